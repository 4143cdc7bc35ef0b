"""Conversations belong to an organization: existing ones to the default organization.

Added nullable and filled here, made required by 0004: in another transaction, since PostgreSQL
refuses to alter a table with the deferred foreign-key checks of this one's UPDATE pending.
"""

import django.db.models.deletion
from django.db import migrations, models


def forwards(apps, schema_editor):
    Organization = apps.get_model("accounts", "Organization")
    organization, _ = Organization.objects.get_or_create(slug="default", defaults={"name": "Default organization"})
    apps.get_model("conversations", "Conversation").objects.filter(organization__isnull=True).update(
        organization=organization
    )


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0013_default_organization"),
        ("conversations", "0002_reply_recovery"),
    ]

    operations = [
        migrations.AddField(
            model_name="conversation",
            name="organization",
            field=models.ForeignKey(
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="conversations",
                to="accounts.organization",
            ),
        ),
        migrations.RunPython(forwards, migrations.RunPython.noop),
    ]
