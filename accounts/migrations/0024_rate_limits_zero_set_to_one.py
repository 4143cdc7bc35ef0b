"""Set rate limits stored as 0 to 1, before 0025 forbids 0 (empty is "no limit"; 1 the least there is).

A limit of 0 admitted nothing; 1 is the nearest limit allowed, and no subject becomes unlimited.
Each change is printed so an operator can revisit it (deactivate a user, revoke a key instead).
"""

from typing import Any

from django.db import migrations

FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")


def zero_set_to_one(apps: Any, schema_editor: Any) -> None:
    for model_name in ("User", "APIKey", "Organization", "Team"):
        model = apps.get_model("accounts", model_name)
        for field in FIELDS:
            ids = list(model.objects.filter(**{field: 0}).values_list("pk", flat=True))
            if ids:
                model.objects.filter(pk__in=ids).update(**{field: 1})
                print(f"\n  {model_name} {', '.join(map(str, ids))}: {field} 0 set to 1")


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0023_organization_slug_unique_ignoring_case"),
    ]

    operations = [
        migrations.RunPython(zero_set_to_one, migrations.RunPython.noop),
    ]
