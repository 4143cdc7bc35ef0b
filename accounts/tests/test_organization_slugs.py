"""Organization slugs are unique ignoring case: "Acme" and "acme" cannot both exist."""

from __future__ import annotations

from typing import Any

import pytest

from accounts.models import Organization


@pytest.mark.django_db
def test_the_admin_refuses_a_slug_differing_only_in_case_with_a_clear_message(admin_site):
    Organization.objects.create(name="Acme", slug="acme")

    response = admin_site.post(
        "/admin/accounts/organization/add/",
        {
            "name": "Acme again",
            "slug": "ACME",
            "allowed_models": "[]",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 200
    assert "An organization with this slug, ignoring case, already exists." in response.content.decode()
    assert list(Organization.objects.filter(slug__iexact="acme").values_list("slug", flat=True)) == ["acme"]


BEFORE = [("accounts", "0021_audit_api_key_deleted")]
AFTER = [("accounts", "0023_organization_slug_unique_ignoring_case")]


@pytest.mark.django_db(transaction=True)
def test_the_migration_renames_later_case_duplicates_and_keeps_the_oldest(migrator: Any) -> None:
    old = migrator.apply_initial_migration(BEFORE)
    Organization = old.apps.get_model("accounts", "Organization")
    acme = Organization.objects.create(name="Acme", slug="Acme")
    upper = Organization.objects.create(name="ACME", slug="ACME")
    taken = Organization.objects.create(name="Taken", slug=f"acme-{upper.pk}")
    lower = Organization.objects.create(name="acme", slug="acme")

    new = migrator.apply_tested_migration(AFTER)

    slugs = dict(new.apps.get_model("accounts", "Organization").objects.values_list("pk", "slug"))
    assert slugs[acme.pk] == "Acme" and slugs[taken.pk] == f"acme-{upper.pk}"
    assert slugs[upper.pk] == f"acme-{upper.pk}-1" and slugs[lower.pk] == f"acme-{lower.pk}"
    assert len({slug.lower() for slug in slugs.values()}) == len(slugs)
