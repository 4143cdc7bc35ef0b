"""Writes for providers and models."""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import aclosing
from dataclasses import dataclass, replace
from decimal import Decimal

from django.db import transaction

from accounts.keys import API_KEY_PREFIX, hash_secret
from accounts.metering.ratelimits import rate_limit_close
from accounts.models import APIKey, User
from accounts.services import api_key_create, api_key_revoke
from chatbackend import broadcast
from chatbackend.errors import ApplicationError

from .models import LLMModel, Provider
from .providers import ChatRequest, ProviderConfig, UpstreamError, get_provider
from .providers.http import aclose_clients
from .routing import cooldown_store_close
from .selectors import llm_model_list_enabled, provider_config_for
from .streaming import ReplyOutcome, ReplyPlan, open_reply

DEMO_PROVIDER_NAME = "simulator"
DEMO_ADMIN_USERNAME = "admin"
DEMO_API_KEY_NAME = "demo"
# (public name, upstream model, input and output US dollars per million tokens). gpt-4o-mini is
# the model NextChat asks for when it generates titles (nextchat.md), priced as OpenAI lists it.
DEMO_MODELS = (
    ("gpt-4o-mini", "sim-1", Decimal("0.15"), Decimal("0.60")),
    ("sim-model", "sim-1", Decimal("0"), Decimal("0")),
)


@dataclass(frozen=True, slots=True)
class DemoSetup:
    """What ``demo_setup`` did.

    ``admin_password``: the admin's password when this call set it (shown once), else None.
    ``api_key``: the ``sk-...`` secret of the admin's ``demo`` key (see ``demo_setup``).
    ``api_key_created``: True when that key was created now (False: an existing key is kept).
    ``provider_created``: True when the simulator provider and its models were created now.
    ``simulator_in_use``: True when a provider named ``simulator`` points at ``simulator_base_url``.
    ``models``: names of the enabled models on enabled providers.
    """

    admin_username: str
    admin_created: bool
    admin_password: str | None
    api_key: str
    api_key_created: bool
    provider_created: bool
    simulator_in_use: bool
    models: list[str]


@transaction.atomic
def demo_simulator_repoint(*, simulator_base_url: str, simulator_api_key: str) -> Provider | None:
    """Point the provider named ``simulator`` at ``simulator_base_url`` with ``simulator_api_key``; return it.

    For a simulator started on another port. None (and nothing changed) when no such provider
    exists. Saved through the model, so every process's model cache is cleared.
    """
    simulator = Provider.objects.filter(name=DEMO_PROVIDER_NAME).first()
    if simulator is not None:
        simulator.base_url, simulator.api_key = simulator_base_url, simulator_api_key
        simulator.save(update_fields=["base_url", "api_key", "updated_at"])
    return simulator


# Shortest secret accepted as DEMO_API_KEY: "sk-" and 32 characters (~190 bits if random).
DEMO_API_KEY_MIN_LENGTH = 35


def demo_setup(
    *,
    simulator_base_url: str,
    simulator_api_key: str,
    admin_password: str | None = None,
    api_key: str | None = None,
    api_key_required: bool = False,
) -> DemoSetup:
    """Seed a demo installation idempotently; return what was done.

    - A superuser ``admin`` (role ``admin``). Its password is ``admin_password`` when given (set
      on every call), else a random one chosen only when the user is created.
    - One usable API key ``demo`` for the admin, kept across calls so that clients keep working:
      ``api_key`` (a secret the caller kept, e.g. in a file, or the operator chose) is kept while
      it is the admin's and not revoked, and created (stored hashed) when no key has it. A revoked
      or foreign ``api_key`` is replaced by a new random secret, or, with ``api_key_required``
      (the operator's choice), raises ``ApplicationError`` (code ``demo_api_key_unusable``); so
      does a malformed one (not ``sk-`` and at least 32 more characters). Other unrevoked
      ``demo`` keys of the admin are revoked: there is one demo key at a time.
    - When no provider exists at all: a provider ``simulator`` (kind ``openai``) at
      ``simulator_base_url`` (the root including ``/v1``) with ``simulator_api_key``, and the
      models ``gpt-4o-mini`` and ``sim-model`` on it. A ``simulator`` provider that already
      exists is re-pointed at the given URL and key (the simulator's port changes per run);
      other providers are never touched.
    """
    admin = User.objects.filter(username=DEMO_ADMIN_USERNAME).first()
    admin_created = admin is None
    if admin is None:
        admin = User(username=DEMO_ADMIN_USERNAME, email="", role=User.Role.ADMIN)
    password_set: str | None = None
    if admin_created or admin_password:
        password_set = admin_password or secrets.token_urlsafe(12)
        admin.set_password(password_set)
    admin.is_staff = admin.is_superuser = admin.is_active = True
    admin.role = User.Role.ADMIN
    admin.save()

    secret, key_id, api_key_created = _demo_api_key(admin, api_key, required=api_key_required)
    for old in APIKey.objects.filter(user=admin, name=DEMO_API_KEY_NAME, revoked_at__isnull=True).exclude(pk=key_id):
        api_key_revoke(user=admin, api_key_id=old.pk)

    provider_created = False
    simulator: Provider | None
    if not Provider.objects.exists():
        simulator = Provider.objects.create(
            name=DEMO_PROVIDER_NAME, kind=Provider.Kind.OPENAI, base_url=simulator_base_url, api_key=simulator_api_key
        )
        for name, upstream_model, input_price, output_price in DEMO_MODELS:
            LLMModel.objects.create(
                name=name,
                provider=simulator,
                upstream_model=upstream_model,
                context_window=128_000,
                input_price_per_million=input_price,
                output_price_per_million=output_price,
            )
        provider_created = True
    else:
        simulator = demo_simulator_repoint(simulator_base_url=simulator_base_url, simulator_api_key=simulator_api_key)

    models = list(llm_model_list_enabled().order_by("name").values_list("name", flat=True))
    return DemoSetup(
        admin_username=admin.username,
        admin_created=admin_created,
        admin_password=password_set,
        api_key=secret,
        api_key_created=api_key_created,
        provider_created=provider_created,
        simulator_in_use=simulator is not None,
        models=models,
    )


def _demo_api_key(admin: User, wanted: str | None, *, required: bool) -> tuple[str, int, bool]:
    """Return ``(secret, key id, created)`` of the admin's demo key (rules: ``demo_setup``)."""
    if wanted is not None:
        wanted = wanted.strip()
        if not wanted.startswith(API_KEY_PREFIX) or len(wanted) < DEMO_API_KEY_MIN_LENGTH:
            if required:
                raise ApplicationError(
                    f"DEMO_API_KEY must start with '{API_KEY_PREFIX}' and be at least {DEMO_API_KEY_MIN_LENGTH} "
                    "characters long.",
                    code="demo_api_key_unusable",
                )
            wanted = None
    if wanted is not None:
        existing = APIKey.objects.filter(key_hash=hash_secret(wanted)).first()
        if existing is None:
            return wanted, api_key_create(user=admin, name=DEMO_API_KEY_NAME, secret=wanted).api_key.pk, True
        if existing.user_id == admin.pk and existing.revoked_at is None:
            return wanted, existing.pk, False
        if required:
            raise ApplicationError(
                "DEMO_API_KEY names a key that was revoked or belongs to another user: choose another.",
                code="demo_api_key_unusable",
            )
    created = api_key_create(user=admin, name=DEMO_API_KEY_NAME)
    return created.secret, created.api_key.pk, True


# --- "Test connection" (admin action) ---------------------------------------------------------

# The one-token call: a tiny prompt, ``max_tokens`` 1 (each adapter maps it to its provider's field:
# Anthropic ``max_tokens``, Gemini ``maxOutputTokens``).
CONNECTION_TEST_MESSAGES = ({"role": "user", "content": "Say OK."},)
CONNECTION_TEST_PARAMETERS = {"max_tokens": 1}
# The longest an operator waits for one test, connecting included (seconds): a provider's read
# timeout (300 s by default) suits a long reply, not a one-token answer.
CONNECTION_TEST_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class ConnectionTest:
    """What ``provider_connection_test`` found.

    ``ok``: the upstream streamed a reply to the end. ``latency_ms``: milliseconds from sending the
    request (connecting included) to the reply's end, or to the failure. ``error``: why it failed
    ("" when ``ok``): our message for the failure and, for an operator, the upstream's own status
    and error text (``UpstreamError.detail``), with the provider's API key removed.
    """

    ok: bool
    latency_ms: float
    error: str = ""


async def provider_connection_test(*, config: ProviderConfig, upstream_model: str) -> ConnectionTest:
    """Make a one-token chat completion to ``upstream_model`` through ``config``'s adapter; report it.

    Waits at most ``CONNECTION_TEST_TIMEOUT_SECONDS`` (a read timeout above that is lowered to it).
    Never raises for the upstream's failures (``UpstreamError``, a request the adapter refuses, a
    timeout): they are the report's ``error``. The key never appears in the report.
    """
    config = replace(config, read_timeout=min(config.read_timeout, CONNECTION_TEST_TIMEOUT_SECONDS))
    request = ChatRequest(
        model=upstream_model,
        messages=[dict(message) for message in CONNECTION_TEST_MESSAGES],
        parameters=dict(CONNECTION_TEST_PARAMETERS),
    )
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CONNECTION_TEST_TIMEOUT_SECONDS):
            async with aclosing(get_provider(config).stream(request)) as batches:
                async for _batch in batches:
                    pass
    except UpstreamError as exc:
        error = f"{exc.message} ({exc.detail})" if exc.detail else exc.message
    except ApplicationError as exc:
        error = exc.message
    except TimeoutError:
        error = f"No complete answer within {CONNECTION_TEST_TIMEOUT_SECONDS:g} s."
    else:
        return ConnectionTest(ok=True, latency_ms=(time.perf_counter() - started) * 1000)
    latency_ms = (time.perf_counter() - started) * 1000
    return ConnectionTest(ok=False, latency_ms=latency_ms, error=config.redacted(error))


def llm_model_connection_test(*, model: LLMModel) -> ConnectionTest:
    """Test ``model``'s provider with a one-token call to its upstream model (``provider_connection_test``). Sync.

    Runs in an event loop of its own, with a fresh connection (so the latency includes connecting,
    as a new client's would) that is closed afterwards; call it from sync code only (the admin).
    """

    config = provider_config_for(model=model)  # reads the provider row: not on the event loop

    async def tested() -> ConnectionTest:
        try:
            return await provider_connection_test(config=config, upstream_model=model.upstream_model)
        finally:
            await aclose_clients()  # this loop's session: the loop ends here

    return asyncio.run(tested())


def reply_run(*, plan: ReplyPlan, timeout_seconds: float) -> ReplyOutcome:
    """Run the reply ``plan`` to its end through the streaming engine, from sync code; return how it ended.

    For replies nobody watches (a conversation's title, written by a Celery task): the same
    admission (``plan.metering``), routing and fallbacks, and usage accounting (``plan.usage``)
    as every reply (``llm.streaming``), the text collected in ``outcome.content``. Runs an event
    loop of its own, so call it only from a thread that runs none (a Celery worker, a plain
    thread), and closes what that loop opened: the upstream connections, the broadcast listener,
    the rate-limit and cooldown stores. After ``timeout_seconds`` the reply is stopped
    (``cancelled``, accounted) and ``TimeoutError`` raised. Raises ``llm.streaming.ReplyRefused``
    when admission control refuses it; an upstream failure is ``outcome.status`` ``failed``.
    """

    async def run() -> ReplyOutcome:
        try:
            async with asyncio.timeout(timeout_seconds), open_reply(plan) as reply:
                async for _event in reply.events():
                    pass
            assert reply.outcome is not None  # noqa: S101 - the events end with the reply
            return reply.outcome
        finally:
            await broadcast.stop_listening()
            await aclose_clients()
            await rate_limit_close()
            await cooldown_store_close()

    return asyncio.run(run())
