"""The branches migration turns each existing conversation's flat history into one branch."""

from __future__ import annotations

from typing import Any

import pytest

BEFORE = [("conversations", "0004_conversation_organization_required")]
AFTER = [("conversations", "0005_message_branches")]


@pytest.mark.django_db(transaction=True)
def test_existing_messages_are_chained_by_id_and_the_last_is_the_active_leaf(migrator: Any) -> None:
    old = migrator.apply_initial_migration(BEFORE)
    User = old.apps.get_model("accounts", "User")
    Provider = old.apps.get_model("llm", "Provider")
    LLMModel = old.apps.get_model("llm", "LLMModel")
    Conversation = old.apps.get_model("conversations", "Conversation")
    Message = old.apps.get_model("conversations", "Message")
    owner = User.objects.create(username="max")
    provider = Provider.objects.create(name="sim", kind="openai_compatible", base_url="http://127.0.0.1:1/v1")
    model = LLMModel.objects.create(provider=provider, name="m1", upstream_model="m1")
    first = Conversation.objects.create(owner=owner, model=model, title="first")
    second = Conversation.objects.create(owner=owner, model=model, title="second")
    empty = Conversation.objects.create(owner=owner, model=model, title="empty")
    written: dict[int, list[int]] = {first.pk: [], second.pk: []}
    for i in range(5):  # interleaved, as concurrent chats write them
        for conversation in (first, second):
            role = ("user", "assistant")[i % 2]
            written[conversation.pk].append(
                Message.objects.create(conversation=conversation, role=role, content=f"{i}").pk
            )

    new = migrator.apply_tested_migration(AFTER)
    Conversation = new.apps.get_model("conversations", "Conversation")
    Message = new.apps.get_model("conversations", "Message")

    for conversation_id, message_ids in written.items():
        parents = dict(Message.objects.filter(conversation_id=conversation_id).values_list("id", "parent_id"))
        assert parents == dict(zip(message_ids, [None, *message_ids[:-1]], strict=True))
        assert Conversation.objects.get(pk=conversation_id).active_leaf_id == message_ids[-1]
    assert Conversation.objects.get(pk=empty.pk).active_leaf_id is None
