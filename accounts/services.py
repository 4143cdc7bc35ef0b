"""Writes for accounts: registration, API keys, usage records."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.contrib.auth.password_validation import validate_password
from django.db import IntegrityError, transaction
from django.utils import timezone

from chatbackend.errors import NotFoundError

from .keys import display_prefix, generate_secret, hash_secret
from .models import APIKey, UsageRecord, User


def user_register(*, username: str, password: str, email: str = "") -> User:
    """Create a ``member`` user. Raises Django's ``ValidationError`` for a weak password."""
    user = User(username=username, email=email, role=User.Role.MEMBER)
    validate_password(password, user=user)
    user.set_password(password)
    user.save()
    return user


@dataclass(frozen=True, slots=True)
class CreatedAPIKey:
    """A new key and its secret; the secret exists only here, once, and is never stored."""

    api_key: APIKey
    secret: str


def api_key_create(*, user: User, name: str) -> CreatedAPIKey:
    """Create an API key for ``user``; return it with its one-time ``sk-...`` secret."""
    secret = generate_secret()
    api_key = APIKey.objects.create(user=user, name=name, prefix=display_prefix(secret), key_hash=hash_secret(secret))
    return CreatedAPIKey(api_key=api_key, secret=secret)


def api_key_revoke(*, user: User, api_key_id: int) -> APIKey:
    """Revoke ``user``'s key ``api_key_id`` (idempotent). Raises ``NotFoundError`` for another's key."""
    try:
        api_key = APIKey.objects.get(pk=api_key_id, user=user)
    except APIKey.DoesNotExist:
        raise NotFoundError("API key not found.", code="api_key_not_found") from None
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


_MILLION = Decimal(1_000_000)


def usage_cost(*, prompt_tokens: int, completion_tokens: int, input_price: Decimal, output_price: Decimal) -> Decimal:
    """Return the cost in US dollars: tokens times the per-million-token prices, over one million."""
    return (Decimal(prompt_tokens) * input_price + Decimal(completion_tokens) * output_price) / _MILLION


def usage_record(
    *,
    request_id: str,
    user_id: int,
    api_key_id: int | None,
    model_id: int | None,
    model_name: str,
    message_id: int | None,
    source: str,
    prompt_tokens: int,
    completion_tokens: int,
    estimated: bool,
    finish_status: str,
) -> UsageRecord | None:
    """Record one reply's usage, priced at the model's current prices; idempotent by ``request_id``.

    Returns the new record, or None when ``request_id`` was already recorded (a redelivered task).
    """
    # accounts must not import llm or conversations at module load (they import accounts).
    from conversations.models import Message
    from llm.models import LLMModel

    # No model (``model_id`` None): no prices, the same as a model deleted before the task ran.
    prices = (
        LLMModel.objects.filter(pk=model_id).values("input_price_per_million", "output_price_per_million").first()
        if model_id is not None
        else None
    )
    cost = Decimal(0)
    if prices:
        cost = usage_cost(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            input_price=prices["input_price_per_million"],
            output_price=prices["output_price_per_million"],
        )
    # The message or key may be deleted before the task runs (a conversation deleted mid-stream):
    # the usage still counts, unlinked, rather than failing on the foreign key.
    if message_id is not None and not Message.objects.filter(pk=message_id).exists():
        message_id = None
    if api_key_id is not None and not APIKey.objects.filter(pk=api_key_id).exists():
        api_key_id = None
    try:
        with transaction.atomic():
            return UsageRecord.objects.create(
                request_id=request_id,
                user_id=user_id,
                api_key_id=api_key_id,
                model_id=model_id if prices else None,
                model_name=model_name,
                message_id=message_id,
                source=source,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cost=cost,
                estimated=estimated,
                finish_status=finish_status,
            )
    except IntegrityError:
        if UsageRecord.objects.filter(request_id=request_id).exists():
            return None
        raise


def usage_enqueue(**fields: object) -> None:
    """Queue ``usage_record_task`` with ``fields`` once the current transaction commits.

    Takes the same keyword arguments as ``usage_record``. Without a transaction it queues at once.
    """
    from .tasks import usage_record_task  # tasks import this module

    transaction.on_commit(lambda: usage_record_task.delay(**fields))
