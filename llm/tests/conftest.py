"""Fixtures for the ``llm`` tests: models on the simulators and the scripted upstream, and the
data the ``/v1`` tests need. The simulators themselves are the root conftest's."""

from __future__ import annotations

import datetime as dt
import socket
from decimal import Decimal

import pytest
from django.utils import timezone
from rest_framework_simplejwt.tokens import AccessToken

from accounts.models import UsageRecord
from accounts.services import api_key_create, api_key_revoke
from tests.factories import UPSTREAM_API_KEY, LLMModelFactory, ProviderFactory, UserFactory
from tests.kit import bearer


@pytest.fixture
def closed_port_url() -> str:
    """Return an API root on a local port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def provider(db):
    """A provider an operator configured, storing the factory's ``UPSTREAM_API_KEY``."""
    return ProviderFactory(name="upstream", base_url="https://llm.example.com/v1")


@pytest.fixture
def tool_model(db, scripted_upstream):
    """``tool-model``: the scripted upstream's reasoning and split tool call."""
    provider = ProviderFactory(base_url=scripted_upstream.base_url)
    return LLMModelFactory(name="tool-model", provider=provider, upstream_model="tool-call")


@pytest.fixture
def silent_model(db, silent_simulator):
    """``silent-model``: silent 1.5 s before its first token."""
    provider = ProviderFactory(name="sim-silent", base_url=silent_simulator.base_url)
    return LLMModelFactory(name="silent-model", provider=provider, upstream_model="sim-1")


@pytest.fixture
def keyed_model(db, keyed_simulator):
    """``keyed-model``: its provider key is wrong for a simulator that echoes wrong keys in its 401."""
    provider = ProviderFactory(name="sim-keyed", base_url=keyed_simulator.base_url, api_key=UPSTREAM_API_KEY)
    return LLMModelFactory(name="keyed-model", provider=provider, upstream_model="sim-1")


@pytest.fixture
def nextchat_model(db, simulator):
    """``gpt-4o-mini`` (NextChat's default and title model), served by the simulator with a provider key."""
    provider = ProviderFactory(name="sim-nextchat", base_url=simulator.base_url, api_key=UPSTREAM_API_KEY)
    return LLMModelFactory(name="gpt-4o-mini", provider=provider, upstream_model="sim-1")


@pytest.fixture
def disabled_models(db, sim_model):
    """``off-model`` (disabled) and ``off-provider-model`` (its provider is disabled)."""
    LLMModelFactory(name="off-model", provider=sim_model.provider, enabled=False)
    provider = ProviderFactory(name="off-provider", enabled=False)
    LLMModelFactory(name="off-provider-model", provider=provider)


@pytest.fixture
def failing_models(db, simulator):
    """``m-error-500/503/429/400``, ``m-fail-midstream`` (the simulator's failures) and ``m-unreachable``."""
    provider = ProviderFactory(name="sim-failing", base_url=simulator.base_url)
    for upstream in ("sim-error-500", "sim-error-503", "sim-error-429", "sim-error-400", "sim-fail-midstream"):
        LLMModelFactory(name=upstream.replace("sim-", "m-"), provider=provider, upstream_model=upstream)
    LLMModelFactory(name="m-unreachable", provider=ProviderFactory(name="nowhere", base_url="http://127.0.0.1:9/v1"))


@pytest.fixture
def bad_credentials(user) -> dict[str, tuple[dict[str, str], str]]:
    """Bad credentials by case: the headers, and the error code they get."""
    revoked = api_key_create(user=user, name="old")
    api_key_revoke(user=user, api_key_id=revoked.api_key.pk)
    expired = AccessToken.for_user(user)
    expired.set_exp(from_time=timezone.now() - dt.timedelta(hours=2))
    return {
        "missing": ({}, "missing_api_key"),
        "not bearer": ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
        "wrong key": (bearer("sk-" + "x" * 48), "invalid_api_key"),
        "revoked key": (bearer(revoked.secret), "api_key_revoked"),
        "expired jwt": (bearer(str(expired)), "token_not_valid"),
        "garbage jwt": (bearer("not.a.jwt"), "token_not_valid"),
        "nextchat access code": (bearer("nk-access-code"), "token_not_valid"),
    }


@pytest.fixture
def spending(user, sim_model):
    """Usage records of ``user`` on 2026-03-01, 03-15 and 04-01 (0.5, 0.25, 1 USD), and another user's."""
    other = UserFactory()
    rows = [(user, "2026-03-01T00:00:00", "0.5"), (user, "2026-03-15T12:00:00", "0.25")]
    rows += [(user, "2026-04-01T00:00:00", "1"), (other, "2026-03-10T00:00:00", "9")]
    for index, (owner, when, cost) in enumerate(rows):
        record = UsageRecord.objects.create(
            request_id=f"chatcmpl-test-{index}",
            user=owner,
            model_name="sim-model",
            source=UsageRecord.Source.OPENAI_API,
            cost=Decimal(cost),
            finish_status="completed",
        )
        created = dt.datetime.fromisoformat(when).replace(tzinfo=dt.UTC)
        UsageRecord.objects.filter(pk=record.pk).update(created_at=created)
