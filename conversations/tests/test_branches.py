"""Branches without an upstream: the tree's services and selectors, the tree, branch reads, switching,
permissions, and a 10,000-message conversation read in as many queries as a 10-message one.

The replies' side (edit and regenerate streaming, what the upstream receives) is in
``test_branches_replies.py``.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.authentication import principal_for
from chatbackend.errors import ApplicationError, NotFoundError
from conversations.models import Conversation, Message
from conversations.selectors import (
    history_for_upstream,
    message_latest_leaf_id,
    message_path,
    message_sibling_ids,
)
from conversations.services import message_append, reply_edit_start, reply_regenerate_start, reply_start
from tests.factories import ConversationFactory, MessageFactory

pytestmark = pytest.mark.django_db


def ids(messages) -> list[int]:
    return [m.pk for m in messages]


def branch(conversation, role_contents: list[tuple[str, str]], *, parent=None) -> list[Message]:
    """Write ``role_contents`` as a chain under ``parent`` (None: a root), without moving the leaf."""
    written = []
    for role, content in role_contents:
        parent = MessageFactory(conversation=conversation, parent=parent, role=role, content=content)
        written.append(parent)
    return written


@pytest.fixture
def tree(user, sim_model):
    """u1 → a1 → u2 → a2 (the first branch), and an edit of u2: u2b → a2b (the active one).

    Returns the conversation and its messages by name.
    """
    conversation = ConversationFactory(owner=user, model=sim_model, system_prompt="Be brief.")
    u1 = message_append(conversation=conversation, role="user", content="one")
    a1 = message_append(conversation=conversation, role="assistant", content="reply one")
    u2 = message_append(conversation=conversation, role="user", content="two")
    a2 = message_append(conversation=conversation, role="assistant", content="reply two")
    u2b, a2b = branch(conversation, [("user", "two, edited"), ("assistant", "reply two b")], parent=a1)
    Conversation.objects.filter(pk=conversation.pk).update(active_leaf=a2b)
    conversation.refresh_from_db()
    return conversation, {"u1": u1, "a1": a1, "u2": u2, "a2": a2, "u2b": u2b, "a2b": a2b}


# --- Services and selectors -------------------------------------------------------------------


def test_message_append_chains_messages_and_moves_the_active_leaf(user, sim_model):
    conversation = ConversationFactory(owner=user, model=sim_model)
    first = message_append(conversation=conversation, role="user", content="hi")
    second = message_append(conversation=conversation, role="assistant", content="hello")

    assert (first.parent_id, second.parent_id) == (None, first.pk)
    conversation.refresh_from_db()
    assert conversation.active_leaf_id == second.pk


def test_the_path_query_names_the_message_table():
    # selectors.PATH_SQL and LATEST_LEAF_SQL spell the table out.
    assert Message._meta.db_table == "conversations_message"


def test_message_path_is_the_active_branch_root_first(tree):
    conversation, m = tree

    assert ids(message_path(conversation=conversation)) == [m["u1"].pk, m["a1"].pk, m["u2b"].pk, m["a2b"].pk]
    assert ids(message_path(conversation=conversation, leaf_id=m["a2"].pk)) == [
        m["u1"].pk,
        m["a1"].pk,
        m["u2"].pk,
        m["a2"].pk,
    ]
    assert ids(message_path(conversation=conversation, leaf_id=m["a1"].pk)) == [m["u1"].pk, m["a1"].pk]


def test_message_path_never_crosses_into_another_conversation(tree, user, sim_model):
    conversation, m = tree
    other = ConversationFactory(owner=user, model=sim_model)

    assert list(message_path(conversation=other, leaf_id=m["a2"].pk)) == []
    assert list(message_path(conversation=ConversationFactory(owner=user, model=sim_model))) == []


def test_history_for_upstream_is_the_active_path_only(tree):
    conversation, m = tree

    assert history_for_upstream(conversation=conversation) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "reply one"},
        {"role": "user", "content": "two, edited"},
        {"role": "assistant", "content": "reply two b"},
    ]
    assert [turn["content"] for turn in history_for_upstream(conversation=conversation, leaf_id=m["u2"].pk)] == [
        "Be brief.",
        "one",
        "reply one",
        "two",
    ]


def test_message_sibling_ids_in_one_query(tree, django_assert_num_queries):
    conversation, m = tree
    root_edit = MessageFactory(conversation=conversation, parent=None, role="user", content="one, again")
    messages = [m["u1"], m["a1"], m["u2"], m["a2b"], root_edit]

    with django_assert_num_queries(1):
        siblings = message_sibling_ids(messages=messages)

    assert siblings[m["u1"].pk] == [m["u1"].pk, root_edit.pk] == siblings[root_edit.pk]
    assert siblings[m["a1"].pk] == [m["a1"].pk]
    assert siblings[m["u2"].pk] == [m["u2"].pk, m["u2b"].pk]
    assert siblings[m["a2b"].pk] == [m["a2b"].pk]


def test_message_latest_leaf_follows_the_latest_child(tree):
    conversation, m = tree

    assert message_latest_leaf_id(message=m["u1"]) == m["a2b"].pk  # a1's latest child is u2b
    assert message_latest_leaf_id(message=m["u2"]) == m["a2"].pk
    assert message_latest_leaf_id(message=m["a2"]) == m["a2"].pk


def test_reply_start_follows_the_active_leaf_and_sends_its_path(tree, user):
    conversation, m = tree

    plan = reply_start(actor=principal_for(user=user), conversation_id=conversation.pk, content="three")

    question = Message.objects.get(pk=plan.user_message_id)
    assert question.parent_id == m["a2b"].pk
    assert Message.objects.get(pk=plan.message_id).parent_id == question.pk
    assert [turn["content"] for turn in plan.request.messages] == [
        "Be brief.",
        "one",
        "reply one",
        "two, edited",
        "reply two b",
        "three",
    ]
    conversation.refresh_from_db()
    assert conversation.active_leaf_id == plan.message_id


def test_reply_edit_start_writes_a_sibling_and_sends_the_path_to_it(tree, user):
    conversation, m = tree

    plan = reply_edit_start(
        actor=principal_for(user=user), conversation_id=conversation.pk, message_id=m["u2"].pk, content="two, again"
    )

    edit = Message.objects.get(pk=plan.user_message_id)
    assert (edit.parent_id, edit.role, edit.content) == (m["a1"].pk, "user", "two, again")
    assert message_sibling_ids(messages=[edit])[edit.pk] == [m["u2"].pk, m["u2b"].pk, edit.pk]
    assert [turn["content"] for turn in plan.request.messages] == ["Be brief.", "one", "reply one", "two, again"]
    assert plan.sibling_ids == [plan.message_id]
    conversation.refresh_from_db()
    assert conversation.active_leaf_id == plan.message_id


def test_reply_regenerate_start_writes_a_sibling_reply_to_the_same_question(tree, user):
    conversation, m = tree
    count = Message.objects.filter(role="user").count()

    plan = reply_regenerate_start(
        actor=principal_for(user=user), conversation_id=conversation.pk, message_id=m["a2"].pk
    )

    assert plan.user_message_id == m["u2"].pk
    assert Message.objects.filter(role="user").count() == count  # no new user message
    assert Message.objects.get(pk=plan.message_id).parent_id == m["u2"].pk
    assert plan.sibling_ids == [m["a2"].pk, plan.message_id]
    assert [turn["content"] for turn in plan.request.messages] == ["Be brief.", "one", "reply one", "two"]
    conversation.refresh_from_db()
    assert conversation.active_leaf_id == plan.message_id


def test_edit_and_regenerate_refuse_the_wrong_kind_of_message(tree, user):
    conversation, m = tree
    actor = principal_for(user=user)

    with pytest.raises(NotFoundError) as edit:
        reply_edit_start(actor=actor, conversation_id=conversation.pk, message_id=m["a1"].pk, content="x")
    with pytest.raises(NotFoundError) as regenerate:
        reply_regenerate_start(actor=actor, conversation_id=conversation.pk, message_id=m["u1"].pk)

    assert edit.value.code == regenerate.value.code == "message_not_found"
    conversation.refresh_from_db()
    assert conversation.active_leaf_id == m["a2b"].pk  # nothing moved


def test_a_refused_reply_gives_the_active_leaf_back(tree, user):
    conversation, m = tree
    actor = principal_for(user=user)
    count = Message.objects.count()

    regenerated = reply_regenerate_start(actor=actor, conversation_id=conversation.pk, message_id=m["a2b"].pk)
    regenerated.refused(ApplicationError("budget", code="insufficient_quota", status=429))
    edited = reply_edit_start(actor=actor, conversation_id=conversation.pk, message_id=m["u1"].pk, content="new")
    edited.refused(ApplicationError("budget", code="insufficient_quota", status=429))

    assert Message.objects.count() == count
    assert Message.objects.filter(pk=m["u2b"].pk).exists()  # a regeneration keeps its user message
    conversation.refresh_from_db()
    assert conversation.active_leaf_id == m["a2b"].pk


def test_purging_a_branched_conversation_deletes_its_tree(tree, auth_client):
    conversation, _ = tree

    assert auth_client.delete(f"/api/conversations/{conversation.pk}/purge/").status_code == 204
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()


# --- API: reads -------------------------------------------------------------------------------


def messages_url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/messages/"


def test_messages_lists_the_active_branch_with_parents_and_siblings(tree, auth_client):
    conversation, m = tree

    results = auth_client.get(messages_url(conversation)).json()["results"]

    assert [r["id"] for r in results] == [m["u1"].pk, m["a1"].pk, m["u2b"].pk, m["a2b"].pk]
    assert [r["parent_id"] for r in results] == [None, m["u1"].pk, m["a1"].pk, m["u2b"].pk]
    assert results[2]["sibling_ids"] == [m["u2"].pk, m["u2b"].pk]  # "2/2"
    assert results[3]["sibling_ids"] == [m["a2b"].pk]


def test_messages_of_another_branch(tree, auth_client):
    conversation, m = tree

    results = auth_client.get(messages_url(conversation), {"branch": m["a2"].pk}).json()["results"]
    assistant = auth_client.get(messages_url(conversation), {"branch": m["a2"].pk, "role": "assistant"}).json()

    assert [r["content"] for r in results] == ["one", "reply one", "two", "reply two"]
    assert [r["id"] for r in assistant["results"]] == [m["a1"].pk, m["a2"].pk]


def test_messages_of_an_unknown_branch_is_a_404_and_a_bad_one_a_400(tree, auth_client, user, sim_model):
    conversation, _ = tree
    elsewhere = MessageFactory(conversation=ConversationFactory(owner=user, model=sim_model))

    missing = auth_client.get(messages_url(conversation), {"branch": elsewhere.pk})
    bad = auth_client.get(messages_url(conversation), {"branch": "abc"})
    empty = auth_client.get(messages_url(conversation), {"branch": ""})
    huge = auth_client.get(messages_url(conversation), {"branch": str(2**63)})

    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "message_not_found")
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "branch")
    assert empty.status_code == huge.status_code == 400


def test_tree_is_compact_and_complete(tree, auth_client):
    conversation, m = tree

    response = auth_client.get(f"/api/conversations/{conversation.pk}/tree/")

    assert response.status_code == 200
    body = response.json()
    assert body["active_leaf"] == m["a2b"].pk
    assert [n["id"] for n in body["messages"]] == sorted(message.pk for message in m.values())
    assert set(body["messages"][0]) == {"id", "parent_id", "role", "status", "created_at"}
    by_id = {n["id"]: n for n in body["messages"]}
    assert by_id[m["u2b"].pk]["parent_id"] == by_id[m["u2"].pk]["parent_id"] == m["a1"].pk


# --- API: switching ---------------------------------------------------------------------------


def test_patch_active_leaf_switches_and_survives_reloads(tree, auth_client):
    conversation, m = tree

    response = auth_client.patch(f"/api/conversations/{conversation.pk}/", {"active_leaf": m["a2"].pk}, format="json")

    assert (response.status_code, response.json()["active_leaf"]) == (200, m["a2"].pk)
    assert auth_client.get(f"/api/conversations/{conversation.pk}/").json()["active_leaf"] == m["a2"].pk
    results = auth_client.get(messages_url(conversation)).json()["results"]
    assert [r["id"] for r in results] == [m["u1"].pk, m["a1"].pk, m["u2"].pk, m["a2"].pk]


def test_patch_active_leaf_of_another_conversation_is_a_400(tree, auth_client, user, sim_model):
    conversation, m = tree
    elsewhere = MessageFactory(conversation=ConversationFactory(owner=user, model=sim_model))

    response = auth_client.patch(f"/api/conversations/{conversation.pk}/", {"active_leaf": elsewhere.pk}, format="json")

    assert (response.status_code, response.json()["error"]["param"]) == (400, "active_leaf")
    conversation.refresh_from_db()
    assert conversation.active_leaf_id == m["a2b"].pk


def test_activate_picks_the_latest_leaf_below_the_message(tree, auth_client):
    conversation, m = tree
    url = f"/api/conversations/{conversation.pk}/messages/{{}}/activate/"

    to_first = auth_client.post(url.format(m["u2"].pk))
    to_latest = auth_client.post(url.format(m["u1"].pk))
    missing = auth_client.post(url.format(10**9))

    assert (to_first.status_code, to_first.json()["active_leaf"]) == (200, m["a2"].pk)
    assert to_latest.json()["active_leaf"] == m["a2b"].pk
    assert missing.status_code == 404


def test_only_the_owner_switches_and_admins_read_the_tree(tree, client_for, admin_user, other_user):
    conversation, m = tree
    admin, stranger = client_for(admin_user), client_for(other_user)
    base = f"/api/conversations/{conversation.pk}"

    assert admin.get(f"{base}/tree/").status_code == 200
    assert admin.get(f"{base}/messages/", {"branch": m["a2"].pk}).status_code == 200
    assert admin.post(f"{base}/messages/{m['u2'].pk}/activate/").status_code == 403
    assert admin.patch(f"{base}/", {"active_leaf": m["a2"].pk}, format="json").status_code == 403
    for response in (
        stranger.get(f"{base}/tree/"),
        stranger.post(f"{base}/messages/{m['u2'].pk}/activate/"),
        stranger.patch(f"{base}/", {"active_leaf": m["a2"].pk}, format="json"),
    ):
        assert response.status_code == 404
    conversation.refresh_from_db()
    assert conversation.active_leaf_id == m["a2b"].pk
    assert Message.objects.filter(conversation=conversation).count() == 6


# --- Length independence ----------------------------------------------------------------------


def long_conversation(user, model, length: int) -> Conversation:
    """A conversation of ``length`` alternating messages in one chain, plus two regenerations of its
    second reply; the active leaf is the chain's last message."""
    conversation = ConversationFactory(owner=user, model=model)
    messages = Message.objects.bulk_create(
        Message(conversation=conversation, role=("user", "assistant")[i % 2], content=f"message {i}")
        for i in range(length)
    )
    for previous, message in zip(messages, messages[1:], strict=False):
        message.parent_id = previous.pk
    Message.objects.bulk_update(messages[1:], ["parent"], batch_size=1000)
    branch(conversation, [("assistant", "again")], parent=messages[2])
    branch(conversation, [("assistant", "and again")], parent=messages[2])
    Conversation.objects.filter(pk=conversation.pk).update(active_leaf=messages[-1])
    conversation.refresh_from_db()
    return conversation


def test_a_10000_message_conversation_reads_in_the_queries_of_a_10_message_one(
    user, sim_model, auth_client, django_assert_num_queries
):
    short = long_conversation(user, sim_model, 10)
    long = long_conversation(user, sim_model, 10_000)
    auth_client.get(messages_url(short))  # warm the process's caches (credentials, model access)

    with CaptureQueriesContext(connection) as short_queries:
        short_page = auth_client.get(messages_url(short))
    with django_assert_num_queries(len(short_queries)):
        first_page = auth_client.get(messages_url(long))
    with django_assert_num_queries(len(short_queries)):
        last_page = auth_client.get(messages_url(long), {"page": 200})

    assert short_page.json()["count"] == 10
    assert first_page.json()["count"] == last_page.json()["count"] == 10_000
    assert [r["content"] for r in first_page.json()["results"][:3]] == ["message 0", "message 1", "message 2"]
    assert len(first_page.json()["results"][3]["sibling_ids"]) == 3  # two regenerations of it
    assert last_page.json()["results"][-1]["content"] == "message 9999"
    history = history_for_upstream(conversation=long)
    assert len(history) == 10_000 and history[-1]["content"] == "message 9999"
