"""Replies whose server process died: checkpoints, orphan detection, recovery, and stop on an orphan."""

from __future__ import annotations

import datetime as dt
import secrets
from decimal import Decimal

import httpx
import pytest
from django.core.cache import cache
from django.test import override_settings
from django.utils import timezone
from httpx_sse import aconnect_sse

from accounts.authentication import principal_for
from accounts.models import UsageRecord
from accounts.usage import usage_flush
from chatbackend.asyncdb import run_sync
from chatbackend.lifespan import LifespanApp
from chatbackend.liveness import BEATS_TO_DEATH, PROCESS_ID, process_alive
from conversations.models import Message
from conversations.services import reply_checkpoint, reply_recover_orphans, reply_stop
from llm.selectors import enabled_model_cache
from llm.streaming import replies_accepting
from llm.tokens import tokenizer_for
from tests.factories import ConversationFactory, LLMModelFactory, MessageFactory, ProviderFactory
from tests.kit import bearer, poll_until, usage_records

pytestmark = pytest.mark.django_db(transaction=True)  # usage records are written by another thread

DEAD = "gone-host:4242:deadbeef"
LONG_AGO = timezone.now() - dt.timedelta(minutes=10)


def streaming_reply(owner_process: str, *, checkpointed_at: dt.datetime | None, conversation=None) -> Message:
    conversation = conversation or ConversationFactory()
    MessageFactory(conversation=conversation, role=Message.Role.USER, content="Tell me a story")
    message = MessageFactory(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        content="Once upon a time",
        model_name=conversation.model.name,
        stream_owner=owner_process,
        checkpointed_at=checkpointed_at,
    )
    if checkpointed_at is None:  # created long ago, never checkpointed
        Message.objects.filter(pk=message.pk).update(created_at=LONG_AGO)
    return message


def test_an_orphan_is_failed_interrupted_with_its_text_and_billed_once():
    orphan = streaming_reply(DEAD, checkpointed_at=LONG_AGO)

    assert reply_recover_orphans() == 1
    assert reply_recover_orphans() == 0  # already ended: nothing twice

    orphan.refresh_from_db()
    assert orphan.status == Message.Status.FAILED
    assert orphan.error_code == "interrupted"
    assert orphan.content == "Once upon a time"
    assert orphan.completion_tokens and orphan.prompt_tokens
    assert usage_flush(10)
    [record] = UsageRecord.objects.filter(message=orphan)
    assert record.request_id == f"message-{orphan.pk}"
    assert record.user_id == orphan.conversation.owner_id
    assert (record.finish_status, record.token_source) == ("failed", "estimated")
    assert record.completion_tokens == orphan.completion_tokens


def test_an_orphan_of_a_model_with_a_known_tokenizer_is_counted_with_it():
    model = LLMModelFactory(upstream_model="gpt-4o-mini")  # tokenizer "auto": o200k_base
    orphan = streaming_reply(DEAD, checkpointed_at=LONG_AGO, conversation=ConversationFactory(model=model))

    assert reply_recover_orphans() == 1

    tokenizer = tokenizer_for(setting="o200k_base", model_name="")
    orphan.refresh_from_db()
    assert orphan.completion_tokens == tokenizer.count_text("Once upon a time") == 4
    assert orphan.prompt_tokens == tokenizer.count_prompt([{"role": "user", "content": "Tell me a story"}])
    assert usage_flush(10)
    [record] = UsageRecord.objects.filter(message=orphan)
    assert (record.token_source, record.completion_tokens) == ("counted", 4)


def test_a_never_checkpointed_orphan_counts_from_its_start():
    orphan = streaming_reply(DEAD, checkpointed_at=None)

    assert reply_recover_orphans() == 1
    assert Message.objects.get(pk=orphan.pk).status == Message.Status.FAILED


@pytest.mark.parametrize("case", ["this process", "a process with a heartbeat", "a recent checkpoint"])
def test_a_reply_of_a_live_process_or_checkpointed_lately_is_not_an_orphan(case):
    if case == "this process":
        message = streaming_reply(PROCESS_ID, checkpointed_at=LONG_AGO)
    elif case == "a process with a heartbeat":
        cache.set("chatbackend:alive:other-host:1:abc", 1, timeout=60)
        assert process_alive("other-host:1:abc")
        message = streaming_reply("other-host:1:abc", checkpointed_at=LONG_AGO)
    else:
        message = streaming_reply(DEAD, checkpointed_at=timezone.now())

    assert reply_recover_orphans() == 0
    assert Message.objects.get(pk=message.pk).status == Message.Status.STREAMING


def test_a_process_is_dead_three_heartbeats_after_its_last():
    cache.set("chatbackend:alive:short-lived:1:x", 1, timeout=0.1)
    assert BEATS_TO_DEATH == 3
    assert not process_alive(DEAD)
    assert process_alive(PROCESS_ID)


def test_a_checkpoint_never_overwrites_an_end():
    message = streaming_reply(PROCESS_ID, checkpointed_at=None)
    reply_checkpoint(message_id=message.pk, content="Once upon a time there")
    message.refresh_from_db()
    assert (message.content, message.status) == ("Once upon a time there", Message.Status.STREAMING)
    assert message.checkpointed_at is not None

    Message.objects.filter(pk=message.pk).update(status=Message.Status.COMPLETED, content="The whole story.")
    reply_checkpoint(message_id=message.pk, content="Once upon")

    message.refresh_from_db()
    assert (message.content, message.status) == ("The whole story.", Message.Status.COMPLETED)


def test_stopping_an_orphan_ends_it_at_once():
    orphan = streaming_reply(DEAD, checkpointed_at=timezone.now())  # recent: the periodic task would wait

    reply_stop(
        actor=principal_for(user=orphan.conversation.owner),
        conversation_id=orphan.conversation_id,
        message_id=orphan.pk,
    )

    orphan.refresh_from_db()
    assert (orphan.status, orphan.error_code) == (Message.Status.FAILED, "interrupted")


@override_settings(REDIS_URL="")
async def test_on_the_embedded_defaults_start_up_recovers_what_an_earlier_run_left_streaming():
    from asgiref.sync import sync_to_async

    orphan = await sync_to_async(streaming_reply)(DEAD, checkpointed_at=timezone.now())
    sent: list[dict] = []
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> dict:
        return inbox.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:  # noqa: ANN001 - never called: lifespan only
        raise AssertionError("not for lifespan")

    try:
        await LifespanApp(app)({"type": "lifespan"}, receive, send)
    finally:
        replies_accepting(True)  # the shutdown refuses new replies in this process: later tests stream

    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    refreshed = await Message.objects.aget(pk=orphan.pk)
    assert refreshed.status == Message.Status.FAILED


@pytest.fixture
def slow_fallback_conversation(user, simulator, slow_simulator, settings):
    """A conversation with ``primary`` (a 500 before any chunk, 10 $/M in and out) whose replies its
    fallback ``backup`` (1 and 2 $/M) serves on the slow simulator, checkpointed every 50 ms."""
    settings.LLM_ROUTING_BACKOFF_SECONDS = 0.01
    settings.REPLY_CHECKPOINT_SECONDS = 0.05
    enabled_model_cache.clear()  # other tests name models "primary" and "backup" too
    failing = f"sim-fallback-{secrets.token_hex(4)}"
    simulator.fault_set(failing, "status=500")
    slow = ProviderFactory(name="sim-slow-backup", base_url=slow_simulator.base_url, api_key="")
    LLMModelFactory(name="backup", provider=slow, upstream_model="sim-1")
    provider = ProviderFactory(name="sim-failing-primary", base_url=simulator.base_url, api_key="")
    primary = LLMModelFactory(
        name="primary",
        provider=provider,
        upstream_model=failing,
        fallbacks=["backup"],
        input_price_per_million="10.000000",
        output_price_per_million="10.000000",
    )
    yield ConversationFactory(owner=user, model=primary)
    simulator.fault_clear(failing)
    enabled_model_cache.clear()


@pytest.mark.usefixtures("provider_clients")
async def test_a_checkpoint_of_a_reply_a_fallback_serves_names_the_fallback_that_recovery_bills(
    slow_fallback_conversation, asgi_server, token
):
    """What a crash keeps of a reply is its checkpoints: the model generating the text must be among
    it, or a recovery bills the text as the requested model's (its prices, its tokenizer), though
    that model generated nothing."""
    conversation = slow_fallback_conversation
    url = f"/api/conversations/{conversation.pk}/messages/"
    async with (
        httpx.AsyncClient(base_url=asgi_server, timeout=10) as client,
        aconnect_sse(client, "POST", url, json={"content": "Tell me a story"}, headers=bearer(token)) as source,
    ):
        events = source.aiter_sse()  # read, never closed early: that would close the connection
        start = await anext(events)
        message_id = start.json()["message_id"]
        checkpointed = await poll_until(
            lambda: Message.objects.aget(pk=message_id), lambda m: m.checkpointed_at is not None and m.content
        )
        assert (checkpointed.status, checkpointed.model_name) == (Message.Status.STREAMING, "backup")

        # Its process dies now: the recovery bills what the checkpoint says.
        await Message.objects.filter(pk=message_id).aupdate(stream_owner=DEAD)
        assert await run_sync(reply_recover_orphans, orphan_after_seconds=0) == 1  # it checkpoints on
        [record] = await usage_records(message_id=message_id)
        assert (record.model_name, record.finish_status) == ("backup", "failed")
        assert record.cost == (record.prompt_tokens * 1 + record.completion_tokens * 2) / Decimal(1_000_000)
