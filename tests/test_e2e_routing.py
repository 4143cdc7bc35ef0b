"""Failover between a model's deployments, and cooldowns shared by two server processes.

Two server processes of their own (``start_server``, a short ``LLM_DEPLOYMENT_COOLDOWN_SECONDS``)
on the stack's database and Redis, and a model with two deployments on the stack's simulator:
``a`` (priority 0, so it is tried first) and ``b`` (priority 1). The simulator is told to fail
``a``'s upstream model id (``PUT /_simulator/faults/{model}``) with a 500, a 429 with
``Retry-After``, or a first token later than the provider's ``first_token_timeout``. For each:

- a streamed ``/v1/chat/completions`` to the first process gets ``b``'s whole reply, no error;
- a request to the second process goes straight to ``b``: the simulator's count of requests for
  ``a``'s model id does not move (the cooldown was shared through Redis);
- the usage rows, written by the Celery worker, name ``b``;
- once ``a`` is healthy and its cooldown has passed, ``a`` serves again.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from accounts.models import UsageRecord
from llm.models import Deployment
from tests.conftest import E2EStack, E2EUser
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import bearer, poll_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

COOLDOWN_SECONDS = 6  # longer than a failover and a reply on a loaded machine
FIRST_TOKEN_TIMEOUT = 1.5
FAULTS = {
    "500": "status=500",
    "429 with Retry-After": "status=429, retry-after=1",
    f"no first token within {FIRST_TOKEN_TIMEOUT} s": "ttft=20",
}


def stream_reply(url: str, key: str, model: str) -> tuple[int, str, str | None]:
    """POST a streamed chat completion; return ``(status, text, error or None)``."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "Route this"}]}
    text, error = "", None
    with (
        httpx.Client(base_url=url, timeout=60, trust_env=False) as http,
        connect_sse(http, "POST", "/v1/chat/completions", json=body, headers=bearer(key)) as source,
    ):
        if source.response.status_code != 200:
            source.response.read()
            return source.response.status_code, "", source.response.text
        for sse in source.iter_sse():
            if sse.data == "[DONE]":
                break
            payload: dict[str, Any] = json.loads(sse.data)
            if "error" in payload:
                error = json.dumps(payload["error"])
            elif payload["choices"]:
                text += payload["choices"][0]["delta"].get("content") or ""
    return 200, text, error


def test_a_failing_deployment_hands_over_and_cools_down_in_every_process(
    e2e_stack: E2EStack, e2e_user: E2EUser, start_server: Any
) -> None:
    if not e2e_stack.shares_state:
        pytest.skip("cooldowns across processes need REDIS_URL (a shared store and a Celery worker)")
    env = {"LLM_DEPLOYMENT_COOLDOWN_SECONDS": str(COOLDOWN_SECONDS)}
    _, first_url = start_server(env=env)
    _, second_url = start_server(env=env)
    simulator = e2e_stack.simulator
    provider = ProviderFactory(
        name=f"route-{secrets.token_hex(3)}",
        base_url=simulator.base_url,
        api_key=e2e_stack.provider_api_key,
        read_timeout=30,
        first_token_timeout=FIRST_TOKEN_TIMEOUT,
    )

    for case, fault in FAULTS.items():
        tag = secrets.token_hex(3)
        model = LLMModelFactory(name=f"routed-{tag}", provider=provider, upstream_model="sim-1")
        a = Deployment.objects.create(model=model, provider=provider, upstream_model=f"sim-route-a-{tag}", priority=0)
        b = Deployment.objects.create(model=model, provider=provider, upstream_model=f"sim-route-b-{tag}", priority=1)
        simulator.fault_set(a.upstream_model, fault)

        status, text, error = stream_reply(first_url, e2e_user.api_key, model.name)
        assert (status, error) == (200, None), case
        assert text.strip(), case
        assert (simulator.requests_for(a.upstream_model), simulator.requests_for(b.upstream_model)) == (1, 1), case

        # The second process has never routed this model: only the shared cooldown keeps it off ``a``.
        status, text, error = stream_reply(second_url, e2e_user.api_key, model.name)
        assert (status, error, bool(text.strip())) == (200, None, True), case
        assert (simulator.requests_for(a.upstream_model), simulator.requests_for(b.upstream_model)) == (1, 2), case

        rows = poll_until_sync(
            lambda model=model: list(UsageRecord.objects.filter(model_name=model.name)),
            lambda rows: len(rows) == 2,
            within=30,
            what=f"two usage rows ({case})",
        )
        assert {(row.deployment, row.finish_status) for row in rows} == {
            (f"{provider.name}/{b.upstream_model}", "completed")
        }, case

        simulator.fault_clear(a.upstream_model)
        time.sleep(COOLDOWN_SECONDS + 0.5)
        status, text, error = stream_reply(second_url, e2e_user.api_key, model.name)
        assert (status, error, bool(text.strip())) == (200, None, True), case
        assert (simulator.requests_for(a.upstream_model), simulator.requests_for(b.upstream_model)) == (2, 2), case
        last = poll_until_sync(
            lambda model=model: UsageRecord.objects.filter(model_name=model.name).count(),
            lambda count: count == 3,
            within=30,
            what=f"the third usage row ({case})",
        )
        assert last == 3
        assert UsageRecord.objects.filter(
            model_name=model.name, deployment=f"{provider.name}/{a.upstream_model}"
        ).exists(), case
