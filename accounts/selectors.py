"""Reads for accounts: API key lookup and listing, usage records, users."""

from __future__ import annotations

import datetime as dt
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import Q, QuerySet, Sum
from django.utils import timezone

from chatbackend.errors import ApplicationError, NotFoundError

from .keys import hash_secret
from .models import APIKey, Budget, UsageRecord, User
from .services import api_key_last_used_update


class AuthenticationFailed(ApplicationError):
    """Credentials are missing, wrong, expired or revoked (HTTP 401)."""

    def __init__(self, message: str = "Invalid API key or token.", *, code: str = "invalid_api_key") -> None:
        super().__init__(message, code=code, status=401)


def api_key_authenticate(*, secret: str) -> APIKey:
    """Return the active ``APIKey`` (with its user loaded) whose secret is ``secret``.

    Updates ``last_used_at`` at most once per ``API_KEY_LAST_USED_RESOLUTION_SECONDS`` so
    authentication is not a write per request. Raises ``AuthenticationFailed`` for an unknown or
    revoked key, or an inactive user. Sync: call through ``sync_to_async`` from async code.
    """
    try:
        api_key = APIKey.objects.select_related("user").get(key_hash=hash_secret(secret))
    except APIKey.DoesNotExist:
        raise AuthenticationFailed("Incorrect API key provided.") from None
    if not api_key.is_active:
        raise AuthenticationFailed("This API key has been revoked.", code="api_key_revoked")
    if not api_key.user.is_active:
        raise AuthenticationFailed("This account is disabled.", code="user_inactive")
    now = timezone.now()
    resolution = timedelta(seconds=settings.API_KEY_LAST_USED_RESOLUTION_SECONDS)
    if api_key.last_used_at is None or now - api_key.last_used_at >= resolution:
        api_key_last_used_update(api_key_id=api_key.pk, at=now)
        api_key.last_used_at = now
    return api_key


def api_key_list(*, user: User) -> QuerySet[APIKey]:
    """Return ``user``'s API keys, newest first (revoked ones included, marked by ``revoked_at``)."""
    return APIKey.objects.filter(user=user)


def usage_record_list(*, user: User) -> QuerySet[UsageRecord]:
    """Return the usage records ``user`` may see, newest first: admins everyone's, members their own."""
    records = UsageRecord.objects.select_related("api_key", "user").order_by("-created_at", "-id")
    return records if user.is_admin else records.filter(user=user)


def usage_cost_total(*, user: User, start_date: dt.date, end_date: dt.date) -> Decimal:
    """Return what ``user`` spent from ``start_date`` (inclusive) to ``end_date`` (exclusive), in US dollars.

    Days are midnights in ``settings.TIME_ZONE``; the sum is of ``UsageRecord.cost``.
    """
    tz = timezone.get_default_timezone()
    start = dt.datetime.combine(start_date, dt.time.min, tzinfo=tz)
    end = dt.datetime.combine(end_date, dt.time.min, tzinfo=tz)
    records = UsageRecord.objects.filter(user=user, created_at__gte=start, created_at__lt=end)
    return records.aggregate(total=Sum("cost"))["total"] or Decimal(0)


def usage_current_month(*, now: dt.datetime | None = None) -> tuple[dt.date, dt.date]:
    """Return ``(first day of this month, first day of next month)``: the current calendar month.

    The month is the one ``now`` (default: the current time) falls in, in ``settings.TIME_ZONE``;
    the end is exclusive, as ``usage_cost_total`` takes it.
    """
    today = timezone.localdate(now, timezone=timezone.get_default_timezone())
    start = today.replace(day=1)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end


def budget_monthly_limit_usd(*, user: User, api_key: APIKey | None) -> Decimal | None:
    """Return the tightest monthly US-dollar limit on what ``user`` may spend through ``api_key``, or None.

    The limit is the smallest ``limit_usd`` of the enabled monthly budgets of the key (when the
    caller used one) and of its user: every budget applies to a request, so the tightest one is
    what the caller can spend this month. None when no monthly budget applies; callers then
    report their documented fallback (``/dashboard/billing/subscription``:
    ``settings.OPENAI_BILLING_HARD_LIMIT_USD``).

    Budgets (``accounts.models.Budget``) are not merged yet: until they are, there is no budget
    and this returns None.
    """
    return None


def user_list(*, actor: User) -> QuerySet[User]:
    """Return every user, oldest first, for an admin ``actor``.

    Raises ``ApplicationError`` 403 ``permission_denied`` when ``actor`` is not an admin.
    """
    if not actor.is_admin:
        raise ApplicationError("Only admins may list users.", code="permission_denied", status=403)
    return User.objects.order_by("date_joined", "id")


def budget_list_own(*, user: User) -> QuerySet[Budget]:
    """Return the budgets that limit ``user``: on the user, and on each of the user's API keys."""
    keys = APIKey.objects.filter(user=user).values("pk")
    return Budget.objects.filter(
        Q(subject_kind=Budget.SubjectKind.USER, subject_id=user.pk)
        | Q(subject_kind=Budget.SubjectKind.API_KEY, subject_id__in=keys)
    )


def budget_list(*, user: User) -> QuerySet[Budget]:
    """Return the budgets ``user`` may see: every budget for admins, their own (``budget_list_own``) for members."""
    return Budget.objects.all() if user.is_admin else budget_list_own(user=user)


def budget_get_for(*, user: User, budget_id: int) -> Budget:
    """Return budget ``budget_id`` if ``user`` may see it; raises ``NotFoundError`` (404) otherwise."""
    try:
        return budget_list(user=user).get(pk=budget_id)
    except (Budget.DoesNotExist, ValueError, TypeError):
        raise NotFoundError("Budget not found.", code="budget_not_found") from None
