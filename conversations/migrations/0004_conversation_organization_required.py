"""Conversations must belong to an organization (0003 filled them)."""

import django.db.models.deletion
from django.db import migrations, models

import accounts.models


class Migration(migrations.Migration):
    dependencies = [("conversations", "0003_conversation_organization")]

    operations = [
        migrations.AlterField(
            model_name="conversation",
            name="organization",
            field=models.ForeignKey(
                default=accounts.models.default_organization_id,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="conversations",
                to="accounts.organization",
            ),
        ),
        migrations.AddIndex(
            model_name="conversation",
            index=models.Index(fields=["organization", "-updated_at"], name="conversatio_organiz_410911_idx"),
        ),
    ]
