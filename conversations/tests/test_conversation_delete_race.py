"""Purging a conversation (``DELETE .../purge/``) while others write to it: its reply's usage row, a second purge.

Django emulates ``UsageRecord.message``'s ``on_delete=SET_NULL`` in Python: the deletion first
UPDATEs the usage rows it sees to ``message = NULL``, then DELETEs the messages, and PostgreSQL
checks the (deferred) foreign keys at commit. A usage row the Celery worker commits in between
points at a message that is then deleted: the deletion failed at commit with an IntegrityError, a
500 (seen by schemathesis in CI). Here the window is held open on purpose: a third connection
locks an earlier usage row of the conversation, so the deletion's UPDATE waits on it, and the
usage writer commits its row meanwhile. And of two concurrent DELETEs of one conversation, the
second is a 404, as it is when it comes after the first. PostgreSQL only: SQLite has no row
locks, and its IMMEDIATE transactions serialize the two writers whole.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, transaction

from accounts.models import UsageRecord
from accounts.usage import UsageEvent, usage_record_many
from conversations.models import Conversation, Message
from conversations.services import conversation_delete
from tests.factories import ConversationFactory, MessageFactory, UsageRecordFactory
from tests.kit import assert_error, poll_until_sync

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
        reason="a race between row locks: PostgreSQL's (CI runs it)",
    ),
]

TIMEOUT = 10


class Worker(threading.Thread):
    """Run ``work`` on its own database connection; keep its result or exception."""

    def __init__(self, work: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as error:  # reported by the test, not lost in the thread
            self.error = error
        finally:
            connection.close()

    def outcome(self) -> Any:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the worker is still blocked"
        if self.error is not None:
            raise self.error
        return self.result


def lock_waits() -> list[str]:
    """Return the statements of this database's sessions that wait for a lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return [query for (query,) in cursor.fetchall()]


def usage_event(message: Message) -> UsageEvent:
    conversation = message.conversation
    return UsageEvent(
        request_id=f"message-{message.pk}",
        source=UsageRecord.Source.CONVERSATION,
        user_id=conversation.owner_id,
        api_key_id=None,
        model_id=conversation.model_id,
        model_name=conversation.model.name,
        message_id=message.pk,
        prompt_tokens=12,
        completion_tokens=34,
        cost="0.00008000",
        token_source=UsageRecord.TokenSource.PROVIDER,
        finish_status="completed",
    )


def test_delete_while_a_reply_usage_row_is_written_is_204_and_the_usage_row_stays(client_for, user):
    conversation = ConversationFactory(owner=user)
    earlier = MessageFactory(conversation=conversation, role=Message.Role.ASSISTANT)
    earlier_usage = UsageRecordFactory(user=user, message=earlier, request_id=f"message-{earlier.pk}")
    reply = MessageFactory(conversation=conversation, role=Message.Role.ASSISTANT)
    client = client_for(user)
    client.raise_request_exception = False  # a server error is the status code it answers

    locked, release = threading.Event(), threading.Event()

    def hold_earlier_usage_row() -> None:
        with transaction.atomic():
            UsageRecord.objects.select_for_update().filter(pk=earlier_usage.pk).get()
            locked.set()
            release.wait(TIMEOUT)

    holder = Worker(hold_earlier_usage_row)
    holder.start()
    assert locked.wait(TIMEOUT), "the holder could not lock the earlier usage row"
    deleter = Worker(lambda: client.delete(f"/api/conversations/{conversation.pk}/purge/"))
    writer = Worker(lambda: usage_record_many([usage_event(reply)]))
    try:
        deleter.start()
        poll_until_sync(
            lock_waits, lambda waits: any("accounts_usagerecord" in q for q in waits), what="the deletion's wait"
        )
        # The reply's usage row is written while the deletion waits: committed at once (before the
        # fix), or waiting for the deletion to commit (after it: it found the message gone then).
        writer.start()
        poll_until_sync(lambda: not writer.is_alive() or len(lock_waits()) >= 2, what="the writer's end or wait")
    finally:
        release.set()
    holder.outcome()

    response = deleter.outcome()
    assert response.status_code == 204, response.content
    assert writer.outcome() == 1
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()
    # Usage is never lost: both rows stay, unlinked from the deleted messages.
    rows = {row.request_id: row for row in UsageRecord.objects.filter(user=user)}
    assert set(rows) == {f"message-{earlier.pk}", f"message-{reply.pk}"}
    assert all(row.message_id is None for row in rows.values())
    assert (rows[f"message-{reply.pk}"].completion_tokens, rows[f"message-{reply.pk}"].cost) == (
        34,
        Decimal("0.00008000"),
    )


def test_second_of_two_concurrent_deletes_is_404(client_for, user):
    conversation = ConversationFactory(owner=user)
    MessageFactory(conversation=conversation)
    client = client_for(user)
    client.raise_request_exception = False
    deleted, release = threading.Event(), threading.Event()

    def delete_and_wait_before_commit() -> None:
        with transaction.atomic():
            conversation_delete(conversation=Conversation.objects.get(pk=conversation.pk))
            deleted.set()
            release.wait(TIMEOUT)

    first = Worker(delete_and_wait_before_commit)
    first.start()
    assert deleted.wait(TIMEOUT), "the first deletion did not run"
    # The second request still finds the conversation (the first has not committed), then waits
    # for the first's lock on it.
    second = Worker(lambda: client.delete(f"/api/conversations/{conversation.pk}/purge/"))
    try:
        second.start()
        poll_until_sync(lock_waits, what="the second deletion's wait")
    finally:
        release.set()
    first.outcome()

    assert_error(second.outcome(), 404, code="not_found")
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
