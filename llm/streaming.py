"""The one streaming engine: start a reply, relay the upstream's chunks as typed events, persist the end.

Every interface — the conversation SSE view, the WebSocket consumer and ``/v1/chat/completions``
— streams a reply the same way and only encodes the events into its own wire format::

    async with open_reply(begin) as reply:            # the start; begin's errors raise here
        async for event in reply.events(keepalive=15):
            ...                                        # STARTED, ReplyDelta..., KEEPALIVE, then
                                                       # ReplyDone or ReplyFailed, always last

``begin`` is an awaitable (usually one ``run_sync`` call of a sync service that writes the start)
returning a ``ReplyPlan``, or the plan itself when it was made on the event loop. The plan says
where to send the request, who pays (``plan.usage``) and, in a subclass, what the interface needs
to report (ids) and how to persist the end (``plan.finish``). The ``Reply`` owns the upstream
request, like openai-python's stream objects: however the block or the iteration exits — the
upstream finished (``completed``), the client went away or asked to stop (``cancelled``), the
upstream failed (``failed``) — it closes the upstream request, persists the end once
(``plan.finish`` in one worker-thread hop, shielded from a second cancellation) and accounts the
usage once (``accounts.usage.usage_account``). The text generated so far is kept in every case. A
streaming HTTP response hands its reply to ``ReplyStreamingResponse``, which plays the role of the
``async with`` block for the response's lifetime.

Built in, once: the keep-alive while the upstream is silent before its first chunk (proxies drop
idle reads; FIELD-NOTES, "HTTP streaming"), the first-chunk wait of ``/v1`` (``open_reply(...,
wait_first_chunk=)``: an upstream failure is still an HTTP status) and stopping. ``Reply.stop()``
ends the reply ``cancelled`` from anywhere in its event loop (a WebSocket frame); a stop request
from another process (``reply_stop_broadcast``) reaches it through the process-wide listener of
``chatbackend.broadcast``, joined before ``STARTED`` is yielded so that a client that has seen the
start can stop the reply.

Deltas come in batches: an upstream adapter yields every chunk that had arrived when it read
(``llm.providers``), and ``ReplyDelta.chunks`` passes them on together, so an interface writes
them to its client in one send.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Generic, TypeVar

from asgiref.sync import async_to_sync
from django.conf import settings
from django.http import HttpResponseBase

from accounts.metering import Admission, MeteringRequest, metering_admit
from accounts.revocation import watch_credential
from accounts.selectors import AuthenticationFailed
from accounts.usage import REFUSED, UsageContext, usage_account, usage_context_served_by, usage_flush
from chatbackend import broadcast
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError
from chatbackend.handlers import request_cancelled_by_server
from chatbackend.http import EventStreamResponse
from chatbackend.liveness import start_heartbeat

from .providers import ChatChunk, ChatRequest, ProviderConfig, UpstreamError, Usage, tool_calls_merged
from .routing import DeploymentConfig, ModelRoute, Router
from .tokens import COUNTED, ESTIMATE_TOKENIZER, Tokenizer

logger = logging.getLogger(__name__)

STOP_MESSAGE_TYPE = "reply.stop"
# ``ReplyOutcome.usage_source`` of usage the provider reported (``UsageRecord.TokenSource``).
PROVIDER = "provider"
# The longest a reply's end may take to be written (one UPDATE, the usage queued) before a
# cancelled wait for it gives up.
PERSIST_TIMEOUT_SECONDS = 10.0


class ReplyStatus(StrEnum):
    """How a reply ended (``Message.status`` and ``UsageRecord.finish_status`` use the same words)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class ReplyRefused(ApplicationError):
    """Admission control refused the reply before it started (``accounts.metering.metering_admit``).

    The refusal's own message, code, status (429 ``rate_limit_exceeded`` / ``insufficient_quota``,
    503 ``metering_unavailable``) and headers (``Retry-After``, ``x-ratelimit-*``), so that streaming
    interfaces can tell it from other start errors and report it in their own format.
    """

    def __init__(self, error: ApplicationError) -> None:
        super().__init__(
            error.message,
            code=error.code,
            status=error.status,
            param=error.param,
            type=error.type,
            fields=error.fields,
            detail=error.detail,
            headers=error.headers,
        )


@dataclass(slots=True)
class ReplyOutcome:
    """How a reply ended.

    ``model_name``: the public name of the model that served it (``Reply.model_name``): the plan's,
    or the fallback that answered when the model's every deployment failed. ``content`` /
    ``reasoning_content`` / ``refusal``: all text the upstream streamed, a batch its client left
    during included (``Reply._take``; ``refusal``: what the model said when it declined, OpenAI's
    ``refusal``; ``text`` joins it to ``content`` for interfaces without a place for it).
    ``tool_calls``: the whole tool calls streamed (``llm.providers.tool_calls_merged``).
    ``usage``: token counts; ``usage_source`` says whose:
    ``"provider"`` (its usage report), else the serving model's tokenizer's (``llm.tokens``; a
    fallback's own, else the plan's): ``"counted"`` by the model's tokenizer or ``"estimated"``
    (``UsageRecord.TokenSource`` values); 0 tokens when the reply ended with no upstream request out
    (before the first was sent, or after one failed while the router waited to try the next:
    ``Router.requested``). Times in milliseconds from the upstream
    request's start; ``time_to_first_token_ms`` is None when no chunk with output arrived.
    ``error``: the failure, for ``failed``.
    """

    status: ReplyStatus
    model_name: str
    content: str
    reasoning_content: str
    finish_reason: str | None
    usage: Usage
    usage_source: str
    time_to_first_token_ms: float | None
    duration_ms: float
    error: ApplicationError | None = None
    refusal: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()

    @property
    def text(self) -> str:
        """The reply as a person reads it: its ``content``, then its ``refusal`` (a model that declines says so)."""
        return self.content + self.refusal if self.refusal else self.content


@dataclass(kw_only=True)
class ReplyPlan:
    """What a reply's start decided: the upstream request, its public model name, its id, who pays.

    ``reply_id``: unique per reply; the key of stop requests and of logs. ``usage``: the accounting
    context, or None for a reply nobody pays for. ``metering``: what admission control checks
    before the upstream call (rate limits, budgets: ``accounts.metering``), or None for a reply
    nothing limits. ``tokenizer``: the model's (``EnabledModel.tokenizer``), which counts the
    tokens of a reply whose provider reported no usage (a stream stopped or cut), unless a fallback
    served it (then the fallback model's own tokenizer counts). ``route``: the
    model's deployments (``EnabledModel.route``), which ``llm.routing.Router`` picks from, then
    ``fallbacks``; None: ``provider`` with ``request.model`` is its one deployment. Interfaces
    subclass it with the typed fields they report to their clients (ids, timestamps) and override
    ``finish`` to persist the end and ``refused`` to undo a start that admission refused.
    """

    provider: ProviderConfig
    request: ChatRequest
    model_name: str
    reply_id: str
    usage: UsageContext | None = None
    metering: MeteringRequest | None = None
    tokenizer: Tokenizer = ESTIMATE_TOKENIZER
    route: ModelRoute | None = None
    fallbacks: tuple[ModelRoute, ...] = ()

    # ``finish`` and ``checkpoint`` run in a worker thread (they may use the ORM), and only when
    # a subclass overrides them.
    def finish(self, outcome: ReplyOutcome) -> None:
        """Persist the end of the reply (sync; the ORM is allowed). The base plan persists nothing."""

    def checkpoint(self, content: str, reasoning_content: str, model_name: str) -> None:
        """Persist the text so far of a reply still streaming, what a crash keeps (sync).

        ``model_name``: the model generating it (``Reply.model_name``: a fallback's once one serves),
        which a crash recovery bills the text as. Called every ``REPLY_CHECKPOINT_SECONDS`` while
        text flows, never per token, one at a time; it must not undo an end already written. The
        base plan keeps nothing.
        """

    def refused(self, error: ApplicationError) -> None:
        """Undo what the start wrote: admission control refused the reply with ``error`` (sync; ORM allowed).

        Runs before any upstream request, once; the refusal's usage record is written by the engine.
        The base plan wrote nothing.
        """


P = TypeVar("P", bound=ReplyPlan)


# --- Events -----------------------------------------------------------------------------------


class ReplyStarted:
    """The reply has started: interfaces announce it (``reply.start``); first event, once."""

    __slots__ = ()


class KeepAlive:
    """The upstream has been silent for ``keepalive`` seconds before its first chunk."""

    __slots__ = ()


STARTED = ReplyStarted()
KEEPALIVE = KeepAlive()
# What a reply's first batch is before it was read (the router's ``first`` returns a batch or None).
_UNREAD = object()


@dataclass(slots=True)
class ReplyDelta:
    """Chunks that arrived together: content, reasoning, a refusal, tool calls or a ``finish_reason``.

    Never empty; chunks that only carry the provider's usage report are not passed on.
    """

    chunks: list[ChatChunk]


@dataclass(slots=True)
class ReplyDone:
    """The reply ended ``completed``, or ``cancelled`` by a stop; last event. Already persisted."""

    outcome: ReplyOutcome


@dataclass(slots=True)
class ReplyFailed:
    """The upstream failed (``outcome.status`` is ``failed``); last event. Already persisted."""

    error: ApplicationError
    outcome: ReplyOutcome


ReplyEvent = ReplyStarted | ReplyDelta | KeepAlive | ReplyDone | ReplyFailed


# --- The reply --------------------------------------------------------------------------------

# Every reply of this process not yet ended, and every end being written: what a shutdown must
# finish before the process exits (``replies_shutdown``).
_open_replies: weakref.WeakSet[Reply[Any]] = weakref.WeakSet()
_persisting: set[asyncio.Future[None]] = set()
# Replies whose end is not written yet, ended or not (strong references: an abandoned reply must
# still be written at exit).
_unwritten: set[Reply[Any]] = set()
_accepting = True


class Reply(Generic[P]):
    """One streamed reply. Get it from ``open_reply``; use it as an async context manager.

    ``events()`` may be iterated once. ``outcome`` is set once the reply has ended. ``admission``:
    what admission control granted (its ``headers`` are OpenAI's ``x-ratelimit-*``), or None.
    """

    def __init__(self, plan: P, admission: Admission | None = None) -> None:
        self.plan = plan
        self.admission = admission
        self.outcome: ReplyOutcome | None = None
        _open_replies.add(self)
        _unwritten.add(self)
        route = plan.route or ModelRoute(
            name=plan.model_name,
            deployments=(
                DeploymentConfig(id=None, key="", name="", provider=plan.provider, upstream_model=plan.request.model),
            ),
        )
        self.router = Router(
            route=route,
            fallbacks=plan.fallbacks,
            request=plan.request,
            prompt_tokens=plan.metering.prompt_tokens if plan.metering is not None else None,
            reply_id=plan.reply_id,
        )
        self._first: asyncio.Future[list[ChatChunk] | None] | None = None  # ``router.first()`` in its own task
        self._events: AsyncGenerator[ReplyEvent, None] | None = None
        self._task: asyncio.Task[Any] | None = None  # the task iterating ``events()``
        self._waiting = False  # True while that task awaits the upstream: a stop may cancel it
        self._stop_requested = False
        self._stop_reason: ApplicationError | None = None
        self._interrupted = False  # we cancelled the task for a stop
        self._started = time.perf_counter()
        self._ttft_ms: float | None = None
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._refusal: list[str] = []
        self._tool_calls: list[dict[str, Any]] = []  # received ``delta.tool_calls`` entries
        self._chunks_with_output = 0
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        # Checkpoints of the text so far, for plans that keep them (see ``ReplyPlan.checkpoint``).
        self._checkpoints = type(plan).checkpoint is not ReplyPlan.checkpoint
        self._checkpoint_every = float(settings.REPLY_CHECKPOINT_SECONDS)
        self._next_checkpoint = time.monotonic() + self._checkpoint_every
        self._checkpointing: asyncio.Task[None] | None = None
        if self._checkpoints:
            start_heartbeat()  # the process proves it is alive while it streams (chatbackend.liveness)

    @property
    def model_name(self) -> str:
        """The public name of the model serving the reply, what the client is told and the usage row says.

        The plan's model (an alias already resolved to it), or the fallback (``LLMModel.fallbacks``)
        the router went on to once every deployment of the model failed before its first chunk
        (``Router.fallback_served``: from the moment its request is out, so that a reply that ends
        while it awaits that fallback is the fallback's, as its usage is). Final from the first
        chunk on; before it, and for a reply no model was asked or answered, the plan's. Interfaces
        read it once, when the first chunks arrive or the reply ends, never per chunk.
        """
        fallback = self.router.fallback_served
        return fallback.name if fallback is not None else self.plan.model_name

    def add_admission_headers(self, response: HttpResponseBase) -> None:
        """Set what admission control asks every response to carry (OpenAI's ``x-ratelimit-*``) on ``response``."""
        if self.admission is not None:
            for name, value in self.admission.headers.items():
                response[name] = value

    async def __aenter__(self) -> Reply[P]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the reply if it has not ended (``cancelled``): close the upstream, persist, account."""
        events = self._events
        if events is not None:
            await events.aclose()  # its ``finally`` ends the reply
        await self._end(ReplyStatus.CANCELLED, None)

    def stop(self, reason: ApplicationError | None = None) -> None:
        """Stop the reply: it ends ``cancelled`` with its text so far. Idempotent; any task of its loop.

        Interrupts the upstream wait at once; a reply whose events are being handled stops before
        its next read. ``reason``: why, when it is not the client's own stop (e.g. its credential
        was revoked); it becomes ``outcome.error`` (the status stays ``cancelled``).
        """
        if self._stop_requested or self.outcome is not None:
            return
        self._stop_requested = True
        self._stop_reason = reason
        if self._waiting and self._task is not None:
            self._interrupted = True
            self._task.cancel()

    def events(self, *, keepalive: float | None = None) -> AsyncGenerator[ReplyEvent, None]:
        """Return the reply's events: ``STARTED``, ``ReplyDelta``s and ``KEEPALIVE``s, then one of
        ``ReplyDone`` / ``ReplyFailed``.

        ``keepalive`` (seconds): yield ``KEEPALIVE`` each time that long passes before the first
        chunk. The end is persisted before the last event is yielded. A cancellation of the
        iterating task (client gone, server shutting down) persists ``cancelled`` and propagates;
        ``outcome.error`` is 503 ``server_shutdown`` when the server cancelled the request
        (``chatbackend.handlers.request_cancelled_by_server``), None when the client went away.
        Raises ``RuntimeError`` if called twice.
        """
        if self._events is not None:
            raise RuntimeError("Reply.events() can be iterated only once")
        self._events = self._generate(keepalive)
        return self._events

    async def _generate(self, keepalive: float | None) -> AsyncGenerator[ReplyEvent, None]:
        self._task = asyncio.current_task()
        status, error = ReplyStatus.CANCELLED, None
        registry = _replies()
        registry[self.plan.reply_id] = self
        usage = self.plan.usage
        watch = (
            watch_credential(user_id=usage.user_id, api_key_id=usage.api_key_id, on_revoked=self._credential_revoked)
            if usage is not None
            else contextlib.nullcontext()
        )
        try:
            watch.__enter__()
            try:
                await broadcast.listen()  # before STARTED: a client that saw the start may stop us
                yield STARTED
                first = self._first
                batch: list[ChatChunk] | None | object = _UNREAD
                if first is None and not self._stop_requested:
                    if keepalive is None:
                        self._waiting = True  # a stop cancels this wait (and with it the attempt)
                        try:
                            batch = await self.router.first()
                        finally:
                            self._waiting = False
                    else:
                        # The first read in its own task, so that waiting for it can time out without
                        # cancelling the upstream request. Later reads are awaited directly.
                        first = self._first = asyncio.ensure_future(self.router.first())
                if first is not None:
                    while not (first.done() or self._stop_requested):
                        self._waiting = True
                        try:
                            await asyncio.wait((first,), timeout=keepalive)
                        finally:
                            self._waiting = False
                        if not first.done():
                            yield KEEPALIVE
                    if first.done():
                        self._first = None
                        if not first.cancelled():  # cancelled: the end was written elsewhere (a shutdown)
                            batch = first.result()
                if batch is None:  # an upstream that ended without a chunk
                    status = ReplyStatus.COMPLETED
                elif isinstance(batch, list):
                    delta = self._take(batch)
                    if delta is not None:
                        yield delta
                        self._delivered()
                if status is not ReplyStatus.COMPLETED and batch is not _UNREAD and not self._stop_requested:
                    # The serving deployment's own iterator: the router adds nothing per batch.
                    # ``_waiting`` is True exactly while the loop awaits the upstream's next batch.
                    self._waiting = True
                    try:
                        async for batch in self.router.upstream:
                            self._waiting = False
                            delta = self._take(batch)
                            if delta is not None:
                                yield delta
                                self._delivered()
                            if self._stop_requested:
                                break
                            self._waiting = True
                        else:
                            status = ReplyStatus.COMPLETED
                    finally:
                        self._waiting = False
            except ApplicationError as exc:
                status, error = ReplyStatus.FAILED, exc
            except asyncio.CancelledError:
                if not self._absorb_stop():
                    raise
            except Exception as exc:  # a bug must still leave the reply persisted and accounted
                logger.exception("reply %s failed", self.plan.reply_id)
                status = ReplyStatus.FAILED
                error = ApplicationError("The reply failed.", code="internal_error", status=500)
                error.__cause__ = exc
        finally:
            watch.__exit__(None, None, None)
            if registry.get(self.plan.reply_id) is self:
                del registry[self.plan.reply_id]
            await self._end(status, error)
            # When the end was written elsewhere (a shutdown) while this task still awaited the first
            # chunk, the upstream that opened since, and the leases taken for it, are still held.
            await self._close_upstream()
            if self.outcome is not None:
                await self.router.release(completion_tokens=self.outcome.usage.completion_tokens)
        assert self.outcome is not None  # noqa: S101 - set by _end
        if self.outcome.status is ReplyStatus.FAILED and error is not None:
            yield ReplyFailed(error, self.outcome)
        else:
            yield ReplyDone(self.outcome)

    def _credential_revoked(self) -> None:
        self.stop(AuthenticationFailed("The credential of this reply was revoked.", code="credential_revoked"))

    def _absorb_stop(self) -> bool:
        """Return True when the ``CancelledError`` being handled was our stop's, and clear it.

        False (re-raise!) when the cancellation came from elsewhere — the client went away or the
        server shuts down — even if it coincides with a stop.
        """
        if not self._interrupted or self._task is None:
            return False
        self._interrupted = False
        return self._task.uncancel() == 0

    def _take(self, batch: list[ChatChunk]) -> ReplyDelta | None:
        """Add a batch of chunks to the reply as received; return what to pass on (None when only usage came).

        Its text is the reply's from now on, whether or not its client gets it: the upstream generated
        it and bills it. A client that leaves (or a server that stops) while the batch is being sent
        to it cancels the send, never the text: the saved reply is every chunk received, and the
        tokens counted for a reply its provider reported none for are that same text's (a stopped or
        cut reply's completion tokens are the tokenizer's count of its saved text).
        """
        # The hot path: appends and compares only.
        usage_only = False
        for chunk in batch:
            content, reasoning = chunk.content, chunk.reasoning_content
            refusal, tool_calls = chunk.refusal, chunk.tool_calls
            if content or reasoning or tool_calls or refusal:
                if self._ttft_ms is None:
                    self._ttft_ms = (time.perf_counter() - self._started) * 1000
                self._chunks_with_output += 1
                if content:
                    self._content.append(content)
                elif refusal:  # OpenAI sends a refusal instead of content: the content path pays nothing
                    self._refusal.append(refusal)
                if reasoning:
                    self._reasoning.append(reasoning)
                if tool_calls:
                    self._tool_calls.extend(tool_calls)
            elif chunk.usage is not None and not chunk.finish_reason:
                usage_only = True
            if chunk.finish_reason:
                self._finish_reason = chunk.finish_reason
            if chunk.usage is not None:
                self._usage = chunk.usage
        if usage_only:
            batch = [chunk for chunk in batch if chunk.usage is None or chunk.finish_reason or _has_output(chunk)]
        return ReplyDelta(batch) if batch else None

    def _delivered(self) -> None:
        """The interface sent the last delta and asks for the next event: checkpoint the text if it is time.

        After the send, so that a checkpoint (what a crash keeps) never holds text its client was not sent.
        """
        if self._checkpoints and time.monotonic() >= self._next_checkpoint:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Write the text so far in a worker thread, fire-and-forget; one checkpoint at a time."""
        self._next_checkpoint = time.monotonic() + self._checkpoint_every
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        content, reasoning = "".join(self._content), "".join(self._reasoning)
        task = asyncio.ensure_future(run_sync(self.plan.checkpoint, content, reasoning, self.model_name))
        task.add_done_callback(self._checkpoint_done)
        self._checkpointing = task

    def _checkpoint_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("checkpointing reply %s failed", self.plan.reply_id, exc_info=task.exception())

    async def _wait_first_chunk(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the upstream's first chunk; raise its failure, persisted ``failed``.

        Then, when rate limits apply, wait for the admission's ``x-ratelimit-*`` headers as the store
        answers them (``Admission.confirmed_headers``: a local admission's record, sent during the
        upstream call and mostly answered by its first chunk), which the response sends next. A
        cancellation of either wait ends the reply ``cancelled``.
        """
        first = self._first = asyncio.ensure_future(self.router.first())
        admission = self.admission
        try:
            await asyncio.wait((first,), timeout=seconds)
            error = first.exception() if first.done() and not first.cancelled() else None
            if not isinstance(error, ApplicationError) and admission is not None and admission.has_headers:
                await admission.confirmed_headers()
        except asyncio.CancelledError:
            await self._end(ReplyStatus.CANCELLED, None)
            raise
        if isinstance(error, ApplicationError):
            self._first = None
            await self._end(ReplyStatus.FAILED, error)
            raise error

    async def _close_upstream(self) -> None:
        first, self._first = self._first, None
        if first is not None and not first.done():
            first.cancel()  # runs the adapter's cleanup, which closes the upstream connection
            await asyncio.wait((first,))
        if first is not None and first.done() and not first.cancelled():
            first.exception()  # retrieved: a failure here is already what ended the reply
        with contextlib.suppress(Exception):  # closing a failed or finished upstream may itself fail
            await self.router.aclose()

    def _set_outcome(self, status: ReplyStatus, error: ApplicationError | None) -> ReplyOutcome:
        """End the reply's bookkeeping: build ``outcome`` from the chunks it took (sync, once)."""
        _open_replies.discard(self)
        content, reasoning = "".join(self._content), "".join(self._reasoning)
        refusal = "".join(self._refusal) if self._refusal else ""
        reported = self._usage
        if reported is not None and not reported.prompt_only:
            usage, source = reported, PROVIDER
        elif self.router.requested:
            usage, source = self._estimate_usage(content + refusal, reasoning), self._tokenizer().source
            if reported is not None:  # the provider reported the prompt (and its cache split) only
                usage = Usage(
                    prompt_tokens=reported.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_tokens=reported.cached_tokens,
                    cache_creation_tokens=reported.cache_creation_tokens,
                )
        else:  # no request out (not sent yet, or the last one failed): nothing to bill, exactly
            usage, source = Usage(prompt_tokens=0, completion_tokens=0), COUNTED
        self.outcome = ReplyOutcome(
            status=status,
            model_name=self.model_name,
            content=content,
            reasoning_content=reasoning,
            finish_reason=self._finish_reason,
            usage=usage,
            usage_source=source,
            time_to_first_token_ms=self._ttft_ms,
            duration_ms=(time.perf_counter() - self._started) * 1000,
            error=error,
            refusal=refusal,
            tool_calls=tuple(tool_calls_merged(self._tool_calls)) if self._tool_calls else (),
        )
        return self.outcome

    async def _end(self, status: ReplyStatus, error: ApplicationError | None) -> None:
        if self.outcome is not None:
            return
        if status is ReplyStatus.CANCELLED and error is None:
            # Why, when it was not the client's own stop: ``stop(reason)``, or the server cancelled
            # the request (its shutdown). The one place a cancelled end gets its reason.
            error = self._stop_reason or (server_shutdown_error() if request_cancelled_by_server() else None)
        outcome = self._set_outcome(status, error)
        # Shielded: a second cancellation (client gone, server shutting down) must not lose the
        # write of what was generated. A server that waits for this task before it exits (daphne's
        # shutdown, this module's ``replies_shutdown``) must see the write done, so a cancelled
        # wait still waits for it, up to ``PERSIST_TIMEOUT_SECONDS``.
        persisting = asyncio.ensure_future(self._persist(outcome))
        _persisting.add(persisting)
        persisting.add_done_callback(_persisting.discard)
        try:
            await asyncio.shield(persisting)
        except asyncio.CancelledError:
            await asyncio.wait((persisting,), timeout=PERSIST_TIMEOUT_SECONDS)
            raise

    async def _persist(self, outcome: ReplyOutcome) -> None:
        await self._close_upstream()
        if type(self.plan).finish is not ReplyPlan.finish:
            try:
                await run_sync(self.plan.finish, outcome)
            except Exception:
                logger.exception("persisting the end of reply %s failed", self.plan.reply_id)
        if self.admission is not None:
            # A local admission is recorded in the store during the call; settlement needs its
            # reservation there (accounts.metering.headroom). At once otherwise.
            await self.admission.confirmed()
        self._account(outcome)
        # Last: a slow or unreachable rate-limit store must not delay the writes above (a shutdown
        # waits for them for a bounded time); a lease not given back expires.
        router = self.router
        await router.release(completion_tokens=outcome.usage.completion_tokens)
        if self.admission is not None:
            # A fallback generated the reply: the requested model's tokens per minute get none of it.
            await self.admission.release(
                completion_tokens=outcome.usage.completion_tokens,
                not_for=router.route.subject if router.fallback_served is not None else None,
            )

    def _persist_now(self, outcome: ReplyOutcome) -> None:
        """``_persist`` without an event loop (at process exit): the end written in this thread."""
        if type(self.plan).finish is not ReplyPlan.finish:
            try:
                self.plan.finish(outcome)
            except Exception:
                logger.exception("persisting the end of reply %s failed", self.plan.reply_id)
        self._account(outcome)

    def _account(self, outcome: ReplyOutcome) -> None:
        _unwritten.discard(self)
        if outcome.error is not None:
            error = outcome.error
            logger.warning(
                "reply %s ended %s: %s (%s)%s",
                self.plan.reply_id,
                outcome.status.value,
                error.message,
                error.code,
                f": {error.detail}" if error.detail else "",
            )
        context = self.plan.usage
        if context is not None:
            fallback = self.router.fallback_served
            if fallback is not None and fallback.model is not None:
                # A fallback model served: the reply is its usage, at its prices.
                context = usage_context_served_by(context, model=fallback.model)
            if self._refused_by_routing(outcome):
                # As a refusal at admission (``_admit``): nothing was sent, 0 tokens, counted apart.
                usage_account(
                    context=context,
                    finish_status=REFUSED,
                    prompt_tokens=0,
                    completion_tokens=0,
                    token_source=COUNTED,
                    produced_output=False,
                )
                return
            usage = outcome.usage
            usage_account(
                context=context,
                finish_status=outcome.status.value,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                cache_creation_tokens=usage.cache_creation_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                token_source=outcome.usage_source,
                produced_output=outcome.time_to_first_token_ms is not None,
                deployment=self.router.deployment.name if self.router.deployment is not None else "",
            )

    def _refused_by_routing(self, outcome: ReplyOutcome) -> bool:
        """Return whether the reply failed because the router's own rate limits (every deployment's, or a
        fallback's: ``llm.routing``) turned it away before any upstream request: a refusal, as one
        admission control makes, not a failed reply. An upstream's own 429 is an ``UpstreamError``."""
        error = outcome.error
        return (
            outcome.status is ReplyStatus.FAILED
            and error is not None
            and not isinstance(error, UpstreamError)
            and error.code == "rate_limit_exceeded"
            and self.router.deployment is None
        )

    def _estimate_usage(self, content: str, reasoning: str) -> Usage:
        """Count the usage the provider did not report: the prompt and what was generated, by ``_tokenizer()``.

        The text is the reply's content and reasoning and its tool calls' names and arguments (the
        model generated them all: a reply cut inside a tool call is billed for what it sent of it).
        The model's tokenizer counts it exactly (``counted``); with nothing to count, or for the
        estimate (``estimated``), the larger of that count (chars / 4) and the chunk count.
        """
        tokenizer = self._tokenizer()
        completion = tokenizer.count_text(content + reasoning + self._tool_call_text())
        if tokenizer.source != COUNTED or not completion:
            completion = max(completion, self._chunks_with_output)
        metering = self.plan.metering  # the prompt was counted at admission (by the plan's tokenizer): not twice
        if metering is not None and tokenizer is self.plan.tokenizer:
            prompt = metering.prompt_tokens
        else:
            prompt = tokenizer.count_prompt(self.plan.request.messages)
        return Usage(prompt_tokens=prompt, completion_tokens=completion)

    def _tool_call_text(self) -> str:
        """Return the names and argument fragments of the tool calls received, joined ("" for none)."""
        parts: list[str] = []
        for call in self._tool_calls:
            function = call.get("function")
            if isinstance(function, dict):
                pieces = (function.get("name"), function.get("arguments"))
                parts.extend(piece for piece in pieces if isinstance(piece, str))
        return "".join(parts)

    def _tokenizer(self) -> Tokenizer:
        """Return the tokenizer of the model that generated the reply: a fallback's own when one served
        (its ``EnabledModel.tokenizer``), else the plan's. Another model's tokenizer would miscount it,
        and label an estimate ``counted`` or an exact count ``estimated``."""
        fallback = self.router.fallback_served
        tokenizer = getattr(fallback.model, "tokenizer", None) if fallback is not None else None
        return tokenizer if isinstance(tokenizer, Tokenizer) else self.plan.tokenizer


def _has_output(chunk: ChatChunk) -> bool:
    return bool(chunk.content or chunk.reasoning_content or chunk.tool_calls or chunk.refusal)


class ReplyOpener(Generic[P]):
    """What ``open_reply`` returns: ``async with`` it, or ``await`` it for a ``Reply`` to hand on."""

    def __init__(self, begin: Awaitable[P] | P, wait_first_chunk: float) -> None:
        self._begin = begin
        self._wait_first_chunk = wait_first_chunk
        self._reply: Reply[P] | None = None

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> Reply[P]:
        self._reply = await self._open()
        return self._reply

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reply is not None:
            await self._reply.aclose()

    async def _open(self) -> Reply[P]:
        if not _accepting:
            if inspect.isawaitable(self._begin):
                # ``begin`` never ran: close it (a coroutine that was never awaited warns).
                close = getattr(self._begin, "close", None)
                if close is not None:
                    close()
            raise ApplicationError(
                "The server is shutting down; retry in a moment.", code="server_shutting_down", status=503
            )
        begin = self._begin
        if isinstance(begin, ReplyPlan):  # planned on the event loop: nothing ran elsewhere
            plan = begin
        else:
            begun = asyncio.ensure_future(begin)
            try:
                plan = await asyncio.shield(begun)
            except asyncio.CancelledError:
                # ``begin`` runs on (in its thread) and writes the start; end the reply
                # ``cancelled`` once it returns, or an assistant message would stay ``streaming``.
                await asyncio.shield(_abandon(begun))
                raise
        admission = None
        if plan.metering is not None:
            try:
                admission = await _admit(plan)
            except asyncio.CancelledError:
                # The start is written (a conversation's messages): end it ``cancelled`` like a
                # reply whose client left, or its message would stay ``streaming``.
                await asyncio.shield(Reply(plan).aclose())
                raise
        reply = Reply(plan, admission)
        if self._wait_first_chunk > 0:
            await reply._wait_first_chunk(self._wait_first_chunk)
        return reply


def open_reply(begin: Awaitable[P] | P, *, wait_first_chunk: float = 0.0) -> ReplyOpener[P]:
    """Start a reply: await ``begin`` for its plan (or take the plan itself) and open the upstream request.

    Use as ``async with open_reply(begin) as reply:`` or, when a response outlives the caller,
    ``reply = await open_reply(begin)`` and hand the reply to ``ReplyStreamingResponse``.
    ``wait_first_chunk`` (seconds): wait that long for the upstream's first chunk, so that an
    upstream failure can still be answered with an error status before any header is sent; then,
    when rate limits apply, for the admission's ``x-ratelimit-*`` headers as the store answers them
    (``Admission.confirmed_headers``), which the response sends.
    Raises the ``ApplicationError`` of ``begin`` (nothing to end), ``ReplyRefused`` when admission
    control refused the plan's ``metering`` (its start undone: ``ReplyPlan.refused``), or the error of
    an upstream that failed within ``wait_first_chunk`` (persisted ``failed``).
    """
    if not (isinstance(begin, ReplyPlan) or inspect.isawaitable(begin)):
        raise TypeError("open_reply() takes a ReplyPlan or an awaitable that returns one")
    return ReplyOpener(begin, wait_first_chunk)


async def _admit(plan: ReplyPlan) -> Admission:
    """Admit ``plan``'s request (``accounts.metering.metering_admit``); on a refusal, undo its start and raise.

    A refused request is recorded (``finish_status`` ``refused``, no tokens, no cost: usage reports
    count refusals) and the plan's start undone (``ReplyPlan.refused``) before the error propagates.
    """
    assert plan.metering is not None  # noqa: S101 - the caller checked
    try:
        return await metering_admit(plan.metering)
    except ApplicationError as error:
        logger.info("reply %s refused: %s (%s)", plan.reply_id, error.message, error.code)
        if type(plan).refused is not ReplyPlan.refused:
            try:
                await asyncio.shield(run_sync(plan.refused, error))
            except Exception:
                logger.exception("undoing the start of refused reply %s failed", plan.reply_id)
        if plan.usage is not None:
            usage_account(
                context=plan.usage,
                finish_status=REFUSED,
                prompt_tokens=0,
                completion_tokens=0,
                token_source=COUNTED,  # nothing was sent: exactly 0
                produced_output=False,
            )
        raise ReplyRefused(error) from error


async def _abandon(begun: asyncio.Future[P]) -> None:
    """Persist as ``cancelled`` the reply that ``begun`` started after its caller went away."""
    try:
        plan = await begun
    except Exception:  # ``begin`` failed: it wrote nothing to end
        return
    await Reply(plan).aclose()


# --- Shutdown ---------------------------------------------------------------------------------


def server_shutdown_error() -> ApplicationError:
    """Return the ``outcome.error`` of a reply the server's shutdown ended (503 ``server_shutdown``)."""
    return ApplicationError("The server shut down during the reply.", code="server_shutdown", status=503)


async def replies_shutdown(*, wait_seconds: float = PERSIST_TIMEOUT_SECONDS) -> int:
    """End this process's open replies and wait until every reply's end is written; return how many it ended.

    For the server's shutdown (the ASGI lifespan ``shutdown``, after the server's graceful wait):
    from now on ``open_reply`` refuses new replies (503 ``server_shutting_down``); every reply
    still open ends ``cancelled`` with its text so far and ``outcome.error`` saying the server
    shut down; then this waits, up to ``wait_seconds``, for every end being written (including
    those of replies whose tasks the server just cancelled) and for the usage queue to be sent
    (``accounts.usage.usage_flush``), so nothing is lost when the process exits.
    """
    global _accepting
    _accepting = False
    reason = server_shutdown_error()
    open_replies = [reply for reply in list(_open_replies) if reply.outcome is None]
    for reply in open_replies:
        # As a stop: a task awaiting the upstream is interrupted, so its upstream request is closed
        # now and no batch arrives after the end below is written (its text neither saved nor counted).
        reply.stop(reason)
    ends = [asyncio.ensure_future(reply._end(ReplyStatus.CANCELLED, reason)) for reply in open_replies]
    pending = set(ends) | set(_persisting)
    if pending:
        _, late = await asyncio.wait(pending, timeout=wait_seconds)
        if late:
            logger.error("%d reply ends were not written within %s s of the shutdown", len(late), wait_seconds)
    if not await asyncio.to_thread(usage_flush, wait_seconds):
        logger.error("usage records were still queued %s s after the shutdown", wait_seconds)
    return len(open_replies)


def _write_unwritten_replies_at_exit() -> None:
    """At process exit, write the end of every reply whose end is not written (no event loop left).

    The last resort when the server stopped its event loop with replies still open or their
    writes pending: a server that stopped without waiting for the requests it cancelled, or
    without the lifespan protocol (``chatbackend.handlers.BoundedBodyASGIHandler`` ends the reply
    of a cancelled request, and uvicorn's lifespan shutdown the rest). Each ends ``cancelled`` with its
    text so far; its usage is queued, and ``accounts.usage`` sends the queue at exit after this
    (handlers run last-registered first). A reply whose write was in flight may be written twice:
    the message write is idempotent and usage records are keyed by the reply.
    """
    reason = server_shutdown_error()
    for reply in list(_unwritten):
        outcome = reply.outcome or reply._set_outcome(ReplyStatus.CANCELLED, reason)
        reply._persist_now(outcome)


atexit.register(_write_unwritten_replies_at_exit)


def replies_accepting(accepting: bool = True) -> None:
    """Let ``open_reply`` start replies again (tests; a process that starts serving)."""
    global _accepting
    _accepting = accepting


# --- HTTP streaming ---------------------------------------------------------------------------


class ReplyStreamingResponse(EventStreamResponse):
    """A streamed HTTP answer (``text/event-stream``) whose body encodes a ``Reply``'s events.

    ``body``: an async iterator of ``bytes`` (an interface's encoder over ``reply.events()``); its
    end ends the reply. ``close()`` ends the reply if the body was never iterated (the client left
    while the headers were being sent), so it is still persisted ``cancelled``. Headers and
    writing: ``chatbackend.http.EventStreamResponse``.
    """

    def __init__(self, reply: Reply[Any], body: AsyncIterator[bytes]) -> None:
        super().__init__(body)
        self.reply = reply

    def close(self) -> None:
        try:
            if self.reply.outcome is None:
                _end_from_sync(self.reply)
        finally:
            super().close()


_closing: set[asyncio.Task[None]] = set()


def _end_from_sync(reply: Reply[Any]) -> None:
    """End ``reply`` from sync code: on this thread's event loop if it has one, else via async_to_sync."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # Django's ASGI handler calls close() in a worker thread
        async_to_sync(reply.aclose)()
        return
    task = loop.create_task(reply.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


# --- Stopping from any process ----------------------------------------------------------------

# The replies streaming in each event loop, by ``reply_id``.
_registries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Reply[Any]]] = weakref.WeakKeyDictionary()


def _replies() -> dict[str, Reply[Any]]:
    loop = asyncio.get_running_loop()
    registry = _registries.get(loop)
    if registry is None:
        registry = _registries[loop] = {}
    return registry


def _on_stop_message(message: dict[str, Any]) -> None:
    # Every process gets every stop: only the one streaming that reply has it.
    reply = _replies().get(str(message.get("reply_id")))
    if reply is not None:
        reason = message.get("reason")
        reply.stop(ApplicationError(**reason) if isinstance(reason, dict) else None)


broadcast.on_broadcast(STOP_MESSAGE_TYPE, _on_stop_message)


def reply_stop_broadcast(*, reply_id: str, reason: ApplicationError | None = None) -> None:
    """Ask the process streaming reply ``reply_id`` to stop it, wherever that process runs.

    Sync (DRF views call it). Returns once the request is sent; the reply ends ``cancelled``
    shortly after. ``reason``: why, when it is not the client's own stop (``Reply.stop``); its
    message, code and status travel with the request. Raises ``ApplicationError`` 503
    ``stop_unavailable`` when the channel layer is unreachable.
    """
    message: dict[str, Any] = {"type": STOP_MESSAGE_TYPE, "reply_id": reply_id}
    if reason is not None:
        message["reason"] = {"message": reason.message, "code": reason.code, "status": reason.status}
    try:
        broadcast.broadcast_sync(message)
    except Exception as exc:
        logger.warning("could not send the stop request of reply %s", reply_id, exc_info=True)
        raise ApplicationError(
            "Stopping replies is unavailable right now.", code="stop_unavailable", status=503
        ) from exc


__all__ = [
    "KEEPALIVE",
    "REFUSED",
    "STARTED",
    "KeepAlive",
    "Reply",
    "ReplyDelta",
    "ReplyDone",
    "ReplyEvent",
    "ReplyFailed",
    "ReplyOpener",
    "ReplyOutcome",
    "ReplyPlan",
    "ReplyRefused",
    "ReplyStarted",
    "ReplyStatus",
    "ReplyStreamingResponse",
    "open_reply",
    "replies_accepting",
    "replies_shutdown",
    "reply_stop_broadcast",
    "server_shutdown_error",
]
