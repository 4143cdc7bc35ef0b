"""Refused requests in the usage reports: written by the engine, counted apart from requests.

A user allowed one request per minute sends two ``/v1`` requests and one conversation turn; the
second and the turn are refused (429 before any reply) and recorded by the engine as ``refused``
usage rows. The usage summary counts them as ``refused_requests``, not ``requests``; NextChat's
balance line counts only what the reply cost.
"""

from __future__ import annotations

import json

import pytest
from django.test import AsyncClient

from chatbackend.asyncdb import run_sync
from tests.factories import ConversationFactory
from tests.kit import access_token, assert_error, bearer, chat_body, post_chat, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]


async def test_refused_requests_are_counted_apart_in_the_usage_summary(user, api_key_secret, sim_model):
    def limit_and_open_a_conversation() -> int:
        user.requests_per_minute = 1
        user.save()  # a save clears the cached principal
        return ConversationFactory(owner=user, model=sim_model).pk

    conversation_id = await run_sync(limit_and_open_a_conversation)
    client = AsyncClient()
    assert (await post_chat(client, chat_body("sim-model", "hello"), bearer(api_key_secret))).status_code == 200
    assert_error(
        await post_chat(client, chat_body("sim-model", "again"), bearer(api_key_secret)),
        429,
        code="rate_limit_exceeded",
    )
    turn = await client.post(
        f"/api/conversations/{conversation_id}/messages/",
        data=json.dumps({"content": "hi"}),
        content_type="application/json",
        headers=bearer(access_token(user)),
    )
    assert turn.status_code == 429
    [reply, *refused] = await usage_records(user=user)
    assert [record.finish_status for record in refused] == ["refused", "refused"]
    assert reply.cost > 0

    response = await client.get("/api/usage/summary/?group_by=api_key", headers=bearer(api_key_secret))
    assert response.status_code == 200, response.content
    rows = {row["api_key_id"]: row for row in json.loads(response.content)["results"]}
    key_row, no_key_row = rows[reply.api_key_id], rows[None]  # /v1 through the key; the turn with a JWT
    assert (key_row["requests"], key_row["refused_requests"]) == (1, 1)
    assert (key_row["prompt_tokens"], key_row["completion_tokens"]) == (reply.prompt_tokens, reply.completion_tokens)
    assert (no_key_row["requests"], no_key_row["refused_requests"], no_key_row["total_tokens"]) == (0, 1, 0)

    response = await client.get("/dashboard/billing/usage", headers=bearer(api_key_secret))
    assert response.status_code == 200
    assert json.loads(response.content)["total_usage"] == pytest.approx(float(reply.cost * 100))
