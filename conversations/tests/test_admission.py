"""The same admission rules on every interface: /v1, conversation SSE and WebSocket (issue 8, item 6).

One rule, a user allowed one request per minute, is reached through each interface in turn: the
refusal is the same 429 ``rate_limit_exceeded`` before any reply starts, recorded as a ``refused``
usage row, and a refused conversation turn leaves no messages. The concurrency slot a reply holds
is given back however it ends, so the next request is admitted. The stores behind the rules are
tested in ``accounts/tests``; the cross-process behaviour in ``tests/test_e2e_*``.
"""

from __future__ import annotations

import json

import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from accounts.models import User
from chatbackend.asgi import application
from chatbackend.asyncdb import run_sync
from conversations.models import Message
from tests.factories import ConversationFactory
from tests.kit import access_token, assert_error, bearer, chat_body, post_chat, sse_events, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

TIMEOUT = 10
SSE = "text/event-stream"


async def _limit(user: User, **limits: int) -> None:
    def save() -> None:
        for name, value in limits.items():
            setattr(user, name, value)
        user.save()  # a save (not an update) clears the cached principal in every process

    await run_sync(save)


async def _message_count(conversation_id: int) -> int:
    return await Message.objects.filter(conversation_id=conversation_id).acount()


async def _send_sse(conversation_id: int, token: str, content: str = "hi"):
    return await AsyncClient().post(
        f"/api/conversations/{conversation_id}/messages/",
        data=json.dumps({"content": content}),
        content_type="application/json",
        headers={**bearer(token), "Accept": SSE},
    )


async def _send_ws(conversation_id: int, token: str, content: str = "hi") -> list[dict]:
    communicator = WebsocketCommunicator(application, f"/ws/conversations/{conversation_id}/?token={token}")
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    try:
        await communicator.send_json_to({"type": "message.send", "content": content})
        frames = []
        while True:
            frame = await communicator.receive_json_from(timeout=TIMEOUT)
            frames.append(frame)
            if frame["type"] in ("reply.done", "error"):
                return frames
    finally:
        await communicator.disconnect(timeout=TIMEOUT)


async def test_a_rate_limit_refuses_the_same_way_on_v1_sse_and_websocket(user, api_key_secret, sim_model):
    await _limit(user, requests_per_minute=1)
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    token = access_token(user)

    first = await post_chat(AsyncClient(), chat_body("sim-model", "hello"), bearer(api_key_secret))
    assert first.status_code == 200, first.content

    v1 = await post_chat(AsyncClient(), chat_body("sim-model", "again"), bearer(api_key_secret))
    error = assert_error(v1, 429, code="rate_limit_exceeded")
    assert f"Rate limit reached for user {user.username!r} on requests per min (RPM)" in error["message"]
    assert int(v1.headers["Retry-After"]) >= 1

    sse = await _send_sse(conversation.pk, token)
    assert sse.status_code == 429
    assert sse["Content-Type"].startswith(SSE)
    events = await sse_events(sse)
    assert [event.event for event in events] == ["error"]
    assert events[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert int(sse["Retry-After"]) >= 1

    frames = await _send_ws(conversation.pk, token)
    assert [frame["type"] for frame in frames] == ["error"]
    assert frames[0]["error"]["code"] == "rate_limit_exceeded"

    assert await _message_count(conversation.pk) == 0  # refused turns leave nothing behind
    records = await usage_records(user=user)
    assert [record.finish_status for record in records] == ["completed", "refused", "refused", "refused"]
    refused = records[1:]
    assert {(r.prompt_tokens, r.completion_tokens, r.cost) for r in refused} == {(0, 0, 0)}
    assert {r.source for r in refused} == {"openai_api", "conversation"}


async def test_a_models_rate_limit_refusal_names_the_model_not_its_row_id(user, api_key_secret, sim_model):
    sim_model.requests_per_minute = 1
    await run_sync(sim_model.save)

    first = await post_chat(AsyncClient(), chat_body("sim-model", "hello"), bearer(api_key_secret))
    assert first.status_code == 200, first.content
    again = await post_chat(AsyncClient(), chat_body("sim-model", "again"), bearer(api_key_secret))

    error = assert_error(again, 429, code="rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached for model 'sim-model' on requests per min (RPM)")


async def test_a_reply_gives_its_concurrency_slot_back_however_it_ends(user, api_key_secret, sim_model):
    """One stream at a time: each interface's reply ends (completed, or stopped by a client that
    left) and the next request, on another interface, is admitted."""
    await _limit(user, concurrent_streams=1)
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    token = access_token(user)

    whole = await post_chat(AsyncClient(), chat_body("sim-model", "one"), bearer(api_key_secret))
    assert whole.status_code == 200, whole.content
    frames = await _send_ws(conversation.pk, token)
    assert frames[-1]["type"] == "reply.done"
    sse = await _send_sse(conversation.pk, token)
    assert sse.status_code == 200
    assert (await sse_events(sse))[-1].event == "reply.done"
    streamed = await post_chat(AsyncClient(), chat_body("sim-model", "two", stream=True), bearer(api_key_secret))
    assert streamed.status_code == 200
    assert b"[DONE]" in b"".join([chunk async for chunk in streamed.streaming_content])

    again = await post_chat(AsyncClient(), chat_body("sim-model", "three"), bearer(api_key_secret))
    assert again.status_code == 200, again.content
    assert await _message_count(conversation.pk) == 4
