"""Fixtures for the accounts tests."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.core.cache import cache

from accounts.apis import AuthRateThrottle
from accounts.models import UsageRecord
from accounts.usage import UsageContext
from tests.factories import LLMModelFactory

# APIClient requests come from 127.0.0.1; these are the throttles' cache keys for that address.
_THROTTLE_KEYS = [f"throttle_{scope}_127.0.0.1" for scope in AuthRateThrottle.DEFAULT_RATES]


@pytest.fixture(autouse=True)
def _fresh_auth_throttles() -> Iterator[None]:
    """Start every test with empty login/registration throttles (the cache may be a shared Redis)."""
    cache.delete_many(_THROTTLE_KEYS)
    yield
    cache.delete_many(_THROTTLE_KEYS)


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
