"""Fixtures for the accounts tests."""

from __future__ import annotations

from decimal import Decimal

import pytest

from accounts.models import UsageRecord
from accounts.usage import UsageContext
from tests.factories import LLMModelFactory


@pytest.fixture
def priced_model(db):
    """``priced``: 0.15 USD per million input tokens, 0.60 per million output tokens."""
    return LLMModelFactory(name="priced", input_price_per_million="0.150000", output_price_per_million="0.600000")


@pytest.fixture
def context(user, priced_model) -> UsageContext:
    """The accounting context of a ``/v1`` reply of ``user`` on ``priced_model`` (request ``chatcmpl-123``)."""
    return UsageContext(
        request_id="chatcmpl-123",
        source=UsageRecord.Source.OPENAI_API,
        user_id=user.id,
        api_key_id=None,
        model_id=priced_model.id,
        model_name=priced_model.name,
        input_price_per_million=Decimal("0.15"),
        output_price_per_million=Decimal("0.6"),
    )
