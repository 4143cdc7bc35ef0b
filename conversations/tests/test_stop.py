"""The stop listener: one process-wide channel layer group, no channel layer call per stream."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.layers import DEFAULT_CHANNEL_LAYER, BaseChannelLayer, InMemoryChannelLayer, channel_layers
from django.conf import settings
from django.utils.module_loading import import_string

from conversations import stop
from conversations.models import Message
from conversations.stop import STOP_GROUP, ReplyStopper, listen_for_stop, reply_stop
from tests.factories import ConversationFactory, MessageFactory

from .conftest import sync_db, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("release_db_connections")]

CONCURRENT_REPLIES = 30


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
    """A fresh real channel layer, installed as the default one for the test."""
    layer = counting_layer()
    previous = channel_layers.set(DEFAULT_CHANNEL_LAYER, layer)
    try:
        yield layer
    finally:
        if previous is None:
            channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
        else:
            channel_layers.set(DEFAULT_CHANNEL_LAYER, previous)
        listener = stop._listeners.get(asyncio.get_running_loop())
        if listener is not None and listener.layer is layer:
            if listener.channel:
                await layer.group_discard(STOP_GROUP, listener.channel)  # leave Redis tidy
            for task in listener._tasks:
                task.cancel()
            if listener._tasks:
                await asyncio.wait(listener._tasks, timeout=10)
        if hasattr(layer, "close_pools"):
            await layer.close_pools()


async def test_concurrent_replies_share_one_group_and_a_stop_reaches_only_its_reply(layer, user):
    def streaming_replies() -> list[int]:
        conversation = ConversationFactory(owner=user)
        return [
            MessageFactory(conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING).pk
            for _ in range(CONCURRENT_REPLIES)
        ]

    message_ids = await sync_db(streaming_replies)()
    conversation_id = await Message.objects.filter(pk=message_ids[0]).values_list("conversation_id", flat=True).aget()
    entered: set[int] = set()
    release = asyncio.Event()

    async def stream(message_id: int) -> str:
        # A stand-in for a reply streaming in ``stoppable_chunks``: waiting for the upstream.
        stopper = ReplyStopper(asyncio.current_task())
        async with listen_for_stop(message_id, stopper):
            entered.add(message_id)
            stopper.waiting = True
            try:
                await release.wait()
            except asyncio.CancelledError:
                if stopper.absorb():
                    return "stopped"
                raise
            finally:
                stopper.waiting = False
        return "finished"

    streams = [asyncio.create_task(stream(message_id)) for message_id in message_ids]
    await wait_until(lambda: asyncio.sleep(0, len(entered) == CONCURRENT_REPLIES))

    # All of them listen through one channel, which joined the one group once.
    assert layer.calls == {("new_channel", ""): 1, ("group_add", STOP_GROUP): 1}
    if isinstance(layer, InMemoryChannelLayer):
        assert list(layer.groups) == [STOP_GROUP]
        assert len(layer.groups[STOP_GROUP]) == 1

    target = message_ids[CONCURRENT_REPLIES // 2]
    await sync_db(reply_stop)(user=user, conversation_id=conversation_id, message_id=target)
    await wait_until(lambda: asyncio.sleep(0, streams[CONCURRENT_REPLIES // 2].done()))
    release.set()
    outcomes = dict(zip(message_ids, await asyncio.gather(*streams), strict=True))

    assert outcomes[target] == "stopped"
    assert {outcome for message_id, outcome in outcomes.items() if message_id != target} == {"finished"}
    # Ending the streams made no channel layer call either.
    assert layer.calls == {("new_channel", ""): 1, ("group_add", STOP_GROUP): 1}


async def test_a_stop_for_a_reply_streaming_nowhere_is_ignored(layer):
    stopper = ReplyStopper()
    async with listen_for_stop(1, stopper):
        await layer.group_send(STOP_GROUP, {"type": stop.STOP_EVENT_TYPE, "message_id": 2})
        await layer.group_send(STOP_GROUP, {"type": stop.STOP_EVENT_TYPE, "message_id": 1})
        await wait_until(lambda: asyncio.sleep(0, stopper.requested))


async def test_the_listener_rejoins_the_group_before_its_membership_expires(layer, monkeypatch):
    monkeypatch.setattr(stop, "REJOIN_SECONDS", 0.05)
    async with listen_for_stop(1, ReplyStopper()):
        await wait_until(lambda: asyncio.sleep(0, layer.calls["group_add", STOP_GROUP] >= 3))
    assert layer.calls["new_channel", ""] == 1
