"""API key secrets: generation and hashing.

Secrets are ``sk-`` followed by 48 URL-safe random characters (~286 bits from ``secrets``).
Because they are random and long, a single SHA-256 is the right digest (as GitHub and Stripe
do for tokens): a slow password hash would add milliseconds to every request and buy nothing
against brute force of a 286-bit secret.
"""

from __future__ import annotations

import hashlib
import secrets

API_KEY_PREFIX = "sk-"
_DISPLAY_PREFIX_LENGTH = 10  # "sk-" + 7 characters, shown in lists so users can tell keys apart


def generate_secret() -> str:
    """Return a new API key secret, ``sk-`` + 48 URL-safe characters."""
    return API_KEY_PREFIX + secrets.token_urlsafe(36)


def hash_secret(secret: str) -> str:
    """Return the hex SHA-256 digest (64 characters) under which ``secret`` is stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    """Return the public, non-secret start of ``secret`` (10 characters)."""
    return secret[:_DISPLAY_PREFIX_LENGTH]


def looks_like_api_key(token: str) -> bool:
    """Return True when ``token`` has our API key form (as opposed to a JWT)."""
    return token.startswith(API_KEY_PREFIX)
