"""Move existing data into the default organization (slug ``default``).

Every user becomes a member of it (their default organization) with the role that matches what
they could do before: superusers ``owner``, users of the ``admin`` role ``admin``, others
``member``. Every API key, budget and usage record gets it as its organization. Reversible: going
back deletes the memberships and the default organization's link (0012's reverse drops the rest).
"""

from django.db import migrations

DEFAULT_SLUG = "default"


def forwards(apps, schema_editor):
    Organization = apps.get_model("accounts", "Organization")
    Membership = apps.get_model("accounts", "Membership")
    User = apps.get_model("accounts", "User")
    organization, _ = Organization.objects.get_or_create(
        slug=DEFAULT_SLUG, defaults={"name": "Default organization"}
    )
    memberships = []
    for user_id, is_superuser, role in User.objects.values_list("id", "is_superuser", "role").iterator():
        if is_superuser:
            member_role = "owner"
        elif role == "admin":
            member_role = "admin"
        else:
            member_role = "member"
        memberships.append(
            Membership(user_id=user_id, organization=organization, role=member_role, is_default=True)
        )
    Membership.objects.bulk_create(memberships, batch_size=1000, ignore_conflicts=True)
    for model_name in ("APIKey", "Budget", "UsageRecord"):
        apps.get_model("accounts", model_name).objects.filter(organization__isnull=True).update(
            organization=organization
        )


def backwards(apps, schema_editor):
    for model_name in ("APIKey", "Budget", "UsageRecord"):
        apps.get_model("accounts", model_name).objects.update(organization=None)
    apps.get_model("accounts", "Membership").objects.all().delete()


class Migration(migrations.Migration):
    dependencies = [("accounts", "0012_organizations")]

    operations = [migrations.RunPython(forwards, backwards)]
