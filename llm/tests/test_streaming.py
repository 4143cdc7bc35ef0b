"""The streaming engine (``llm.streaming``) against the real simulator process over HTTP.

Each test streams real replies and checks what the engine promises every interface: the order
of its events, the end persisted exactly once however the reply ends, stops that reach the one
reply they name (through the real channel layer), keep-alives, and the first-chunk wait.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from channels.layers import DEFAULT_CHANNEL_LAYER, BaseChannelLayer, InMemoryChannelLayer, channel_layers
from django.conf import settings
from django.utils.module_loading import import_string

from chatbackend import broadcast
from llm.providers import ChatRequest, ProviderConfig, UpstreamError
from llm.simulator import reply_text
from llm.streaming import (
    KEEPALIVE,
    STARTED,
    Reply,
    ReplyDelta,
    ReplyDone,
    ReplyEvent,
    ReplyFailed,
    ReplyOutcome,
    ReplyPlan,
    ReplyStatus,
    open_reply,
    replies_accepting,
    replies_shutdown,
    reply_stop_broadcast,
)
from llm.tests.simulator_process import SimulatorProcess
from llm.tokens import Tokenizer, tokenizer_for
from tests.kit import FAST_REPLY_TOKENS, SLOW_REPLY_TOKENS, poll_until

pytestmark = pytest.mark.usefixtures("provider_clients")

MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "Tell me a story."}]


@dataclass(kw_only=True)
class RecordingPlan(ReplyPlan):
    """A plan whose ``finish`` records every outcome it is given (it runs in a worker thread)."""

    finished: list[ReplyOutcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self, outcome: ReplyOutcome) -> None:
        with self.lock:
            self.finished.append(outcome)


_ids = iter(range(1, 1_000_000))


def plan_for(
    sim: SimulatorProcess, model: str = "sim-1", *, tokenizer: Tokenizer | None = None, stream_usage: bool = True
) -> RecordingPlan:
    return RecordingPlan(
        provider=ProviderConfig(
            kind="openai", base_url=sim.base_url, api_key="", read_timeout=30, stream_usage=stream_usage
        ),
        request=ChatRequest(model=model, messages=MESSAGES),
        model_name="public-name",
        reply_id=f"test-reply-{next(_ids)}",
        **({"tokenizer": tokenizer} if tokenizer is not None else {}),
    )


async def begin(plan: RecordingPlan) -> RecordingPlan:
    return plan


async def collect(reply: Reply[Any], **options: float) -> list[ReplyEvent]:
    return [event async for event in reply.events(**options)]


def text_of(events: list[ReplyEvent]) -> str:
    return "".join(chunk.content for event in events if type(event) is ReplyDelta for chunk in event.chunks)


async def test_a_reply_yields_start_deltas_then_done_and_persists_once(simulator):
    plan = plan_for(simulator)
    async with open_reply(begin(plan)) as reply:
        events = await collect(reply)

    assert events[0] is STARTED
    assert all(type(event) is ReplyDelta and event.chunks for event in events[1:-1])
    assert type(events[-1]) is ReplyDone
    outcome = events[-1].outcome
    assert outcome.status is ReplyStatus.COMPLETED
    assert outcome.content == text_of(events) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert outcome.usage.completion_tokens == FAST_REPLY_TOKENS
    assert outcome.usage_source == "provider"
    assert outcome.finish_reason == "stop"
    assert outcome.time_to_first_token_ms is not None
    assert plan.finished == [outcome]  # persisted before the last event, once


@pytest.mark.parametrize("k", [1, 4])
async def test_a_reply_stopped_after_k_chunks_counts_its_text_with_the_models_tokenizer(slow_simulator, k):
    tokenizer = tokenizer_for(setting="auto", model_name="gpt-4o-mini")
    plan = plan_for(slow_simulator, tokenizer=tokenizer)
    async with open_reply(begin(plan)) as reply:
        events: list[ReplyEvent] = []
        async for event in reply.events():
            events.append(event)
            if sum(len(e.chunks) for e in events if type(e) is ReplyDelta) >= k:
                reply.stop()

    outcome = events[-1].outcome  # type: ignore[union-attr]
    assert outcome.status is ReplyStatus.CANCELLED
    assert outcome.content and len(outcome.content.split()) < SLOW_REPLY_TOKENS
    assert outcome.usage_source == "counted"
    assert outcome.usage.completion_tokens == len(tiktoken_o200k().encode_ordinary(outcome.content))
    assert outcome.usage.completion_tokens == tokenizer.count_text(outcome.content)
    assert outcome.usage.prompt_tokens == tokenizer.count_prompt(MESSAGES)
    assert plan.finished == [outcome]


async def test_a_completed_reply_keeps_the_providers_usage_whatever_the_tokenizer(simulator):
    plan = plan_for(simulator, tokenizer=tokenizer_for(setting="o200k_base", model_name="x"))
    async with open_reply(begin(plan)) as reply:
        events = await collect(reply)

    outcome = events[-1].outcome  # type: ignore[union-attr]
    assert outcome.status is ReplyStatus.COMPLETED
    assert outcome.usage_source == "provider"
    assert outcome.usage.completion_tokens == FAST_REPLY_TOKENS  # the simulator's count: one per word


async def test_without_stream_usage_a_completed_reply_is_counted_by_the_tokenizer(simulator):
    # A provider whose server rejects stream_options: nothing asks for usage, none comes, we count.
    tokenizer = tokenizer_for(setting="cl100k_base", model_name="x")
    plan = plan_for(simulator, tokenizer=tokenizer, stream_usage=False)
    async with open_reply(begin(plan)) as reply:
        events = await collect(reply)

    outcome = events[-1].outcome  # type: ignore[union-attr]
    assert outcome.status is ReplyStatus.COMPLETED
    assert outcome.content == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert outcome.usage_source == "counted"
    assert outcome.usage.completion_tokens == tokenizer.count_text(outcome.content)


def tiktoken_o200k() -> Any:
    """tiktoken's o200k_base encoding as ``llm.tokens`` builds it (its equality with tiktoken's: test_tokens)."""
    from llm.tokens import load_encoding

    return load_encoding("o200k_base")


async def test_an_upstream_failure_is_the_last_event_and_is_persisted_failed(simulator):
    plan = plan_for(simulator, model="sim-error-500")
    async with open_reply(begin(plan)) as reply:
        events = await collect(reply)

    assert events[0] is STARTED
    assert type(events[-1]) is ReplyFailed
    assert isinstance(events[-1].error, UpstreamError)
    assert events[-1].error.status == 502
    assert plan.finished == [events[-1].outcome]
    assert plan.finished[0].status is ReplyStatus.FAILED


async def test_the_first_chunk_wait_raises_an_upstream_failure_before_any_event(simulator):
    plan = plan_for(simulator, model="sim-error-429")

    with pytest.raises(UpstreamError) as raised:
        await open_reply(begin(plan), wait_first_chunk=5)

    assert raised.value.status == 429
    [outcome] = plan.finished
    assert outcome.status is ReplyStatus.FAILED
    assert outcome.error is raised.value


async def test_keep_alives_flow_while_the_upstream_is_silent_before_its_first_chunk(sleepy_simulator):
    before = await sleepy_simulator.astats()
    plan = plan_for(sleepy_simulator)
    async with open_reply(begin(plan)) as reply:
        events: list[ReplyEvent] = []
        async for event in reply.events(keepalive=0.05):
            events.append(event)
            if events.count(KEEPALIVE) == 3:
                reply.stop()

    assert events[:4] == [STARTED, KEEPALIVE, KEEPALIVE, KEEPALIVE]
    assert type(events[-1]) is ReplyDone
    assert events[-1].outcome.status is ReplyStatus.CANCELLED
    assert events[-1].outcome.content == ""
    assert [outcome.status for outcome in plan.finished] == [ReplyStatus.CANCELLED]
    await poll_until(
        sleepy_simulator.astats,
        lambda stats: stats["requests_disconnected"] == before["requests_disconnected"] + 1,
        what="the upstream request to be closed",
    )


async def test_stop_ends_the_reply_cancelled_with_its_text_so_far_and_closes_the_upstream(slow_simulator):
    before = await slow_simulator.astats()
    plan = plan_for(slow_simulator)
    async with open_reply(begin(plan)) as reply:
        events: list[ReplyEvent] = []
        async for event in reply.events():
            events.append(event)
            if len(text_of(events).split()) >= 3:
                reply.stop()

    outcome = events[-1].outcome  # type: ignore[union-attr]
    assert type(events[-1]) is ReplyDone
    assert outcome.status is ReplyStatus.CANCELLED
    assert outcome.content == text_of(events)
    assert 3 <= len(outcome.content.split()) < SLOW_REPLY_TOKENS
    assert outcome.usage_source == "estimated"
    assert plan.finished == [outcome]
    await poll_until(
        slow_simulator.astats,
        lambda stats: stats["requests_disconnected"] > before["requests_disconnected"],
    )


async def test_cancelling_the_iterating_task_persists_cancelled_and_propagates(slow_simulator):
    plan = plan_for(slow_simulator)
    seen: list[ReplyEvent] = []

    async def consume() -> None:
        async with open_reply(begin(plan)) as reply:
            async for event in reply.events():
                seen.append(event)

    task = asyncio.create_task(consume())
    await poll_until(lambda: len(seen), lambda count: count >= 3)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    [outcome] = plan.finished
    assert outcome.status is ReplyStatus.CANCELLED
    assert outcome.content == text_of(seen)


async def test_a_reply_never_iterated_is_persisted_cancelled_when_its_block_ends(simulator):
    plan = plan_for(simulator)
    async with open_reply(begin(plan)) as reply:
        assert reply.outcome is None

    assert reply.outcome is not None
    assert reply.outcome.status is ReplyStatus.CANCELLED
    assert plan.finished == [reply.outcome]


async def test_events_can_be_iterated_once(simulator):
    async with open_reply(begin(plan_for(simulator))) as reply:
        await collect(reply)
        with pytest.raises(RuntimeError):
            reply.events()


# --- Stopping through the channel layer -------------------------------------------------------


def counting_layer() -> Any:
    """Return a new instance of the configured channel layer that counts its group calls."""
    config: dict[str, Any] = settings.CHANNEL_LAYERS[DEFAULT_CHANNEL_LAYER]
    backend: type[BaseChannelLayer] = import_string(config["BACKEND"])

    class CountingLayer(backend):  # type: ignore[valid-type,misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.calls: Counter[tuple[str, str]] = Counter()

        async def group_add(self, group: str, channel: str) -> None:
            self.calls["group_add", group] += 1
            await super().group_add(group, channel)

        async def group_discard(self, group: str, channel: str) -> None:
            self.calls["group_discard", group] += 1
            await super().group_discard(group, channel)

        async def new_channel(self, *args: Any, **kwargs: Any) -> str:
            self.calls["new_channel", ""] += 1
            return await super().new_channel(*args, **kwargs)

    return CountingLayer(**config.get("CONFIG", {}))


@pytest.fixture
async def layer() -> AsyncIterator[Any]:
    """A fresh real channel layer (Redis when configured), installed as the default one for the test."""
    layer = counting_layer()
    previous = channel_layers.set(DEFAULT_CHANNEL_LAYER, layer)
    try:
        yield layer
    finally:
        await broadcast.stop_listening()
        if previous is None:
            channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
        else:
            channel_layers.set(DEFAULT_CHANNEL_LAYER, previous)
        if hasattr(layer, "close_pools"):
            await layer.close_pools()


CONCURRENT_REPLIES = 8


async def test_a_broadcast_stop_reaches_only_its_reply_and_replies_share_one_channel(layer, slow_simulator):
    plans = [plan_for(slow_simulator) for _ in range(CONCURRENT_REPLIES)]
    texts: dict[str, list[ReplyEvent]] = {plan.reply_id: [] for plan in plans}
    replies: dict[str, Reply[RecordingPlan]] = {}

    async def stream(plan: RecordingPlan) -> None:
        async with open_reply(begin(plan)) as reply:
            replies[plan.reply_id] = reply
            async for event in reply.events():
                texts[plan.reply_id].append(event)

    tasks = [asyncio.create_task(stream(plan)) for plan in plans]
    await poll_until(lambda: [len(t) for t in texts.values()], lambda counts: min(counts) >= 3)
    # Every reply listens through one channel, which joined the one group once.
    assert layer.calls == {("new_channel", ""): 1, ("group_add", broadcast.PROCESS_GROUP): 1}
    if isinstance(layer, InMemoryChannelLayer):
        assert len(layer.groups[broadcast.PROCESS_GROUP]) == 1

    target = plans[CONCURRENT_REPLIES // 2]
    await asyncio.to_thread(reply_stop_broadcast, reply_id=target.reply_id)  # as a DRF view sends it
    await poll_until(lambda: target.finished)

    others = [plan for plan in plans if plan is not target]
    counts = {plan.reply_id: len(texts[plan.reply_id]) for plan in others}
    # The others go on streaming after the target ended...
    await poll_until(lambda: texts, lambda t: all(len(t[pid]) > counts[pid] + 2 for pid in counts))
    assert all(not plan.finished for plan in others)
    for plan in others:
        replies[plan.reply_id].stop()
    await asyncio.gather(*tasks)

    assert target.finished[0].status is ReplyStatus.CANCELLED
    assert target.finished[0].content == text_of(texts[target.reply_id])
    assert all(plan.finished[0].status is ReplyStatus.CANCELLED for plan in others)
    # Ending the replies made no channel layer call either.
    assert layer.calls == {("new_channel", ""): 1, ("group_add", broadcast.PROCESS_GROUP): 1}


async def test_a_stop_for_a_reply_streaming_nowhere_is_ignored(layer, slow_simulator):
    plan, barrier = plan_for(slow_simulator), plan_for(slow_simulator)
    seen: dict[str, list[ReplyEvent]] = {plan.reply_id: [], barrier.reply_id: []}

    async def stream(plan: RecordingPlan) -> None:
        async with open_reply(begin(plan)) as reply:
            async for event in reply.events():
                seen[plan.reply_id].append(event)

    tasks = [asyncio.create_task(stream(plan)), asyncio.create_task(stream(barrier))]
    await poll_until(lambda: seen, lambda seen: all(len(events) >= 2 for events in seen.values()))
    await broadcast.broadcast({"type": "reply.stop", "reply_id": "test-reply-that-does-not-exist"})
    # A listener handles messages in order: once the stop sent next has ended its reply, the
    # stop for nobody has been handled too.
    await broadcast.broadcast({"type": "reply.stop", "reply_id": barrier.reply_id})
    await poll_until(lambda: barrier.finished)
    delivered = len(seen[plan.reply_id])
    await poll_until(lambda: len(seen[plan.reply_id]), lambda count: count > delivered + 2)  # it streams on
    assert not plan.finished
    tasks[0].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert [outcome.status for outcome in barrier.finished] == [ReplyStatus.CANCELLED]
    assert [outcome.status for outcome in plan.finished] == [ReplyStatus.CANCELLED]


async def test_the_listener_rejoins_the_group_before_its_membership_expires(layer, monkeypatch):
    monkeypatch.setattr(broadcast, "REJOIN_SECONDS", 0.05)
    assert await broadcast.listen()

    await poll_until(lambda: layer.calls["group_add", broadcast.PROCESS_GROUP], lambda n: n >= 3)
    assert layer.calls["new_channel", ""] == 1


async def test_a_reply_that_ends_before_its_request_is_sent_uses_no_tokens(simulator):
    """Closed before its events were iterated (a client gone while the headers were written, a
    cancelled admission): nothing went upstream, so nothing is billed, not even the prompt."""
    plan = plan_for(simulator, tokenizer=tokenizer_for(setting="o200k_base", model_name="sim-1"))
    reply = await open_reply(plan)
    await reply.aclose()

    assert plan.finished == [reply.outcome]
    outcome = plan.finished[0]
    assert outcome.status is ReplyStatus.CANCELLED
    assert (outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (0, 0)
    assert outcome.time_to_first_token_ms is None


async def test_a_reply_stopped_before_its_first_token_still_bills_its_prompt(sleepy_simulator):
    """Once the request is sent, the upstream has read the prompt: a stop before any output bills it."""
    plan = plan_for(sleepy_simulator, tokenizer=tokenizer_for(setting="o200k_base", model_name="sim-1"))
    async with open_reply(plan) as reply:
        async for event in reply.events(keepalive=0.05):
            if event is KEEPALIVE:
                reply.stop()

    outcome = plan.finished[0]
    assert outcome.status is ReplyStatus.CANCELLED
    assert outcome.usage.prompt_tokens == plan.tokenizer.count_prompt(MESSAGES)
    assert outcome.usage.completion_tokens == 0


async def test_a_shutdown_while_the_upstream_streams_closes_it_with_the_reply(slow_simulator):
    """``replies_shutdown`` ends a reply whose task still awaits the upstream's next batch (a server that
    did not cancel it): the upstream request is closed then, not left generating, billed by the
    provider yet counted nowhere, until the process exits."""
    plan = plan_for(slow_simulator)
    reply = await open_reply(begin(plan))
    before = await slow_simulator.astats()
    events: list[ReplyEvent] = []

    async def consume() -> None:
        async with reply:
            async for event in reply.events():
                events.append(event)

    task = asyncio.create_task(consume())
    try:
        await poll_until(lambda: sum(type(e) is ReplyDelta for e in events), lambda n: n >= 3, what="3 deltas")
        await replies_shutdown(wait_seconds=2)
        await asyncio.wait_for(task, 5)
    finally:
        replies_accepting(True)

    outcome = reply.outcome
    assert outcome is not None and outcome.status is ReplyStatus.CANCELLED
    assert outcome.error is not None and outcome.error.code == "server_shutdown"
    assert type(events[-1]) is ReplyDone and events[-1].outcome is outcome
    assert outcome.content == text_of(events)
    assert plan.finished == [outcome]
    closed = before["requests_disconnected"] + 1
    stats = await poll_until(slow_simulator.astats, lambda s: s["requests_disconnected"] == closed, within=2)
    assert stats["active_streams"] == before["active_streams"]
