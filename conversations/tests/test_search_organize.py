"""Search, pin, archive, the trash (restore, purge) and retention, on PostgreSQL and SQLite alike.

Search runs PostgreSQL's full-text search there and the LIKE fallback elsewhere: the same
assertions hold on both (run with and without ``DATABASE_URL``).
"""

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.authentication import principal_for
from accounts.models import Organization, UsageRecord
from chatbackend.celery import app as celery_app
from chatbackend.errors import NotFoundError
from chatbackend.pagination import PageNumberPagination
from conversations import retention, search
from conversations.models import Conversation, Message, RetentionPolicy
from conversations.retention import RetentionResult, retention_apply
from conversations.services import message_append, reply_start
from conversations.tasks import retention_apply_task
from tests.factories import ConversationFactory, MessageFactory, UsageRecordFactory, UserFactory
from tests.kit import assert_error

pytestmark = pytest.mark.django_db

SEARCH = "/api/conversations/search/"


def url(conversation: Conversation, suffix: str = "") -> str:
    return f"/api/conversations/{conversation.pk}/{suffix}"


def ids(response) -> list[int]:
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def _ago(conversation: Conversation, **delta: float) -> None:
    """Date ``conversation``'s creation and last activity back by ``delta``."""
    when = timezone.now() - dt.timedelta(**delta)
    Conversation.objects.filter(pk=conversation.pk).update(created_at=when, updated_at=when)


# --- Search -------------------------------------------------------------------------------------


def test_search_finds_a_word_in_message_content_with_its_message_and_snippet(auth_client, user, other_user):
    found = ConversationFactory(owner=user, title="Holiday")
    MessageFactory(conversation=found, content="Nothing to see here.")
    hit = MessageFactory(conversation=found, content="We should visit the aquarium in Lisbon on Tuesday.")
    ConversationFactory(owner=user, title="Groceries")  # no match
    theirs = ConversationFactory(owner=other_user, title="aquarium")  # another user's: never found
    MessageFactory(conversation=theirs, content="aquarium aquarium")

    response = auth_client.get(SEARCH, {"q": "aquarium"})

    assert ids(response) == [found.pk]
    [row] = response.json()["results"]
    assert row["message_id"] == hit.pk
    assert "aquarium" in row["snippet"] and row["rank"] > 0
    assert row["title"] == "Holiday" and row["model"] == found.model.name


def test_search_ranks_a_title_hit_above_a_message_hit(auth_client, user):
    in_message = ConversationFactory(owner=user, title="Notes")
    MessageFactory(conversation=in_message, content="the volcano erupted")
    in_title = ConversationFactory(owner=user, title="Volcano trip")
    _ago(in_title, days=3)  # older, yet first: rank before recency

    rows = auth_client.get(SEARCH, {"q": "volcano"}).json()["results"]

    assert [row["id"] for row in rows] == [in_title.pk, in_message.pk]
    assert rows[0]["rank"] > rows[1]["rank"]
    assert rows[0]["message_id"] is None and rows[0]["snippet"] is None


def test_search_needs_every_word(auth_client, user):
    both = ConversationFactory(owner=user, title="x")
    MessageFactory(conversation=both, content="red apples and green pears")
    one = ConversationFactory(owner=user, title="y")
    MessageFactory(conversation=one, content="red cars")

    assert ids(auth_client.get(SEARCH, {"q": "red pears"})) == [both.pk]


@pytest.mark.parametrize(
    ("content", "query"),
    [
        ("今天的天气很好，我们下午去公园散步吧。", "天气"),  # Chinese: no spaces between words
        ("今天的天气很好，我们下午去公园散步吧。", "公园 散步"),  # every word, anywhere in the message
        ("用 Python 写一个网页爬虫的例子", "python 爬虫"),  # mixed with a Latin word, any case
        ("昨日は東京で美味しい寿司を食べました。", "寿司"),  # Japanese (kanji)
        ("このレシピはとても簡単です", "レシピ"),  # Japanese (katakana)
        ("서울 날씨가 정말 좋네요", "날씨"),  # Korean: the word carries its particle
        ("วันนี้อากาศดีมาก", "อากาศ"),  # Thai
    ],
)
def test_search_finds_a_word_inside_a_sentence_of_a_script_without_spaces(auth_client, user, content, query):
    found = ConversationFactory(owner=user, title="notes")
    hit = MessageFactory(conversation=found, content=content)
    other = ConversationFactory(owner=user, title="other")
    MessageFactory(conversation=other, content="明天要下雨，记得带伞。 The weather is nice.")

    response = auth_client.get(SEARCH, {"q": query})

    assert ids(response) == [found.pk]
    [row] = response.json()["results"]
    assert row["message_id"] == hit.pk
    assert query.split()[-1] in row["snippet"].lower()


def test_search_in_a_script_without_spaces_finds_titles_and_needs_every_word(auth_client, user):
    in_title = ConversationFactory(owner=user, title="学习机器学习的笔记")
    in_message = ConversationFactory(owner=user, title="杂项")
    MessageFactory(conversation=in_message, content="机器学习需要大量的数据")
    MessageFactory(conversation=ConversationFactory(owner=user, title="x"), content="机器人")  # not 学习

    rows = auth_client.get(SEARCH, {"q": "机器学习"}).json()["results"]

    assert [row["id"] for row in rows] == [in_title.pk, in_message.pk]  # a title hit first
    assert ids(auth_client.get(SEARCH, {"q": "机器 数据"})) == [in_message.pk]
    assert ids(auth_client.get(SEARCH, {"q": "火车"})) == []


@pytest.mark.parametrize(
    ("first", "second", "found"),
    [
        (
            "red apples and green pears",
            "red cars",
            {"red -pears": "2", "pears or cars": "12", '"green pears" -cars': "1", "red -pears -cars": ""},
        ),
        # A script without spaces: matched by substring, read the same way.
        ("明天天气不好，会下雨", "今天天气很好", {"天气 -下雨": "2", "很好 or 下雨": "12", "-下雨": ""}),
    ],
)
def test_search_reads_or_and_minus_as_a_web_search_does(auth_client, user, first, second, found):
    conversations = {}
    for number, content in (("1", first), ("2", second)):
        conversations[number] = ConversationFactory(owner=user, title="x")
        MessageFactory(conversation=conversations[number], content=content)

    for query, numbers in found.items():
        expected = sorted(conversations[number].pk for number in numbers)
        assert sorted(ids(auth_client.get(SEARCH, {"q": query}))) == expected, query


@pytest.mark.parametrize(
    ("query", "alternatives"),
    [
        ("red pears", [(["red", "pears"], [])]),
        ('red -"green pears" -cars', [(["red"], ["green pears", "cars"])]),
        ("apples OR pears or", [(["apples"], []), (["pears"], [])]),
        ('"unterminated phrase', [(["unterminated phrase"], [])]),
        ("e-mail - -- or", [(["e-mail"], [])]),
        ("-only -excluded or kiwi", [(["kiwi"], [])]),
    ],
)
def test_search_query_alternatives_read_a_query_as_websearch_to_tsquery_does(query, alternatives):
    assert [tuple(alternative) for alternative in search.query_alternatives(query)] == alternatives


def test_search_never_shows_the_trash_nor_a_members_conversation_to_an_admin(client_for, auth_client, user, admin_user):
    trashed = ConversationFactory(owner=user, title="kiwi")
    assert auth_client.delete(url(trashed)).status_code == 204
    members = ConversationFactory(owner=user, title="kiwi again")

    assert ids(auth_client.get(SEARCH, {"q": "kiwi"})) == [members.pk]
    # Admins read a member's conversation by id (the list), but search is the caller's own.
    assert ids(client_for(admin_user).get(SEARCH, {"q": "kiwi"})) == []


def test_search_filters_model_dates_archived_and_pinned(auth_client, user, model):
    old = ConversationFactory(owner=user, title="mango old")
    _ago(old, days=10)
    pinned = ConversationFactory(owner=user, title="mango pinned", model=model)
    archived = ConversationFactory(owner=user, title="mango archived")
    assert auth_client.patch(url(pinned), {"pinned": True}, format="json").status_code == 200
    assert auth_client.patch(url(archived), {"archived": True}, format="json").status_code == 200
    since = (timezone.now() - dt.timedelta(days=1)).isoformat()

    assert set(ids(auth_client.get(SEARCH, {"q": "mango"}))) == {old.pk, pinned.pk, archived.pk}
    assert ids(auth_client.get(SEARCH, {"q": "mango", "model": "gpt-test"})) == [pinned.pk]
    assert ids(auth_client.get(SEARCH, {"q": "mango", "pinned": "true"})) == [pinned.pk]
    assert ids(auth_client.get(SEARCH, {"q": "mango", "archived": "true"})) == [archived.pk]
    assert set(ids(auth_client.get(SEARCH, {"q": "mango", "archived": "false"}))) == {old.pk, pinned.pk}
    assert ids(auth_client.get(SEARCH, {"q": "mango", "created_to": since})) == [old.pk]
    assert old.pk not in ids(auth_client.get(SEARCH, {"q": "mango", "updated_from": since}))


@pytest.mark.parametrize("query", [None, "", "   ", "a\x00b", "x" * 501])
def test_search_refuses_a_missing_blank_or_bad_query(auth_client, query):
    params = {} if query is None else {"q": query}
    assert_error(auth_client.get(SEARCH, params), 400, code="invalid_query", param="q")


@pytest.mark.parametrize("path", ["/api/conversations/", "/api/templates/"])
def test_a_nul_character_in_the_list_search_is_a_400_naming_search(auth_client, path):
    # As every other query parameter's refusal does (docs/api.md, "Errors"): a client shows it by the field.
    response = auth_client.get(path, {"search": "a\x00b"})
    assert_error(response, 400, code="invalid", param="search")
    assert response.json()["error"]["fields"] == {"search": ["Null characters are not allowed."]}


def test_search_is_paginated(auth_client, user, monkeypatch):
    monkeypatch.setattr(PageNumberPagination, "page_size", 2)
    for _ in range(3):
        ConversationFactory(owner=user, title="papaya")

    body = auth_client.get(SEARCH, {"q": "papaya"}).json()

    assert body["count"] == 3 and len(body["results"]) == 2
    assert len(auth_client.get(SEARCH, {"q": "papaya", "page": 2}).json()["results"]) == 1


# --- Pin and archive --------------------------------------------------------------------------


def test_pin_and_archive_shape_the_list_and_keep_updated_at(auth_client, user):
    first, second, third = (ConversationFactory(owner=user) for _ in range(3))
    before = Conversation.objects.get(pk=first.pk).updated_at

    response = auth_client.patch(url(first), {"pinned": True}, format="json")
    assert response.status_code == 200 and response.json()["pinned"] is True
    response = auth_client.patch(url(third), {"archived": True}, format="json")
    assert response.json()["archived"] is True and response.json()["archived_at"] is not None

    assert Conversation.objects.get(pk=first.pk).updated_at == before  # organizing is not activity
    assert ids(auth_client.get("/api/conversations/")) == [first.pk, second.pk]  # pinned first, archived out
    assert ids(auth_client.get("/api/conversations/", {"archived": "true"})) == [third.pk]
    assert ids(auth_client.get("/api/conversations/", {"pinned": "true"})) == [first.pk]
    assert auth_client.get(url(third)).status_code == 200  # an archived conversation is still readable

    assert auth_client.patch(url(third), {"archived": False}, format="json").json()["archived_at"] is None
    assert set(ids(auth_client.get("/api/conversations/"))) == {first.pk, second.pk, third.pk}


@pytest.mark.parametrize(
    ("field", "value"), [("pinned", "yes"), ("pinned", "true"), ("archived", 1), ("archived", None)]
)
def test_pinned_and_archived_take_a_json_boolean_only(auth_client, user, field, value):
    conversation = ConversationFactory(owner=user)

    response = auth_client.patch(url(conversation), {field: value}, format="json")

    assert_error(response, 400, param=field)
    refreshed = Conversation.objects.get(pk=conversation.pk)
    assert (refreshed.pinned, refreshed.archived_at) == (False, None)


def test_an_unknown_format_is_a_400_naming_format_not_a_404(auth_client, user):
    conversation = ConversationFactory(owner=user)

    for path in ("/api/conversations/", url(conversation)):
        error = assert_error(auth_client.get(path, {"format": "xml"}), 400, code="invalid", param="format")
        assert "json" in error["message"]
        assert auth_client.get(path, {"format": "json"}).status_code == 200


# --- Trash, restore, purge --------------------------------------------------------------------


def test_a_trashed_conversation_is_found_only_in_the_trash_and_takes_no_message(auth_client, user):
    conversation = ConversationFactory(owner=user, title="to trash")
    MessageFactory(conversation=conversation, content="hello")

    assert auth_client.delete(url(conversation)).status_code == 204

    assert ids(auth_client.get("/api/conversations/trash/")) == [conversation.pk]
    assert auth_client.get("/api/conversations/trash/").json()["results"][0]["deleted_at"] is not None
    assert ids(auth_client.get("/api/conversations/")) == []
    for path in ("", "messages/", "tree/"):
        assert auth_client.get(url(conversation, path)).status_code == 404
    assert auth_client.patch(url(conversation), {"title": "x"}, format="json").status_code == 404
    with pytest.raises(NotFoundError):  # what the send endpoints, the WebSocket and imports call
        reply_start(actor=principal_for(user=user), conversation_id=conversation.pk, content="hi")
    with pytest.raises(NotFoundError):
        message_append(conversation=conversation, role=Message.Role.USER, content="hi")
    assert auth_client.delete(url(conversation)).status_code == 404  # already in the trash
    assert Message.objects.filter(conversation=conversation).count() == 1  # nothing deleted yet


def test_restore_brings_it_back(auth_client, user):
    conversation = ConversationFactory(owner=user)
    auth_client.delete(url(conversation))

    response = auth_client.post(url(conversation, "restore/"))

    assert response.status_code == 200 and response.json()["deleted_at"] is None
    assert ids(auth_client.get("/api/conversations/")) == [conversation.pk]
    assert ids(auth_client.get("/api/conversations/trash/")) == []
    assert_error(auth_client.post(url(conversation, "restore/")), 404)  # not in the trash any more


def test_purge_deletes_for_good_and_usage_rows_survive(auth_client, user):
    conversation = ConversationFactory(owner=user)
    reply = MessageFactory(conversation=conversation, role=Message.Role.ASSISTANT, content="hi")
    record = UsageRecordFactory(user=user, message=reply)
    auth_client.delete(url(conversation))

    assert auth_client.delete(url(conversation, "purge/")).status_code == 204

    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(pk=reply.pk).exists()
    record.refresh_from_db()  # still there, unlinked (UsageRecord.message is SET_NULL)
    assert record.message_id is None and record.completion_tokens == 5
    assert auth_client.delete(url(conversation, "purge/")).status_code == 404


def test_purge_also_takes_a_conversation_not_in_the_trash(auth_client, user):
    conversation = ConversationFactory(owner=user)
    assert auth_client.delete(url(conversation, "purge/")).status_code == 204
    assert not Conversation.objects.filter(pk=conversation.pk).exists()


def test_another_users_trash_is_a_404_and_an_admin_may_not_restore_or_purge(
    client_for, auth_client, user, other_user, admin_user
):
    conversation = ConversationFactory(owner=user)
    auth_client.delete(url(conversation))
    other = client_for(other_user)
    admin = client_for(admin_user)

    assert ids(other.get("/api/conversations/trash/")) == []
    assert ids(admin.get("/api/conversations/trash/")) == []  # only one's own trash
    assert_error(other.post(url(conversation, "restore/")), 404)
    assert_error(other.delete(url(conversation, "purge/")), 404)
    assert_error(admin.post(url(conversation, "restore/")), 403, code="permission_denied")
    assert_error(admin.delete(url(conversation, "purge/")), 403, code="permission_denied")
    assert Conversation.objects.get(pk=conversation.pk).deleted_at is not None


# --- Retention --------------------------------------------------------------------------------


def test_retention_purges_what_is_due_and_nothing_else(user):
    default = Organization.objects.default()
    RetentionPolicy.objects.create(organization=default, delete_after_days=30, trash_purge_after_days=7)
    other_org = Organization.objects.create(name="Other", slug="other")  # no policy
    empty_org = Organization.objects.create(name="Empty", slug="empty")
    RetentionPolicy.objects.create(organization=empty_org)  # keeps forever

    inactive = ConversationFactory(owner=user, organization=default)
    reply = MessageFactory(conversation=inactive, role=Message.Role.ASSISTANT, content="old")
    record = UsageRecordFactory(user=user, message=reply)
    _ago(inactive, days=31)
    recent = ConversationFactory(owner=user, organization=default)
    _ago(recent, days=29)
    long_trashed = ConversationFactory(owner=user, organization=default)
    newly_trashed = ConversationFactory(owner=user, organization=default)
    Conversation.objects.filter(pk=long_trashed.pk).update(deleted_at=timezone.now() - dt.timedelta(days=8))
    Conversation.objects.filter(pk=newly_trashed.pk).update(deleted_at=timezone.now() - dt.timedelta(days=6))
    elsewhere = ConversationFactory(owner=UserFactory(), organization=other_org)
    _ago(elsewhere, days=400)
    kept_forever = ConversationFactory(owner=UserFactory(), organization=empty_org)
    _ago(kept_forever, days=400)
    Conversation.objects.filter(pk=kept_forever.pk).update(deleted_at=timezone.now() - dt.timedelta(days=400))

    result = retention_apply_task.delay().get()

    assert result == {"inactive": 1, "trash": 1}
    remaining = set(Conversation.objects.values_list("pk", flat=True))
    assert remaining == {recent.pk, newly_trashed.pk, elsewhere.pk, kept_forever.pk}
    record.refresh_from_db()
    assert record.message_id is None  # the usage row survives its message
    assert UsageRecord.objects.filter(pk=record.pk).exists()
    assert retention_apply_task.delay().get() == {"inactive": 0, "trash": 0}  # idempotent


def _due_conversations(user, count: int) -> list[Conversation]:
    """``count`` conversations inactive for 31 days, each with a question, a reply and its usage row."""
    due = []
    for _ in range(count):
        conversation = ConversationFactory(owner=user)
        MessageFactory(conversation=conversation, role=Message.Role.USER, content="q")
        reply = MessageFactory(conversation=conversation, role=Message.Role.ASSISTANT, content="a")
        UsageRecordFactory(user=user, message=reply)
        _ago(conversation, days=31)
        due.append(conversation)
    return due


def test_retention_deletes_in_batches_whose_queries_do_not_grow_with_their_size(user, monkeypatch):
    RetentionPolicy.objects.create(organization=Organization.objects.default(), delete_after_days=30)
    kept = ConversationFactory(owner=user)
    queries = []
    for count in (2, 12):
        _due_conversations(user, count)
        with CaptureQueriesContext(connection) as captured:
            assert retention_apply() == RetentionResult(inactive=count, trash=0)
        queries.append(len(captured))
    assert queries[0] == queries[1], queries  # one batch either way

    monkeypatch.setattr(retention, "RETENTION_BATCH_SIZE", 2)
    _due_conversations(user, 5)  # three batches: 2, 2 and 1
    assert retention_apply() == RetentionResult(inactive=5, trash=0)
    assert set(Conversation.objects.values_list("pk", flat=True)) == {kept.pk}
    assert not Message.objects.exists()
    assert UsageRecord.objects.count() == 19 and not UsageRecord.objects.filter(message__isnull=False).exists()


def test_retention_runs_on_celery_beat():
    entry = settings.CELERY_BEAT_SCHEDULE["conversations.retention_apply"]
    assert entry["task"] in celery_app.tasks
    assert entry["schedule"] == settings.RETENTION_INTERVAL_SECONDS > 0


def test_the_admin_edits_retention_policies(admin_site):
    organization = Organization.objects.default()
    response = admin_site.post(
        "/admin/conversations/retentionpolicy/add/",
        {"organization": organization.pk, "delete_after_days": "30", "trash_purge_after_days": ""},
    )
    assert response.status_code == 302, response.content
    policy = RetentionPolicy.objects.get(organization=organization)
    assert (policy.delete_after_days, policy.trash_purge_after_days) == (30, None)
    assert admin_site.get("/admin/conversations/retentionpolicy/").status_code == 200


@pytest.mark.parametrize(
    "params", [{"pinned": ""}, {"pinned": "maybe"}, {"archived": ""}, {"updated_to": ""}, {"created_from": "soon"}]
)
@pytest.mark.parametrize("path", ["/api/conversations/", SEARCH])
def test_a_malformed_filter_is_a_400_not_ignored(auth_client, path, params):
    response = auth_client.get(path, {"q": "x", **params})
    assert response.status_code == 400, response.content


@pytest.mark.parametrize(
    ("field", "truthy", "falsy"), [("pinned", "1", "0"), ("archived", "1", "0"), ("pinned", "TRUE", "False")]
)
@pytest.mark.parametrize("path", ["/api/conversations/", SEARCH])
def test_a_boolean_filter_reads_1_and_0_and_any_case_as_it_reads_true_and_false(
    auth_client, user, path, field, truthy, falsy
):
    """The filter form lets ``1``/``0`` and any case through as booleans, so the filter must read them
    so: django-filter's default widget read ``1`` and ``0`` as "no filter" (``?pinned=1`` listed every
    conversation, ``?archived=1`` the unarchived ones: the opposite of the question)."""
    plain = ConversationFactory(owner=user, title="quince plain")
    flagged = ConversationFactory(owner=user, title="quince flagged")
    assert auth_client.patch(url(flagged), {field: True}, format="json").status_code == 200

    assert ids(auth_client.get(path, {"q": "quince", field: truthy})) == [flagged.pk]
    assert ids(auth_client.get(path, {"q": "quince", field: falsy})) == [plain.pk]


def test_retention_with_only_one_period_set(user):
    default = Organization.objects.default()
    RetentionPolicy.objects.create(organization=default, trash_purge_after_days=1)
    old = ConversationFactory(owner=user)
    _ago(old, days=100)  # inactive, but no inactivity period: kept
    trashed = ConversationFactory(owner=user)
    Conversation.objects.filter(pk=trashed.pk).update(deleted_at=timezone.now() - dt.timedelta(days=2))

    assert retention_apply_task.delay().get() == {"inactive": 0, "trash": 1}
    assert set(Conversation.objects.values_list("pk", flat=True)) == {old.pk}


@pytest.mark.parametrize("days", [800_000, 2_147_483_647])  # past year 1; past timedelta's range
def test_a_period_longer_than_the_calendar_keeps_everything_and_fails_no_other_organization(user, days):
    # Such a period raised OverflowError, failing the run before the other organizations' policies.
    default = Organization.objects.default()
    other_org = Organization.objects.create(name="Other", slug="other")
    RetentionPolicy.objects.create(organization=default, delete_after_days=days, trash_purge_after_days=days)
    RetentionPolicy.objects.create(organization=other_org, delete_after_days=30)
    kept = ConversationFactory(owner=user, organization=default)
    _ago(kept, days=400)
    Conversation.objects.filter(pk=kept.pk).update(deleted_at=timezone.now() - dt.timedelta(days=400))
    due = ConversationFactory(owner=UserFactory(), organization=other_org)
    _ago(due, days=31)

    assert retention_apply_task.delay().get() == {"inactive": 1, "trash": 0}
    assert set(Conversation.objects.values_list("pk", flat=True)) == {kept.pk}


@pytest.mark.parametrize(
    ("value", "found"),
    [("0772-03-26T02:05:28-21:23", False), ("0001-01-01T00:00:00+10:00", False), ("9999-12-31T23:00:00-10:00", True)],
)
def test_any_valid_utc_offset_is_taken(auth_client, user, value, found):
    """PostgreSQL refuses offsets of 16 hours or more; ISO 8601 (and the schema) allow up to 23:59."""
    conversation = ConversationFactory(owner=user, title="x")
    response = auth_client.get(SEARCH, {"q": "x", "updated_to": value})
    assert ids(response) == ([conversation.pk] if found else [])
