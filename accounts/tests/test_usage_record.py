"""The usage_record service and its Celery task: priced from the model, idempotent by request_id."""

from __future__ import annotations

from decimal import Decimal

import pytest

from accounts.models import UsageRecord
from accounts.services import usage_enqueue, usage_record
from accounts.tasks import usage_record_task
from tests.factories import LLMModelFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def priced_model(db):
    return LLMModelFactory(name="priced", input_price_per_million="0.150000", output_price_per_million="0.600000")


@pytest.fixture
def fields(user, priced_model) -> dict:
    return {
        "request_id": "chatcmpl-123",
        "user_id": user.id,
        "api_key_id": None,
        "model_id": priced_model.id,
        "model_name": priced_model.name,
        "message_id": None,
        "source": UsageRecord.Source.OPENAI_API,
        "prompt_tokens": 1234,
        "completion_tokens": 567,
        "estimated": True,
        "finish_status": "stop",
    }


def test_usage_record_prices_tokens_per_million(fields):
    record = usage_record(**fields)

    record.refresh_from_db()
    expected = (Decimal(1234) * Decimal("0.15") + Decimal(567) * Decimal("0.6")) / Decimal(1_000_000)
    assert expected == Decimal("0.0005253")
    assert isinstance(record.cost, Decimal)
    assert record.cost == expected
    assert record.total_tokens == 1801
    assert record.estimated is True


def test_usage_record_is_idempotent_by_request_id(fields):
    first = usage_record(**fields)
    second = usage_record(**{**fields, "prompt_tokens": 9999})

    assert first is not None
    assert second is None
    assert UsageRecord.objects.count() == 1
    assert UsageRecord.objects.get().prompt_tokens == 1234


def test_usage_record_task_writes_once_and_a_redelivery_writes_nothing(fields):
    record_id = usage_record_task.delay(**fields).get(timeout=10)
    redelivered = usage_record_task.delay(**fields).get(timeout=10)

    assert UsageRecord.objects.count() == 1
    assert UsageRecord.objects.get().pk == record_id
    assert redelivered is None


def test_usage_enqueue_records_after_commit(fields, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        usage_enqueue(**fields)
        assert not UsageRecord.objects.exists()  # nothing before the commit

    assert len(callbacks) == 1
    assert UsageRecord.objects.get().request_id == "chatcmpl-123"


def test_usage_of_a_message_deleted_before_the_task_runs_is_kept_unlinked(fields, user):
    from tests.factories import ConversationFactory, MessageFactory

    message = MessageFactory(conversation=ConversationFactory(owner=user), role="assistant")
    message_id = message.pk
    message.conversation.delete()

    record = usage_record(**{**fields, "message_id": message_id})

    assert record is not None
    assert record.message_id is None
    assert record.prompt_tokens == 1234
