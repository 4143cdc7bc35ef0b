"""Deleting a conversation while its reply streams: the reply stops, and its client is told why.

``DELETE /api/conversations/{id}/`` moves it to the trash (the reply's text is kept there);
``.../purge/`` deletes it for good: the client is told the same either way.

The reply is stopped (its upstream request closed, its usage billed as ``cancelled``) and every
interface ends with the ``conversation_deleted`` error (404): the SSE stream and the WebSocket
with an ``error`` event whose ``message`` is null, the non-streamed POST with the JSON error.
The upstream is the slow simulator (a 10 s reply), the server a real uvicorn in the test's loop.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from channels.testing import WebsocketCommunicator
from httpx_sse import aconnect_sse

from chatbackend.asgi import application
from conversations.models import Conversation, Message
from tests.kit import SLOW_REPLY_TOKENS, assert_error, bearer, poll_until, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients", "broadcast_listener"),
]

TIMEOUT = 10


def url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/messages/"


async def streaming_reply(conversation) -> Message:
    """Wait for the conversation's assistant message to be written (``streaming``) and return it."""
    return await poll_until(
        lambda: Message.objects.filter(conversation=conversation, role="assistant").afirst(),
        what="the assistant message",
    )


async def delete(client: httpx.AsyncClient, conversation, token: str, *, purge: bool = False) -> None:
    path = f"/api/conversations/{conversation.pk}/" + ("purge/" if purge else "")
    response = await client.delete(path, headers=bearer(token))
    assert response.status_code == 204, response.text


async def assert_stopped_and_billed(simulator, before: dict, message_id: int) -> None:
    """The upstream request was closed early and the reply billed once, ``cancelled``."""
    await poll_until(
        simulator.astats, lambda stats: stats["requests_disconnected"] >= before["requests_disconnected"] + 1
    )
    [record] = await poll_until(lambda: usage_records(request_id=f"message-{message_id}"))
    assert record.finish_status == "cancelled"
    assert record.completion_tokens < SLOW_REPLY_TOKENS


@pytest.mark.parametrize("purge", [False, True], ids=["trash", "purge"])
async def test_sse_stream_ends_with_a_conversation_deleted_error(
    asgi_server, slow_simulator, slow_conversation, token, purge
):
    before = await slow_simulator.astats()
    events = []
    async with httpx.AsyncClient(base_url=asgi_server, timeout=TIMEOUT) as client:
        source_context = aconnect_sse(
            client, "POST", url(slow_conversation), json={"content": "hi"}, headers=bearer(token)
        )
        async with source_context as source:
            async for event in source.aiter_sse():
                events.append(event)
                if event.event == "reply.delta" and sum(e.event == "reply.delta" for e in events) == 2:
                    await delete(client, slow_conversation, token, purge=purge)

    last = events[-1]
    assert last.event == "error", [e.event for e in events]
    assert last.json()["error"]["code"] == "conversation_deleted"
    assert last.json()["error"]["type"] == "not_found_error"
    assert last.json()["message"] is None
    await assert_stopped_and_billed(slow_simulator, before, events[0].json()["message_id"])
    if purge:
        assert not await Conversation.objects.filter(pk=slow_conversation.pk).aexists()
    else:  # in the trash, with the reply's text so far, ended cancelled
        reply = await Message.objects.aget(pk=events[0].json()["message_id"])
        assert reply.status == "cancelled" and reply.content
        assert (await Conversation.objects.aget(pk=slow_conversation.pk)).deleted_at is not None


async def test_non_streamed_post_answers_404_conversation_deleted(
    asgi_server, slow_simulator, slow_conversation, token
):
    before = await slow_simulator.astats()
    async with httpx.AsyncClient(base_url=asgi_server, timeout=TIMEOUT) as client:
        sending = asyncio.create_task(
            client.post(url(slow_conversation), json={"content": "hi"}, headers=bearer(token))
        )
        await poll_until(
            slow_simulator.astats, lambda stats: stats["requests_started"] >= before["requests_started"] + 1
        )
        message = await streaming_reply(slow_conversation)
        await delete(client, slow_conversation, token)
        response = await sending

    assert_error(response, 404, code="conversation_deleted", type="not_found_error")
    await assert_stopped_and_billed(slow_simulator, before, message.pk)


async def test_websocket_reply_ends_with_a_conversation_deleted_error(
    asgi_server, slow_simulator, slow_conversation, token
):
    before = await slow_simulator.astats()
    socket = WebsocketCommunicator(application, f"/ws/conversations/{slow_conversation.pk}/?token={token}")
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected
    try:
        await socket.send_json_to({"type": "message.send", "content": "hi"})
        start = await socket.receive_json_from(timeout=TIMEOUT)
        assert start["type"] == "reply.start"
        assert (await socket.receive_json_from(timeout=TIMEOUT))["type"] == "reply.delta"
        async with httpx.AsyncClient(base_url=asgi_server, timeout=TIMEOUT) as client:
            await delete(client, slow_conversation, token)
        frame = await socket.receive_json_from(timeout=TIMEOUT)
        while frame["type"] == "reply.delta":
            frame = await socket.receive_json_from(timeout=TIMEOUT)
    finally:
        await socket.disconnect(timeout=TIMEOUT)

    assert frame["type"] == "error", frame
    assert frame["error"]["code"] == "conversation_deleted"
    assert frame["message"] is None
    await assert_stopped_and_billed(slow_simulator, before, start["message_id"])
