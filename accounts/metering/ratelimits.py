"""Rate limits per subject (requests and tokens per minute, concurrent streams). Placeholder: allows all."""

from __future__ import annotations

from collections.abc import Sequence

from .types import MeteringSubject


class RateLease:
    """What a request holds while it runs: its concurrency slot; ``headers`` are OpenAI's ``x-ratelimit-*``."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    async def release(self, *, completion_tokens: int) -> None:
        """Free the request's concurrency slot and count its completion tokens. Idempotent."""


async def rate_limit_acquire(*, request_id: str, subjects: Sequence[MeteringSubject], prompt_tokens: int) -> RateLease:
    """Count one request of ``prompt_tokens`` against every subject's limits; return its lease."""
    return RateLease()


__all__ = ["RateLease", "rate_limit_acquire"]
