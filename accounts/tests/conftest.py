"""Fixtures for the accounts tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.core.cache import cache

from accounts.apis import AuthRateThrottle
from tests.factories import UserFactory

# APIClient requests come from 127.0.0.1; these are the throttles' cache keys for that address.
_THROTTLE_KEYS = [f"throttle_{scope}_127.0.0.1" for scope in AuthRateThrottle.DEFAULT_RATES]


@pytest.fixture(autouse=True)
def _fresh_auth_throttles() -> Iterator[None]:
    """Start every test with empty login/registration throttles (the cache may be a shared Redis)."""
    cache.delete_many(_THROTTLE_KEYS)
    yield
    cache.delete_many(_THROTTLE_KEYS)


@pytest.fixture
def superuser(db):
    return UserFactory(is_superuser=True, is_staff=True)
