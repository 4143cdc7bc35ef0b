"""Usage accounting, in one place: whether a reply is billed, its price, queueing it, writing it.

A streamed reply ends in the streaming engine (``llm.streaming``), which calls ``usage_account``
once with what the reply's start knew (``UsageContext``: who pays, for which model, at which
prices) and how it ended (tokens, status). ``usage_account`` decides whether the reply is billed
(``usage_is_billable``), prices it (``usage_cost``) and queues the record; a Celery task writes
queued records in batches (``usage_record_many``), idempotently by ``request_id``.

Queueing never blocks the caller: records go to an in-process queue that one sender thread per
process publishes to Celery in batches, one task per batch (a kombu publish per reply was ~9 % of
the server's CPU at 50 streams). A batch is what arrives within ``BATCH_WINDOW_SECONDS`` of its
first record (at most ``MAX_BATCH``), plus what piled up while the previous publish was in
flight: accounting is a fraction of a second late, the broker sees a few publishes a second
whatever the load. ``usage_flush`` waits until everything queued is sent; it runs at process exit.
While the broker is unreachable the sender keeps the records and retries (``_Sender._publish``).

Prices are US dollars per million tokens (what providers publish), taken from the model when the
reply started; the cost is ``accounts.pricing.token_cost``: fresh prompt tokens at the input price,
cached and cache-written ones at their own prices, completion tokens (reasoning included) at the
output price, over one million.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from decimal import Decimal
from typing import Any, Protocol

from django.db import IntegrityError, connections, models, transaction

from chatbackend.errors import OUTAGE_ERRORS

from .models import UsageRecord, default_organization_id
from .pricing import Prices, token_cost

logger = logging.getLogger(__name__)

# Most records one task carries. A burst of thousands of replies ending together becomes a few tasks.
MAX_BATCH = 500
# How long the sender gathers records after the first of a batch before publishing them.
BATCH_WINDOW_SECONDS = 0.1
# While the broker is unreachable, the sender retries a batch after this many seconds, doubling up to the max.
RETRY_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0
# What an unreachable broker raises from a publish (kombu gives up after Celery's publish retry
# policy), and, with eager tasks, an unreachable database: the outages every endpoint answers with
# 503, plus a socket error that kombu passes on unwrapped.
_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (*OUTAGE_ERRORS, OSError)
# Reply statuses as the streaming engine reports them (``llm.streaming.ReplyStatus`` values).
FAILED = "failed"
# ``UsageRecord.deployment``'s length.
DEPLOYMENT_NAME_MAX = 320
# The finish status of a request refused before any upstream call (a budget or a rate limit):
# recorded with 0 tokens and cost 0, and counted apart from requests by the usage summary.
REFUSED = "refused"


@dataclass(frozen=True, kw_only=True)
class UsageSubject:
    """Whose usage a record is, and of what.

    ``request_id``: unique per reply (``message-<id>`` or ``chatcmpl-...``): a record is written at
    most once per id. ``source``: a ``UsageRecord.Source`` value. ``message_id``: the assistant
    message, if any. ``organization_id``: the organization the request acted in (None, as in
    events queued before organizations existed: the default organization). ``team_id``: the team
    of the API key used, if any (a team budget sums these rows).
    """

    request_id: str
    source: str
    user_id: int
    api_key_id: int | None
    model_id: int | None
    model_name: str
    message_id: int | None = None
    organization_id: int | None = None
    team_id: int | None = None


@dataclass(frozen=True, kw_only=True)
class UsageContext(UsageSubject):
    """What the start of a reply knows about its accounting: the subject and the model's prices
    (US dollars per million tokens; cache prices None: the input price) when the reply started."""

    input_price_per_million: Decimal
    output_price_per_million: Decimal
    cached_input_price_per_million: Decimal | None = None
    cache_write_price_per_million: Decimal | None = None

    @property
    def prices(self) -> Prices:
        """Return the prices as ``accounts.pricing`` takes them."""
        return Prices(
            input=self.input_price_per_million,
            output=self.output_price_per_million,
            cached_input=self.cached_input_price_per_million,
            cache_write=self.cache_write_price_per_million,
        )


@dataclass(frozen=True, kw_only=True)
class UsageEvent(UsageSubject):
    """One record to write: ``UsageRecord``'s fields, JSON-ready (``cost`` a decimal string, US dollars).

    The token breakdown (``cached_tokens``, ``cache_creation_tokens``, ``reasoning_tokens``) defaults
    to 0: events queued by a release before it carry none. ``deployment``: the name of the
    deployment that served the reply (``UsageRecord.deployment``), "" when unknown.
    """

    prompt_tokens: int
    completion_tokens: int
    cost: str
    token_source: str
    finish_status: str
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    deployment: str = ""

    @classmethod
    def from_task(cls, fields: dict[str, Any]) -> UsageEvent:
        """Return the event a task carried (``asdict`` of one); one queued by a release before
        ``token_source`` carries ``estimated`` (bool) instead, read as "estimated" / "provider".

        Fields this release does not know (queued by a newer one during a rolling deploy) are
        dropped with a warning: the row is still written, without them, rather than the batch lost.
        """
        fields = dict(fields)
        if "estimated" in fields:
            source = UsageRecord.TokenSource.ESTIMATED if fields.pop("estimated") else UsageRecord.TokenSource.PROVIDER
            fields["token_source"] = source.value
        unknown = fields.keys() - _EVENT_FIELDS
        if unknown:
            logger.warning(
                "usage event %s: dropped fields this release does not know: %s",
                fields.get("request_id"),
                sorted(unknown),
            )
            for name in unknown:
                del fields[name]
        return cls(**fields)


_EVENT_FIELDS = frozenset(field.name for field in fields(UsageEvent))


class PricedModel(Protocol):
    """What accounting reads of a model (``llm.LLMModel`` has it): its id, name and prices per million tokens
    (the cache prices None when the model has none).

    Read-only members, so that an immutable snapshot (``llm.selectors.EnabledModel``) fits too.
    """

    @property
    def pk(self) -> Any: ...

    @property
    def name(self) -> str: ...

    @property
    def input_price_per_million(self) -> Decimal: ...

    @property
    def output_price_per_million(self) -> Decimal: ...

    @property
    def cached_input_price_per_million(self) -> Decimal | None: ...

    @property
    def cache_write_price_per_million(self) -> Decimal | None: ...


def usage_context(
    *,
    request_id: str,
    source: str,
    user_id: int,
    api_key_id: int | None,
    model: PricedModel | None,
    model_name: str = "",
    message_id: int | None = None,
    organization_id: int | None = None,
    team_id: int | None = None,
) -> UsageContext:
    """Return the accounting context of a reply of ``model`` starting now (its current prices), in
    organization ``organization_id`` (None: the default organization).

    ``model`` None (a model deleted since): no prices, the reply is recorded under ``model_name``
    at no cost.
    """
    if model is None:
        priced: dict[str, Any] = {
            "model_id": None,
            "model_name": model_name,
            "input_price_per_million": Decimal(0),
            "output_price_per_million": Decimal(0),
        }
    else:
        priced = _model_fields(model)
    return UsageContext(
        request_id=request_id,
        source=source,
        user_id=user_id,
        api_key_id=api_key_id,
        message_id=message_id,
        organization_id=organization_id,
        team_id=team_id,
        **priced,
    )


def usage_context_served_by(context: UsageContext, *, model: PricedModel) -> UsageContext:
    """Return ``context`` for a reply that ``model`` served instead (a fallback): its id, name and prices.

    Every other field (who pays, the request id, the message, any added later) is kept as it is:
    ``dataclasses.replace`` copies them, so none can be dropped on the way.
    """
    return replace(context, **_model_fields(model))


def _model_fields(model: PricedModel) -> dict[str, Any]:
    """Return the ``UsageContext`` fields that come from ``model``: the one place they are read from it."""
    return {
        "model_id": model.pk,
        "model_name": model.name,
        "input_price_per_million": model.input_price_per_million,
        "output_price_per_million": model.output_price_per_million,
        "cached_input_price_per_million": model.cached_input_price_per_million,
        "cache_write_price_per_million": model.cache_write_price_per_million,
    }


def usage_is_billable(*, finish_status: str, produced_output: bool) -> bool:
    """Return whether a reply that ended with ``finish_status`` consumed tokens worth billing.

    Completed and stopped (``cancelled``) replies are billed, a stopped one for what it generated
    and its prompt; a failed one only if the upstream produced output before failing (an upstream
    that refused the request, or never answered, charges nothing).
    """
    return finish_status != FAILED or produced_output


def usage_cost(
    *,
    prompt_tokens: int,
    completion_tokens: int,
    input_price: Decimal,
    output_price: Decimal,
    cached_tokens: int = 0,
    cache_creation_tokens: int = 0,
    cached_input_price: Decimal | None = None,
    cache_write_price: Decimal | None = None,
) -> Decimal:
    """Return the cost in US dollars of a reply's tokens at per-million-token prices.

    ``accounts.pricing.token_cost``: ``(prompt - cached - cache_creation) * input + cached *
    cached_input + cache_creation * cache_write + completion * output``, over one million; a cache
    price None is the input price.
    """
    prices = Prices(
        input=input_price, output=output_price, cached_input=cached_input_price, cache_write=cache_write_price
    )
    return token_cost(
        prices=prices,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached_tokens,
        cache_creation_tokens=cache_creation_tokens,
    )


def usage_account(
    *,
    context: UsageContext,
    finish_status: str,
    prompt_tokens: int,
    completion_tokens: int,
    token_source: str,
    produced_output: bool,
    cached_tokens: int = 0,
    cache_creation_tokens: int = 0,
    reasoning_tokens: int = 0,
    deployment: str = "",
) -> UsageEvent:
    """Queue the usage record of a reply that ended; return the queued event.

    Every reply gets exactly one record, so requests are counted whatever their outcome; one
    that is not billable (``usage_is_billable``: failed before any output) is recorded with
    0 tokens and cost 0. ``token_source``: where the counts came from, a ``UsageRecord.TokenSource``
    value (``provider``; ``counted`` or ``estimated`` when the provider reported none, e.g. a
    stream cut off). The breakdown, as the provider reported it (``llm.providers.Usage``):
    ``cached_tokens`` and ``cache_creation_tokens`` of ``prompt_tokens`` read from / written to its
    prompt cache, ``reasoning_tokens`` of ``completion_tokens``; priced by ``accounts.pricing.token_cost``.
    ``deployment``: which deployment of the model served it (its name, as the router reports it).
    Never blocks and never raises for a broker outage (the sender thread keeps the record).
    """
    if not usage_is_billable(finish_status=finish_status, produced_output=produced_output):
        prompt_tokens = completion_tokens = cached_tokens = cache_creation_tokens = reasoning_tokens = 0
    cost = token_cost(
        prices=context.prices,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached_tokens,
        cache_creation_tokens=cache_creation_tokens,
    )
    subject = {field.name: getattr(context, field.name) for field in fields(UsageSubject)}
    event = UsageEvent(
        **subject,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost=str(cost),
        token_source=token_source,
        finish_status=finish_status,
        cached_tokens=cached_tokens,
        cache_creation_tokens=cache_creation_tokens,
        reasoning_tokens=reasoning_tokens,
        deployment=deployment[:DEPLOYMENT_NAME_MAX],
    )
    _sender.put(event)
    return event


def usage_flush(timeout: float = 30.0) -> bool:
    """Wait until every record queued so far in this process is sent; return False on timeout."""
    return _sender.flush(timeout)


def usage_record_many(events: Iterable[UsageEvent]) -> int:
    """Write ``events`` as ``UsageRecord`` rows; return how many rows were new.

    Idempotent by ``request_id``: a record already written (a redelivered task) is skipped, and so
    is a second event with the same id in one batch. A message, API key or model deleted since
    the reply (a conversation deleted mid-stream) leaves its record unlinked rather than lost.
    """
    unique: dict[str, UsageEvent] = {}
    for event in events:
        unique.setdefault(event.request_id, event)
    if not unique:
        return 0
    written = set(UsageRecord.objects.filter(request_id__in=unique).values_list("request_id", flat=True))
    new = [event for request_id, event in unique.items() if request_id not in written]
    default_organization = default_organization_id() if any(e.organization_id is None for e in new) else None
    rows = [UsageRecord(**_row_fields(event, default_organization)) for event in new]
    if not rows:
        return 0
    for field_name in _LINKS:
        _unlink_missing(rows, UsageRecord._meta.get_field(field_name))
    try:
        with transaction.atomic():
            # ignore_conflicts: a concurrent delivery of the same batch may insert first.
            UsageRecord.objects.bulk_create(rows, ignore_conflicts=True)
    except IntegrityError:  # a linked row deleted between the check and the insert: one at a time
        return sum(_record_one(row) for row in rows)
    return len(rows)


# The nullable links of a record, unlinked when their row is gone.
_LINKS = ("message", "api_key", "model", "team")


def _row_fields(event: UsageEvent, default_organization: int | None) -> dict[str, Any]:
    fields = asdict(event)
    fields["cost"] = Decimal(fields["cost"])
    if fields["organization_id"] is None:
        fields["organization_id"] = default_organization
    return fields


def _unlink_missing(rows: Sequence[UsageRecord], field: Any) -> None:
    """Set ``field`` (a nullable foreign key of ``UsageRecord``) to None where its row no longer exists.

    The related model comes from the field itself, so this app imports none of the apps its records
    link to (``conversations.Message``, ``llm.LLMModel``: see the README's architecture section).
    """
    attname = field.attname
    wanted = {getattr(row, attname) for row in rows} - {None}
    if not wanted:
        return
    related: type[models.Model] = field.related_model
    present = set(related._default_manager.filter(pk__in=wanted).values_list("pk", flat=True))
    for row in rows:
        if getattr(row, attname) not in present:
            setattr(row, attname, None)


def _record_one(row: UsageRecord) -> int:
    for field_name in _LINKS:
        _unlink_missing([row], UsageRecord._meta.get_field(field_name))
    try:
        with transaction.atomic():
            row.save(force_insert=True)
    except IntegrityError:
        if UsageRecord.objects.filter(request_id=row.request_id).exists():
            return 0
        raise
    return 1


class _Sender:
    """The process's usage sender: a queue and one daemon thread that publishes batches to Celery."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[UsageEvent] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending = 0  # queued or being sent
        self._idle = threading.Condition(self._lock)

    def put(self, event: UsageEvent) -> None:
        with self._lock:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="usage-sender", daemon=True)
                self._thread.start()
        self._queue.put(event)

    def flush(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + BATCH_WINDOW_SECONDS
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
            try:
                self._publish(batch)
            finally:
                with self._idle:
                    self._pending -= len(batch)
                    if self._pending == 0:
                        self._idle.notify_all()

    def _publish(self, batch: list[UsageEvent]) -> None:
        """Publish ``batch`` as one task; while the broker (or, eager, the database) is unreachable, retry.

        Retried with a backoff of ``RETRY_SECONDS`` doubling to ``RETRY_MAX_SECONDS`` until it is
        published: records queued meanwhile wait behind it, none is dropped, and the thread
        survives the outage. A redelivery is harmless (the task is idempotent by request id). Any
        other error is a bug: logged with the request ids, and the batch dropped.
        """
        from .tasks import usage_record_batch_task  # tasks import this module

        delay = RETRY_SECONDS
        failing_since: float | None = None
        while True:
            try:
                usage_record_batch_task.delay([asdict(event) for event in batch])
            except _OUTAGE_ERRORS as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    logger.warning(
                        "could not queue %d usage records (%s: %s); retrying until the broker answers",
                        len(batch),
                        type(exc).__name__,
                        exc,
                    )
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            except Exception:
                logger.exception("could not queue %d usage records (request ids %s)", len(batch), _ids(batch))
            finally:
                _release_connections()
            if failing_since is not None:
                logger.warning(
                    "queued %d usage records after %.1f s of retries", len(batch), time.monotonic() - failing_since
                )
            return


def _release_connections() -> None:
    # An eager task ran here: hand its connection back (this thread never ends a request). A
    # connection that a database outage broke may fail to close: the thread goes on regardless.
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            try:
                connection.close()
            except Exception:
                logger.debug("closing a database connection failed", exc_info=True)


def _ids(batch: Sequence[UsageEvent]) -> str:
    return ", ".join(event.request_id for event in batch[:10]) + (" ..." if len(batch) > 10 else "")


_sender = _Sender()
atexit.register(usage_flush, 10.0)

__all__ = [
    "BATCH_WINDOW_SECONDS",
    "MAX_BATCH",
    "PricedModel",
    "UsageContext",
    "UsageEvent",
    "UsageSubject",
    "usage_context",
    "usage_context_served_by",
    "usage_account",
    "usage_cost",
    "usage_flush",
    "usage_is_billable",
    "usage_record_many",
]
