"""Usage accounting (``accounts.usage``): billing rule, price, queueing, and the idempotent write."""

from __future__ import annotations

from dataclasses import asdict, replace
from decimal import Decimal

import pytest

from accounts.models import UsageRecord
from accounts.tasks import usage_record_batch_task, usage_record_task
from accounts.usage import (
    UsageContext,
    UsageEvent,
    usage_account,
    usage_context,
    usage_context_served_by,
    usage_flush,
    usage_record_many,
)
from tests.factories import ConversationFactory, LLMModelFactory, MessageFactory

pytestmark = pytest.mark.django_db(transaction=True)  # the sender thread writes on its own connection


def account(context: UsageContext, **overrides) -> UsageEvent:
    fields = {
        "finish_status": "completed",
        "prompt_tokens": 1234,
        "completion_tokens": 567,
        "token_source": "estimated",
        "produced_output": True,
        **overrides,
    }
    return usage_account(context=context, **fields)


def test_a_completed_reply_is_priced_per_million_tokens_and_written(context):
    event = account(context)

    assert usage_flush(10)
    record = UsageRecord.objects.get()
    expected = (Decimal(1234) * Decimal("0.15") + Decimal(567) * Decimal("0.6")) / Decimal(1_000_000)
    assert expected == Decimal("0.0005253")
    assert event is not None and Decimal(event.cost) == expected
    assert isinstance(record.cost, Decimal)
    assert record.cost == expected
    assert record.total_tokens == 1801
    assert record.token_source == "estimated"
    assert record.finish_status == "completed"
    assert record.model_id == context.model_id


def test_the_token_breakdown_is_stored_and_priced_at_the_cache_prices(user):
    context = usage_context(
        request_id="chatcmpl-cached",
        source=UsageRecord.Source.OPENAI_API,
        user_id=user.id,
        api_key_id=None,
        model=LLMModelFactory(
            name="cached",
            input_price_per_million=Decimal(3),
            output_price_per_million=Decimal(15),
            cached_input_price_per_million=Decimal("0.3"),
            cache_write_price_per_million=Decimal("3.75"),
        ),
    )
    event = account(
        context,
        prompt_tokens=10_000,
        completion_tokens=500,
        cached_tokens=6_000,
        cache_creation_tokens=3_000,
        reasoning_tokens=200,
        token_source="provider",
    )

    assert usage_flush(10)
    record = UsageRecord.objects.get(request_id="chatcmpl-cached")
    fields = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_creation_tokens", "reasoning_tokens")
    assert tuple(getattr(record, name) for name in fields) == (10_000, 500, 6_000, 3_000, 200)
    # (1000 fresh * 3 + 6000 cached * 0.3 + 3000 written * 3.75 + 500 * 15) / 1e6; reasoning is output.
    assert record.cost == Decimal(event.cost) == Decimal("0.02355")


def test_a_reply_a_fallback_served_keeps_its_subject_and_takes_the_fallbacks_name_and_prices(context):
    message = MessageFactory()
    started = replace(context, source=UsageRecord.Source.CONVERSATION, api_key_id=None, message_id=message.pk)
    fallback = LLMModelFactory(
        name="fallback",
        input_price_per_million=Decimal(2),
        output_price_per_million=Decimal(8),
        cached_input_price_per_million=Decimal("0.5"),
        cache_write_price_per_million=Decimal("2.5"),
    )

    served = usage_context_served_by(started, model=fallback)

    model_fields = {
        "model_id": fallback.pk,
        "model_name": "fallback",
        "input_price_per_million": Decimal(2),
        "output_price_per_million": Decimal(8),
        "cached_input_price_per_million": Decimal("0.5"),
        "cache_write_price_per_million": Decimal("2.5"),
    }
    # Every field but the model's is the started reply's: none is dropped or reset to its default.
    assert asdict(served) == {**asdict(started), **model_fields}
    account(served)
    assert usage_flush(10)
    record = UsageRecord.objects.get()
    assert (record.model_id, record.model_name, record.message_id) == (fallback.pk, "fallback", message.pk)
    assert record.cost == (Decimal(1234) * 2 + Decimal(567) * 8) / Decimal(1_000_000)


def test_an_unbilled_reply_stores_no_breakdown(context):
    account(context, finish_status="failed", produced_output=False, cached_tokens=5, reasoning_tokens=3)

    assert usage_flush(10)
    record = UsageRecord.objects.get()
    assert (record.cached_tokens, record.cache_creation_tokens, record.reasoning_tokens, record.cost) == (0, 0, 0, 0)


def test_a_batch_queued_before_the_breakdown_is_recorded_with_zeros(context):
    event = account(context)
    assert usage_flush(10)
    UsageRecord.objects.all().delete()
    fields = {**asdict(event), "request_id": "chatcmpl-before-breakdown"}
    for name in ("cached_tokens", "cache_creation_tokens", "reasoning_tokens"):
        del fields[name]

    assert usage_record_batch_task.delay([fields]).get(timeout=10) == 1

    record = UsageRecord.objects.get()
    assert (record.prompt_tokens, record.cached_tokens, record.reasoning_tokens) == (1234, 0, 0)


@pytest.mark.parametrize(
    ("finish_status", "produced_output", "billed"),  # each is recorded once; billed: tokens and cost
    [
        ("completed", True, True),
        ("cancelled", False, True),  # stopped before the first token: the prompt was still read
        ("cancelled", True, True),
        ("failed", True, True),  # failed mid-way: what was generated counts
        ("failed", False, False),  # failed before any output: nothing to bill
    ],
)
def test_which_replies_are_billed(context, finish_status, produced_output, billed):
    event = account(context, finish_status=finish_status, produced_output=produced_output)

    assert usage_flush(10)
    record = UsageRecord.objects.get(request_id="chatcmpl-123")
    assert record.finish_status == event.finish_status == finish_status
    assert (record.total_tokens > 0, record.cost > 0) == (billed, billed)


def test_the_write_is_idempotent_by_request_id(context):
    first = account(context)
    assert first is not None
    assert usage_flush(10)

    assert usage_record_many([replace(first, prompt_tokens=9999)]) == 0
    assert UsageRecord.objects.count() == 1
    assert UsageRecord.objects.get().prompt_tokens == 1234


def test_one_batch_with_an_id_twice_writes_it_once(context):
    event = UsageEvent(
        request_id="chatcmpl-twice",
        source=context.source,
        user_id=context.user_id,
        api_key_id=None,
        model_id=context.model_id,
        model_name=context.model_name,
        message_id=None,
        prompt_tokens=1,
        completion_tokens=2,
        cost="0",
        token_source="provider",
        finish_status="completed",
    )

    assert usage_record_many([event, replace(event, prompt_tokens=5)]) == 1
    assert UsageRecord.objects.get(request_id="chatcmpl-twice").prompt_tokens == 1


def test_a_redelivered_batch_writes_nothing_twice(context):
    event = account(context)
    assert event is not None
    assert usage_flush(10)
    payload = [asdict(event)]

    redelivered = usage_record_batch_task.delay(payload).get(timeout=10)

    assert redelivered == 0
    assert UsageRecord.objects.count() == 1


def test_a_task_queued_by_an_older_release_is_still_recorded_at_current_prices(user, priced_model):
    fields = {
        "request_id": "message-old",
        "user_id": user.id,
        "api_key_id": None,
        "model_id": priced_model.id,
        "model_name": priced_model.name,
        "message_id": None,
        "source": UsageRecord.Source.CONVERSATION,
        "prompt_tokens": 1000,
        "completion_tokens": 1000,
        "estimated": False,
        "finish_status": "completed",
    }

    assert usage_record_task.delay(**fields).get(timeout=10) == 1
    assert usage_record_task.delay(**fields).get(timeout=10) == 0
    assert UsageRecord.objects.get().cost == Decimal("0.00075")


def test_usage_of_a_message_deleted_before_the_write_is_kept_unlinked(context, user):
    message = MessageFactory(conversation=ConversationFactory(owner=user), role="assistant")
    message_id = message.pk
    message.conversation.delete()
    linked = replace(context, message_id=message_id)

    account(linked)

    assert usage_flush(10)
    record = UsageRecord.objects.get()
    assert record.message_id is None
    assert record.prompt_tokens == 1234


def test_a_batch_queued_before_token_source_is_recorded_with_its_estimated_flag(context):
    event = account(context, token_source="counted")
    assert event is not None
    assert usage_flush(10)
    UsageRecord.objects.all().delete()
    legacy = []
    for request_id, estimated in (("chatcmpl-old-1", True), ("chatcmpl-old-2", False)):
        fields = {**asdict(event), "request_id": request_id, "estimated": estimated}
        del fields["token_source"]
        legacy.append(fields)

    assert usage_record_batch_task.delay(legacy).get(timeout=10) == 2

    sources = dict(UsageRecord.objects.values_list("request_id", "token_source"))
    assert sources == {"chatcmpl-old-1": "estimated", "chatcmpl-old-2": "provider"}


def test_a_batch_queued_by_a_newer_release_is_recorded_without_the_fields_it_does_not_know(context, caplog):
    event = account(context)
    assert event is not None
    assert usage_flush(10)
    UsageRecord.objects.all().delete()
    newer = {**asdict(event), "request_id": "chatcmpl-newer-1", "audio_tokens": 7}  # a field of a later release

    assert usage_record_batch_task.delay([newer]).get(timeout=10) == 1

    record = UsageRecord.objects.get()
    assert (record.request_id, record.prompt_tokens) == ("chatcmpl-newer-1", event.prompt_tokens)
    assert "audio_tokens" in caplog.text
