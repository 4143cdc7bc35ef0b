"""The conversation WebSocket, through the full ASGI application (so the token middleware runs)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from chatbackend.asgi import application
from chatbackend.asyncdb import run_sync
from chatbackend.stopping import server_stopping_set
from conversations.consumers import CLOSE_SERVICE_RESTART
from conversations.models import Message
from llm.simulator import reply_text
from tests.factories import ConversationFactory
from tests.kit import (
    FAST_REPLY_TOKENS,
    SLOW_REPLY_TOKENS,
    access_token,
    bearer,
    listed_messages,
    poll_until,
    usage_records,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

TIMEOUT = 10


def ws_path(conversation_id: int, token: str | None) -> str:
    query = f"?token={token}" if token else ""
    return f"/ws/conversations/{conversation_id}/{query}"


@pytest.fixture
async def open_sockets() -> AsyncIterator[list[WebsocketCommunicator]]:
    """Sockets opened by a test; any still open are disconnected at its end."""
    sockets: list[WebsocketCommunicator] = []
    yield sockets
    for communicator in sockets:
        await communicator.disconnect(timeout=TIMEOUT)


@pytest.fixture
def connect(open_sockets):
    async def connect(conversation, token: str | None, **kwargs) -> WebsocketCommunicator:
        communicator = WebsocketCommunicator(application, ws_path(conversation.pk, token), **kwargs)
        open_sockets.append(communicator)
        connected, _ = await communicator.connect(timeout=TIMEOUT)
        assert connected
        return communicator

    return connect


async def receive_until(communicator: WebsocketCommunicator, *types: str) -> list[dict]:
    """Return the frames received up to and including the first one whose type is in ``types``."""
    frames = []
    while True:
        frame = await communicator.receive_json_from(timeout=TIMEOUT)
        frames.append(frame)
        if frame["type"] in types:
            return frames


async def test_send_streams_start_deltas_done_and_persists(connect, user, conversation, token):
    socket = await connect(conversation, token)

    await socket.send_json_to({"type": "message.send", "content": "Hello there"})
    frames = await receive_until(socket, "reply.done", "error")

    assert [f["type"] for f in frames][0] == "reply.start"
    assert frames[-1]["type"] == "reply.done"
    deltas = frames[1:-1]
    assert len(deltas) > 1
    assert {f["type"] for f in deltas} == {"reply.delta"}
    start = frames[0]
    assert (start["conversation_id"], start["model"]) == (conversation.pk, "sim-model")
    text = "".join(f["content"] for f in deltas)
    assert text == reply_text([{"role": "user", "content": "Hello there"}], FAST_REPLY_TOKENS)
    done = frames[-1]["message"]
    assert (done["id"], done["status"], done["content"]) == (start["message_id"], "completed", text)

    answer = await Message.objects.aget(pk=start["message_id"])
    assert (answer.status, answer.content, answer.completion_tokens) == ("completed", text, FAST_REPLY_TOKENS)
    assert (await Message.objects.aget(pk=start["user_message_id"])).content == "Hello there"
    [record] = await usage_records(message_id=answer.pk)
    assert (record.user_id, record.finish_status, record.completion_tokens) == (user.pk, "completed", FAST_REPLY_TOKENS)


async def test_start_and_done_frames_match_the_api(connect, conversation, token):
    socket = await connect(conversation, token)

    await socket.send_json_to({"type": "message.send", "content": "Hello there"})
    frames = await receive_until(socket, "reply.done", "error")

    start = frames[0]
    assert list(start) == ["type", "conversation_id", "user_message_id", "message_id", "model"]
    listed = await listed_messages(conversation.pk, token)
    # Built from what the reply wrote, not read back: it must be what the API shows, field for field.
    assert frames[-1]["message"] == listed[start["message_id"]]


async def test_a_reply_a_fallback_served_is_saved_under_the_fallbacks_name(connect, fallback_conversation, token):
    socket = await connect(fallback_conversation, token)

    await socket.send_json_to({"type": "message.send", "content": "Hello there"})
    frames = await receive_until(socket, "reply.done", "error")

    start, done = frames[0], frames[-1]
    assert start["model"] == "primary"  # announced before the upstream answered: the model asked for
    assert (done["type"], done["message"]["model"]) == ("reply.done", "backup")
    answer = await Message.objects.aget(pk=start["message_id"])
    assert (answer.model_name, answer.status) == ("backup", "completed")
    assert answer.content == reply_text([{"role": "user", "content": "Hello there"}], FAST_REPLY_TOKENS)
    assert done["message"] == (await listed_messages(fallback_conversation.pk, token))[answer.pk]


async def test_a_second_message_after_the_first_reply(connect, conversation, token):
    socket = await connect(conversation, token)

    for content in ("one", "two"):
        await socket.send_json_to({"type": "message.send", "content": content})
        frames = await receive_until(socket, "reply.done", "error")
        assert frames[-1]["type"] == "reply.done"

    assert await Message.objects.filter(conversation=conversation).acount() == 4


async def test_ping_pong(connect, conversation, token):
    socket = await connect(conversation, token)

    await socket.send_json_to({"type": "ping"})

    assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}


async def test_reply_stop_frame_cancels_mid_stream_and_the_upstream_request(
    connect, slow_simulator, slow_conversation, token
):
    before = (await slow_simulator.astats())["requests_disconnected"]
    socket = await connect(slow_conversation, token)
    await socket.send_json_to({"type": "message.send", "content": "a long story"})
    frames = await receive_until(socket, "reply.start")
    frames += [await socket.receive_json_from(timeout=TIMEOUT) for _ in range(3)]

    await socket.send_json_to({"type": "reply.stop"})
    frames += await receive_until(socket, "reply.done", "error")

    done = frames[-1]
    assert done["type"] == "reply.done"
    assert done["message"]["status"] == "cancelled"
    streamed = "".join(f["content"] for f in frames if f["type"] == "reply.delta")
    assert done["message"]["content"] == streamed
    assert 3 <= len(streamed.split()) < SLOW_REPLY_TOKENS
    answer = await Message.objects.aget(pk=frames[0]["message_id"])
    assert (answer.status, answer.content) == ("cancelled", streamed)
    await poll_until(slow_simulator.astats, lambda stats: stats["requests_disconnected"] >= before + 1)
    [record] = await usage_records(message_id=answer.pk)
    assert record.finish_status == "cancelled"
    assert record.completion_tokens >= len(streamed.split())

    # The socket stays usable: one reply at a time, not one per socket.
    await socket.send_json_to({"type": "ping"})
    assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}


@pytest.fixture
def stopping_state() -> Iterator[None]:
    """Leave the process's stop mark as the test found it (``chatbackend.stopping``)."""
    yield
    server_stopping_set(False)


@pytest.mark.parametrize(
    ("code", "stopping", "error_code"),
    [
        (1000, False, ""),
        (1001, False, ""),
        # uvicorn reports a client's own 1012 close as it does the 1012 it sends at shutdown:
        # only a stopping server makes it a shutdown, else it is a client's stop like any other.
        (CLOSE_SERVICE_RESTART, False, ""),
        (CLOSE_SERVICE_RESTART, True, "server_shutdown"),
    ],
)
async def test_disconnect_mid_stream_cancels_the_reply(
    connect, slow_simulator, slow_conversation, token, stopping_state, code, stopping, error_code
):
    before = (await slow_simulator.astats())["requests_disconnected"]
    socket = await connect(slow_conversation, token)
    await socket.send_json_to({"type": "message.send", "content": "a long story"})
    start = (await receive_until(socket, "reply.start"))[-1]
    first = await socket.receive_json_from(timeout=TIMEOUT)
    assert first["type"] == "reply.delta"

    server_stopping_set(stopping)  # uvicorn closes its sockets after the stop signal marked it
    await socket.disconnect(code=code, timeout=TIMEOUT)

    answer = await poll_until(lambda: Message.objects.filter(pk=start["message_id"], status="cancelled").afirst())
    assert answer.error_code == error_code
    assert answer.content.startswith(first["content"])
    assert 0 < len(answer.content.split()) < SLOW_REPLY_TOKENS
    await poll_until(slow_simulator.astats, lambda stats: stats["requests_disconnected"] >= before + 1)


async def test_stop_endpoint_stops_a_reply_streaming_in_the_consumer(connect, slow_conversation, token):
    socket = await connect(slow_conversation, token)
    await socket.send_json_to({"type": "message.send", "content": "a long story"})
    start = (await receive_until(socket, "reply.start"))[-1]
    assert (await socket.receive_json_from(timeout=TIMEOUT))["type"] == "reply.delta"

    response = await AsyncClient().post(
        f"/api/conversations/{slow_conversation.pk}/messages/{start['message_id']}/stop/",
        headers=bearer(token),
    )
    frames = await receive_until(socket, "reply.done", "error")

    assert response.status_code == 202
    assert frames[-1]["type"] == "reply.done"
    assert frames[-1]["message"]["status"] == "cancelled"
    answer = await Message.objects.aget(pk=start["message_id"])
    assert answer.status == "cancelled"
    assert 0 < len(answer.content.split()) < SLOW_REPLY_TOKENS


async def test_stop_endpoint_of_another_user_is_404_and_the_reply_goes_on(
    connect, other_user, slow_conversation, token
):
    socket = await connect(slow_conversation, token)
    await socket.send_json_to({"type": "message.send", "content": "a long story"})
    start = (await receive_until(socket, "reply.start"))[-1]

    response = await AsyncClient().post(
        f"/api/conversations/{slow_conversation.pk}/messages/{start['message_id']}/stop/",
        headers=bearer(access_token(other_user)),
    )

    assert response.status_code == 404
    assert (await socket.receive_json_from(timeout=TIMEOUT))["type"] == "reply.delta"
    assert (await Message.objects.aget(pk=start["message_id"])).status == "streaming"


async def test_message_send_while_a_reply_streams_is_an_error_frame(connect, slow_conversation, token):
    socket = await connect(slow_conversation, token)
    await socket.send_json_to({"type": "message.send", "content": "first"})
    await receive_until(socket, "reply.start")

    await socket.send_json_to({"type": "message.send", "content": "second"})
    frames = await receive_until(socket, "error")

    assert frames[-1]["error"]["code"] == "reply_in_progress"
    assert frames[-1]["message"] is None
    assert await Message.objects.filter(conversation=slow_conversation, role="user").acount() == 1


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json at all", "invalid_json"),
        ("[1, 2, 3]", "invalid_frame"),
        ('{"type": "dance"}', "unknown_frame_type"),
        ('{"content": "no type"}', "unknown_frame_type"),
        ('{"type": "message.send", "content": ""}', "empty_message"),
        ('{"type": "message.send", "content": "   "}', "empty_message"),
        ('{"type": "message.send", "content": 42}', "invalid_type"),
        ('{"type": "message.send"}', "invalid_type"),
    ],
)
async def test_bad_frames_get_an_error_frame_and_the_socket_stays_open(connect, conversation, token, frame, code):
    socket = await connect(conversation, token)

    await socket.send_to(text_data=frame)
    error = await socket.receive_json_from(timeout=TIMEOUT)

    assert error["type"] == "error"
    assert error["error"]["code"] == code
    assert error["message"] is None
    await socket.send_json_to({"type": "ping"})
    assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}
    assert not await Message.objects.filter(conversation=conversation).aexists()


async def test_binary_frame_gets_an_error_frame(connect, conversation, token):
    socket = await connect(conversation, token)

    await socket.send_to(bytes_data=b"\x00\x01")

    assert (await socket.receive_json_from(timeout=TIMEOUT))["error"]["code"] == "invalid_frame"


async def test_reply_stop_without_a_reply_is_a_no_op(connect, conversation, token):
    socket = await connect(conversation, token)

    await socket.send_json_to({"type": "reply.stop"})
    await socket.send_json_to({"type": "ping"})

    assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}


async def test_upstream_failure_is_an_error_frame_and_a_failed_message(connect, failing_conversation, token):
    socket = await connect(failing_conversation, token)

    await socket.send_json_to({"type": "message.send", "content": "hi"})
    frames = await receive_until(socket, "reply.done", "error")

    assert [f["type"] for f in frames] == ["reply.start", "error"]
    error = frames[-1]
    assert error["error"]["code"] == "upstream_error"
    assert error["message"]["status"] == "failed"
    assert (await Message.objects.aget(pk=error["message"]["id"])).status == "failed"


async def test_unreachable_upstream_is_an_error_frame(connect, unreachable_conversation, token):
    socket = await connect(unreachable_conversation, token)

    await socket.send_json_to({"type": "message.send", "content": "hi"})
    error = (await receive_until(socket, "reply.done", "error"))[-1]

    assert error["type"] == "error"
    assert error["error"]["code"] == "upstream_unreachable"
    assert (await Message.objects.aget(pk=error["message"]["id"])).status == "failed"


@pytest.mark.parametrize("token", [None, "not-a-token", "sk-not-a-real-key-000000000000000000"])
async def test_unauthenticated_socket_is_closed_4401(connect, conversation, token):
    socket = await connect(conversation, token)

    assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    # A frame that was already on its way is ignored, not answered. Nothing signals "ignored", so
    # absence is checked over a bounded time (an answer would follow within a thread hop), then
    # once more after the consumer has handled the disconnect behind the frame and ended any reply.
    await socket.send_json_to({"type": "message.send", "content": "hi"})
    assert await socket.receive_nothing(timeout=0.2)
    await socket.disconnect(timeout=TIMEOUT)
    assert socket.output_queue.empty()
    assert not await Message.objects.filter(conversation=conversation).aexists()


async def test_other_users_conversation_is_closed_4404(connect, other_user, sim_model, token):
    theirs = await run_sync(ConversationFactory, owner=other_user, model=sim_model)

    socket = await connect(theirs, token)

    assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4404}


async def test_missing_conversation_is_closed_4404(connect, token):
    class Missing:
        pk = 987654

    socket = await connect(Missing, token)

    assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4404}


@pytest.mark.parametrize(
    "path",
    ["/ws/conversations/abc/", "/ws/conversations/-1/", "/ws/foo/", "/ws/", "/elsewhere", "/ws/conversations/1/extra/"],
)
@pytest.mark.parametrize("with_token", [True, False])
async def test_a_path_no_route_matches_is_closed_4404_not_a_500(open_sockets, token, path, with_token):
    socket = WebsocketCommunicator(
        application, path + (f"?token={token}" if with_token else ""), subprotocols=["chat.v1"]
    )
    open_sockets.append(socket)

    connected, subprotocol = await socket.connect(timeout=TIMEOUT)

    assert connected
    assert subprotocol == "chat.v1"  # a browser drops a handshake that picks none of those it offered
    assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4404}


async def test_api_key_in_a_bearer_subprotocol(open_sockets, conversation, api_key_secret):
    socket = WebsocketCommunicator(
        application, ws_path(conversation.pk, None), subprotocols=[f"bearer.{api_key_secret}"]
    )
    open_sockets.append(socket)

    connected, subprotocol = await socket.connect(timeout=TIMEOUT)
    await socket.send_json_to({"type": "message.send", "content": "hi"})
    frames = await receive_until(socket, "reply.done", "error")

    assert connected
    assert subprotocol == f"bearer.{api_key_secret}"  # the only offer: browsers need one echoed
    assert frames[-1]["type"] == "reply.done"
    [record] = await usage_records(message_id=frames[-1]["message"]["id"])
    assert record.api_key_id is not None


async def test_bearer_subprotocol_is_not_echoed_when_another_is_offered(open_sockets, conversation, api_key_secret):
    socket = WebsocketCommunicator(
        application, ws_path(conversation.pk, None), subprotocols=["chat.v1", f"bearer.{api_key_secret}"]
    )
    open_sockets.append(socket)

    connected, subprotocol = await socket.connect(timeout=TIMEOUT)
    await socket.send_json_to({"type": "ping"})

    assert connected
    assert subprotocol == "chat.v1"
    assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}


async def test_reply_stop_before_the_first_token(connect, sleepy_simulator, sleepy_conversation, token):
    before = await sleepy_simulator.astats()
    socket = await connect(sleepy_conversation, token)
    await socket.send_json_to({"type": "message.send", "content": "hi"})
    await receive_until(socket, "reply.start")
    # Stop once the upstream has the request (a stop before that never sends it at all).
    await poll_until(sleepy_simulator.astats, lambda stats: stats["requests_started"] >= before["requests_started"] + 1)

    await socket.send_json_to({"type": "reply.stop"})
    done = await socket.receive_json_from(timeout=TIMEOUT)

    assert done["type"] == "reply.done"
    assert (done["message"]["status"], done["message"]["content"]) == ("cancelled", "")
    assert done["message"]["duration_ms"] < 5000
    await poll_until(
        sleepy_simulator.astats, lambda stats: stats["requests_disconnected"] >= before["requests_disconnected"] + 1
    )


async def test_reply_stop_right_after_message_send(connect, sleepy_conversation, token):
    socket = await connect(sleepy_conversation, token)

    # Both frames at once: the stop lands while the reply is still being started.
    await socket.send_json_to({"type": "message.send", "content": "hi"})
    await socket.send_json_to({"type": "reply.stop"})
    frames = await receive_until(socket, "reply.done", "error")

    assert [f["type"] for f in frames] == ["reply.start", "reply.done"]
    assert frames[-1]["message"]["status"] == "cancelled"
    assert (await Message.objects.aget(pk=frames[0]["message_id"])).status == "cancelled"
