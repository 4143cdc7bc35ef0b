"""NextChat (ChatGPT-Next-Web v2.16) against the OpenAI-compatible API, unmodified.

Requests are shaped exactly as /work/shared/nextchat.md records them (browser mode and server
mode), and responses are read the way NextChat's ``app/client/platforms/openai.ts`` reads them:
status and content type first, then the JSON of each ``data:`` line, ``choices[0].delta``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.test import AsyncClient
from django.utils import timezone

from accounts.models import Membership, Organization
from accounts.selectors import usage_current_month
from accounts.services import api_key_create
from chatbackend.asyncdb import run_sync
from llm.simulator import reply_text
from llm.tests.openai_schema import validate_against
from tests.factories import UPSTREAM_API_KEY, usage_record_at
from tests.kit import (
    CHAT_URL,
    FAST_REPLY_TOKENS,
    NEXTCHAT_ORIGIN,
    asgi_request,
    assert_error,
    bearer,
    nextchat_browser_headers,
    nextchat_chat_request,
    nextchat_server_headers,
    streamed_content,
    usage_records,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("provider_clients")]

SYSTEM_PROMPT = (
    "\nYou are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2023-10\n"
    "Current model: gpt-4o-mini\nCurrent time: Sat Nov 21 2026 11:00:00 GMT+0000\n"
)


def read_like_nextchat(status: int, content_type: str, body: bytes) -> tuple[str, str, bool]:
    """Return ``(text, reasoning, saw_done)`` as NextChat's ``streamWithThink`` assembles them.

    NextChat's ``onopen`` refuses anything but a 200 ``text/event-stream``; each ``data:`` line
    is JSON except ``[DONE]``; chunks without ``choices`` are ignored; it reads only
    ``choices[0].delta.content`` and ``.reasoning_content``.
    """
    assert status == 200, body[:500]
    assert content_type.startswith("text/event-stream"), content_type
    text, reasoning, done = [], [], False
    for line in body.decode("utf-8").split("\n"):
        if not line.startswith("data:"):
            assert line == "" or line.startswith(":"), line  # blank separators, comments
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        chunk = json.loads(data)
        validate_against("CreateChatCompletionStreamResponse", chunk)
        choices = chunk.get("choices")
        if not choices:
            continue
        delta = choices[0]["delta"]
        text.append(delta.get("content") or "")
        reasoning.append(delta.get("reasoning_content") or "")
    return "".join(text), "".join(reasoning), done


async def post_as_nextchat(client: AsyncClient, request: dict[str, Any], headers: dict[str, str]) -> Any:
    """POST ``request`` with NextChat's ``headers`` (``Content-Type`` travels as the body's type)."""
    headers = dict(headers)
    content_type = headers.pop("Content-Type")
    return await client.post(CHAT_URL, data=json.dumps(request), content_type=content_type, headers=headers)


def assert_no_secrets(response_bytes: bytes, *secrets: str) -> None:
    for secret in secrets:
        assert secret.encode() not in response_bytes


def everything(response: Any, body: bytes) -> bytes:
    return body + str(sorted(response.items())).encode()


# --- Browser mode ("custom endpoint"): the browser calls /v1 directly -------------------------


async def test_cors_preflight_as_the_browser_sends_it_needs_no_key():
    client = AsyncClient()
    for path, method in ((CHAT_URL, "POST"), ("/v1/models", "GET"), ("/dashboard/billing/usage", "GET")):
        response = await client.options(
            path,
            headers={
                "Origin": NEXTCHAT_ORIGIN,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert response.status_code == 200, path
        assert response["Access-Control-Allow-Origin"] in ("*", NEXTCHAT_ORIGIN)
        allowed = {name.strip() for name in response["Access-Control-Allow-Headers"].split(",")}
        # Every header NextChat's providers may send (nextchat.md, "Browser mode").
        needed = {"authorization", "content-type", "accept", "x-api-key", "anthropic-version", "api-key"}
        assert needed | {"x-goog-api-key"} <= allowed
        allowed_methods = {name.strip() for name in response["Access-Control-Allow-Methods"].split(",")}
        assert {"GET", "POST", "PUT", "OPTIONS"} <= allowed_methods
        assert int(response["Access-Control-Max-Age"]) > 0


async def test_chat_turn_streams_the_way_nextchat_reads_it(api_key_secret, nextchat_model):
    client = AsyncClient()
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Write a haiku"}]
    response = await post_as_nextchat(
        client, nextchat_chat_request(messages), nextchat_browser_headers(api_key_secret, stream=True)
    )
    assert response["Access-Control-Allow-Origin"] in ("*", NEXTCHAT_ORIGIN)
    body = await streamed_content(response)
    text, reasoning, done = read_like_nextchat(response.status_code, response["Content-Type"], body)

    assert text == reply_text(messages, FAST_REPLY_TOKENS)
    assert reasoning == ""
    assert done
    assert_no_secrets(everything(response, body), api_key_secret, UPSTREAM_API_KEY)
    [record] = await usage_records()
    assert record.model_name == "gpt-4o-mini" and record.finish_status == "completed"


async def test_vision_request_with_content_parts_streams(api_key_secret, nextchat_model):
    client = AsyncClient()
    image = "data:image/jpeg;base64," + "A" * 4000
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        },
    ]
    response = await post_as_nextchat(
        client, nextchat_chat_request(messages, max_tokens=4000), nextchat_browser_headers(api_key_secret, stream=True)
    )
    body = await streamed_content(response)
    text, _, done = read_like_nextchat(response.status_code, response["Content-Type"], body)
    assert text == reply_text(messages, FAST_REPLY_TOKENS)
    assert done


async def test_reasoning_model_request_with_developer_role_streams(api_key_secret, nextchat_model):
    client = AsyncClient()
    # For o1/o3/o4-mini/gpt-5 NextChat sends a developer message and max_completion_tokens.
    messages = [{"role": "developer", "content": "Formatting re-enabled"}, {"role": "user", "content": "Prove it"}]
    request = nextchat_chat_request(messages, max_completion_tokens=5)
    for name in ("presence_penalty", "frequency_penalty", "top_p"):
        request.pop(name)
    response = await post_as_nextchat(client, request, nextchat_browser_headers(api_key_secret, stream=True))
    body = await streamed_content(response)
    text, _, done = read_like_nextchat(response.status_code, response["Content-Type"], body)
    assert text == reply_text(messages, 5)  # max_completion_tokens reached the upstream
    assert done


async def test_plugin_tool_follow_up_request_is_accepted(api_key_secret, nextchat_model):
    client = AsyncClient()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "web_search",
                "description": "Search the web",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
            },
        }
    ]
    call = {"id": "call_abc", "type": "function", "function": {"name": "web_search", "arguments": '{"query":"x"}'}}
    messages = [
        {"role": "user", "content": "Search for x"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "name": "web_search", "content": "x is a letter"},
    ]
    response = await post_as_nextchat(
        client, nextchat_chat_request(messages, tools=tools), nextchat_browser_headers(api_key_secret, stream=True)
    )
    body = await streamed_content(response)
    text, _, done = read_like_nextchat(response.status_code, response["Content-Type"], body)
    assert text == reply_text(messages, FAST_REPLY_TOKENS)  # the reply to the last user message
    assert done


async def test_title_request_without_stream_answers_json(api_key_secret, nextchat_model):
    client = AsyncClient()
    messages = [
        {"role": "user", "content": "Write a haiku"},
        {"role": "assistant", "content": "An old silent pond"},
        {"role": "user", "content": "Summarize our conversation in a title of at most 10 words."},
    ]
    response = await post_as_nextchat(
        client, nextchat_chat_request(messages, stream=False), nextchat_browser_headers(api_key_secret, stream=False)
    )
    assert response.status_code == 200  # NextChat keeps a title only on 200
    assert response["Content-Type"] == "application/json"
    completion = json.loads(response.content)
    validate_against("CreateChatCompletionResponse", completion)
    assert completion["choices"][0]["message"]["content"] == reply_text(messages, FAST_REPLY_TOKENS)
    assert_no_secrets(everything(response, response.content), api_key_secret, UPSTREAM_API_KEY)


async def test_errors_reach_nextchat_as_status_and_json_before_any_stream(api_key_secret, nextchat_model):
    client = AsyncClient()
    messages = [{"role": "user", "content": "hi"}]
    response = await post_as_nextchat(
        client,
        nextchat_chat_request(messages, model="gpt-5-turbo-ultra"),
        nextchat_browser_headers(api_key_secret, stream=True),
    )
    error = assert_error(response, 404, code="model_not_found")
    assert "gpt-5-turbo-ultra" in error["message"]  # NextChat shows the body to the user

    response = await post_as_nextchat(
        client, nextchat_chat_request(messages), nextchat_browser_headers("nk-my-access-code", stream=True)
    )
    error = assert_error(response, 401, code="token_not_valid")
    assert "NextChat access code" in error["message"]  # not "invalid or expired": it never was ours
    assert response["Access-Control-Allow-Origin"] in ("*", NEXTCHAT_ORIGIN)  # the browser may read the error


# --- Server mode: NextChat's server relays /api/openai/<path> to us ---------------------------


async def test_server_mode_relays_a_chunked_body_without_content_length(api_key_secret, nextchat_model):
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Hello from the server"}]
    raw = json.dumps(nextchat_chat_request(messages)).encode()
    headers = {"Host": "localhost:8000", **nextchat_server_headers(api_key_secret), "Transfer-Encoding": "chunked"}
    parts = [raw[:40], raw[40:100], raw[100:]]
    result = await asgi_request("POST", CHAT_URL, headers=headers, body=parts)

    text, _, done = read_like_nextchat(result.status_code, result.headers["content-type"], result.content)
    assert text == reply_text(messages, FAST_REPLY_TOKENS)
    assert done
    assert_no_secrets(result.content + str(result.headers).encode(), api_key_secret, UPSTREAM_API_KEY)


# --- Optional endpoints NextChat calls --------------------------------------------------------


async def test_usage_and_subscription_as_nextchat_asks_for_them(api_key_secret, nextchat_model):
    client = AsyncClient()
    # A reply first, so there is something to count.
    messages = [{"role": "user", "content": "hi"}]
    response = await post_as_nextchat(
        client, nextchat_chat_request(messages), nextchat_browser_headers(api_key_secret, stream=True)
    )
    await streamed_content(response)
    [record] = await usage_records()

    # app/client/platforms/openai.ts usage(): the month's first day to tomorrow.
    today = timezone.now().date()
    start, end = today.replace(day=1), today + dt.timedelta(days=1)
    headers = nextchat_browser_headers(api_key_secret, stream=False)
    response = await client.get(f"/dashboard/billing/usage?start_date={start}&end_date={end}", headers=headers)
    assert response.status_code == 200
    assert json.loads(response.content)["total_usage"] == pytest.approx(float(record.cost * 100))
    assert record.cost > 0

    response = await client.get("/dashboard/billing/subscription", headers=headers)
    assert response.status_code == 200
    assert isinstance(json.loads(response.content)["hard_limit_usd"], float)


async def test_balance_in_server_mode_is_this_months_usage(api_key_secret, user, nextchat_model):
    """NextChat's server relays ``/dashboard/billing/usage`` without its query string: this month's usage, 200."""
    client = AsyncClient()
    messages = [{"role": "user", "content": "hi"}]
    response = await post_as_nextchat(client, nextchat_chat_request(messages), nextchat_server_headers(api_key_secret))
    await streamed_content(response)
    [record] = await usage_records()
    assert record.cost > 0
    # A reply of last month, which "used this month" must not show.
    month_start = dt.datetime.combine(usage_current_month()[0], dt.time.min, tzinfo=timezone.get_default_timezone())
    await run_sync(usage_record_at, month_start - dt.timedelta(seconds=1), user=user, cost=Decimal("3"))

    headers = nextchat_server_headers(api_key_secret)
    response = await client.get("/dashboard/billing/usage", headers=headers)  # no query string: as relayed
    assert response.status_code == 200, response.content
    assert json.loads(response.content)["total_usage"] == pytest.approx(float(record.cost * 100))

    response = await client.get("/dashboard/billing/subscription", headers=headers)
    assert response.status_code == 200
    # No monthly budget: the documented fallback, not 0 (NextChat would show "of $0").
    assert json.loads(response.content)["hard_limit_usd"] == float(settings.OPENAI_BILLING_HARD_LIMIT_USD)


async def test_server_mode_over_real_http_with_a_chunked_body(asgi_server, api_key_secret, nextchat_model):
    """The same relay through a real ASGI server (uvicorn): ``Transfer-Encoding: chunked`` on the wire."""
    messages = [{"role": "user", "content": "Hello over HTTP"}]
    raw = json.dumps(nextchat_chat_request(messages)).encode()

    async def relayed_body() -> AsyncIterator[bytes]:  # how Next.js streams the request it relays
        for start in range(0, len(raw), 64):
            yield raw[start : start + 64]

    headers = nextchat_server_headers(api_key_secret)
    async with (
        httpx.AsyncClient(base_url=asgi_server, timeout=10) as client,
        client.stream("POST", CHAT_URL, content=relayed_body(), headers=headers) as response,
    ):
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        body = b"".join([part async for part in response.aiter_raw()])
    assert "content-encoding" not in response.headers
    text, _, done = read_like_nextchat(response.status_code, response.headers["content-type"], body)
    assert text == reply_text(messages, FAST_REPLY_TOKENS)
    assert done


async def test_balance_counts_only_the_organization_the_key_acts_in(api_key_secret, user):
    """A user in two organizations: NextChat's "used $X" through a key of one is that organization's
    spend, as the usage summary and the monthly budget behind ``/subscription`` count it, not the other's."""

    def spend_in_both() -> str:
        acme = Organization.objects.create(name="Acme", slug="acme")
        Membership.objects.create(user=user, organization=acme, role=Membership.Role.MEMBER)
        now = timezone.now()
        usage_record_at(now, user=user, cost=Decimal("1.25"))  # the default organization's
        usage_record_at(now, user=user, cost=Decimal("3"), organization=acme)
        return api_key_create(user=user, name="acme key", organization=acme).secret

    acme_secret = await run_sync(spend_in_both)
    client = AsyncClient()
    default = await client.get("/dashboard/billing/usage", headers=bearer(api_key_secret))
    acme = await client.get("/dashboard/billing/usage", headers=bearer(acme_secret))
    summary = await client.get("/api/usage/summary/?group_by=", headers=bearer(acme_secret))

    assert default.status_code == acme.status_code == summary.status_code == 200
    assert json.loads(default.content)["total_usage"] == pytest.approx(125.0)
    assert json.loads(acme.content)["total_usage"] == pytest.approx(300.0)
    assert Decimal(json.loads(summary.content)["results"][0]["cost"]) == Decimal("3")
