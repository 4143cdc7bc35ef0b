"""Fixtures shared by every app's tests (helpers are in ``tests.kit``, factories in ``tests.factories``).

The suite runs on whatever ``DATABASE_URL`` / ``REDIS_URL`` point at (``.ci/run`` sets
PostgreSQL and Redis; unset, the embedded defaults). The LLM upstream is always a simulator
process over real HTTP, one per pace (``tests.kit`` names each pace's reply length), or the
scripted upstream for the shapes the simulator never sends.

- Simulators: ``simulator`` (fast), ``slow_simulator`` (10 s replies, to stop mid-way),
  ``sleepy_simulator`` (5 s before the first token), ``silent_simulator`` (1.5 s before the first
  token, then a short reply), ``keyed_simulator`` (fast, requires ``SIMULATOR_API_KEY``). Each
  process starts on first use and lives for the session; the fixture waits until it streams
  nothing, so a test's before/after counts of its stats are its own.
- Models on them: ``sim_model``, ``slow_model``, ``sleepy_model``; ``scripted_upstream``.
- People and credentials: ``user``, ``other_user``, ``admin_user``, ``password``, ``token`` (a JWT),
  ``api_key_secret``, ``api_client``, ``client_for``, ``auth_client``, ``superuser``, ``admin_site``.
- Stores: ``store``, each test once on the in-process stores and once on Redis (rate limits,
  deployment cooldowns; the Redis run skipped without ``REDIS_URL``).
- Servers and cleanup: ``asgi_server`` (uvicorn in the test's loop), ``provider_clients`` and
  ``broadcast_listener`` (for async tests); for every test, a fresh channel layer, empty auth
  throttles, the usage queue drained and the connections left in asgiref's sync thread closed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn
from aiohttp import web
from asgiref.sync import SyncToAsync
from django.conf import settings
from django.core.cache import caches
from django.db import connections
from rest_framework.test import APIClient

from accounts.metering.budget_store import budget_store_reset
from accounts.metering.budgets import budget_cache
from accounts.metering.ratelimits import KEY_PREFIX as RATE_LIMIT_KEY_PREFIX
from accounts.metering.ratelimits import rate_limit_close
from accounts.services import api_key_create
from accounts.usage import usage_flush
from chatbackend import broadcast
from conversations.titles import conversation_titles_flush
from llm.providers.openai_compatible import aclose_clients
from llm.routing import cooldown_store_close
from llm.streaming import replies_accepting
from llm.tests.simulator_process import SimulatorProcess, start_simulator
from tests.factories import PASSWORD, LLMModelFactory, ProviderFactory, UserFactory
from tests.kit import (
    FAST_REPLY_TOKENS,
    SILENT_REPLY_TOKENS,
    SIMULATOR_API_KEY,
    SLEEPY_REPLY_TOKENS,
    SLOW_REPLY_TOKENS,
    access_token,
    bearer,
    poll_until,
    poll_until_sync,
)

ROOT = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="session")
def _celery_eager_in_process() -> Iterator[None]:
    """Run Celery tasks in-process for unit tests; the end-to-end test uses a real worker."""
    from chatbackend.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    yield
    app.conf.task_always_eager = previous


@pytest.fixture(autouse=True, scope="session")
def _no_rate_limit_counts_of_earlier_runs() -> None:
    """Delete the test Redis database's rate-limit counters left by earlier test runs.

    Each run's test database numbers users, keys and models from 1 again, so a minute's window left
    by the run before would count against this run's rows. (Budget counters are cleared before
    every test: ``_fresh_budgets``.)
    """
    url = settings.REDIS_URL
    if not url:
        return
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(f"{RATE_LIMIT_KEY_PREFIX}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(autouse=True)
def _no_connections_left_in_the_sync_thread() -> Iterator[None]:
    """Close, after every test, the database connections left in asgiref's shared sync thread.

    An async test's ``sync_to_async`` ORM calls run in that one long-lived thread, which no request
    ends. A connection left open there was taken by a later test without database access for a
    live one: the lean ASGI chain's ``request_started`` (``close_old_connections``, run in that
    thread) asked it for its autocommit state, and pytest-django refused ("Database access not
    allowed"); it also kept the test database from being dropped. Closing needs no database access.
    Torn down before pytest-django's database fixtures (theirs are set up first).
    """
    yield
    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=30)


@pytest.fixture(autouse=True)
def _fresh_channel_layer() -> Iterator[None]:
    """Give each test its own channel layer instance (``get_channel_layer()`` builds a new one).

    Each async test runs its own event loop, but the process-wide layer outlives it: channels_redis
    keeps receive state per instance (a lock per channel prefix, buffers) that a loop closing
    mid-receive can leave locked and bound to the dead loop, after which the broadcast listener
    of every later test fails to receive ("bound to a different event loop").
    """
    yield
    from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)


@pytest.fixture(autouse=True)
def _usage_queue_drained() -> Iterator[None]:
    """Wait, after each test, until the usage records it queued are written.

    ``accounts.usage`` writes them from a sender thread after the reply has ended, possibly after
    the test returned: left running, that write races the flush of the test database (a deadlock
    against ``TRUNCATE`` on PostgreSQL) or lands in the next test. Set up after pytest-django's
    database fixtures (autouse fixtures of plugins come first), so it is torn down before them.
    """
    yield
    # Titles first: an eager title task queues the usage of its request.
    assert conversation_titles_flush(30), "the conversation titles were not queued within 30 s"
    assert usage_flush(10), "the usage queue did not drain within 10 s"


def auth_throttles_clear() -> None:
    """Empty the ``auth_throttle`` cache: login failures and lockouts, login/registration rates.

    With ``REDIS_URL`` it is a Redis that outlives the run and that the end-to-end servers share:
    its keys (and only those: the database holds the channel layer and Celery's queue too) are
    deleted by their prefix. Otherwise it is this process's memory.
    """
    if not settings.REDIS_URL:
        caches["auth_throttle"].clear()
        return
    with redis.Redis.from_url(settings.REDIS_URL) as client:
        keys = list(client.scan_iter(match=f"{settings.AUTH_THROTTLE_KEY_PREFIX}:*", count=1000))
        if keys:
            client.delete(*keys)


def budget_state_clear() -> None:
    """Forget every budget counter and reservation, and this process's cached budgets.

    With ``REDIS_URL`` the counters live in a Redis that outlives the run (and test databases reuse
    ids from 1, so an earlier run's counter would be taken for this one's): their keys, and only
    those, are deleted by their hash-tag prefix. Otherwise they are this process's memory.
    """
    if settings.REDIS_URL:
        with redis.Redis.from_url(settings.REDIS_URL) as client:
            keys = list(client.scan_iter(match="\\{budget\\}:*", count=1000))
            if keys:
                client.delete(*keys)
    budget_store_reset()
    budget_cache.clear()


@pytest.fixture(autouse=True)
def _fresh_budgets() -> Iterator[None]:
    """Start every test with no budget counters, no reservations and no cached budgets."""
    budget_state_clear()
    yield


@pytest.fixture(autouse=True)
def _fresh_auth_throttles() -> Iterator[None]:
    """Start every test with empty login/registration throttles and no lockouts.

    Test clients and end-to-end servers' clients all come from 127.0.0.1: an earlier test's (or
    run's) failed logins and registrations would otherwise count against this one.
    """
    auth_throttles_clear()
    yield
    auth_throttles_clear()


@pytest.fixture(autouse=True)
def _replies_accepted() -> Iterator[None]:
    """End every test with this process accepting replies again.

    A test that runs the ASGI lifespan through its shutdown (``chatbackend.lifespan``) leaves
    ``llm.streaming`` refusing new replies (503 ``server_shutting_down``) for the tests after it.
    """
    yield
    replies_accepting(True)


# --- Simulators, one process per pace --------------------------------------------------------


@dataclass(frozen=True)
class Pace:
    """A simulator's pace: ms to the first token, ms between tokens, tokens per reply, and the API key
    it requires (empty: none)."""

    ttft_ms: int
    token_delay_ms: int
    reply_tokens: int
    api_key: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        """Return the ``manage.py llm_simulator`` options of this pace."""
        options = ("--ttft-ms", str(self.ttft_ms), "--token-delay-ms", str(self.token_delay_ms))
        options += ("--reply-tokens", str(self.reply_tokens))
        return (*options, "--api-key", self.api_key) if self.api_key else options


class Simulators:
    """The session's simulator processes: one per pace, started on first use, stopped at the end."""

    def __init__(self) -> None:
        self._running: dict[Pace, SimulatorProcess] = {}

    def idle(self, pace: Pace) -> SimulatorProcess:
        """Return the simulator of ``pace`` once it streams nothing: what an earlier test started has ended.

        So a test's before/after counts of its stats are its own.
        """
        sim = self._running.get(pace)
        if sim is None:
            sim = self._running[pace] = start_simulator(*pace.options)
        poll_until_sync(sim.stats, lambda stats: stats["active_streams"] == 0, what=f"the simulator {pace} to be idle")
        return sim

    def stop(self) -> None:
        for sim in self._running.values():
            sim.stop()


@pytest.fixture(scope="session")
def _simulators() -> Iterator[Simulators]:
    simulators = Simulators()
    yield simulators
    simulators.stop()


def _simulator_fixture(name: str, pace: Pace, purpose: str) -> Any:
    """Return the fixture ``name``: the session's simulator of ``pace``, once it is idle."""

    def fixture(_simulators: Simulators) -> SimulatorProcess:
        return _simulators.idle(pace)

    fixture.__doc__ = (
        f"A simulator for {purpose}: {pace.reply_tokens} tokens per reply, {pace.ttft_ms} ms to the first, "
        f"{pace.token_delay_ms} ms apart" + ("; it requires ``SIMULATOR_API_KEY``." if pace.api_key else ".")
    )
    return pytest.fixture(name=name)(fixture)


simulator = _simulator_fixture("simulator", Pace(20, 5, FAST_REPLY_TOKENS), "quick replies")
slow_simulator = _simulator_fixture("slow_simulator", Pace(100, 50, SLOW_REPLY_TOKENS), "stopping replies mid-way")
sleepy_simulator = _simulator_fixture("sleepy_simulator", Pace(5000, 5, SLEEPY_REPLY_TOKENS), "stops before output")
silent_simulator = _simulator_fixture("silent_simulator", Pace(1500, 5, SILENT_REPLY_TOKENS), "keep-alives")
keyed_simulator = _simulator_fixture(
    "keyed_simulator", Pace(5, 2, FAST_REPLY_TOKENS, SIMULATOR_API_KEY), "upstream keys (it echoes a wrong one)"
)


def _model_on(sim: SimulatorProcess, name: str, provider_name: str) -> Any:
    """Create the enabled model ``name`` (upstream ``sim-1``) on a keyless provider at ``sim``."""
    provider = ProviderFactory(name=provider_name, base_url=sim.base_url, api_key="")
    return LLMModelFactory(name=name, provider=provider, upstream_model="sim-1")


@pytest.fixture
def sim_model(db, simulator):
    """``sim-model``: an enabled model served by the fast simulator."""
    return _model_on(simulator, "sim-model", "sim-fast")


@pytest.fixture
def slow_model(db, slow_simulator):
    """``slow-model``: an enabled model served by the slow simulator."""
    return _model_on(slow_simulator, "slow-model", "sim-slow")


@pytest.fixture
def sleepy_model(db, sleepy_simulator):
    """``sleepy-model``: an enabled model served by the sleepy simulator."""
    return _model_on(sleepy_simulator, "sleepy-model", "sim-sleepy")


# --- A scripted upstream: tool calls and reasoning, over real HTTP ---------------------------


class ScriptedUpstream:
    """An OpenAI-compatible upstream in a thread that streams scripted chunks by ``model`` name.

    ``tool-call``: a reasoning delta, then a function call split over three deltas.
    ``tool-calls-repeating``: two calls whose every delta repeats the call's ``id`` and name, the
    first ``type`` left out. ``tool-calls-at-index-0``: two calls, both numbered 0, each whole in one
    delta. ``tool-calls-interleaved``: two calls whose fragments alternate (the second call opens
    before the first's arguments are whole). ``tool-call-cut``: a call whose arguments the output
    limit cut off (``finish_reason`` ``length``). (As some OpenAI-compatible servers stream them; OpenAI
    sends ``id``, ``type`` and the name once, and numbers calls 0, 1, ...) Any other model: one
    content chunk ``"ok"``.
    ``requests`` records every JSON body received.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _chunks(self, model: str) -> list[dict[str, Any]]:
        if model == "tool-call":
            call = {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
            return [
                {"role": "assistant", "reasoning_content": "The user wants weather."},
                {"tool_calls": [call]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
            ]
        if model == "tool-calls-repeating":
            weather = {"index": 0, "id": "call_w", "function": {"name": "get_weather"}}
            time = {"index": 1, "id": "call_t", "type": "function", "function": {"name": "get_time"}}
            fragments = [(weather, '{"city":'), (weather, '"Paris"}'), (time, '{"tz":'), (time, '"CET"}')]
            return [
                {"role": "assistant", "content": None},
                *(
                    {"tool_calls": [{**call, "function": {**call["function"], "arguments": part}}]}
                    for call, part in fragments
                ),
            ]
        if model == "tool-calls-interleaved":
            weather = {"index": 0, "id": "call_w", "type": "function", "function": {"name": "get_weather"}}
            time = {"index": 1, "id": "call_t", "type": "function", "function": {"name": "get_time"}}
            return [
                {"role": "assistant", "content": None},
                {"tool_calls": [{**weather, "function": {**weather["function"], "arguments": '{"city":'}}]},
                {"tool_calls": [{**time, "function": {**time["function"], "arguments": '{"tz":'}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
                {"tool_calls": [{"index": 1, "function": {"arguments": '"CET"}'}}]},
            ]
        if model == "tool-call-cut":
            call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather"}}
            return [
                {"role": "assistant", "content": None},
                {"tool_calls": [{**call, "function": {**call["function"], "arguments": '{"city":'}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"Pa'}}]},
            ]
        if model == "tool-calls-at-index-0":
            calls = [("call_w", "get_weather", '{"city":"Paris"}'), ("call_t", "get_time", '{"tz":"CET"}')]
            return [
                {"role": "assistant", "content": None},
                *(
                    {
                        "tool_calls": [
                            {"index": 0, "id": id_, "type": "function", "function": {"name": n, "arguments": a}}
                        ]
                    }
                    for id_, n, a in calls
                ),
            ]
        return [{"role": "assistant", "content": "ok"}]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        model = body["model"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        envelope = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": model}
        for delta in self._chunks(model):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            await response.write(f"data: {json.dumps({**envelope, 'choices': [choice]})}\n\n".encode())
        finish = "length" if model == "tool-call-cut" else "tool_calls" if model.startswith("tool-call") else "stop"
        last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
        await response.write(f"data: {json.dumps({**envelope, 'choices': [last]})}\n\n".encode())
        usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
        await response.write(f"data: {json.dumps({**envelope, 'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> ScriptedUpstream:
        self._thread.start()
        assert self._ready.wait(10), "the scripted upstream did not start"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="session")
def scripted_upstream() -> Iterator[ScriptedUpstream]:
    """The scripted upstream (``ScriptedUpstream``), for the session."""
    upstream = ScriptedUpstream().start()
    yield upstream
    upstream.stop()


# --- People and credentials ------------------------------------------------------------------


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def other_user(db):
    return UserFactory()


@pytest.fixture
def admin_user(db):
    """A user with the ``admin`` role (sees everyone's data through the API; not Django staff)."""
    return UserFactory(role="admin")


@pytest.fixture
def password() -> str:
    return PASSWORD


@pytest.fixture
def token(user) -> str:
    """A JWT access token for ``user``."""
    return access_token(user)


@pytest.fixture
def api_key_secret(user) -> str:
    """A fresh ``sk-...`` secret for ``user``."""
    return api_key_create(user=user, name="test key").secret


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()


@pytest.fixture
def client_for() -> Callable[[Any], APIClient]:
    """``client_for(someone)``: an APIClient logged in as that user with a JWT access token."""
    return lambda someone: APIClient(headers=bearer(access_token(someone)))


@pytest.fixture
def auth_client(client_for, user) -> APIClient:
    """An APIClient logged in as ``user`` with a JWT access token."""
    return client_for(user)


@pytest.fixture
def superuser(db):
    """A Django superuser (staff): an operator of the admin site."""
    return UserFactory(is_superuser=True, is_staff=True)


@pytest.fixture
def admin_site(client, superuser):
    """A Django test client logged in to the admin as ``superuser``."""
    client.force_login(superuser)
    return client


# --- Stores ----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, settings: Any) -> AsyncIterator[str]:
    """Run the test on the in-process stores, then on Redis (when REDIS_URL is set, as in CI).

    The stores that follow ``settings.REDIS_URL``: rate limits (``accounts.metering.ratelimit_store``)
    and deployment cooldowns (``llm.routing``). Yields ``"memory"`` or ``"redis"``; closes this
    event loop's stores of both kinds at the end.
    """
    if request.param == "redis" and not settings.REDIS_URL:
        pytest.skip("the Redis store needs REDIS_URL (CI sets it)")
    if request.param == "memory":
        settings.REDIS_URL = ""
    yield request.param
    await rate_limit_close()
    await cooldown_store_close()


# --- Servers and cleanup ---------------------------------------------------------------------


@pytest.fixture
async def asgi_server() -> AsyncIterator[str]:
    """Serve ``chatbackend.asgi.application`` with uvicorn in the test's event loop; yield its URL.

    A real HTTP server, so a client that closes its connection is a real disconnect (Django then
    cancels the request task), unlike the test client.
    """
    from chatbackend.asgi import application

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    # proxy_headers off, as production runs it: chatbackend.client_ip alone decides the client.
    config = uvicorn.Config(application, lifespan="off", log_level="warning", ws="none", proxy_headers=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await poll_until(lambda: server.started or task.done(), what="uvicorn's start-up")
    assert not task.done(), "uvicorn stopped during start-up"
    host, port = sock.getsockname()
    yield f"http://{host}:{port}"
    server.should_exit = True
    await asyncio.wait_for(task, timeout=10)
    sock.close()


@pytest.fixture
async def broadcast_listener() -> AsyncIterator[None]:
    """Leave the broadcast group and stop the listener of the test's event loop when the test ends."""
    yield
    await broadcast.stop_listening()


@pytest.fixture
async def provider_clients() -> AsyncIterator[None]:
    """Close the provider adapter's per-loop HTTP client when the test's event loop is done with it."""
    yield
    await aclose_clients()
