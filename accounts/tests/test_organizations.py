"""Organizations: every user joins the default one; objects created without one belong to it."""

from __future__ import annotations

import pytest

from accounts.models import APIKey, Membership, Organization, User
from accounts.services import api_key_create, membership_join_default_organization
from tests.factories import ConversationFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_a_new_user_joins_the_default_organization_as_a_member() -> None:
    user = UserFactory()
    (membership,) = Membership.objects.filter(user=user)
    assert membership.organization == Organization.objects.default()
    assert membership.organization.slug == "default"
    assert (membership.role, membership.is_default) == (Membership.Role.MEMBER, True)


@pytest.mark.parametrize(
    ("fields", "role"),
    [
        ({"is_superuser": True, "is_staff": True}, Membership.Role.OWNER),
        ({"role": User.Role.ADMIN}, Membership.Role.ADMIN),
    ],
)
def test_the_membership_role_follows_what_the_user_could_do(fields: dict, role: str) -> None:
    user = UserFactory(**fields)
    assert Membership.objects.get(user=user).role == role


def test_joining_twice_changes_nothing() -> None:
    other = Organization.objects.create(name="Acme", slug="acme")
    user = UserFactory()
    Membership.objects.filter(user=user).delete()
    Membership.objects.create(user=user, organization=other, role=Membership.Role.VIEWER, is_default=True)

    first = membership_join_default_organization(user=user)
    again = membership_join_default_organization(user=user)

    assert first.pk == again.pk
    # The user's own default (acme) stays; the default organization is one more membership.
    assert first.is_default is False and first.role == Membership.Role.MEMBER
    assert Membership.objects.get(user=user, organization=other).is_default is True


def test_objects_created_without_an_organization_belong_to_the_default_one() -> None:
    user = UserFactory()
    created = api_key_create(user=user, name="laptop")
    conversation = ConversationFactory(owner=user)

    default = Organization.objects.default()
    assert APIKey.objects.get(pk=created.api_key.pk).organization_id == default.pk
    assert conversation.organization_id == default.pk
    assert Organization.objects.count() == 1
