from django.db import migrations, models

HELP = "model and alias names members and keys may use (a model's name allows its aliases); empty for all"


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0016_team_keys_budgets"),
    ]

    operations = [
        migrations.AddField(
            model_name="organization",
            name="allowed_models",
            field=models.JSONField(blank=True, default=list, help_text=HELP),
        ),
        migrations.AddField(
            model_name="team",
            name="allowed_models",
            field=models.JSONField(blank=True, default=list, help_text=HELP),
        ),
    ]
