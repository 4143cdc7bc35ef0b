"""Sending a message over HTTP: the SSE stream and the non-streamed answer.

The upstream is the simulator process over real HTTP. Streaming tests use
``django_db(transaction=True)``: the views write through worker threads (``run_sync``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from django.test import AsyncClient
from httpx_sse import ServerSentEvent, aconnect_sse

from accounts.models import Membership, Organization
from chatbackend.asyncdb import run_sync
from conversations.models import Message
from llm.models import LLMModel
from llm.selectors import enabled_model_cache
from llm.simulator import reply_text
from llm.tokens import tokenizer_for
from tests.factories import ConversationFactory
from tests.kit import (
    FAST_REPLY_TOKENS,
    SLOW_REPLY_TOKENS,
    asgi_request,
    assert_error,
    bearer,
    listed_messages,
    poll_until,
    sse_events,
    usage_records,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

SSE = "text/event-stream"
O200K = tokenizer_for(setting="o200k_base", model_name="gpt-4o")


def url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/messages/"


async def post(conversation, token: str, body, *, accept: str = SSE, raw: bool = False):
    data = body if raw else json.dumps(body)
    return await AsyncClient().post(
        url(conversation),
        data=data,
        content_type="application/json",
        headers={**bearer(token), "Accept": accept},
    )


def send_over_sse(client: httpx.AsyncClient, conversation, token: str, content: str = "hi") -> Any:
    """Send ``content`` asking for SSE; return httpx-sse's ``EventSource`` context (it adds the ``Accept``)."""
    return aconnect_sse(client, "POST", url(conversation), json={"content": content}, headers=bearer(token))


async def message(pk: int) -> Message:
    return await Message.objects.aget(pk=pk)


async def test_sse_streams_start_deltas_done_and_persists_the_reply(user, conversation, token):
    response = await post(conversation, token, {"content": "Tell me a story"})

    assert response.status_code == 200
    assert response["Content-Type"].startswith(SSE)
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Accel-Buffering"] == "no"
    events = await sse_events(response)
    names = [e.event for e in events]
    assert names[0] == "reply.start"
    assert names[-1] == "reply.done"
    deltas = [e.json() for e in events if e.event == "reply.delta"]
    assert len(deltas) > 1
    assert names == ["reply.start", *["reply.delta"] * len(deltas), "reply.done"]

    start = events[0].json()
    assert start["conversation_id"] == conversation.pk
    assert start["model"] == "sim-model"
    text = "".join(d["content"] for d in deltas)
    assert text == reply_text([{"role": "user", "content": "Tell me a story"}], FAST_REPLY_TOKENS)

    done = events[-1].json()["message"]
    assert done["id"] == start["message_id"]
    assert done["status"] == "completed"
    assert done["content"] == text
    assert done["finish_reason"] == "stop"

    question, answer = await message(start["user_message_id"]), await message(start["message_id"])
    assert (question.role, question.content, question.status) == ("user", "Tell me a story", "completed")
    assert (answer.role, answer.status, answer.content) == ("assistant", "completed", text)
    assert answer.completion_tokens == FAST_REPLY_TOKENS
    assert answer.prompt_tokens > 0
    assert answer.time_to_first_token_ms is not None
    assert answer.duration_ms >= answer.time_to_first_token_ms
    [record] = await usage_records(message_id=answer.pk)
    assert (record.user_id, record.completion_tokens, record.finish_status) == (user.pk, FAST_REPLY_TOKENS, "completed")
    assert record.token_source == "provider"


async def test_sse_start_and_done_payloads_match_the_api(conversation, token):
    raw: list[bytes] = []
    events = await sse_events(await post(conversation, token, {"content": "Tell me a story"}), raw)

    start = events[0].json()
    assert list(start) == ["conversation_id", "user_message_id", "message_id", "model"]
    assert all(isinstance(part, bytes) for part in raw)
    done = events[-1].json()["message"]
    # Built from what the reply wrote, not read back: it must be what the API shows, field for field.
    assert done == (await listed_messages(conversation.pk, token))[start["message_id"]]
    assert list(done) == list((await listed_messages(conversation.pk, token))[start["message_id"]])


async def test_sse_error_message_matches_the_api(failing_conversation, token):
    events = await sse_events(await post(failing_conversation, token, {"content": "hello"}))

    message = events[-1].json()["message"]
    assert message["status"] == "failed"
    assert message == (await listed_messages(failing_conversation.pk, token))[message["id"]]


async def test_sse_reply_a_fallback_served_is_saved_under_the_fallbacks_name(fallback_conversation, token):
    events = await sse_events(await post(fallback_conversation, token, {"content": "Tell me a story"}))

    start, done = events[0].json(), events[-1].json()["message"]
    assert start["model"] == "primary"  # announced before the upstream answered: the model asked for
    assert (done["status"], done["model"]) == ("completed", "backup")
    assert done["content"] == reply_text([{"role": "user", "content": "Tell me a story"}], FAST_REPLY_TOKENS)
    answer = await message(start["message_id"])
    assert answer.model_name == "backup"
    assert done == (await listed_messages(fallback_conversation.pk, token))[answer.pk]
    [record] = await usage_records(message_id=answer.pk)
    assert record.model_name == "backup"


async def test_sse_sends_history_so_a_second_message_gets_its_own_reply(conversation, token):
    first = await sse_events(await post(conversation, token, {"content": "first question"}))
    second = await sse_events(await post(conversation, token, {"content": "second question"}))

    text = "".join(e.json()["content"] for e in second if e.event == "reply.delta")
    assert text == reply_text([{"role": "user", "content": "second question"}], FAST_REPLY_TOKENS)
    assert first[-1].json()["message"]["id"] < second[-1].json()["message"]["id"]
    assert await Message.objects.filter(conversation=conversation).acount() == 4


async def test_sse_accepts_an_api_key(conversation, api_key_secret):
    events = await sse_events(await post(conversation, api_key_secret, {"content": "hi"}))

    assert events[-1].event == "reply.done"
    [record] = await usage_records(message_id=events[-1].json()["message"]["id"])
    assert record.api_key_id is not None


async def test_sse_sends_keepalive_comments_while_waiting_for_the_first_chunk(settings, conversation, token):
    # The simulator waits 20 ms before its first token, so a 5 ms interval must fire at least once.
    settings.SSE_KEEPALIVE_SECONDS = 0.005
    raw: list[bytes] = []

    events = await sse_events(await post(conversation, token, {"content": "hello"}), raw)

    assert [e.event for e in events][-1] == "reply.done"
    assert b": keep-alive\n\n" in raw
    first_delta = next(i for i, part in enumerate(raw) if part.startswith(b"event: reply.delta"))
    assert raw.index(b": keep-alive\n\n") < first_delta
    assert raw[0].startswith(b"event: reply.start")


async def test_non_streamed_send_answers_201_with_both_messages(conversation, token):
    response = await post(conversation, token, {"content": "hello"}, accept="application/json")

    assert response.status_code == 201
    body = response.json()
    assert body["user_message"]["role"] == "user"
    assert body["user_message"]["content"] == "hello"
    assistant = body["assistant_message"]
    assert assistant["status"] == "completed"
    assert assistant["content"] == reply_text([{"role": "user", "content": "hello"}], FAST_REPLY_TOKENS)
    assert assistant["model"] == "sim-model"
    assert await usage_records(message_id=assistant["id"])


async def test_upstream_error_is_an_error_event_and_a_failed_message(failing_conversation, token):
    events = await sse_events(await post(failing_conversation, token, {"content": "hello"}))

    assert [e.event for e in events] == ["reply.start", "error"]
    body = events[-1].json()
    assert body["error"]["code"] == "upstream_error"
    assert body["error"]["type"] == "api_error"
    assert body["message"]["status"] == "failed"
    assert body["message"]["error"]
    answer = await message(body["message"]["id"])
    assert answer.status == "failed"
    # Nothing was generated: one record of the request, nothing billed.
    [record] = await usage_records(message_id=answer.pk)
    assert (record.finish_status, record.total_tokens, record.cost) == ("failed", 0, 0)


async def test_unreachable_upstream_is_an_error_event(unreachable_conversation, token):
    events = await sse_events(await post(unreachable_conversation, token, {"content": "hello"}))

    assert events[-1].event == "error"
    assert events[-1].json()["error"]["code"] == "upstream_unreachable"
    assert (await message(events[-1].json()["message"]["id"])).status == "failed"


async def test_non_streamed_upstream_error_answers_its_status_and_marks_the_message_failed(failing_conversation, token):
    response = await post(failing_conversation, token, {"content": "hello"}, accept="application/json")

    assert_error(response, 502, code="upstream_error")
    answer = await Message.objects.aget(conversation=failing_conversation, role="assistant")
    assert answer.status == "failed"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"content": 5}', "invalid_type"),
        (b'{"content": null}', "invalid_type"),
        (b"{}", "invalid_type"),
        (b'{"content": "   "}', "empty_message"),
    ],
)
async def test_bad_bodies_are_400(conversation, token, body, code):
    response = await post(conversation, token, body, raw=True)

    assert_error(response, 400, code=code, type="invalid_request_error")
    assert not await Message.objects.filter(conversation=conversation).aexists()


@pytest.mark.parametrize("body", [b'{"content": "hi"}', b"{not json"])
async def test_send_without_valid_credentials_is_401(conversation, body):
    response = await post(conversation, "not-a-token", body, raw=True)
    anonymous = await AsyncClient().post(url(conversation), data=body, content_type="application/json")

    assert_error(response, 401, code="token_not_valid")
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert_error(anonymous, 401, code="missing_api_key")
    assert not await Message.objects.filter(conversation=conversation).aexists()


async def test_send_to_another_users_conversation_is_404(other_user, sim_model, token):
    theirs = await run_sync(ConversationFactory, owner=other_user, model=sim_model)

    response = await post(theirs, token, {"content": "hi"})

    assert_error(response, 404, code="conversation_not_found")
    assert not await Message.objects.filter(conversation=theirs).aexists()


async def test_client_disconnect_cancels_the_reply_and_the_upstream_request(
    asgi_server, slow_simulator, slow_conversation, token
):
    before = (await slow_simulator.astats())["requests_disconnected"]
    deltas: list[str] = []
    async with httpx.AsyncClient(base_url=asgi_server, timeout=10) as client:
        async with send_over_sse(client, slow_conversation, token) as source:
            async for event in source.aiter_sse():
                if event.event == "reply.start":
                    message_id = event.json()["message_id"]
                elif event.event == "reply.delta":
                    deltas.append(event.json()["content"])
                    if len(deltas) == 3:
                        break  # leaving the block closes the connection

    answer = await poll_until(lambda: Message.objects.filter(pk=message_id, status="cancelled").afirst())
    assert answer.content.startswith("".join(deltas))  # the server may have relayed a little more
    assert 0 < len(answer.content.split()) < SLOW_REPLY_TOKENS
    await poll_until(slow_simulator.astats, lambda stats: stats["requests_disconnected"] >= before + 1)
    [record] = await poll_until(lambda: usage_records(message_id=message_id))
    assert record.finish_status == "cancelled"
    assert record.token_source == "estimated"


async def test_a_delta_the_client_left_during_is_saved_and_billed_with_the_text_before_it(
    slow_model, slow_conversation, token
):
    """The client disconnects while a ``reply.delta`` is being sent (it never gets it). The upstream
    generated that text and bills it: the message keeps it and the completion tokens are the
    tokenizer's count of exactly the saved text, as for any stopped reply."""
    await run_sync(LLMModel.objects.filter(pk=slow_model.pk).update, tokenizer="o200k_base")
    enabled_model_cache.clear()
    result = await asgi_request(
        "POST",
        url(slow_conversation),
        headers={"Content-Type": "application/json", "Accept": SSE, **bearer(token)},
        body=json.dumps({"content": "Tell me a story"}).encode(),
        disconnect_during_frame=5,  # reply.start, then deltas
    )

    received = [json.loads(part.split(b"data: ", 1)[1]) for part in result.frames]
    message_id = received[0]["message_id"]
    sent = "".join(data["content"] for data in received[1:])
    left_during = json.loads(result.undelivered.split(b"data: ", 1)[1])["content"]
    assert len(received) == 4 and left_during
    answer = await message(message_id)
    assert answer.status == "cancelled"
    assert answer.content == sent + left_during
    [record] = await usage_records(message_id=message_id)
    assert record.token_source == "counted"
    assert record.completion_tokens == answer.completion_tokens == O200K.count_text(sent + left_during)


async def test_stop_endpoint_stops_an_sse_reply(asgi_server, slow_simulator, slow_conversation, token):
    headers = bearer(token)
    events: list[ServerSentEvent] = []
    async with httpx.AsyncClient(base_url=asgi_server, timeout=10) as client:
        async with send_over_sse(client, slow_conversation, token) as source:
            async for event in source.aiter_sse():
                events.append(event)
                if event.event == "reply.delta" and sum(e.event == "reply.delta" for e in events) == 2:
                    message_id = events[0].json()["message_id"]
                    stop = await client.post(f"{url(slow_conversation)}{message_id}/stop/", headers=headers)
                    assert stop.status_code == 202
                    assert stop.json() == {"message_id": message_id, "status": "stopping"}

    assert events[-1].event == "reply.done"  # the stream ends on its own, with the stopped message
    done = events[-1].json()["message"]
    streamed = "".join(e.json()["content"] for e in events if e.event == "reply.delta")
    assert done["status"] == "cancelled"
    assert done["content"] == streamed
    assert 0 < len(streamed.split()) < SLOW_REPLY_TOKENS
    assert (await message(done["id"])).status == "cancelled"


async def test_stop_endpoint_stops_a_non_streamed_reply(asgi_server, slow_simulator, slow_conversation, token):
    headers = bearer(token)
    started = (await slow_simulator.astats())["requests_started"]
    async with httpx.AsyncClient(base_url=asgi_server, timeout=10) as client:
        sending = asyncio.create_task(client.post(url(slow_conversation), json={"content": "hi"}, headers=headers))
        # The upstream request starts after the view listens for stop requests.
        await poll_until(slow_simulator.astats, lambda stats: stats["requests_started"] >= started + 1)
        streaming = await Message.objects.aget(conversation=slow_conversation, role="assistant")
        stop = await client.post(f"{url(slow_conversation)}{streaming.pk}/stop/", headers=headers)
        response = await sending

    assert stop.status_code == 202
    assert response.status_code == 201
    assistant = response.json()["assistant_message"]
    assert assistant["status"] == "cancelled"
    assert assistant["id"] == streaming.pk
    assert len(assistant["content"].split()) < SLOW_REPLY_TOKENS


async def test_stop_endpoint_stops_a_reply_still_waiting_for_its_first_token(
    settings, asgi_server, sleepy_simulator, sleepy_conversation, token
):
    settings.SSE_KEEPALIVE_SECONDS = 0.05  # so the view waits for the first chunk in keep-alive rounds
    before = await sleepy_simulator.astats()
    headers = bearer(token)
    events: list[ServerSentEvent] = []
    async with httpx.AsyncClient(base_url=asgi_server, timeout=10) as client:
        async with send_over_sse(client, sleepy_conversation, token) as source:
            async for event in source.aiter_sse():
                events.append(event)
                if event.event == "reply.start":
                    # Stop once the upstream has the request (a stop before that never sends it).
                    await poll_until(
                        sleepy_simulator.astats,
                        lambda stats: stats["requests_started"] >= before["requests_started"] + 1,
                    )
                    stop_url = f"{url(sleepy_conversation)}{event.json()['message_id']}/stop/"
                    assert (await client.post(stop_url, headers=headers)).status_code == 202

    assert [e.event for e in events] == ["reply.start", "reply.done"]
    done = events[-1].json()["message"]
    assert (done["status"], done["content"], done["time_to_first_token_ms"]) == ("cancelled", "", None)
    assert done["duration_ms"] < 5000  # stopped before the upstream's first token
    await poll_until(
        sleepy_simulator.astats,
        lambda stats: stats["requests_disconnected"] >= before["requests_disconnected"] + 1,
    )


async def test_sse_reply_in_another_organization_is_accounted_to_it(user, sim_model, token):
    """A reply acting in an organization (``OpenAI-Organization``) writes its usage row to that organization."""
    acme = await Organization.objects.acreate(name="Acme", slug="acme")
    await Membership.objects.acreate(user=user, organization=acme)
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model, organization=acme)

    response = await AsyncClient().post(
        url(conversation),
        data=json.dumps({"content": "hi"}),
        content_type="application/json",
        headers={**bearer(token), "Accept": "application/json", "OpenAI-Organization": "acme"},
    )
    assert response.status_code == 201, response.content
    [record] = await usage_records(message_id=response.json()["assistant_message"]["id"])
    assert record.organization_id == acme.pk
    # Acting in the default organization, the conversation does not exist.
    missing = await post(conversation, token, {"content": "hi"}, accept="application/json")
    assert missing.status_code == 404
