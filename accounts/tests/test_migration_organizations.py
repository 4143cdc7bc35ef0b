"""The organizations migration moves an existing database into the default organization, losing nothing.

Built at the migration before organizations existed (django-test-migrations), filled with users of
every kind, their keys, budgets, usage and conversations, then migrated forward.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

BEFORE = [
    ("accounts", "0011_user_lifecycle"),
    ("conversations", "0002_reply_recovery"),
    ("llm", "0008_model_alias"),
]
AFTER = [
    ("accounts", "0014_organization_required"),
    ("conversations", "0004_conversation_organization_required"),
]


def _fill(apps: Any) -> dict[str, int]:
    """Write the pre-organization rows; return the ids the test checks afterwards."""
    User = apps.get_model("accounts", "User")
    APIKey = apps.get_model("accounts", "APIKey")
    Budget = apps.get_model("accounts", "Budget")
    UsageRecord = apps.get_model("accounts", "UsageRecord")
    Provider = apps.get_model("llm", "Provider")
    LLMModel = apps.get_model("llm", "LLMModel")
    Conversation = apps.get_model("conversations", "Conversation")
    Message = apps.get_model("conversations", "Message")

    root = User.objects.create(username="root", is_superuser=True, is_staff=True, role="member")
    admin = User.objects.create(username="ada", role="admin")
    member = User.objects.create(username="max", role="member")
    key = APIKey.objects.create(user=member, name="laptop", prefix="sk-abc", key_hash="a" * 64)
    APIKey.objects.create(user=admin, name="ci", prefix="sk-def", key_hash="b" * 64)
    provider = Provider.objects.create(name="sim", kind="openai_compatible", base_url="http://127.0.0.1:1/v1")
    model = LLMModel.objects.create(provider=provider, name="m1", upstream_model="m1")
    conversation = Conversation.objects.create(owner=member, model=model, title="kept")
    Message.objects.create(conversation=conversation, role="user", content="hello")
    Message.objects.create(conversation=conversation, role="assistant", content="hi there", status="completed")
    UsageRecord.objects.create(
        request_id="r1", user=member, api_key=key, model=model, model_name="m1", source="openai_api",
        prompt_tokens=10, completion_tokens=5, cost=Decimal("0.00012"), finish_status="completed",
    )  # fmt: skip
    Budget.objects.create(name="monthly", subject_kind="user", subject_id=member.pk, limit_usd=Decimal("5"))
    return {"root": root.pk, "admin": admin.pk, "member": member.pk, "conversation": conversation.pk}


@pytest.mark.django_db(transaction=True)
def test_existing_data_moves_into_the_default_organization(migrator: Any) -> None:
    old = migrator.apply_initial_migration(BEFORE)
    ids = _fill(old.apps)

    new = migrator.apply_tested_migration(AFTER)
    Organization = new.apps.get_model("accounts", "Organization")
    Membership = new.apps.get_model("accounts", "Membership")
    (organization,) = Organization.objects.all()
    assert organization.slug == "default"
    roles = {m.user_id: (m.role, m.is_default) for m in Membership.objects.filter(organization=organization)}
    assert roles == {
        ids["root"]: ("owner", True),
        ids["admin"]: ("admin", True),
        ids["member"]: ("member", True),
    }
    for app_label, model_name, count in (
        ("accounts", "APIKey", 2),
        ("accounts", "Budget", 1),
        ("accounts", "UsageRecord", 1),
        ("conversations", "Conversation", 1),
    ):
        rows = new.apps.get_model(app_label, model_name).objects.all()
        assert rows.count() == count, model_name
        assert set(rows.values_list("organization_id", flat=True)) == {organization.pk}, model_name
    # Nothing else changed: the conversation keeps its messages, the usage row its figures.
    conversation = new.apps.get_model("conversations", "Conversation").objects.get(pk=ids["conversation"])
    assert [m.content for m in conversation.messages.order_by("id")] == ["hello", "hi there"]
    record = new.apps.get_model("accounts", "UsageRecord").objects.get()
    assert (record.prompt_tokens, record.completion_tokens, record.cost) == (10, 5, Decimal("0.00012000"))
    migrator.reset()


@pytest.mark.django_db(transaction=True)
def test_the_migration_goes_back(migrator: Any) -> None:
    old = migrator.apply_initial_migration(BEFORE)
    _fill(old.apps)
    migrator.apply_tested_migration(AFTER)

    back = migrator.apply_tested_migration(BEFORE)
    assert back.apps.get_model("accounts", "APIKey").objects.count() == 2
    assert back.apps.get_model("conversations", "Conversation").objects.count() == 1
    migrator.reset()
