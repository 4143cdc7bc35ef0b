"""API keys, budgets and usage records must belong to an organization (0013 filled them)."""

import django.db.models.deletion
from django.db import migrations, models

import accounts.models


class Migration(migrations.Migration):
    dependencies = [("accounts", "0013_default_organization")]

    operations = [
        migrations.AlterField(
            model_name=model_name,
            name="organization",
            field=models.ForeignKey(
                default=accounts.models.default_organization_id,
                on_delete=django.db.models.deletion.PROTECT,
                related_name=related_name,
                to="accounts.organization",
            ),
        )
        for model_name, related_name in (
            ("apikey", "api_keys"),
            ("budget", "budgets"),
            ("usagerecord", "usage_records"),
        )
    ]
