"""API key expiry, model allowlists, scopes and rotation on the streaming side: ``/v1``, the SSE send view.

Each refusal in the wire format's own shape (OpenAI's on ``/v1`` and ``/api``, Anthropic's on
``/v1/messages``), before any reply starts: nothing is written, nothing is billed. Requests go
through Django's ASGI handler; the upstream is the simulator. The REST side is
``accounts/tests/test_api_key_restrictions.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient
from django.utils import timezone

from accounts.authentication import principal_cache
from accounts.keys import hash_secret
from accounts.models import APIKey
from accounts.services import api_key_create, api_key_rotate
from chatbackend.asgi import application
from chatbackend.asyncdb import run_sync
from conversations.models import Message
from llm.models import ModelAlias
from tests.factories import ConversationFactory, LLMModelFactory
from tests.kit import assert_error, bearer, chat_body, poll_until, post_chat, streamed_content, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients", "broadcast_listener"),
]

RESPONSES_URL = "/v1/responses"
MESSAGES_URL = "/v1/messages"


async def new_key(user, **restrictions: Any) -> str:
    """Return the secret of a new key of ``user`` with ``restrictions``."""
    created = await run_sync(api_key_create, user=user, name="restricted", **restrictions)
    return created.secret


async def expire(secret: str, *, ago: dt.timedelta = dt.timedelta(seconds=1)) -> dt.datetime:
    """Make the key of ``secret`` expired ``ago`` (an UPDATE: no signal, as the clock passing sends none)."""
    expired_at = timezone.now() - ago
    await APIKey.objects.filter(key_hash=hash_secret(secret)).aupdate(expires_at=expired_at)
    return expired_at


async def post_json(path: str, body: Any, headers: dict[str, str]) -> Any:
    return await AsyncClient().post(path, data=json.dumps(body), content_type="application/json", headers=headers)


def responses_body(model: str) -> dict[str, Any]:
    return {"model": model, "input": "Say hello"}


def messages_body(model: str) -> dict[str, Any]:
    return {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "Say hello"}]}


def anthropic_error(response: Any, status: int) -> dict[str, Any]:
    """Assert ``response`` is Anthropic's error JSON with ``status``; return its ``error`` object."""
    assert response.status_code == status, (response.status_code, response.content[:300])
    body = json.loads(response.content)
    assert body["type"] == "error", body
    return body["error"]


# --- Expiry -------------------------------------------------------------------------------------


async def test_an_expired_key_is_refused_on_every_v1_endpoint_in_the_wire_formats_shape(user, sim_model):
    secret = await new_key(user, expires_at=timezone.now() + dt.timedelta(hours=1))
    expired_at = await expire(secret)
    client = AsyncClient()
    headers = bearer(secret)

    refused = [
        await post_chat(client, chat_body("sim-model", stream=True), headers),
        await post_json(RESPONSES_URL, responses_body("sim-model"), headers),
        await client.get("/v1/models", headers=headers),
        await client.get("/v1/models/sim-model", headers=headers),
        await client.get("/dashboard/billing/usage", headers=headers),
    ]

    for response in refused:
        error = assert_error(response, 401, code="invalid_api_key", type="invalid_request_error")
        assert error["message"] == f"This API key expired at {expired_at.isoformat()}.", error
        assert secret not in response.content.decode()
    anthropic = await post_json(MESSAGES_URL, messages_body("sim-model"), {"x-api-key": secret})
    assert anthropic_error(anthropic, 401)["message"] == f"This API key expired at {expired_at.isoformat()}."
    assert await usage_records() == []


async def test_a_key_cached_before_it_expired_is_refused_once_it_has(user, sim_model):
    secret = await new_key(user, expires_at=timezone.now() + dt.timedelta(seconds=1.5))
    client = AsyncClient()

    first = await post_chat(client, chat_body("sim-model"), bearer(secret))

    assert first.status_code == 200
    assert principal_cache.get(("api_key", hash_secret(secret))) is not None  # the next use is a cache hit
    refused = await poll_until(
        lambda: post_chat(client, chat_body("sim-model"), bearer(secret)),
        lambda response: response.status_code != 200,
        within=5,
        what="the cached key to expire",
    )
    error = assert_error(refused, 401, code="invalid_api_key", type="invalid_request_error")
    assert "expired" in error["message"]
    assert principal_cache.get(("api_key", hash_secret(secret))) is not None  # refused from the cache itself


# --- Model allowlist ----------------------------------------------------------------------------


@pytest.fixture
def other_models(db, sim_model):
    """``other-model`` (enabled), ``off-model`` (disabled), alias ``fast`` to ``sim-model`` and ``other-alias``."""
    other = LLMModelFactory(name="other-model", provider=sim_model.provider, upstream_model="sim-1")
    LLMModelFactory(name="off-model", provider=sim_model.provider, enabled=False)
    ModelAlias.objects.create(name="fast", model=sim_model)
    ModelAlias.objects.create(name="other-alias", model=other)


def without_name(error: dict[str, Any], name: str) -> dict[str, Any]:
    return {**error, "message": error["message"].replace(f"'{name}'", "'<name>'")}


async def test_a_model_outside_the_allowlist_answers_as_one_that_does_not_exist(user, other_models):
    secret = await new_key(user, allowed_models=["sim-model"])
    headers = bearer(secret)
    client = AsyncClient()
    missing = assert_error(await post_chat(client, chat_body("no-such-model"), headers), 404, code="model_not_found")

    for name in ("other-model", "other-alias", "off-model"):  # off-model: disabled, still a 404
        for stream in (True, False):
            response = await post_chat(client, chat_body(name, stream=stream), headers)
            error = assert_error(response, 404, code="model_not_found", param="model")
            assert without_name(error, name) == without_name(missing, "no-such-model"), (name, error)
        response = await post_json(RESPONSES_URL, responses_body(name), headers)
        assert_error(response, 404, code="model_not_found", param="model")
        anthropic = await post_json(MESSAGES_URL, messages_body(name), {"x-api-key": secret})
        assert anthropic_error(anthropic, 404)["type"] == "not_found_error"
        count_body = {key: value for key, value in messages_body(name).items() if key != "max_tokens"}
        counted = await post_json(f"{MESSAGES_URL}/count_tokens", count_body, {"x-api-key": secret})
        assert anthropic_error(counted, 404)["type"] == "not_found_error"
    assert await usage_records() == []

    # The allowed model, by its name and by its alias (which serves it).
    assert (await post_chat(client, chat_body("sim-model"), headers)).status_code == 200
    assert (await post_chat(client, chat_body("fast"), headers)).status_code == 200
    assert (await post_json(RESPONSES_URL, responses_body("sim-model"), headers)).status_code == 200
    # Without an allowlist, or with a JWT, every model.
    unrestricted = bearer(await new_key(user))
    assert (await post_chat(client, chat_body("other-model"), unrestricted)).status_code == 200


async def test_models_list_and_retrieve_show_only_the_allowed_models(user, other_models):
    allowed = bearer(await new_key(user, allowed_models=["sim-model", "other-alias"]))
    client = AsyncClient()

    listed = await client.get("/v1/models", headers=allowed)
    everything = await client.get("/v1/models", headers=bearer(await new_key(user)))

    assert listed.status_code == 200
    # sim-model, its alias fast, other-alias; not other-model (only its alias is allowed).
    assert [entry["id"] for entry in listed.json()["data"]] == ["fast", "other-alias", "sim-model"]
    assert [entry["id"] for entry in everything.json()["data"]] == [
        "fast",
        "other-alias",
        "other-model",
        "sim-model",
    ]
    for name in ("sim-model", "fast", "other-alias"):
        retrieved = await client.get(f"/v1/models/{name}", headers=allowed)
        assert retrieved.status_code == 200 and retrieved.json()["id"] == name
    for name in ("other-model", "off-model", "no-such-model"):
        assert_error(await client.get(f"/v1/models/{name}", headers=allowed), 404, code="model_not_found")
    rest = await client.get("/api/models/", headers=allowed)
    assert [row["name"] for row in rest.json()["results"]] == ["sim-model"]


# --- Scopes -------------------------------------------------------------------------------------


async def test_a_key_without_the_scope_is_a_403_naming_it_before_anything_else(user, sim_model):
    read_only = await new_key(user, scopes=["read"])
    chat_only = await new_key(user, scopes=["chat"])
    client = AsyncClient()

    refusals = [
        (await post_chat(client, "{not json", bearer(read_only)), "chat"),  # judged before the body
        (await post_chat(client, chat_body("sim-model", stream=True), bearer(read_only)), "chat"),
        (await post_json(RESPONSES_URL, responses_body("sim-model"), bearer(read_only)), "chat"),
        (await client.get("/dashboard/billing/subscription", headers=bearer(chat_only)), "read"),
    ]

    for response, scope in refusals:
        error = assert_error(response, 403, code="insufficient_permissions", type="invalid_request_error")
        assert f"Missing scopes: {scope}" in error["message"], error
    anthropic = await post_json(MESSAGES_URL, messages_body("sim-model"), {"x-api-key": read_only})
    assert "Missing scopes: chat" in anthropic_error(anthropic, 403)["message"]
    assert await usage_records() == []
    assert (await post_chat(client, chat_body("sim-model"), bearer(chat_only))).status_code == 200
    assert (await client.get("/v1/models", headers=bearer(read_only))).status_code == 200
    # Listing models serves chatting too (clients list them first): read or chat will do.
    assert (await client.get("/v1/models", headers=bearer(chat_only))).status_code == 200
    assert (await client.get("/v1/models/sim-model", headers=bearer(chat_only))).status_code == 200
    no_models = await new_key(user, scopes=["admin"])
    assert (await client.get("/v1/models", headers=bearer(no_models))).status_code == 200  # admin includes read


# --- The conversation send view (SSE) and the WebSocket -----------------------------------------


async def send(conversation, secret: str) -> Any:
    return await AsyncClient().post(
        f"/api/conversations/{conversation.pk}/messages/",
        data=json.dumps({"content": "hi"}),
        content_type="application/json",
        headers={**bearer(secret), "Accept": "text/event-stream"},
    )


async def test_the_sse_send_view_refuses_expired_unscoped_and_disallowed_keys(user, other_models, sim_model):
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    expired = await new_key(user, expires_at=timezone.now() + dt.timedelta(hours=1))
    await expire(expired)
    read_only = await new_key(user, scopes=["read"])
    elsewhere = await new_key(user, allowed_models=["other-model"])

    error = assert_error(await send(conversation, expired), 401, code="invalid_api_key", type="invalid_request_error")
    assert "expired" in error["message"]
    assert_error(await send(conversation, read_only), 403, code="insufficient_permissions")
    assert_error(await send(conversation, elsewhere), 404, code="model_not_found", param="model")
    assert not await Message.objects.filter(conversation=conversation).aexists()  # no turn was written
    assert await usage_records() == []

    allowed = await send(conversation, await new_key(user, allowed_models=["sim-model"], scopes=["chat"]))
    assert allowed.status_code == 200
    assert allowed["Content-Type"] == "text/event-stream"
    assert b"event: reply.done" in await streamed_content(allowed)


async def test_a_websocket_of_a_key_without_chat_is_closed_4403(user, sim_model):
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    secret = await new_key(user, scopes=["read"])
    socket = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={secret}")
    connected, _ = await socket.connect(timeout=10)

    assert connected
    assert await socket.receive_output(timeout=10) == {"type": "websocket.close", "code": 4403}
    await socket.disconnect(timeout=10)


async def test_a_websocket_whose_key_expires_is_refused_at_the_next_message(user, sim_model):
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    expires_at = timezone.now() + dt.timedelta(seconds=1)
    secret = await new_key(user, expires_at=expires_at)
    socket = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={secret}")
    connected, _ = await socket.connect(timeout=10)
    assert connected
    await asyncio.sleep(max(0.0, (expires_at - timezone.now()).total_seconds()) + 0.05)  # the key expires

    await socket.send_json_to({"type": "message.send", "content": "hi"})
    frame = await socket.receive_json_from(timeout=10)

    assert frame["type"] == "error"
    assert frame["error"]["code"] == "invalid_api_key" and "expired" in frame["error"]["message"]
    assert await socket.receive_output(timeout=10) == {"type": "websocket.close", "code": 4401}
    assert not await Message.objects.filter(conversation=conversation).aexists()
    await socket.disconnect(timeout=10)


# --- Rotation -----------------------------------------------------------------------------------


async def test_a_rotated_keys_old_secret_is_refused_at_once_even_when_cached(user, sim_model):
    created = await run_sync(api_key_create, user=user, name="service")
    client = AsyncClient()
    assert (await post_chat(client, chat_body("sim-model"), bearer(created.secret))).status_code == 200
    assert principal_cache.get(("api_key", hash_secret(created.secret))) is not None

    rotated = await run_sync(api_key_rotate, user=user, api_key_id=created.api_key.pk)

    assert principal_cache.get(("api_key", hash_secret(created.secret))) is None
    assert_error(await post_chat(client, chat_body("sim-model"), bearer(created.secret)), 401, code="invalid_api_key")
    assert (await post_chat(client, chat_body("sim-model"), bearer(rotated.secret))).status_code == 200
    records = await usage_records()
    assert {record.api_key_id for record in records} == {created.api_key.pk}  # the same key, both secrets
