"""A new turn on a branch whose reply still streams is refused (409 ``reply_in_progress``), race-safe;
other branches reply in parallel; a reply whose process died does not block its branch.

Without the refusal, the later user message was attached after the earlier reply while that reply
was still empty: the model never saw it, yet the tree showed the later turn following it.
"""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from django.db import connection
from django.test import AsyncClient
from django.utils import timezone

from accounts.authentication import principal_for
from accounts.models import UsageRecord
from accounts.usage import usage_flush
from chatbackend.asgi import application
from chatbackend.errors import ApplicationError
from chatbackend.liveness import PROCESS_ID
from conversations.models import Message
from conversations.services import (
    reply_checkpoint,
    reply_edit_start,
    reply_regenerate_start,
    reply_start,
)
from tests.kit import assert_error, bearer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

TIMEOUT = 10
DEAD = "gone-host:4242:deadbeef"


def in_progress(excinfo: pytest.ExceptionInfo[ApplicationError]) -> bool:
    return (excinfo.value.code, excinfo.value.status) == ("reply_in_progress", 409)


def test_turns_started_at_once_on_one_branch_one_replies_the_others_are_refused(user, conversation):
    actor = principal_for(user=user)
    threads = 4
    barrier = threading.Barrier(threads)
    started: list[int] = []
    refused: list[str] = []

    def send(n: int) -> None:
        try:
            barrier.wait(timeout=TIMEOUT)
            plan = reply_start(actor=actor, conversation_id=conversation.pk, content=f"tab {n}")
            started.append(plan.message_id)
        except ApplicationError as exc:
            refused.append(f"{exc.status} {exc.code}")
        finally:
            connection.close()  # this thread's own connection

    workers = [threading.Thread(target=send, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(TIMEOUT)

    assert len(started) == 1, (started, refused)
    assert refused == ["409 reply_in_progress"] * (threads - 1)
    # Only the turn that started was written: one user message and its streaming reply.
    messages = list(conversation.messages.order_by("id").values_list("role", "status"))
    assert messages == [("user", "completed"), ("assistant", "streaming")]
    conversation.refresh_from_db()
    assert conversation.active_leaf_id == started[0]


def test_other_branches_reply_while_one_streams_and_the_branch_takes_turns_once_it_ended(user, conversation):
    actor = principal_for(user=user)
    first = reply_start(actor=actor, conversation_id=conversation.pk, content="Tell me a story")

    with pytest.raises(ApplicationError) as excinfo:
        reply_start(actor=actor, conversation_id=conversation.pk, content="and then?")
    assert in_progress(excinfo)

    # An edit of the question and a regeneration of the streaming reply are siblings: another branch,
    # whose history holds no streaming reply.
    edit = reply_edit_start(
        actor=actor, conversation_id=conversation.pk, message_id=first.user_message_id, content="Tell me a joke"
    )
    again = reply_regenerate_start(actor=actor, conversation_id=conversation.pk, message_id=first.message_id)
    assert again.sibling_ids == [first.message_id, again.message_id]
    # The active branch is the regeneration's, still streaming: continuing it is refused too.
    with pytest.raises(ApplicationError) as excinfo:
        reply_start(actor=actor, conversation_id=conversation.pk, content="and then?")
    assert in_progress(excinfo)

    # Once the active branch's reply has ended, it takes the next turn (the others still stream).
    Message.objects.filter(pk=again.message_id).update(status="completed", content="Once upon a time.")
    after = reply_start(actor=actor, conversation_id=conversation.pk, content="and then?")
    assert Message.objects.get(pk=after.user_message_id).parent_id == again.message_id
    assert [m["content"] for m in after.request.messages] == ["Tell me a story", "Once upon a time.", "and then?"]
    assert Message.objects.get(pk=edit.message_id).status == "streaming"


def test_a_reply_whose_process_died_is_recovered_rather_than_blocking_its_branch(user, conversation):
    actor = principal_for(user=user)
    dead = reply_start(actor=actor, conversation_id=conversation.pk, content="Tell me a story")
    reply_checkpoint(message_id=dead.message_id, content="Once upon")
    long_ago = timezone.now() - dt.timedelta(minutes=10)
    Message.objects.filter(pk=dead.message_id).update(stream_owner=DEAD, checkpointed_at=long_ago)

    after = reply_start(actor=actor, conversation_id=conversation.pk, content="and then?")

    orphan = Message.objects.get(pk=dead.message_id)
    assert (orphan.status, orphan.error_code, orphan.content) == ("failed", "interrupted", "Once upon")
    assert [m["content"] for m in after.request.messages] == ["Tell me a story", "Once upon", "and then?"]
    assert usage_flush(10)
    [record] = UsageRecord.objects.filter(message=orphan)
    assert record.finish_status == "failed"


@pytest.mark.parametrize(
    ("owner", "quiet_for"),
    [
        ("other-host:1:alive", dt.timedelta(minutes=10)),  # another process that still beats
        (DEAD, dt.timedelta(seconds=5)),  # no heartbeat, but checkpointed lately: maybe a lost key
        (PROCESS_ID, dt.timedelta(minutes=10)),  # this process: a slow upstream
    ],
)
def test_a_reply_that_may_still_stream_blocks_its_branch(user, conversation, owner, quiet_for):
    actor = principal_for(user=user)
    live = reply_start(actor=actor, conversation_id=conversation.pk, content="Tell me a story")
    Message.objects.filter(pk=live.message_id).update(stream_owner=owner, checkpointed_at=timezone.now() - quiet_for)
    cache.set("chatbackend:alive:other-host:1:alive", 1, timeout=60)
    try:
        with pytest.raises(ApplicationError) as excinfo:
            reply_start(actor=actor, conversation_id=conversation.pk, content="and then?")
    finally:
        cache.delete("chatbackend:alive:other-host:1:alive")
    assert in_progress(excinfo)
    assert Message.objects.get(pk=live.message_id).status == "streaming"
    assert conversation.messages.count() == 2


async def test_a_second_tab_gets_409_over_rest_and_an_error_frame_over_its_socket(user, slow_conversation, token):
    """One tab streams a reply over its WebSocket; another tab sends, edits on the branch, regenerates."""
    path = f"/ws/conversations/{slow_conversation.pk}/?token={token}"
    first_tab, second_tab = WebsocketCommunicator(application, path), WebsocketCommunicator(application, path)
    assert (await first_tab.connect(timeout=TIMEOUT))[0]
    assert (await second_tab.connect(timeout=TIMEOUT))[0]
    try:
        await first_tab.send_json_to({"type": "message.send", "content": "a long story"})
        start = await first_tab.receive_json_from(timeout=TIMEOUT)
        assert start["type"] == "reply.start"
        url = f"/api/conversations/{slow_conversation.pk}/messages/"
        body = json.dumps({"content": "and then?"})

        for accept in ("application/json", "text/event-stream"):
            response = await AsyncClient().post(
                url, data=body, content_type="application/json", headers={**bearer(token), "Accept": accept}
            )
            assert_error(response, 409, code="reply_in_progress")

        await second_tab.send_json_to({"type": "message.send", "content": "and then?"})
        frame = await second_tab.receive_json_from(timeout=TIMEOUT)
        assert frame["type"] == "error" and frame["message"] is None
        assert (frame["error"]["code"], frame["error"]["type"]) == ("reply_in_progress", "conflict_error")
        await second_tab.send_json_to({"type": "ping"})  # the socket stays open
        assert (await second_tab.receive_json_from(timeout=TIMEOUT))["type"] == "pong"

        assert await Message.objects.filter(conversation=slow_conversation).acount() == 2
        assert (await Message.objects.aget(pk=start["message_id"])).status == "streaming"
        assert (await first_tab.receive_json_from(timeout=TIMEOUT))["type"] == "reply.delta"  # it streams on
    finally:
        await first_tab.disconnect(timeout=TIMEOUT)
        await second_tab.disconnect(timeout=TIMEOUT)
