"""OpenAI's stored chat completions: ``store: true`` keeps the exchange as a conversation of its caller.

The official openai SDK talks to the server over real HTTP (``asgi_server``: uvicorn in the test's
loop) and stores, lists, retrieves, updates and deletes completions and lists their messages; the
raw bodies are checked against OpenAI's published schemas (``llm.tests.openai_schema``). Replies
come from the LLM simulator.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from accounts.models import APIKey, Membership, Organization
from accounts.services import api_key_create
from chatbackend.asyncdb import run_sync
from conversations.models import Conversation, Message
from llm.simulator import reply_text
from llm.simulator.wire import REFUSAL_TEXT
from llm.tests.openai_schema import validate_against
from tests.factories import LLMModelFactory, ProviderFactory, simulator_fault_model
from tests.kit import (
    CHAT_URL,
    FAST_REPLY_TOKENS,
    SLOW_REPLY_TOKENS,
    asgi_request,
    assert_error,
    bearer,
    chat_body,
    chunk_text,
    sse_data,
    usage_records,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

MESSAGES: Any = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "about rivers"}]},
]


def sdk(server: str, key: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, default_headers=headers or None)


async def get_json(server: str, path: str, key: str, **params: Any) -> tuple[int, Any]:
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        response = await client.get(path, params=params, headers=bearer(key))
    return response.status_code, response.json()


def stored() -> list[Conversation]:
    return list(Conversation.objects.filter(completion_id__isnull=False).order_by("pk"))


def validate_message_list(body: dict[str, Any]) -> None:
    """Check a messages page against ``ChatCompletionMessageList``.

    OpenAI's schema types each item as a ``ChatCompletionResponseMessage``, whose ``role`` enum holds
    only ``assistant``, while its own example (and its API) lists the request's ``user`` messages:
    each item is checked with its role set aside, the role against the request roles.
    """
    validate_against("ChatCompletionMessageList", {**body, "data": []})
    for item in body["data"]:
        assert item["role"] in ("system", "developer", "user", "assistant", "tool")
        validate_against("ChatCompletionMessageList", {**body, "data": [{**item, "role": "assistant"}]})


async def validate_raw_shapes(server: str, key: str, completion_id: str) -> Any:
    """Check the raw bodies of a stored completion and of its messages against OpenAI's schemas; return the first."""
    status, body = await get_json(server, f"/v1/chat/completions/{completion_id}", key)
    assert status == 200
    validate_against("CreateChatCompletionResponse", body)
    status, page = await get_json(server, f"/v1/chat/completions/{completion_id}/messages", key)
    assert status == 200
    validate_message_list(page)
    return body


async def test_the_sdk_stores_a_completion_then_lists_retrieves_and_reads_its_messages(
    asgi_server, api_key_secret, user, sim_model
):
    async with sdk(asgi_server, api_key_secret) as client:
        created = await client.chat.completions.create(
            model="sim-model", messages=MESSAGES, store=True, metadata={"topic": "rivers"}
        )
        stream = await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "Hello"}], store=True, stream=True
        )
        streamed = [chunk async for chunk in stream]
        listed = await client.chat.completions.list()
        retrieved = await client.chat.completions.retrieve(created.id)
        messages = await client.chat.completions.messages.list(created.id)

    stream_id = streamed[0].id
    assert [completion.id for completion in listed.data] == [created.id, stream_id]  # oldest first
    assert listed.has_more is False
    assert retrieved.id == created.id and retrieved.created == created.created
    assert retrieved.model == "sim-model"
    assert retrieved.choices[0].message.content == created.choices[0].message.content
    expected_text = reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert retrieved.choices[0].message.content == expected_text
    assert retrieved.choices[0].finish_reason == "stop"
    assert retrieved.usage is not None and created.usage is not None
    assert retrieved.usage.total_tokens == created.usage.total_tokens
    assert retrieved.metadata == {"topic": "rivers"}
    assert [(m.id, m.role, m.content) for m in messages.data] == [
        (f"{created.id}-0", "system", "Answer briefly."),
        (f"{created.id}-1", "user", "Tell me about rivers"),
    ]
    streamed_text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert listed.data[1].choices[0].message.content == streamed_text

    # Kept as conversations of the caller, with the request's messages and the reply.
    [first, second] = await run_sync(stored)
    assert first.owner_id == user.pk and first.completion_id == created.id
    assert first.organization_id == (await run_sync(Organization.objects.default)).pk
    rows = await run_sync(lambda: list(first.messages.values_list("role", "content", "status")))
    assert rows == [
        ("system", "Answer briefly.", "completed"),
        ("user", "Tell me about rivers", "completed"),
        ("assistant", expected_text, "completed"),
    ]
    assert second.completion_id == stream_id
    async with httpx.AsyncClient(base_url=asgi_server, timeout=30) as http:
        listed_rest = (await http.get("/api/conversations/", headers=bearer(api_key_secret))).json()["results"]
    assert {row["completion_id"] for row in listed_rest} == {created.id, stream_id}
    # ... whose exchange is the active branch: read and continued like a chat made here.
    async with httpx.AsyncClient(base_url=asgi_server, timeout=30) as http:
        branch = (await http.get(f"/api/conversations/{first.pk}/messages/", headers=bearer(api_key_secret))).json()
    assert [row["role"] for row in branch["results"]] == ["system", "user", "assistant"]

    # The raw bodies are OpenAI's shapes.
    status, page = await get_json(asgi_server, "/v1/chat/completions", api_key_secret)
    assert status == 200
    validate_against("ChatCompletionList", page)
    body = await validate_raw_shapes(asgi_server, api_key_secret, created.id)
    assert body["status"] == "completed"


async def test_a_stored_completion_continued_as_a_conversation_reads_back_unchanged(
    asgi_server, api_key_secret, sim_model
):
    """README: a stored completion is a conversation that can be continued; what its /v1 endpoints
    read back is still the completion as answered, not the conversation's newest reply."""
    history: Any = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, what shall we talk about?"},  # a history, not generated here
        {"role": "user", "content": "Rivers"},
    ]
    async with sdk(asgi_server, api_key_secret) as client:
        created = await client.chat.completions.create(model="sim-model", messages=history, store=True)
    [conversation] = await run_sync(stored)
    async with httpx.AsyncClient(base_url=asgi_server, timeout=30) as http:
        sent = await http.post(
            f"/api/conversations/{conversation.pk}/messages/",
            json={"content": "And now something else entirely, at some length"},
            headers=bearer(api_key_secret),
        )
        assert sent.status_code == 201
        reply_id = sent.json()["assistant_message"]["id"]
        regenerated = await http.post(
            f"/api/conversations/{conversation.pk}/messages/{reply_id}/regenerate/", headers=bearer(api_key_secret)
        )
        assert regenerated.status_code == 201
    async with sdk(asgi_server, api_key_secret) as client:
        retrieved = await client.chat.completions.retrieve(created.id)
        [listed] = (await client.chat.completions.list()).data
        messages = await client.chat.completions.messages.list(created.id)

    for completion in (retrieved, listed):
        assert completion.choices[0].message.content == created.choices[0].message.content
        assert completion.usage is not None and created.usage is not None
        assert completion.usage.total_tokens == created.usage.total_tokens
    assert [(m.role, m.content) for m in messages.data] == [(m["role"], m["content"]) for m in history]


async def test_without_store_nothing_is_stored(asgi_server, api_key_secret, sim_model):
    async with sdk(asgi_server, api_key_secret) as client:
        await client.chat.completions.create(model="sim-model", messages=MESSAGES)
        await client.chat.completions.create(model="sim-model", messages=MESSAGES, store=False, metadata={"a": "b"})
        stream = await client.chat.completions.create(model="sim-model", messages=MESSAGES, stream=True)
        _ = [chunk async for chunk in stream]
        listed = await client.chat.completions.list()

    assert len(await usage_records()) == 3
    assert listed.data == [] and listed.has_more is False
    assert await run_sync(lambda: Conversation.objects.count()) == 0


async def test_another_user_or_organization_gets_404(asgi_server, api_key_secret, user, other_user, sim_model):
    acme = await run_sync(Organization.objects.create, name="Acme", slug="acme")
    await run_sync(Membership.objects.create, user=user, organization=acme, role=Membership.Role.OWNER)
    other_key = (await run_sync(api_key_create, user=other_user, name="other")).secret
    acme_key = (await run_sync(api_key_create, user=user, name="acme", organization=acme)).secret
    async with sdk(asgi_server, api_key_secret) as client:
        created = await client.chat.completions.create(model="sim-model", messages=MESSAGES, store=True)

    for key in (other_key, acme_key):
        async with sdk(asgi_server, key) as client:
            assert (await client.chat.completions.list()).data == []
            with pytest.raises(openai.NotFoundError) as caught:
                await client.chat.completions.retrieve(created.id)
            assert caught.value.body["code"] == "completion_not_found"  # type: ignore[index]
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.messages.list(created.id)
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.update(created.id, metadata={"taken": "yes"})
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.delete(created.id)
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.list(after=created.id)
        status, body = await get_json(asgi_server, f"/v1/chat/completions/{created.id}", key)
        assert status == 404
        validate_against("ErrorResponse", body)

    # Still there, unchanged, for its owner.
    async with sdk(asgi_server, api_key_secret) as client:
        assert (await client.chat.completions.retrieve(created.id)).metadata == {}


async def test_metadata_update_filters_and_delete(asgi_server, api_key_secret, sim_model):
    async with sdk(asgi_server, api_key_secret) as client:
        first = await client.chat.completions.create(
            model="sim-model", messages=MESSAGES, store=True, metadata={"team": "blue", "run": "1"}
        )
        second = await client.chat.completions.create(
            model="sim-model", messages=MESSAGES, store=True, metadata={"team": "red"}
        )
        blue = await client.chat.completions.list(metadata={"team": "blue"})
        assert [c.id for c in blue.data] == [first.id]
        assert (await client.chat.completions.list(metadata={"team": "blue", "run": "2"})).data == []
        assert [c.id for c in (await client.chat.completions.list(model="sim-model")).data] == [first.id, second.id]
        assert (await client.chat.completions.list(model="other-model")).data == []

        updated = await client.chat.completions.update(second.id, metadata={"team": "blue", "note": "moved"})
        assert updated.id == second.id and updated.metadata == {"team": "blue", "note": "moved"}
        blue = await client.chat.completions.list(metadata={"team": "blue"})
        assert [c.id for c in blue.data] == [first.id, second.id]

        deleted = await client.chat.completions.delete(first.id)
        assert deleted.id == first.id and deleted.deleted is True
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.retrieve(first.id)
        assert [c.id for c in (await client.chat.completions.list()).data] == [second.id]

    assert [c.completion_id for c in await run_sync(stored)] == [second.id]
    assert len(await usage_records()) == 2  # usage rows outlive the deleted completion


async def test_pages_follow_after_limit_and_order(asgi_server, api_key_secret, sim_model):
    async with sdk(asgi_server, api_key_secret) as client:
        ids = [
            (await client.chat.completions.create(model="sim-model", messages=MESSAGES, store=True)).id
            for _ in range(3)
        ]
        page = await client.chat.completions.list(limit=2)
        assert [c.id for c in page.data] == ids[:2] and page.has_more is True
        rest = await client.chat.completions.list(limit=2, after=ids[1])
        assert [c.id for c in rest.data] == ids[2:] and rest.has_more is False
        newest = await client.chat.completions.list(limit=2, order="desc")
        assert [c.id for c in newest.data] == ids[:0:-1]
        assert [c.id async for c in client.chat.completions.list(limit=1)] == ids  # the SDK's auto-pagination
        messages = await client.chat.completions.messages.list(ids[0], limit=1, order="desc")
        assert [m.role for m in messages.data] == ["user"] and messages.has_more is True
        messages = await client.chat.completions.messages.list(ids[0], after=f"{ids[0]}-1", order="desc")
        assert [m.role for m in messages.data] == ["system"] and messages.has_more is False

    status, body = await get_json(asgi_server, "/v1/chat/completions", api_key_secret, limit=2, after=ids[1])
    assert status == 200 and body["first_id"] == body["last_id"] == ids[2]
    validate_against("ChatCompletionList", body)
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"limit": ""}, {"order": "up"}, {"order": ""}):
        status, body = await get_json(asgi_server, "/v1/chat/completions", api_key_secret, **params)
        assert status == 400 and body["error"]["param"] == next(iter(params)), body
    status, body = await get_json(asgi_server, f"/v1/chat/completions/{ids[0]}/messages", api_key_secret, order="")
    assert status == 400 and body["error"]["param"] == "order"
    status, body = await get_json(asgi_server, f"/v1/chat/completions/{ids[0]}/messages", api_key_secret, after="x")
    assert status == 404 and body["error"]["code"] == "message_not_found"


async def test_pages_continue_after_a_completion_deleted_meanwhile(asgi_server, api_key_secret, sim_model):
    # The SDK's auto-pagination asks for the next page "after" the last id of the page it has: a
    # loop deleting each completion it lists (cleanup) got a 404 on its second page.
    async with sdk(asgi_server, api_key_secret) as client:
        ids = [
            (await client.chat.completions.create(model="sim-model", messages=MESSAGES, store=True)).id
            for _ in range(4)
        ]
        newest = await client.chat.completions.list(limit=2, order="desc")
        await client.chat.completions.delete(ids[2])
        older = await client.chat.completions.list(limit=2, order="desc", after=newest.data[-1].id)
        assert [c.id for c in older.data] == [ids[1], ids[0]] and older.has_more is False

        seen = []
        async for completion in client.chat.completions.list(limit=1):
            seen.append(completion.id)
            await client.chat.completions.delete(completion.id)
        assert seen == [ids[0], ids[1], ids[3]]

    assert await run_sync(stored) == []
    status, body = await get_json(asgi_server, "/v1/chat/completions", api_key_secret, after="chatcmpl-never")
    assert status == 404 and body["error"]["code"] == "completion_not_found" and body["error"]["param"] == "after"


async def test_a_stopped_stream_keeps_what_was_generated_marked_cancelled(
    api_key_secret, slow_model, slow_simulator, asgi_server
):
    body = json.dumps(chat_body("slow-model", stream=True, store=True)).encode()
    headers = {"Content-Type": "application/json", **bearer(api_key_secret)}
    result = await asgi_request("POST", CHAT_URL, headers=headers, body=body, disconnect_after_frames=3)
    assert result.status_code == 200

    [conversation] = await run_sync(stored)
    reply = await run_sync(lambda: conversation.messages.get(role=Message.Role.ASSISTANT))
    assert reply.status == Message.Status.CANCELLED
    assert reply.error_code == ""  # the client left: not the server's shutdown (chatbackend.tests.test_asgi)
    assert 0 < len(reply.content) < len(reply_text(chat_body("slow-model")["messages"], SLOW_REPLY_TOKENS))
    async with sdk(asgi_server, api_key_secret) as client:
        retrieved = await client.chat.completions.retrieve(conversation.completion_id or "")
    assert retrieved.choices[0].message.content == reply.content
    assert retrieved.model_extra is not None and retrieved.model_extra["status"] == "cancelled"
    # Not "stop" (a natural end): the stream was cut before any finish_reason, as its client saw it.
    assert retrieved.choices[0].finish_reason is None


async def test_a_refusal_reads_back_as_refusal_and_usage_with_its_details(api_key_secret, simulator, asgi_server):
    """A stored refusal reads back as the model answered it (``message.refusal``, ``content`` null),
    and a stored reply's ``usage`` keeps the provider's cached and reasoning tokens, as answered."""
    refusing = await run_sync(
        simulator_fault_model, base_url=simulator.base_url, name="refusing-model", fault="refusal"
    )
    caching = await run_sync(
        simulator_fault_model,
        base_url=simulator.base_url,
        name="cache-model",
        fault="cached-tokens=4, reasoning-tokens=7",
    )
    async with sdk(asgi_server, api_key_secret) as client:
        refused = await client.chat.completions.create(model=refusing.name, messages=MESSAGES, store=True)
        cached = await client.chat.completions.create(model=caching.name, messages=MESSAGES, store=True)
        stream = await client.chat.completions.create(model=refusing.name, messages=MESSAGES, store=True, stream=True)
        streamed_id = [chunk async for chunk in stream][0].id
        refused_back = await client.chat.completions.retrieve(refused.id)
        streamed_back = await client.chat.completions.retrieve(streamed_id)
        cached_back = await client.chat.completions.retrieve(cached.id)

    assert refused.choices[0].message.refusal == REFUSAL_TEXT
    for completion in (refused_back, streamed_back):
        assert completion.choices[0].message.refusal == REFUSAL_TEXT
        assert completion.choices[0].message.content is None
    assert cached.usage is not None and cached_back.usage is not None
    assert cached_back.usage.prompt_tokens_details is not None
    assert cached_back.usage.prompt_tokens_details.cached_tokens == 4
    assert cached_back.usage.completion_tokens_details is not None
    assert cached_back.usage.completion_tokens_details.reasoning_tokens == 7
    assert cached_back.usage.model_dump() == cached.usage.model_dump()
    for completion_id in (refused.id, cached.id):
        status, body = await get_json(asgi_server, f"/v1/chat/completions/{completion_id}", api_key_secret)
        assert status == 200
        validate_against("CreateChatCompletionResponse", body)
    # The conversation still shows what the model said, as a conversation reply keeps a refusal.
    reply = await run_sync(
        lambda: Message.objects.get(conversation__completion_id=refused.id, role=Message.Role.ASSISTANT)
    )
    assert reply.content == REFUSAL_TEXT


TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


async def test_tool_calls_read_back_as_answered_and_as_sent(api_key_secret, simulator, asgi_server):
    """The reply's tool calls (streamed or whole) and the request's assistant tool calls are kept:
    ``retrieve`` answers them as ``message.tool_calls``, ``messages.list`` with their turns."""
    await run_sync(
        lambda: LLMModelFactory(
            name="claude-tools",
            provider=ProviderFactory(name="sim-anthropic", kind="anthropic", base_url=simulator.root_url, api_key=""),
            upstream_model="sim-1",
        )
    )
    earlier = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    messages: Any = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [earlier]},
        {"role": "tool", "tool_call_id": "call_0", "content": "Sunny"},
        {"role": "assistant", "content": "Sunny in Oslo."},
        {"role": "user", "content": "And in Paris?"},
    ]
    async with sdk(asgi_server, api_key_secret) as client:
        whole = await client.chat.completions.create(model="claude-tools", messages=messages, tools=TOOLS, store=True)
        stream = await client.chat.completions.create(
            model="claude-tools", messages=messages, tools=TOOLS, store=True, stream=True
        )
        chunks = [chunk async for chunk in stream]
        streamed_id = chunks[0].id
        whole_back = await client.chat.completions.retrieve(whole.id)
        streamed_back = await client.chat.completions.retrieve(streamed_id)
        listed = [message async for message in client.chat.completions.messages.list(whole.id)]

    answered = whole.choices[0].message.tool_calls
    assert answered and answered[0].function.name == "get_weather"
    deltas = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
    streamed = {
        "id": deltas[0].id,
        "type": "function",
        "function": {"name": deltas[0].function.name, "arguments": "".join(d.function.arguments or "" for d in deltas)},
    }
    for completion, expected in ((whole_back, [call.model_dump() for call in answered]), (streamed_back, [streamed])):
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls is not None
        assert [call.model_dump() for call in choice.message.tool_calls] == expected
    assert [message.role for message in listed] == ["user", "assistant", "tool", "assistant", "user"]
    assert listed[1].tool_calls is not None and listed[1].tool_calls[0].model_dump() == earlier
    assert listed[1].content is None and listed[0].tool_calls is None
    # The tool message says which call it answers, as the request sent it; no other message has one.
    assert [getattr(message, "tool_call_id", None) for message in listed] == [None, None, "call_0", None, None]
    await validate_raw_shapes(asgi_server, api_key_secret, whole.id)


async def test_a_reply_cut_off_keeps_a_stream_but_not_a_whole_reply_answered_with_an_error(
    api_key_secret, simulator, asgi_server
):
    """The upstream drops the connection after 3 tokens: a stream's client got those tokens, and the
    completion is kept ``failed`` with them; a ``stream: false`` client got a 502, not a completion
    (nor its id), and nothing is kept, as for a request that failed before any output."""
    dropping = await run_sync(
        simulator_fault_model, base_url=simulator.base_url, name="drop-model", fault="drop-after=3"
    )
    headers = {"Content-Type": "application/json", **bearer(api_key_secret)}
    async with httpx.AsyncClient(base_url=asgi_server, timeout=30) as http:
        whole = await http.post(CHAT_URL, json=chat_body(dropping.name, store=True), headers=headers)
        assert whole.status_code == 502
        streamed = await http.post(CHAT_URL, json=chat_body(dropping.name, store=True, stream=True), headers=headers)
        assert streamed.status_code == 200
    [conversation] = await run_sync(stored)
    reply = await run_sync(lambda: conversation.messages.get(role=Message.Role.ASSISTANT))
    assert reply.status == Message.Status.FAILED and reply.error_code == "upstream_disconnected"
    received = chunk_text(json.loads(data) for data in sse_data(streamed.content) if data.startswith('{"id"'))
    assert reply.content == received and received  # what its client got before the cut
    assert len(await usage_records()) == 2  # both billed for what was generated


async def test_scopes_reading_needs_read_and_storing_chat(asgi_server, user, sim_model):
    chat_only = (await run_sync(api_key_create, user=user, name="chat", scopes=[APIKey.Scope.CHAT])).secret
    read_only = (await run_sync(api_key_create, user=user, name="read", scopes=[APIKey.Scope.READ])).secret
    async with sdk(asgi_server, chat_only) as client:
        created = await client.chat.completions.create(model="sim-model", messages=MESSAGES, store=True)
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.list()
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.retrieve(created.id)
    async with sdk(asgi_server, read_only) as client:
        assert [c.id for c in (await client.chat.completions.list()).data] == [created.id]
        assert (await client.chat.completions.messages.list(created.id)).data
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="sim-model", messages=MESSAGES, store=True)
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.update(created.id, metadata={})
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.delete(created.id)


async def test_metadata_follows_openai_limits(asgi_server, api_key_secret, sim_model):
    async with sdk(asgi_server, api_key_secret) as client:
        for metadata in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(
                    model="sim-model", messages=MESSAGES, store=True, metadata=metadata
                )
            assert caught.value.body["param"].startswith("metadata")  # type: ignore[index]
        created = await client.chat.completions.create(model="sim-model", messages=MESSAGES, store=True)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.update(created.id, metadata={"k" * 65: "v"})
        cleared = await client.chat.completions.update(created.id, metadata=None)  # type: ignore[arg-type]
        assert cleared.metadata == {}
    assert await run_sync(lambda: Conversation.objects.count()) == 1


async def test_store_and_metadata_are_not_sent_upstream(asgi_server, api_key_secret, scripted_upstream):
    from llm.models import LLMModel, Provider

    provider = await run_sync(Provider.objects.create, name="scripted", base_url=scripted_upstream.base_url)
    await run_sync(LLMModel.objects.create, name="scripted-ok", provider=provider, upstream_model="plain")
    async with sdk(asgi_server, api_key_secret) as client:
        await client.chat.completions.create(
            model="scripted-ok", messages=MESSAGES, store=True, metadata={"k": "v"}, temperature=0.5
        )
    sent = scripted_upstream.requests[-1]
    assert "store" not in sent and "metadata" not in sent and sent["temperature"] == 0.5


# A NUL character reaches no query (PostgreSQL refuses it in text: a 500): a completion id holding
# one is no completion's (404, as an unknown id), a query parameter holding one is a 400 naming it.
@pytest.mark.parametrize(
    ("method", "url", "body", "status", "code", "param"),
    [
        ("GET", "/v1/chat/completions?model=%00", None, 400, "invalid", "model"),
        ("GET", "/v1/chat/completions?after=%00", None, 400, "invalid", "after"),
        ("GET", "/v1/chat/completions?metadata%5Bk%5D=%00", None, 400, "invalid", "metadata[k]"),
        ("GET", "/v1/chat/completions?metadata%5B%00%5D=x", None, 400, "invalid", "metadata"),
        ("GET", "/v1/chat/completions/%00", None, 404, "completion_not_found", None),
        ("POST", "/v1/chat/completions/%00", {"metadata": {}}, 404, "completion_not_found", None),
        ("DELETE", "/v1/chat/completions/%00", None, 404, "completion_not_found", None),
        ("GET", "/v1/chat/completions/%00/messages", None, 404, "completion_not_found", None),
        ("GET", "/v1/chat/completions/chatcmpl-x/messages?after=%00", None, 400, "invalid", "after"),
    ],
)
async def test_a_nul_character_in_an_id_or_a_query_parameter_is_a_4xx(
    async_client, api_key_secret, method, url, body, status, code, param
):
    response = await async_client.generic(
        method,
        url,
        json.dumps(body) if body is not None else "",
        content_type="application/json",
        headers=bearer(api_key_secret),
    )
    error = assert_error(response, status, code=code)
    assert error["param"] == param
