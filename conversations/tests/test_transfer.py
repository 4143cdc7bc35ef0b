"""Export and import: the JSON export round-trips a conversation's whole tree (its branches, contents
and active path); Markdown shows the active branch; NextChat's backup.json imports idempotently; bad
input is a 400, never a 500; the size limit holds; nobody exports another user's conversation."""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

import pytest
from django.contrib.auth.models import update_last_login
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from accounts.models import Membership, Organization
from conversations.conversation_templates.models import ConversationTemplate
from conversations.models import Conversation, Message
from conversations.selectors import message_path
from conversations.services import message_append
from conversations.sync.services import _imports_serialize
from conversations.tests.test_sync import (
    NULL_FREE_CONVERSATIONS,
    document_with_null_characters,
    many_sessions,
    run_at_once,
)
from conversations.tests.test_sync import _document as nextchat_document
from conversations.tests.test_sync import _masks as nextchat_masks
from llm.models import LLMModel
from llm.selectors import enabled_model_cache
from tests.factories import ConversationFactory, LLMModelFactory, MessageFactory, UserFactory
from tests.kit import assert_error

pytestmark = pytest.mark.django_db

IMPORT = "/api/conversations/import/"


@pytest.fixture
def tree(user, model):
    """u1 → a1 → u2 → a2 (first branch), u2b → a2b (an edit of u2, active), and a1's regeneration a1b."""
    conversation = ConversationFactory(owner=user, model=model, title="Branches", system_prompt="Be brief.")
    Conversation.objects.filter(pk=conversation.pk).update(
        metadata={"project": "x"},
        parameters={"temperature": 0.3, "max_tokens": 100},
        pinned=True,
        archived_at=timezone.now() - dt.timedelta(days=1),
    )
    u1 = message_append(conversation=conversation, role="user", content="one")
    a1 = message_append(
        conversation=conversation, role="assistant", content="reply one", model_name="gpt-test",
        prompt_tokens=5, completion_tokens=7, time_to_first_token_ms=12.5, duration_ms=80.0, finish_reason="stop",
    )  # fmt: skip
    u2 = message_append(conversation=conversation, role="user", content="two")
    message_append(conversation=conversation, role="assistant", content="reply two", status="failed", error="boom")
    MessageFactory(conversation=conversation, parent=u1, role="assistant", content="reply one, again")
    u2b = MessageFactory(conversation=conversation, parent=a1, role="user", content="two, edited")
    a2b = MessageFactory(conversation=conversation, parent=u2b, role="assistant", content="reply *two* b")
    Message.objects.filter(pk=u1.pk).update(created_at=timezone.now() - dt.timedelta(days=3))
    Conversation.objects.filter(pk=conversation.pk).update(active_leaf=a2b)
    conversation.refresh_from_db()
    assert u2.pk < u2b.pk
    return conversation


def shape(conversation: Conversation) -> tuple:
    """The tree with ids replaced by positions: comparable across an import."""
    messages = list(conversation.messages.order_by("id"))
    position = {m.pk: i for i, m in enumerate(messages)}
    nodes = [
        (
            position.get(m.parent_id), m.role, m.content, m.status, m.model_name, m.finish_reason, m.prompt_tokens,
            m.completion_tokens, m.time_to_first_token_ms, m.duration_ms, m.error, m.error_code, m.created_at,
        )
        for m in messages
    ]  # fmt: skip
    active = [m.content for m in message_path(conversation=conversation)]
    header = (
        conversation.title,
        conversation.system_prompt,
        conversation.model.name,
        conversation.metadata,
        conversation.parameters,
        conversation.pinned,
        conversation.archived_at,
    )
    return header, nodes, position.get(conversation.active_leaf_id), active


def test_export_then_import_round_trips_the_tree(auth_client, tree):
    exported = auth_client.get(f"/api/conversations/{tree.pk}/export/?format=json")
    assert exported.status_code == 200 and exported["Content-Type"] == "application/json"
    assert "attachment" in exported["Content-Disposition"]
    document = exported.json()
    assert document["format"] == "chatbackend.conversations" and document["format_version"] == 1
    [item] = document["conversations"]
    assert len(item["messages"]) == 7 and item["active_leaf"] == tree.active_leaf_id
    assert {"id", "parent_id", "role", "content", "status", "model", "prompt_tokens", "created_at"} <= set(
        item["messages"][0]
    )
    assert item["parameters"] == {"temperature": 0.3, "max_tokens": 100} and item["pinned"] is True
    assert item["archived_at"] == tree.archived_at.isoformat().replace("+00:00", "Z")

    imported = auth_client.post(IMPORT, document, format="json")
    assert imported.status_code == 201, imported.content
    body = imported.json()
    assert body["imported_from"] == "chatbackend" and body["models_replaced"] == []
    [new] = body["conversations"]
    copy = Conversation.objects.get(pk=new["id"])
    assert copy.pk != tree.pk and copy.owner_id == tree.owner_id
    assert not set(copy.messages.values_list("id", flat=True)) & set(tree.messages.values_list("id", flat=True))
    assert shape(copy) == shape(tree)
    assert (new["parameters"], new["pinned"], new["archived"]) == ({"temperature": 0.3, "max_tokens": 100}, True, True)
    assert new["active_leaf"] == copy.active_leaf_id and copy.created_at == tree.created_at

    # The copy exports as the original did, ids aside.
    again = auth_client.get(f"/api/conversations/{copy.pk}/export/").json()["conversations"][0]
    strip = lambda c: [{k: v for k, v in m.items() if k not in ("id", "parent_id")} for m in c["messages"]]  # noqa: E731
    assert strip(again) == strip(item)


def test_markdown_export_shows_the_active_branch(auth_client, tree):
    response = auth_client.get(f"/api/conversations/{tree.pk}/export/?format=markdown")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/markdown")
    text = response.content.decode()
    assert text.startswith("# Branches") and "> Be brief." in text
    assert text.index("one") < text.index("two, edited") < text.index("reply *two* b")
    assert "reply one, again" not in text and "reply two\n" not in text
    assert "3 message(s) on other branches" in text
    assert auth_client.get(f"/api/conversations/{tree.pk}/export/", HTTP_ACCEPT="text/markdown")[
        "Content-Type"
    ].startswith("text/markdown")


def test_export_of_everything_is_the_callers_own_in_the_organization(auth_client, tree, user, model, other_user):
    mine = ConversationFactory(owner=user, model=model, title="second")
    ConversationFactory(owner=other_user, model=model, title="not mine")
    elsewhere = Organization.objects.create(name="Elsewhere", slug="elsewhere")
    Membership.objects.create(user=user, organization=elsewhere, role=Membership.Role.MEMBER)
    ConversationFactory(owner=user, model=model, organization=elsewhere, title="other organization")
    trashed = ConversationFactory(owner=user, model=model, title="in the trash")
    assert auth_client.delete(f"/api/conversations/{trashed.pk}/").status_code == 204

    response = auth_client.get("/api/conversations/export/?format=json")
    assert response.status_code == 200
    assert [c["id"] for c in response.json()["conversations"]] == [tree.pk, mine.pk]
    assert_error(auth_client.get("/api/conversations/export/?format=markdown"), 400, param="format")


def test_another_users_conversation_is_not_exported(client_for, tree):
    stranger = client_for(UserFactory())
    assert_error(stranger.get(f"/api/conversations/{tree.pk}/export/"), 404)
    assert_error(stranger.get(f"/api/conversations/{tree.pk}/export/?format=markdown"), 404)
    assert_error(stranger.get(f"/api/conversations/{tree.pk}/export/?format=xml"), 400, code="invalid_format")
    assert_error(stranger.get(f"/api/conversations/{tree.pk}/export/?format="), 400, code="invalid_format")
    assert_error(stranger.get("/api/conversations/export/?format="), 400, code="invalid_format")


def test_nextchat_backup_json_is_imported_idempotently(auth_client, user):
    LLMModelFactory(name="gpt-4o-mini")
    LLMModelFactory(name="aaa-first-model")
    backup = nextchat_document()

    first = auth_client.post(IMPORT, backup, format="json")
    assert first.status_code == 201, first.content
    assert first.json()["imported_from"] == "nextchat"
    ids = [c["id"] for c in first.json()["conversations"]]
    assert len(ids) == 2  # the empty session is skipped, as NextChat skips it
    lisbon = Conversation.objects.get(pk=ids[0])
    assert lisbon.title == "Trip to Lisbon" and lisbon.model.name == "gpt-4o-mini"
    assert [m.content for m in message_path(conversation=lisbon)] == ["Plan a trip to Lisbon", "Day 1: Alfama."]

    second = auth_client.post(IMPORT, backup, format="json")
    assert [c["id"] for c in second.json()["conversations"]] == ids
    assert Conversation.objects.filter(owner=user).count() == 2 and Message.objects.count() == 3
    assert first.json()["templates_imported"] == 0  # its mask-store holds none


def test_a_nextchat_backups_masks_become_templates_idempotently(auth_client, user):
    LLMModelFactory(name="gpt-4o-mini")
    LLMModelFactory(name="aaa-first-model")
    backup = nextchat_document()
    backup["mask-store"]["masks"] = nextchat_masks()

    for _ in range(2):
        response = auth_client.post(IMPORT, backup, format="json")
        assert response.status_code == 201, response.content
        assert response.json()["templates_imported"] == 3  # the nameless mask is skipped
        assert sorted(ConversationTemplate.objects.filter(owner=user).values_list("name", flat=True)) == [
            "Follows the settings",
            "Keyed only",
            "Latin tutor",
        ]


def test_an_unusable_model_falls_back_and_is_reported(auth_client, tree, user):
    document = auth_client.get(f"/api/conversations/{tree.pk}/export/").json()
    document["conversations"][0]["model"] = "no-such-model"
    response = auth_client.post(IMPORT, document, format="json")
    assert response.status_code == 201
    assert response.json()["models_replaced"] == [{"requested": "no-such-model", "model": "gpt-test"}]
    assert response.json()["conversations"][0]["model"] == "gpt-test"


def _one(**conversation) -> dict:
    messages = [
        {"id": 1, "parent_id": None, "role": "user", "content": "hi"},
        {"id": 2, "parent_id": 1, "role": "assistant", "content": "hello"},
    ]
    item = {"title": "t", "model": "gpt-test", "messages": messages, "active_leaf": 2, **conversation}
    return {"format": "chatbackend.conversations", "format_version": 1, "conversations": [item]}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([], "invalid_import"),
        ({"anything": 1}, "invalid_import"),
        ({"format": "chatbackend.conversations", "format_version": 2, "conversations": []}, None),
        ({"format": "chatbackend.conversations", "format_version": 1}, None),
        (_one(messages=[{"id": 1, "parent_id": 1, "role": "user", "content": "x"}], active_leaf=None), None),
        (_one(messages=[{"id": 1, "parent_id": 9, "role": "user", "content": "x"}], active_leaf=None), None),
        (
            _one(
                messages=[
                    {"id": 1, "parent_id": None, "role": "user", "content": "x"},
                    {"id": 1, "parent_id": None, "role": "user", "content": "y"},
                ],
                active_leaf=1,
            ),
            "invalid_import",
        ),
        (_one(active_leaf=3), "invalid_import"),
        (_one(messages=[{"id": 1, "parent_id": None, "role": "wizard", "content": "x"}], active_leaf=1), None),
        (_one(messages=[{"id": 1, "parent_id": None, "role": "user", "content": "\x00"}], active_leaf=1), None),
        (_one(messages=[{"id": 2**70, "parent_id": None, "role": "user", "content": "x"}], active_leaf=1), None),
        (_one(messages="nope"), None),
        (_one(metadata={"k": {"nested": True}}), None),
        (_one(title="x" * 201), None),
        (_one(model=7), None),
        (_one(parameters={"temperature": 2.5}), None),
        (_one(parameters={"max_tokens": 1.5}), None),
        (_one(parameters={"top_p": "1"}), None),
        (_one(parameters=[]), None),
        (_one(parameters=None), None),
        (_one(pinned="true"), None),
        (_one(archived_at="yesterday"), None),
        ({"chat-next-web-store": "not an object"}, "invalid_import"),
    ],
)
def test_bad_input_is_a_400(auth_client, model, body, code):
    response = auth_client.post(IMPORT, body, format="json")
    error = assert_error(response, 400)
    assert code is None or error["code"] == code
    assert not Conversation.objects.exists()


@pytest.mark.parametrize(
    ("conversation", "param"),
    [
        ({"parameters": {"temperature": 2.5}}, "conversations.0.parameters.temperature"),
        ({"parameters": {"max_tokens": 0}}, "conversations.0.parameters.max_tokens"),
        ({"pinned": 1}, "conversations.0.pinned"),
        ({"archived_at": "yesterday"}, "conversations.0.archived_at"),
    ],
)
def test_bad_parameters_pinned_or_archived_at_are_a_400_naming_the_field(auth_client, model, conversation, param):
    assert_error(auth_client.post(IMPORT, _one(**conversation), format="json"), 400, code="invalid", param=param)
    assert not Conversation.objects.exists()


def test_an_export_without_parameters_pinned_or_archived_at_imports_with_their_defaults(auth_client, model):
    """Exports written before these fields were (and hand-written ones) still import."""
    document = _one()
    assert not {"parameters", "pinned", "archived_at"} & set(document["conversations"][0])
    response = auth_client.post(IMPORT, document, format="json")
    assert response.status_code == 201, response.content
    conversation = Conversation.objects.get()
    assert (conversation.parameters, conversation.pinned, conversation.archived_at) == ({}, False, None)
    # Null parameters are the model's defaults: left out, as a template leaves them out.
    document["conversations"][0].update(parameters={"temperature": None, "top_p": 0.5, "seed": 3}, pinned=False)
    response = auth_client.post(IMPORT, document, format="json")
    assert response.status_code == 201, response.content
    assert Conversation.objects.get(pk=response.json()["conversations"][0]["id"]).parameters == {"top_p": 0.5}


def test_a_cycle_is_a_400(auth_client, model):
    cycle = [
        {"id": 1, "parent_id": 2, "role": "user", "content": "x"},
        {"id": 2, "parent_id": 1, "role": "assistant", "content": "y"},
    ]
    assert_error(
        auth_client.post(IMPORT, _one(messages=cycle, active_leaf=1), format="json"), 400, code="invalid_import"
    )


def test_invalid_json_and_other_media_types_are_400_or_415(auth_client, model):
    assert_error(auth_client.generic("POST", IMPORT, b"{not json", content_type="application/json"), 400)
    assert_error(auth_client.generic("POST", IMPORT, b"", content_type="application/json"), 400)
    assert auth_client.generic("POST", IMPORT, b"a=b", content_type="text/plain").status_code == 415


def test_the_size_limit_is_sync_max_document_bytes_not_djangos(auth_client, model, settings):
    """A NextChat state is often larger than DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB), the limit of other
    bodies: the import's own limit applies instead, read by the one JSON parser (a view's
    ``request_body_limit``), whose error names the import."""
    body = json.dumps(_one()).encode()
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    assert len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    settings.SYNC_MAX_DOCUMENT_BYTES = len(body) - 1
    response = auth_client.generic("POST", IMPORT, body, content_type="application/json")
    error = assert_error(response, 413, code="import_too_large")
    assert f"({len(body)} bytes) is larger than this server imports ({len(body) - 1} bytes" in error["message"]
    assert not Conversation.objects.exists()
    settings.SYNC_MAX_DOCUMENT_BYTES = len(body)
    assert auth_client.generic("POST", IMPORT, body, content_type="application/json").status_code == 201


def test_a_streaming_message_is_imported_cancelled_and_a_missing_leaf_is_the_last(auth_client, model):
    messages = [
        {"id": 10, "parent_id": None, "role": "user", "content": "hi"},
        {"id": 11, "parent_id": 10, "role": "assistant", "content": "hal", "status": "streaming"},
    ]
    response = auth_client.post(IMPORT, _one(messages=messages, active_leaf=None), format="json")
    assert response.status_code == 201
    conversation = Conversation.objects.get()
    assert [(m.content, m.status) for m in message_path(conversation=conversation)] == [
        ("hi", "completed"),
        ("hal", "cancelled"),
    ]


def test_a_session_repeated_in_one_backup_is_one_conversation(auth_client, user):
    LLMModelFactory(name="gpt-4o-mini")
    backup = nextchat_document()
    sessions = backup["chat-next-web-store"]["sessions"]
    sessions.append(json.loads(json.dumps(sessions[0])))
    response = auth_client.post(IMPORT, backup, format="json")
    assert response.status_code == 201, response.content
    assert Conversation.objects.filter(owner=user, external_id="sess-lisbon").count() == 1


def test_without_a_usable_model_nothing_is_imported(auth_client, user, tree):
    document = auth_client.get(f"/api/conversations/{tree.pk}/export/").json()
    LLMModel.objects.update(enabled=False)
    enabled_model_cache.clear()
    assert_error(auth_client.post(IMPORT, document, format="json"), 400)
    assert_error(auth_client.post(IMPORT, nextchat_document(), format="json"), 400)
    assert Conversation.objects.count() == 1


def test_a_nextchat_backup_with_null_characters_imports_without_them(auth_client, user):
    """NextChat's backup.json is imported as a synced document is: null characters (which
    PostgreSQL cannot store) are left out of every text, never a 500; importing it again changes
    nothing (the ids, stripped, still match)."""
    LLMModelFactory(name="gpt-4o-mini")
    LLMModelFactory(name="aaa-first-model")
    body = json.dumps(document_with_null_characters())
    assert "\\u0000" in body
    for _ in range(2):
        response = auth_client.post(IMPORT, data=body, content_type="application/json")
        assert response.status_code == 201, response.content
        assert [c["title"] for c in response.json()["conversations"]] == ["Trip to Lisbon", "Images"]
    conversations = Conversation.objects.filter(owner=user).order_by("external_id")
    assert [
        (c.external_id, c.title, c.model.name, [(m.external_id, m.role, m.content) for m in c.messages.all()])
        for c in conversations
    ] == NULL_FREE_CONVERSATIONS
    assert conversations[0].system_prompt == "You are a travel agent."
    assert conversations[0].messages.get(external_id="msg-a1").model_name == "gpt-4o-mini"


@pytest.mark.parametrize(
    ("conversation", "message", "param"),
    [
        ({"title": "a\x00b"}, {}, "conversations.0.title"),
        ({"system_prompt": "\x00"}, {}, "conversations.0.system_prompt"),
        ({"model": "gpt-test\x00"}, {}, "conversations.0.model"),
        ({"metadata": {"k": "v\x00"}}, {}, "conversations.0.metadata.k"),
        ({"metadata": {"k\x00": "v"}}, {}, "conversations.0.metadata"),
        ({}, {"content": "hi\x00"}, "conversations.0.messages.1.content"),
        ({}, {"model": "\x00"}, "conversations.0.messages.1.model"),
        ({}, {"finish_reason": "stop\x00"}, "conversations.0.messages.1.finish_reason"),
        ({}, {"error": "\x00"}, "conversations.0.messages.1.error"),
        ({}, {"error_code": "\x00"}, "conversations.0.messages.1.error_code"),
    ],
)
def test_null_characters_in_our_export_are_a_400_naming_the_field(auth_client, model, conversation, message, param):
    document = _one(**conversation)
    document["conversations"][0]["messages"][1].update(message)
    body = json.dumps(document)
    assert "\\u0000" in body
    assert_error(auth_client.post(IMPORT, data=body, content_type="application/json"), 400, param=param)
    assert not Conversation.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_imports_of_one_backup_make_one_conversation_per_session(client_for, user):
    """Two imports of one backup.json at once: each finds the other's conversations or waits for
    them (one owner's NextChat imports are serialized), never a copy, never a 500."""
    LLMModelFactory(name="gpt-4o-mini")
    body = json.dumps(many_sessions(60))

    def post() -> Any:
        return client_for(user).post(IMPORT, data=body, content_type="application/json")

    responses = run_at_once(post, post)
    assert [r.status_code for r in responses] == [201, 201], [r.content[:300] for r in responses]
    assert [[c["id"] for c in r.json()["conversations"]] for r in responses][0] == [
        c["id"] for c in responses[1].json()["conversations"]
    ]
    conversations = Conversation.objects.filter(owner=user)
    assert conversations.count() == 60
    assert sorted(conversations.values_list("external_id", flat=True)) == sorted(f"sess-{i}" for i in range(60))
    assert Message.objects.filter(conversation__owner=user).count() == 120


@pytest.mark.django_db(transaction=True)
def test_an_import_in_progress_does_not_hold_up_a_sign_in_but_holds_up_another_import(user):
    """One owner's imports wait for each other (``_imports_serialize``); the lock is not the user's
    row, which a sign-in updates (``last_login``)."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite's IMMEDIATE transactions serialize every writer")
    holding, done = threading.Event(), threading.Event()

    def importing() -> None:
        try:
            with transaction.atomic():
                _imports_serialize(user)
                holding.set()
                done.wait(10)
        finally:
            connection.close()

    importer = threading.Thread(target=importing)
    importer.start()
    try:
        assert holding.wait(10)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")
            update_last_login(None, user)  # what a sign-in writes: not held up
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '200ms'")
            with pytest.raises(OperationalError, match="lock timeout"), transaction.atomic():
                _imports_serialize(user)  # another import of the same owner waits
            _imports_serialize(UserFactory())  # another owner's does not
    finally:
        done.set()
        importer.join()
    user.refresh_from_db()
    assert user.last_login is not None
