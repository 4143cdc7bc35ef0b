"""The audit log over REST: an organization's admins read their organization's events only."""

from __future__ import annotations

import pytest

from accounts.audit import audit_record
from accounts.models import AuditEvent, Membership, Organization
from accounts.services import api_key_create
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

Action = AuditEvent.Action


def test_an_event_belongs_to_its_objects_organization() -> None:
    acme = Organization.objects.create(name="Acme", slug="acme")
    user = UserFactory()
    Membership.objects.create(user=user, organization=acme)
    created = api_key_create(user=user, name="ci", organization=acme)

    row = AuditEvent.objects.get(action=Action.API_KEY_CREATED)
    assert row.object_id == str(created.api_key.pk)
    assert row.organization == acme


def test_organization_admins_read_their_organizations_events_only(client_for) -> None:
    acme = Organization.objects.create(name="Acme", slug="acme")
    boss = UserFactory()  # a member of the default organization, an admin of acme
    Membership.objects.create(user=boss, organization=acme, role=Membership.Role.ADMIN)
    in_acme = audit_record(action=Action.BUDGET_CREATED, actor=boss, obj=acme)
    audit_record(action=Action.BUDGET_CREATED, actor=UserFactory())  # the default organization's

    client = client_for(boss)
    response = client.get("/api/audit-log/", headers={"OpenAI-Organization": "acme"})
    assert response.status_code == 200, response.content
    assert [row["id"] for row in response.json()["results"]] == [in_acme.pk]
    # Acting in the default organization, where boss is a plain member: refused.
    assert client.get("/api/audit-log/").status_code == 403


def test_a_role_changed_on_the_organizations_admin_page_is_one_row(admin_site, superuser) -> None:
    acme = Organization.objects.create(name="Acme", slug="acme")
    member = UserFactory()
    membership = Membership.objects.create(user=member, organization=acme)
    data = {
        "name": "Acme",
        "slug": "acme",
        "memberships-TOTAL_FORMS": "1",
        "memberships-INITIAL_FORMS": "1",
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
        "memberships-0-id": str(membership.pk),
        "memberships-0-organization": str(acme.pk),
        "memberships-0-user": str(member.pk),
        "memberships-0-role": "admin",
    }

    response = admin_site.post(f"/admin/accounts/organization/{acme.pk}/change/", data)

    assert response.status_code == 302, response.content.decode()[:3000]
    (row,) = AuditEvent.objects.filter(action=Action.MEMBERSHIP_UPDATED)
    assert (row.actor, row.organization, row.object_id) == (superuser, acme, str(membership.pk))
    assert (row.before, row.after) == ({"role": "member"}, {"role": "admin"})


def test_platform_objects_belong_to_no_organization(superuser) -> None:
    from tests.factories import ProviderFactory

    provider = ProviderFactory()
    row = audit_record(action=Action.PROVIDER_UPDATED, actor=superuser, obj=provider)
    assert row.organization is None
