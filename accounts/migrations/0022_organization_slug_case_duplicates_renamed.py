"""Rename organization slugs that differ from an older one only in case, before 0023 forbids them.

The oldest organization (lowest id) of each group keeps its slug; each later one becomes
``<slug>-<id>`` (lowercase, cut to fit 64 characters; ``-<n>`` more if that is taken). Lookups by
slug (the ``OpenAI-Organization`` header) are exact, so a client still sending the old slug gets
the answer for an unknown organization, never another tenant's. Each rename is printed so an operator can tell the affected clients.
"""

from typing import Any

from django.db import migrations


def rename_case_duplicates(apps: Any, schema_editor: Any) -> None:
    Organization = apps.get_model("accounts", "Organization")
    organizations = list(Organization.objects.order_by("id").only("id", "slug"))
    taken = {organization.slug.lower() for organization in organizations}
    kept: set[str] = set()
    for organization in organizations:
        key = organization.slug.lower()
        if key not in kept:
            kept.add(key)
            continue
        new_slug, n = key, 0
        while new_slug in taken:  # another organization may already be called "<slug>-<id>"
            suffix = f"-{organization.pk}" + (f"-{n}" if n else "")
            new_slug, n = f"{key[: 64 - len(suffix)]}{suffix}", n + 1
        taken.add(new_slug)
        kept.add(new_slug)
        print(f"\n  organization {organization.pk}: slug {organization.slug!r} renamed {new_slug!r} (case duplicate)")
        Organization.objects.filter(pk=organization.pk).update(slug=new_slug)


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0021_audit_api_key_deleted"),
    ]

    operations = [
        migrations.RunPython(rename_case_duplicates, migrations.RunPython.noop),
    ]
