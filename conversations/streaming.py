"""The one place that streams a reply: start it, relay the upstream's chunks, persist the end.

Every interface — the conversation SSE view, the WebSocket consumer and ``/v1/chat/completions``
— goes through ``open_reply`` and ``Reply.chunks``::

    reply = await open_reply(begin)           # one sync service call; errors raise here
    async for chunk in reply.chunks():        # ChatChunk objects, as the provider yields them
        ...
    reply.outcome                             # ReplyOutcome, already persisted by ``plan.finish``

``begin`` is a sync service returning a ``ReplyPlan``; ``plan.finish`` is a sync service that
persists the end. Each runs once, through ``run_sync`` (a worker thread that hands its DB
connection back before the long wait: FIELD-NOTES, "Database").

The end is persisted whatever happens: the upstream finishes (``completed``), the caller stops
or the client goes away (``asyncio.CancelledError`` or ``aclose()``: ``cancelled``), or the
upstream fails (``UpstreamError``: ``failed``). The text generated so far is kept in every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError
from llm.providers import ChatChunk, ChatRequest, ProviderConfig, UpstreamError, Usage, get_provider
from llm.tokens import estimate_prompt_tokens, estimate_text_tokens

logger = logging.getLogger(__name__)

COMPLETED, CANCELLED, FAILED = "completed", "cancelled", "failed"


@dataclass(slots=True)
class ReplyOutcome:
    """How a reply ended.

    ``status``: ``completed`` | ``cancelled`` | ``failed``. ``content`` / ``reasoning_content``:
    all text streamed. ``usage``: token counts — the provider's when it reported them
    (``usage_estimated`` False), else estimated (``llm.tokens``). Times in milliseconds from the
    upstream request's start; ``time_to_first_token_ms`` is None when no chunk arrived.
    ``error``: the failure, for ``failed``.
    """

    status: str
    content: str
    reasoning_content: str
    finish_reason: str | None
    usage: Usage
    usage_estimated: bool
    time_to_first_token_ms: float | None
    duration_ms: float
    error: ApplicationError | None = None


@dataclass(slots=True)
class ReplyPlan:
    """What a ``begin`` service returns: where to send the request, and how to persist the end.

    ``finish`` is a sync callable run once with the ``ReplyOutcome`` (its return value is ignored
    here). ``info`` carries ids the interface reports to its client (e.g. ``conversation_id``,
    ``message_id``).
    """

    provider: ProviderConfig
    request: ChatRequest
    model_name: str
    finish: Callable[[ReplyOutcome], object]
    info: dict[str, Any] = field(default_factory=dict)


class Reply:
    """One streamed reply in progress. Create with ``open_reply``; iterate ``chunks()`` once."""

    def __init__(self, plan: ReplyPlan) -> None:
        self.plan = plan
        self.outcome: ReplyOutcome | None = None
        self._upstream = get_provider(plan.provider).stream(plan.request)
        self._first: asyncio.Task[list[ChatChunk]] | None = None
        self._started = time.perf_counter()
        self._ttft_ms: float | None = None
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._chunks_with_text = 0
        self._finish_reason: str | None = None
        self._usage: Usage | None = None

    async def wait_first_chunk(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the upstream's first chunk.

        Lets an interface answer an upstream failure with a plain error status before it sends
        any header (NextChat cannot see an error inside a stream). Raises ``UpstreamError`` when
        the upstream failed first (the end is already persisted as ``failed``); returns quietly
        on timeout, leaving the first chunk to ``chunks()``.
        """
        self._first = asyncio.ensure_future(anext(self._upstream))
        try:
            await asyncio.wait({self._first}, timeout=seconds)
        except asyncio.CancelledError:
            self._first.cancel()
            await self._end(CANCELLED, None)
            raise
        if self._first.done() and not self._first.cancelled():
            error = self._first.exception()
            if isinstance(error, ApplicationError):
                self._first = None
                await self._end(FAILED, error)
                raise error

    async def chunks(self) -> AsyncIterator[ChatChunk]:
        """Yield the reply's chunks; persist the end once, however the iteration stops.

        Raises ``UpstreamError`` (after persisting ``failed``) when the upstream fails mid-way;
        re-raises ``asyncio.CancelledError`` (after persisting ``cancelled``).
        """
        status, error = CANCELLED, None
        try:
            if self._first is not None:
                first, self._first = self._first, None
                try:
                    batch = await first
                except StopAsyncIteration:
                    status = COMPLETED
                    return
                for chunk in batch:
                    self._take(chunk)
                    yield chunk
            async for batch in self._upstream:  # the provider yields lists of chunks
                for chunk in batch:
                    self._take(chunk)
                    yield chunk
            status = COMPLETED
        except ApplicationError as exc:
            status, error = FAILED, exc
            raise
        except Exception as exc:  # a bug must still leave the message marked and accounted
            logger.exception("reply stream failed")
            status, error = FAILED, ApplicationError("The reply failed.", code="internal_error", status=500)
            raise error from exc
        finally:
            await self._end(status, error)

    def _take(self, chunk: ChatChunk) -> None:
        # The hot path: keep it to appends and compares.
        if chunk.content or chunk.reasoning_content or chunk.tool_calls:
            if self._ttft_ms is None:
                self._ttft_ms = (time.perf_counter() - self._started) * 1000
            self._chunks_with_text += 1
            if chunk.content:
                self._content.append(chunk.content)
            if chunk.reasoning_content:
                self._reasoning.append(chunk.reasoning_content)
        if chunk.finish_reason:
            self._finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self._usage = chunk.usage

    def _estimate_usage(self, content: str, reasoning: str) -> Usage:
        # One chunk per token is what OpenAI-compatible servers send; text length bounds it below.
        completion = max(self._chunks_with_text, estimate_text_tokens(content + reasoning))
        return Usage(prompt_tokens=estimate_prompt_tokens(self.plan.request.messages), completion_tokens=completion)

    async def _end(self, status: str, error: ApplicationError | None) -> None:
        if self.outcome is not None:
            return
        with contextlib.suppress(Exception):  # closing a failed or finished upstream may itself fail
            await self._upstream.aclose()
        content, reasoning = "".join(self._content), "".join(self._reasoning)
        self.outcome = ReplyOutcome(
            status=status,
            content=content,
            reasoning_content=reasoning,
            finish_reason=self._finish_reason,
            usage=self._usage or self._estimate_usage(content, reasoning),
            usage_estimated=self._usage is None,
            time_to_first_token_ms=self._ttft_ms,
            duration_ms=(time.perf_counter() - self._started) * 1000,
            error=error,
        )
        # Shielded: a second cancellation (client gone, server shutting down) must not lose the
        # write of what was generated.
        await asyncio.shield(run_sync(self.plan.finish, self.outcome))

    async def aclose(self) -> None:
        """Abandon a reply whose ``chunks()`` was never iterated; persist it as ``cancelled``."""
        if self._first is not None:
            self._first.cancel()
            self._first = None
        await self._end(CANCELLED, None)


async def open_reply(begin: Callable[[], ReplyPlan], *, wait_first_chunk: float = 0.0) -> Reply:
    """Run the ``begin`` service and return the started ``Reply``.

    ``wait_first_chunk`` (seconds): see ``Reply.wait_first_chunk``. Raises the
    ``ApplicationError`` of ``begin`` (nothing persisted by us) or the ``UpstreamError`` of an
    upstream that failed before its first chunk (persisted as ``failed``).
    """
    begun = asyncio.ensure_future(run_sync(begin))
    try:
        plan = await asyncio.shield(begun)
    except asyncio.CancelledError:
        # ``begin`` runs on in its thread and writes the messages; end them as ``cancelled`` once
        # it returns, or the assistant message would stay ``streaming`` for ever.
        await asyncio.shield(_abandon(begun))
        raise
    reply = Reply(plan)
    if wait_first_chunk > 0:
        await reply.wait_first_chunk(wait_first_chunk)
    return reply


async def _abandon(begun: asyncio.Future[ReplyPlan]) -> None:
    """Persist as ``cancelled`` the reply that ``begun`` started after its caller went away."""
    try:
        plan = await begun
    except Exception:  # ``begin`` failed: it wrote nothing to end
        return
    await Reply(plan).aclose()


__all__ = ["CANCELLED", "COMPLETED", "FAILED", "Reply", "ReplyOutcome", "ReplyPlan", "UpstreamError", "open_reply"]
