"""Across processes: a change made in one process is seen by a server process on its next request.

The server (``uvicorn``, a separate process) caches API keys, JWT users and models
(``chatbackend.lookup_cache``); this test process changes rows through the services and model
saves, as the admin or a Celery task would, and its signal handlers broadcast the clear through
the Redis channel layer. Without Redis, processes share no channel layer: nothing to test here
(``tests/test_lookup_cache.py`` covers one process). Fixtures: tests/conftest.py.
"""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from django.conf import settings
from django.utils import timezone

from accounts.models import APIKey, UsageRecord, User
from accounts.services import api_key_revoke
from llm.models import LLMModel
from tests.kit import assert_error, bearer, chat_body, poll_until_sync

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not settings.REDIS_URL, reason="processes share a channel layer only through Redis"),
]


def chat(http: httpx.Client, token: str, model: str = "sim-model") -> httpx.Response:
    """Ask the server for a short, non-streamed chat completion."""
    return http.post("/v1/chat/completions", json=chat_body(model, max_tokens=2), headers=bearer(token))


def test_a_key_revoked_in_another_process_is_refused_on_the_next_request(http: httpx.Client, e2e_user):
    assert chat(http, e2e_user.api_key).status_code == 200
    user = User.objects.get(username=e2e_user.username)

    # A write that bypasses model signals is not broadcast: the server still answers from its
    # cache, which shows that the refusal below comes from the broadcast, not from a re-read.
    APIKey.objects.filter(user=user).update(name="renamed without a signal", revoked_at=timezone.now())
    assert chat(http, e2e_user.api_key).status_code == 200
    APIKey.objects.filter(user=user).update(revoked_at=None)

    api_key_revoke(user=user, api_key_id=APIKey.objects.get(user=user).pk)

    assert_error(chat(http, e2e_user.api_key), 401, code="api_key_revoked")


def test_a_user_deactivated_in_another_process_is_refused_on_the_next_request(http: httpx.Client, e2e_user):
    assert chat(http, e2e_user.access).status_code == 200
    assert chat(http, e2e_user.api_key).status_code == 200

    user = User.objects.get(username=e2e_user.username)
    user.is_active = False
    user.save()  # what the admin does

    assert chat(http, e2e_user.access).status_code == 401
    assert_error(chat(http, e2e_user.api_key), 401, code="user_inactive")


def test_model_changes_in_another_process_apply_from_the_next_request(http: httpx.Client, e2e_user):
    assert chat(http, e2e_user.api_key).status_code == 200
    assert chat(http, e2e_user.api_key, "gpt-4o-mini").status_code == 200

    model = LLMModel.objects.get(name="sim-model")
    model.input_price_per_million = Decimal("1000")
    model.output_price_per_million = Decimal("3000")
    model.save()
    repriced = chat(http, e2e_user.api_key)
    assert repriced.status_code == 200

    record = poll_until_sync(lambda: UsageRecord.objects.filter(request_id=repriced.json()["id"]).first())
    assert record.cost == (record.prompt_tokens * 1000 + record.completion_tokens * 3000) / Decimal(1_000_000)

    model.enabled = False
    model.save()
    assert_error(chat(http, e2e_user.api_key), 400, code="model_disabled")

    provider = LLMModel.objects.get(name="gpt-4o-mini").provider
    provider.enabled = False
    provider.save()
    assert_error(chat(http, e2e_user.api_key, "gpt-4o-mini"), 400, code="model_disabled")
