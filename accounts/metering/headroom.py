"""Local admission: far from every limit, a process admits on what it last saw of the shared counters.

Every metered request used to wait for its admission script in Redis before its upstream call: one
round trip (~0.65 ms of TTFT at one stream on the 2-core VM, ~130 µs of it Redis' own time) and
its client CPU on the critical path. Most requests are far from every limit, where the answer is
known in advance. So each admission's answer (``ratelimit_store.Admitted``) also says where the
caller stands — each counter's window, each stream set's leases, each budget counter's spent plus
reserved amount — and how many processes admit (``processes``). The process keeps that *view*
per caller (its subjects, their limits and its budget counters: ``view_key``).

The next request of that caller is admitted at once, without waiting for Redis, when for every
limit what this process has admitted unseen (``pending``) plus this request fits in
``share / processes`` of the room the view left:

    pending + cost <= share * (limit - used) / processes        (each counter, stream set, budget)

and the view is at most ``VIEW_SECONDS`` old. The admission is still *recorded* in Redis, by the
same script with every limit lifted (a ``record``: the hits, the stream lease and the budget
reservation always taken), during the upstream call: records wait up to ``RECORD_DELAY_SECONDS``
(50 ms) in the process, so that those made meanwhile, and the releases waiting then, share one
script call (``RedisRateLimitStore.record``); the answer refreshes the view and takes the request
out of ``pending``. The shared counters thus hold every admitted request, as before, at most that
delay and a round trip later; settlement (which needs the reservation) waits for the record
(``Admission.confirmed``, which sends the waiting records at once when the reply ended first), and
so does the release.

What it costs in exactness: requests admitted unseen by the other processes are at most ``share``
of a limit's remaining room in all (each process takes ``share / processes`` of it). A limit is
exceeded only if the other processes take the rest of the room, ``1 - share`` of it, between this
process's last answer and its record (at most ``RECORD_DELAY_SECONDS`` and a round trip while the
caller is busy, at most ``VIEW_SECONDS`` otherwise). Near a limit — and for small limits: a request
that is more than ``share / processes`` of the room left — every admission waits for Redis as
before, exact: a limit of 10 requests per minute on two processes is never admitted locally with
``share`` 0.1.
An answer replaces the view only if it comes from a later store call than the view's (calls on
different connections may answer out of order). Completion tokens this process released count in
the view until an answer holds them. A local admission's ``x-ratelimit-*`` headers are first the
view's, which lack what other processes admitted since its last answer; a response sends those
of the record's answer (``RateLease.confirmed_headers``, awaited once the upstream's first chunk
is in: ``llm.streaming.open_reply``), which count every request recorded before it.
A failed record drops every view (the next admissions wait for Redis: 503 if it is gone) and is
logged; its reply's usage row is still written, and budget reconciliation counts it.

``METERING_LOCAL_ADMISSION_SHARE`` sets ``share`` (default 0.1; 0 turns local admission off).
The in-process store (the embedded defaults) has no round trip to save and keeps no views.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .budget_store import ReserveRequest
from .ratelimit_store import Admitted, Window
from .types import MeteringSubject

# Seconds a view may go without a fresh answer before admissions wait for Redis again.
VIEW_SECONDS = 1.0
# Views kept per store (callers); past it they are all dropped and rebuilt from the next answers.
VIEWS_MAX = 10_000

ViewKey = tuple[tuple[MeteringSubject, ...], tuple[tuple[str, int, int | None], ...] | None]


def view_key(subjects: tuple[MeteringSubject, ...], budget: ReserveRequest | None) -> ViewKey:
    """Return the key of a caller's view: its subjects (with their limits) and its budget counters
    (with their limits); a changed limit or a new budget period is another view."""
    if budget is None:
        return subjects, None
    return subjects, tuple([(line.key, line.limit_units, line.token_limit) for line in budget.lines])


def view_key_label(key: ViewKey) -> str:
    """Return a view's caller for the logs: its subjects (``kind:id``), then its budget counters."""
    subjects, budget = key
    label = ", ".join(f"{subject.kind}:{subject.id}" for subject in subjects)
    return label + (", budgets " + ", ".join(line[0] for line in budget) if budget else "")


@dataclass(slots=True, eq=False)
class HeadroomView:
    """What one caller's last answer showed, and what this process did since that the answer lacks.

    Vectors, one entry per limit in this order: each counter (the shape's order), each stream set,
    then each budget line's units and tokens. ``limits``: None for a budget without a token limit
    (never checked); ``caps``: the same, None as infinity. ``used``: the amount each held at the
    answer (a counter's weighted count, rounded down as ``limits`` does). ``call``: the store call
    that answered (``Admitted.call``): an answer of an earlier call never replaces a later one's.
    ``pending``: amounts admitted locally whose record has not answered yet. ``releases``: completion
    tokens this process released, each with the call that carried it to the store (a one-item list,
    None while it waits in the process), oldest first, counted (``unsent``: their sum per limit)
    until an answer of that call or a later one. ``windows``: the counters' windows, for the
    ``x-ratelimit-*`` headers.
    """

    limits: tuple[int | None, ...]
    used: list[int]
    windows: list[Window]
    processes: int
    answered_at: float
    call: int
    counter_index: dict[str, int]
    caps: tuple[int | float, ...]
    pending: list[int] = field(default_factory=list)
    releases: deque[tuple[list[int | None], list[tuple[int, int]]]] = field(default_factory=deque)
    unsent: list[int] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        limits: tuple[int | None, ...],
        counter_keys: Sequence[str],
        admitted: Admitted,
        now: float,
        counts: Sequence[int] | None = None,
    ) -> HeadroomView | None:
        """Return the view an answer shows, or None when it lacks a figure (a failed call). ``counts``:
        its counters' weighted counts rounded down, when the caller has them (else computed here)."""
        figures = _figures(admitted, len(counter_keys), len(limits), counts)
        if figures is None:
            return None
        windows, used = figures
        return cls(
            limits=limits,
            caps=tuple(math.inf if limit is None else limit for limit in limits),
            used=used,
            windows=windows,
            processes=admitted.processes,
            answered_at=now,
            call=admitted.call,
            counter_index={key: index for index, key in enumerate(counter_keys)},
            pending=[0] * len(limits),
            unsent=[0] * len(limits),
        )

    def take(self, costs: Sequence[int], share: float, now: float) -> bool:
        """Admit ``costs`` locally if they fit (the module's rule): add them to ``pending`` and return
        True; else change nothing and return False."""
        if now - self.answered_at > VIEW_SECONDS:
            return False
        fraction = share / self.processes
        for limit, held, unsent, unseen, cost in zip(
            self.limits, self.used, self.unsent, self.pending, costs, strict=True
        ):
            if limit is not None and unseen + cost > fraction * (limit - held - unsent):
                return False
        pending = self.pending
        for index, cost in enumerate(costs):
            pending[index] += cost
        return True

    def answered(self, costs: Sequence[int]) -> None:
        """Take a record's ``costs`` out of ``pending`` (its answer came, or it failed)."""
        pending = self.pending
        for index, cost in enumerate(costs):
            pending[index] -= cost

    def merge(self, admitted: Admitted, now: float, counts: Sequence[int] | None = None) -> bool:
        """Take in an answer: it replaces the view unless an answer of a later call already did.
        Returns False when the answer lacks a figure. ``counts``: as ``of``'s."""
        if admitted.call < self.call:
            return True
        figures = _figures(admitted, len(self.windows), len(self.used), counts)
        if figures is None:
            return False
        windows, used = figures
        self.used, self.windows, self.processes = used, windows, admitted.processes
        self.call, self.answered_at = admitted.call, now
        releases, unsent = self.releases, self.unsent
        # Oldest first: one still waiting in the process keeps the later ones counted a little longer.
        while releases and releases[0][0][0] is not None and releases[0][0][0] <= self.call:
            for index, amount in releases.popleft()[1]:
                unsent[index] -= amount
        return True

    def released(self, counter_amounts: Sequence[tuple[str, int]]) -> list[int | None]:
        """Count completion tokens this process releases (``(counter key, amount)``) until an answer holds
        them; return the cell the store writes the carrying call into."""
        carrier: list[int | None] = [None]
        amounts = [(self.counter_index[key], amount) for key, amount in counter_amounts if key in self.counter_index]
        if amounts:
            self.releases.append((carrier, amounts))
            for index, amount in amounts:
                self.unsent[index] += amount
        return carrier

    def over(self) -> list[int]:
        """Return the indexes of the limits the view shows exceeded (a local admission went over)."""
        if not any(map(operator.gt, self.used, self.caps)):  # in C: none, nearly always
            return []
        return [
            index
            for index, (limit, used) in enumerate(zip(self.limits, self.used, strict=True))
            if limit is not None and used > limit
        ]

    def counts(self) -> list[int]:
        """Return what each counter holds with what is pending and released since the answer (the
        ``x-ratelimit-*`` headers' figures): its weighted count, rounded down, plus those amounts."""
        used, pending, unsent = self.used, self.pending, self.unsent
        return [used[index] + pending[index] + unsent[index] for index in range(len(self.windows))]

    def pending_window(self, index: int) -> Window:
        """Return counter ``index``'s window with what is pending and released since added (its reset time)."""
        return self.windows[index].without(-(self.pending[index] + self.unsent[index]))


def _figures(
    admitted: Admitted, counters: int, limits: int, counts: Sequence[int] | None = None
) -> tuple[list[Window], list[int]] | None:
    """Return an answer's counter windows and what each limit held (the view's order), or None when
    it lacks a figure (a failed call). ``counts``: the counters' weighted counts rounded down, if known."""
    windows = [w for w in admitted.windows if w is not None]
    if len(windows) != counters:
        return None
    used = [math.floor(window.used()) for window in windows] if counts is None else [*counts]
    used += admitted.stream_counts
    for units, tokens in admitted.budget_used:
        used += (int(units), int(tokens))
    return (windows, used) if len(used) == limits else None


__all__ = ["VIEWS_MAX", "VIEW_SECONDS", "HeadroomView", "ViewKey", "view_key", "view_key_label"]
