"""Rate limits per user, API key and model: requests per minute, tokens per minute, concurrent streams.

``rate_limit_acquire`` admits a request against every subject that has limits (all must allow
it) and returns a ``RateLease``; the engine calls ``lease.release(completion_tokens=)`` once the
reply has ended. A refusal is ``ApplicationError`` 429 ``rate_limit_exceeded`` with
``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers.

Where the counts live
    With ``REDIS_URL``: in Redis, under the key prefix ``chatbackend-ratelimit``, shared by every
    server process. Without it (the embedded defaults): in this process's memory, which is right
    for the one process those defaults run and wrong for several (each would count alone).

Requests and tokens per minute
    The ``limits`` library's sliding window counter (https://limits.readthedocs.io/en/stable/
    strategies.html#sliding-window-counter), through its async storage: its Redis storage (on
    redis-py's asyncio client, ``implementation="redispy"``) or its memory storage. A window's
    count is the current minute's hits plus the previous minute's, weighted by how much of the
    previous minute is still inside the last 60 s, so capacity frees gradually, as OpenAI's
    limits replenish, and never doubles at a window's edge as a fixed window's does. Each admission
    is one atomic Lua script per counter (a hit that would go over the limit adds nothing); the
    moving-window strategy is not used because it stores one entry per unit, i.e. per token.
    Tokens: the prompt's tokens are counted at admission (the request is refused when they do
    not fit); the completion's are added at release whatever the limit, so a reply that went
    over leaves the counter over, and later requests are refused until the window has freed
    enough.

All or nothing
    Every subject's counters, its stream leases and the request's budget reservation are taken in
    one script on the store (``ratelimit_store``: one round trip), each counter hit only if it fits.
    If any refuses, the script gives back what the others took before it returns: a request refused
    for its API key's limit does not eat its user's or its model's, nor hold budget. A request
    whose tokens alone exceed a tokens-per-minute limit can never be admitted: 429 with OpenAI's
    "Request too large" message and no ``Retry-After``.

Concurrent streams
    Not a ``limits`` feature: a sorted set per subject of leases (member: the request id; score:
    when the lease expires, in Redis' own clock, ``TIME``), taken for all subjects or none in
    one Lua script, removed at release. A lease lasts ``RATE_LIMIT_STREAM_LEASE_SECONDS``
    (default 60); while its stream runs, this process renews all its leases every third of that
    (one script call), so a long stream keeps its slot and the slots of a process that died
    (SIGKILL, OOM) free within that many seconds. The in-process store is a dict with the same
    expiry.

Cost
    A request whose subjects have no limits (and no budget) costs no I/O. One with limits costs one
    round trip to Redis at admission; its release is queued and sent within
    ``RATE_LIMIT_RELEASE_BATCH_SECONDS`` together with the other releases, or with the next
    admission (``ratelimit_store``); measure it with ``python -m bench.admission``. In memory: no I/O.
    A caller far from every limit does not wait for that round trip: its admission is made on this
    process's view of its counters and recorded in Redis during the upstream call (``headroom``:
    local admission, its rule and what it costs in exactness).

Redis unreachable
    503 ``metering_unavailable`` (fail closed), unless ``RATE_LIMIT_FAIL_OPEN`` lets requests
    through unlimited (logged). A command waits at most ``REDIS_SOCKET_TIMEOUT_SECONDS``; after a
    failure, admissions fail at once for ``UNREACHABLE_RETRY_SECONDS`` without trying Redis, so a
    Redis that hangs does not cost every request that timeout. Failures at release are logged (with
    every request of the failed batch) and dropped: the counters age out in two minutes, the leases
    at their expiry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from django.conf import settings

from chatbackend.errors import ApplicationError

from .budget_store import RESERVED, ReserveLine, ReserveRequest, ReserveVerdict
from .budgets import metering_unavailable
from .headroom import VIEW_SECONDS, VIEWS_MAX, HeadroomView, ViewKey, view_key, view_key_label
from .ratelimit_store import (
    KEY_PREFIX,
    NO_LIMIT,
    UNREACHABLE_ERRORS,
    Admitted,
    RateLimitStore,
    Window,
    rate_limit_store,
    rate_limit_store_close,
)
from .types import MeteringSubject

logger = logging.getLogger(__name__)

__all__ = ["KEY_PREFIX", "RateLease", "Window", "format_reset", "rate_limit_acquire", "rate_limit_close"]

# Retry-After of a concurrent-stream refusal: a slot frees when some stream ends, which no one can foresee.
CONCURRENCY_RETRY_AFTER_SECONDS = 1
# Seconds admissions fail at once after the store was found unreachable, before it is tried again.
UNREACHABLE_RETRY_SECONDS = 1.0

_SUBJECT_NAMES = {
    "user": "user",
    "api_key": "API key",
    "team": "team",
    "organization": "organization",
    "model": "model",
    "deployment": "deployment",
}


def format_reset(seconds: float) -> str:
    """Return ``seconds`` as OpenAI's ``x-ratelimit-reset-*`` value: Go's duration format.

    E.g. ``0.02`` -> ``"20ms"``, ``1`` -> ``"1s"``, ``1.5`` -> ``"1.5s"``, ``360`` -> ``"6m0s"``,
    ``3725`` -> ``"1h2m5s"`` (https://platform.openai.com/docs/guides/rate-limits, "Rate limits in
    headers"; Go's ``time.Duration.String``). Rounded up to the millisecond; 0 or less is ``"0s"``.
    """
    millis = math.ceil(seconds * 1000 - 1e-6)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class _Counter(NamedTuple):
    """One sliding-window counter of one subject: ``dimension`` "requests" or "tokens", its ``key``
    (``_counter_key``) and what this request adds to it (``cost``). A named tuple: one per counter
    per request."""

    subject: MeteringSubject
    dimension: str
    limit: int
    cost: int
    key: str


def _counter_key(dimension: str, subject: MeteringSubject) -> str:
    # The limit is not in the key: a changed limit applies to what was already counted.
    return f"{dimension}:{subject.kind}:{subject.id}"


@dataclass(frozen=True, slots=True)
class _Shape:
    """What admission needs of a request's subjects, the same for every request of one caller: each
    counter (subject, dimension, limit, key; requests first per subject, as ``_counter_key``), the
    tokens counters again (subject, key: what a release adds completion tokens to), the counters'
    keys, dimensions, limits and whether each counts tokens, one tuple each (what a request's admission
    reads, without a ``_Counter`` per counter), the lowest tokens-per-minute limit, and each
    concurrent-stream set (subject, key, limit). ``limited``: whether any of them exists."""

    subjects: tuple[MeteringSubject, ...]
    counters: tuple[tuple[MeteringSubject, str, int, str], ...]
    token_counters: tuple[tuple[MeteringSubject, str], ...]
    counter_keys: tuple[str, ...]
    dimensions: tuple[str, ...]
    limits: tuple[int, ...]
    tokens: tuple[bool, ...]
    least_tokens_limit: int | None
    streams: tuple[MeteringSubject, ...]
    stream_keys: tuple[str, ...]
    stream_limits: tuple[int, ...]
    limited: bool

    @classmethod
    def of(cls, subjects: tuple[MeteringSubject, ...]) -> _Shape:
        counters: list[tuple[MeteringSubject, str, int, str]] = []
        streams: list[MeteringSubject] = []
        for subject in subjects:
            limits = subject.limits
            if limits.requests_per_minute is not None:
                counters.append((subject, "requests", limits.requests_per_minute, _counter_key("requests", subject)))
            if limits.tokens_per_minute is not None:
                counters.append((subject, "tokens", limits.tokens_per_minute, _counter_key("tokens", subject)))
            if limits.concurrent_streams is not None:
                streams.append(subject)
        return cls(
            subjects=subjects,
            counters=tuple(counters),
            token_counters=tuple([(subject, key) for subject, dimension, _, key in counters if dimension == "tokens"]),
            counter_keys=tuple([key for _, _, _, key in counters]),
            dimensions=tuple([dimension for _, dimension, _, _ in counters]),
            limits=tuple([limit for _, _, limit, _ in counters]),
            tokens=tuple([dimension == "tokens" for _, dimension, _, _ in counters]),
            least_tokens_limit=min(
                (limit for _, dimension, limit, _ in counters if dimension == "tokens"), default=None
            ),
            streams=tuple(streams),
            stream_keys=tuple(_streams_key(subject) for subject in streams),
            stream_limits=tuple(subject.limits.concurrent_streams or 0 for subject in streams),
            limited=bool(counters or streams),
        )


# Subjects (with their limits: changed limits are other subjects) -> their _Shape. A caller's requests
# name the same subjects, so admission builds its keys once per caller, not per request. Cleared
# when it grows past _SHAPES_MAX.
_shapes: dict[tuple[MeteringSubject, ...], _Shape] = {}
_SHAPES_MAX = 10_000


def _shape(subjects: Sequence[MeteringSubject]) -> _Shape:
    key = subjects if type(subjects) is tuple else tuple(subjects)
    shape = _shapes.get(key)
    if shape is None:
        if len(_shapes) >= _SHAPES_MAX:
            _shapes.clear()
        shape = _shapes[key] = _Shape.of(key)
    return shape


def _who(subject: MeteringSubject) -> str:
    return (
        f"{_SUBJECT_NAMES.get(subject.kind, subject.kind)} {subject.name!r}"
        if subject.name
        else (f"{_SUBJECT_NAMES.get(subject.kind, subject.kind)} {subject.id}")
    )


def _streams_key(subject: MeteringSubject) -> str:
    return f"{KEY_PREFIX}:streams:{subject.kind}:{subject.id}"


async def rate_limit_close() -> None:
    """Close this event loop's rate-limit store (its Redis connections, its lease renewer)."""
    await rate_limit_store_close()


@dataclass(eq=False)
class RateLease:
    """What an admitted request holds until its reply ends.

    ``headers``: OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the
    subject with the least remaining of each (``reset``: time until that subject's window holds
    nothing, Go's duration format); empty when no subject limits requests or tokens. A local
    admission's are its record's answer's once it has answered (``confirmed_headers``), its view's
    until then (and when the record failed). ``budget``: the verdict of the budget reservation asked
    with the admission, or None.
    """

    _settled_headers: dict[str, str] = field(default_factory=dict)
    request_id: str = ""
    budget: ReserveVerdict | None = None
    _store: RateLimitStore | None = None
    _token_counters: tuple[tuple[MeteringSubject, str], ...] = ()  # (subject, counter key)
    _stream_keys: tuple[str, ...] = ()
    _released: bool = False
    # A local admission's record in the store (``headroom``), under way until it answers.
    _confirmation: asyncio.Future[Admitted] | None = None
    _view_key: ViewKey | None = None
    # A local admission's counters and view, until its headers are settled (``headers``).
    _local: tuple[_Shape, HeadroomView] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers (see the class); a local admission's are computed when read,
        not at admission: conversation replies never read them."""
        local = self._local
        if local is None:
            return self._settled_headers
        shape, view = local
        record = self._confirmation
        answered = record is not None and record.done()
        headers = self._answer_headers(shape, record) if record is not None and answered else None
        if headers is None:  # no answer yet, or the record failed: the view's
            headers = _headers(shape.dimensions, shape.limits, view.counts(), view.pending_window)
        if answered:  # settled
            self._settled_headers, self._local = headers, None
        return headers

    @property
    def has_headers(self) -> bool:
        """Whether ``headers`` is not empty (a requests or tokens limit applies), without computing them."""
        return self._local is not None or bool(self._settled_headers)

    @staticmethod
    def _answer_headers(shape: _Shape, record: asyncio.Future[Admitted]) -> dict[str, str] | None:
        if record.cancelled() or record.exception() is not None:
            return None
        answer = record.result()
        windows = [window for window in answer.windows if window is not None]
        if answer.error is not None or len(windows) != len(shape.limits):
            return None
        return _window_headers(shape, windows)

    async def confirmed(self) -> None:
        """Wait until the store holds this admission (a local admission's record answered or failed).

        At once for an admission the store made itself. Never raises but for the caller's own
        cancellation (the record goes on without it).
        """
        task = self._confirmation
        if task is not None and not task.done():
            if self._store is not None:  # the reply ended before its record was sent: send it now
                self._store.send_records_now()
            await asyncio.wait((task,))

    async def confirmed_headers(self) -> dict[str, str]:
        """Wait until ``confirmed``; return ``headers``, for a local admission those of its record's answer.

        A local admission's headers are first its caller's view's (``headroom``), which lacks what
        other processes admitted since its last answer: two processes taking turns would each answer
        a remaining count one too high. The record's answer holds the shared counters with this
        request in them and every request recorded before it, as an admission by the store does.
        Headers stay the view's when the record failed. Never raises but for the caller's own
        cancellation.
        """
        await self.confirmed()
        return self.headers

    async def release(self, *, completion_tokens: int, not_for: MeteringSubject | None = None) -> None:
        """Add ``completion_tokens`` to every tokens-per-minute counter and free the stream slots; once.

        ``not_for``: a subject whose counters get none of them (a model that did not generate the
        reply: another served it). Queued on the Redis store (sent with others within a few ms, or
        with the next admission: ``RateLimitStore.release``). Idempotent: a second call does nothing. Runs to
        its end even if the caller is cancelled. Never raises for an unreachable store (logged; the
        counters and leases expire on their own).
        """
        if self._released or self._store is None:
            self._released = True
            return
        self._released = True
        # Nothing here suspends before the store's release, which runs to its end once called.
        await self._release(max(0, completion_tokens), not_for)

    async def _release(self, completion_tokens: int, not_for: MeteringSubject | None) -> None:
        store = self._store
        assert store is not None  # noqa: S101 - checked by release
        amounts = (
            [
                (key, completion_tokens)
                for subject, key in self._token_counters
                if not_for is None or (subject.kind, subject.id) != (not_for.kind, not_for.id)
            ]
            if completion_tokens
            else []
        )
        if self._stream_keys:
            store.unhold(self.request_id)
        if not amounts and not self._stream_keys:
            return
        carrier = None
        if amounts and self._view_key is not None:
            view = store.views.get(self._view_key)
            if view is not None:  # the caller's view counts them until the store's answers do
                carrier = view.released(amounts)
        confirmation = self._confirmation
        if confirmation is not None and not confirmation.done():
            # After the record, so that it never adds a lease this release removed.
            stream_keys, member = self._stream_keys, self.request_id
            confirmation.add_done_callback(lambda _: store.release_soon(amounts, stream_keys, member, carrier))
            return
        # Queued on the Redis store: sent with the releases and admissions of the next few ms.
        await store.release(amounts, self._stream_keys, self.request_id, carrier)


def _unavailable(store: RateLimitStore, exc: BaseException, *, known: bool = False, budget: bool = False) -> RateLease:
    """Fail closed (503) or, with ``RATE_LIMIT_FAIL_OPEN`` and no ``budget`` asked, admit unlimited.

    ``known``: the store was already found unreachable less than ``UNREACHABLE_RETRY_SECONDS``
    ago (not logged again); otherwise admissions fail at once for that long, and it is logged.
    """
    if budget:  # budgets always fail closed
        if not known:
            store.unreachable_until = time.monotonic() + UNREACHABLE_RETRY_SECONDS
            store.unreachable_error = exc
            logger.warning(
                "the metering store is unreachable: refusing a budgeted request: %s: %s", type(exc).__name__, exc
            )
        raise metering_unavailable() from exc
    if not known:
        store.unreachable_until = time.monotonic() + UNREACHABLE_RETRY_SECONDS
        store.unreachable_error = exc
        logger.warning(
            "the rate limits' store is unreachable; requests with a rate limit are %s for %s s at least: %s: %s",
            "admitted unlimited (RATE_LIMIT_FAIL_OPEN)" if settings.RATE_LIMIT_FAIL_OPEN else "refused",
            UNREACHABLE_RETRY_SECONDS,
            type(exc).__name__,
            exc,
        )
    if settings.RATE_LIMIT_FAIL_OPEN:
        return RateLease()
    raise ApplicationError(
        "Rate limits cannot be checked right now; try again in a few seconds.",
        code="metering_unavailable",
        status=503,
    ) from exc


# Each dimension's header names, requests first: OpenAI's ``x-ratelimit-{limit,remaining,reset}-*``.
_HEADER_NAMES = {
    dimension: tuple(f"x-ratelimit-{figure}-{dimension}" for figure in ("limit", "remaining", "reset"))
    for dimension in ("requests", "tokens")
}


def _headers(
    dimensions: Sequence[str], limits: Sequence[int], used: Sequence[int], window_at: Callable[[int], Window]
) -> dict[str, str]:
    """Return OpenAI's ``x-ratelimit-*`` headers of the counter with the least remaining (then the
    lowest limit) of each dimension, requests first.

    Each counter's ``dimensions`` ("requests" or "tokens") and ``limits``; ``used``: what each counter
    holds (its window's weighted count rounded down, as ``limits`` admits on it); ``window_at(i)``:
    counter ``i``'s window, read only for the counters the headers name (their reset time).
    """
    tightest: dict[str, tuple[int, int, int]] = {}
    for index, (dimension, limit) in enumerate(zip(dimensions, limits, strict=True)):
        remaining = limit - used[index]
        best = tightest.get(dimension)
        if best is None or remaining < best[0] or (remaining == best[0] and limit < best[1]):
            tightest[dimension] = (remaining, limit, index)
    headers: dict[str, str] = {}
    for dimension, (limit_name, remaining_name, reset_name) in _HEADER_NAMES.items():
        best = tightest.get(dimension)
        if best is not None:
            remaining, limit, index = best
            headers[limit_name] = str(limit)
            headers[remaining_name] = str(max(0, remaining))
            headers[reset_name] = format_reset(window_at(index).reset_seconds(limit))
    return headers


def _window_headers(shape: _Shape, windows: list[Window]) -> dict[str, str]:
    """Return ``_headers`` of ``shape``'s counters, whose windows are ``windows`` (a store's answer)."""
    counts = [math.floor(window.used()) for window in windows]
    return _headers(shape.dimensions, shape.limits, counts, windows.__getitem__)


def _refusal(counter: _Counter, window: Window, headers: dict[str, str]) -> tuple[float, ApplicationError]:
    used = math.floor(window.used())
    seconds = window.seconds_until_fits(counter.limit, counter.cost)
    wait = max(1, math.ceil(seconds))  # Retry-After: whole seconds (RFC 9110, section 10.2.3)
    unit = "requests per min (RPM)" if counter.dimension == "requests" else "tokens per min (TPM)"
    message = (
        f"Rate limit reached for {_who(counter.subject)} on {unit}: Limit {counter.limit}, Used {used}, "
        f"Requested {counter.cost}. Please try again in {format_reset(seconds)}."
    )
    error = ApplicationError(
        message,
        code="rate_limit_exceeded",
        status=429,
        type=counter.dimension,
        headers={**headers, "Retry-After": str(wait)},
    )
    return wait, error


def _streams_refusal(subject: MeteringSubject, headers: dict[str, str]) -> tuple[float, ApplicationError]:
    wait = CONCURRENCY_RETRY_AFTER_SECONDS
    message = (
        f"Concurrent stream limit reached for {_who(subject)}: Limit {subject.limits.concurrent_streams} streams "
        "at once. Please try again when one of them has ended."
    )
    error = ApplicationError(
        message, code="rate_limit_exceeded", status=429, type="requests", headers={**headers, "Retry-After": str(wait)}
    )
    return wait, error


def _counters(shape: _Shape, costs: Sequence[int]) -> list[_Counter]:
    """Return ``shape``'s counters with what a request adds to each (``costs``): for refusals' messages."""
    return [
        _Counter(subject, dimension, limit, cost, key)
        for (subject, dimension, limit, key), cost in zip(shape.counters, costs, strict=True)
    ]


def _too_large(counters: Sequence[_Counter]) -> None:
    """Raise the 429 of the first tokens counter whose limit ``counters``' request exceeds on its own."""
    for counter in counters:
        if counter.dimension == "tokens" and counter.cost > counter.limit:  # never fits, however long one waits
            raise ApplicationError(
                f"Request too large for {_who(counter.subject)} on tokens per min (TPM): Limit {counter.limit}, "
                f"Requested {counter.cost}. The input or output tokens must be reduced in order to run successfully.",
                code="rate_limit_exceeded",
                status=429,
                type="tokens",
            )


async def rate_limit_acquire(
    *,
    request_id: str,
    subjects: Sequence[MeteringSubject],
    prompt_tokens: int,
    budget: ReserveRequest | None = None,
) -> RateLease:
    """Admit a request against the rate limits of every subject in ``subjects``; return its lease.

    ``request_id``: the reply's id (names its concurrent-stream lease). ``prompt_tokens``: counted
    against each tokens-per-minute limit now (the completion's are added by ``RateLease.release``).
    Every subject with limits must allow the request; when one refuses, nothing stays taken on the
    others. ``budget``: a budget reservation to make in the same call once the rate limits allow the
    request (``accounts.metering.budgets``); its verdict is the lease's ``budget``, and a lease whose
    reservation was not made holds nothing. Subjects without limits and no ``budget`` cost no I/O;
    otherwise one round trip to the store.

    Raises ``ApplicationError`` 429 ``rate_limit_exceeded`` (``type`` "requests" or "tokens", as
    OpenAI's; a message naming the subject and the limit; ``headers``: ``Retry-After`` in whole
    seconds, none when the prompt alone exceeds a tokens limit, and ``x-ratelimit-*``), or 503
    ``metering_unavailable`` when the store is unreachable and ``RATE_LIMIT_FAIL_OPEN`` is off (or a
    ``budget`` was asked: budgets always fail closed).
    """
    shape = _shape(subjects)
    if not shape.limited and budget is None:
        return RateLease(request_id=request_id)
    tokens = max(0, prompt_tokens)
    # What the request adds to each counter: one request, or its prompt's tokens.
    costs = [tokens if counts_tokens else 1 for counts_tokens in shape.tokens]
    streams = shape.streams

    if shape.least_tokens_limit is not None and tokens > shape.least_tokens_limit:
        _too_large(_counters(shape, costs))

    store = rate_limit_store()
    if store.unreachable_error is not None and time.monotonic() < store.unreachable_until:
        return _unavailable(store, store.unreachable_error, known=True, budget=budget is not None)
    stream_keys = shape.stream_keys
    stream_limits = shape.stream_limits
    key = None
    if store.local_share > 0:
        key = view_key(shape.subjects, budget)
        view = store.views.get(key)
        now = time.monotonic()
        if view is not None and now - view.answered_at <= VIEW_SECONDS:  # else take refuses: no costs to build
            taken = _costs(costs, stream_keys, budget)
            if view.take(taken, store.local_share, now):
                return _admit_locally(store, key, view, taken, costs, shape, request_id, budget)
    hits = list(zip(shape.counter_keys, shape.limits, costs, strict=True))
    try:
        admitted = await store.admit(hits, stream_keys, stream_limits, request_id, budget)
    except asyncio.CancelledError:
        # The client went away mid-admission: its stream leases must not lock the subject out until
        # they expire (releasing a lease never taken is a no-op). Counters hit stay counted.
        await asyncio.shield(_drop_leases(store, stream_keys, request_id))
        raise

    if key is not None and not admitted.admitted:
        store.views.pop(key, None)  # refused, or no answer: admissions of this caller wait for the store
    if admitted.error is not None:
        # Whether the store ran the admission is unknown: give back the leases it may have taken.
        await asyncio.shield(_drop_leases(store, stream_keys, request_id))
        if not isinstance(admitted.error, UNREACHABLE_ERRORS):
            raise admitted.error
        return _unavailable(store, admitted.error, budget=budget is not None)

    windows = [w for w in admitted.windows if w is not None]
    refused_streams = admitted.streams is not None and admitted.streams > 0
    if refused_streams or not all(admitted.hits):
        # The store gave back what the others took: the windows as they are now.
        counters = _counters(shape, costs)
        windows = [
            window.without(counter.cost) if hit else window
            for counter, window, hit in zip(counters, windows, admitted.hits, strict=True)
        ]
        headers = _window_headers(shape, windows)
        errors = [
            _refusal(counter, window, headers)
            for counter, window, hit in zip(counters, windows, admitted.hits, strict=True)
            if not hit
        ]
        if refused_streams:
            errors.append(_streams_refusal(streams[(admitted.streams or 1) - 1], headers))
        # The longest wait is when every refusing limit allows the request again.
        raise max(errors, key=lambda e: e[0])[1]

    if not admitted.admitted:  # the budgets refused or need a seed: nothing is held
        return RateLease(request_id=request_id, budget=admitted.budget)
    if stream_keys:
        store.hold(request_id, stream_keys)
    counts = [math.floor(window.used()) for window in windows]  # for the headers and the view alike
    if key is not None:
        _observe(store, key, shape, budget, admitted, counts)
    return RateLease(
        _settled_headers=_headers(shape.dimensions, shape.limits, counts, windows.__getitem__),
        request_id=request_id,
        budget=admitted.budget,
        _store=store,
        _token_counters=shape.token_counters,
        _stream_keys=stream_keys,
        _view_key=key,
    )


# --- Local admission (``headroom``) ---------------------------------------------------------------

# What a record asks of a budget: more than any limit, so that the reservation is always made.
_LIFTED_UNITS = 2**62


def _costs(counter_costs: list[int], stream_keys: Sequence[str], budget: ReserveRequest | None) -> list[int]:
    """Return what a request takes of each limit, in ``HeadroomView``'s order: ``counter_costs`` (what it
    adds to each counter), then one lease per stream set, then each budget line's units and tokens."""
    costs = counter_costs + [1] * len(stream_keys)
    if budget is not None:
        for line in budget.lines:
            costs += (line.units, line.tokens)
    return costs


def _observe(
    store: RateLimitStore,
    key: ViewKey,
    shape: _Shape,
    budget: ReserveRequest | None,
    admitted: Admitted,
    counts: list[int],
) -> None:
    """Take an admission's answer into its caller's view (made on the first answer); ``counts``: its
    counters' weighted counts, rounded down."""
    now = time.monotonic()
    view = store.views.get(key)
    if view is not None:
        view.merge(admitted, now, counts)
        return
    limits: list[int | None] = [*shape.limits, *shape.stream_limits]
    if budget is not None:
        for line in budget.lines:
            limits += (line.limit_units, line.token_limit)
    view = HeadroomView.of(tuple(limits), shape.counter_keys, admitted, now, counts)
    if view is not None:
        if len(store.views) >= VIEWS_MAX:
            store.views.clear()
        store.views[key] = view


def _admit_locally(
    store: RateLimitStore,
    key: ViewKey,
    view: HeadroomView,
    costs: list[int],
    counter_costs: list[int],
    shape: _Shape,
    request_id: str,
    budget: ReserveRequest | None,
) -> RateLease:
    """Admit on the view (``costs`` already taken into its ``pending``; ``counter_costs``: what the
    request adds to each counter) and queue its record in the store (``_recorded`` takes the answer);
    return the lease, whose ``confirmed`` waits for that record."""
    stream_keys = shape.stream_keys
    if stream_keys:
        store.hold(request_id, stream_keys)
    hits = list(zip(shape.counter_keys, [NO_LIMIT] * len(counter_costs), counter_costs, strict=True))
    lifted = None
    if budget is not None:
        # Each line with its limit lifted and no token limit (line[3:]: the fields after those), built
        # directly: a named tuple's _replace is a Python function, three times as slow.
        lines = tuple([ReserveLine(line.key, _LIFTED_UNITS, None, *line[3:]) for line in budget.lines])
        lifted = ReserveRequest(budget.request_id, budget.pid, budget.expires_at, lines)
    # A future and a callback rather than a task per request: nothing here needs to suspend.
    record = store.record(hits, stream_keys, [NO_LIMIT] * len(stream_keys), request_id, lifted)
    record.add_done_callback(functools.partial(_recorded, store, key, view, costs, request_id))
    store.records.add(record)
    record.add_done_callback(store.records.discard)
    return RateLease(
        request_id=request_id,
        budget=RESERVED if budget is not None else None,
        _store=store,
        _token_counters=shape.token_counters,
        _stream_keys=stream_keys,
        _confirmation=record,
        _view_key=key,
        _local=(shape, view) if shape.limits else None,
    )


def _recorded(
    store: RateLimitStore,
    key: ViewKey,
    view: HeadroomView,
    costs: list[int],
    request_id: str,
    record: asyncio.Future[Admitted],
) -> None:
    """Take a local admission's record answer (``record``, done): its answer refreshes the view. A failure
    drops every view (admissions wait for the store again) and is logged."""
    view.answered(costs)
    if record.cancelled():
        admitted = Admitted([], [], None, None, asyncio.CancelledError("the record was cancelled"))
    else:
        error = record.exception()  # the Redis store's answers carry theirs; another store may raise
        admitted = record.result() if error is None else Admitted([], [], None, None, error)
    now = time.monotonic()
    if admitted.error is not None:
        store.views.clear()
        if isinstance(admitted.error, UNREACHABLE_ERRORS):
            store.unreachable_until = now + UNREACHABLE_RETRY_SECONDS
            store.unreachable_error = admitted.error
        logger.warning(
            "request %s, admitted locally, could not be recorded in the metering store: its rate-limit "
            "counts and budget reservation are missing there (budget reconciliation counts its usage "
            "row): %s: %s",
            request_id,
            type(admitted.error).__name__,
            admitted.error,
        )
        return
    if admitted.budget is not None and not admitted.budget.reserved:
        # A budget counter is gone (it expired, or Redis restarted empty): the next admission of this
        # caller waits for the store, which seeds it again from the usage rows.
        store.views.pop(key, None)
        logger.warning(
            "request %s, admitted locally, found a budget counter gone: its reservation is not recorded "
            "(budget reconciliation counts its usage row)",
            request_id,
        )
        return
    if store.views.get(key) is view and view.merge(admitted, now):
        over = view.over()
        if over:
            logger.warning(
                "after request %s, admitted locally, limits %s of %s are past their maximum: other processes "
                "used the room meanwhile, or (tokens per minute) replies' completion tokens did",
                request_id,
                over,
                view_key_label(key),
            )


async def _drop_leases(store: RateLimitStore, stream_keys: Sequence[str], request_id: str) -> None:
    """Remove the stream leases an admission may have taken, when whether it ran is unknown."""
    if not stream_keys:
        return
    try:
        await store.add((), stream_keys, request_id)
    except Exception as exc:
        logger.warning("dropping the stream leases of %s failed: %s", request_id, exc)
