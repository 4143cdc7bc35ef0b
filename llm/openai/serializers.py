"""DRF serializers for ``/v1/models`` and NextChat's ``/dashboard/billing`` endpoints.

The output serializers only document the bodies in OpenAPI: the views build those bodies as
plain dicts. ``BillingUsageQuerySerializer`` validates the billing usage query.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from accounts.selectors import usage_current_month


class OpenAIModelOutputSerializer(serializers.Serializer):
    """A model as ``/v1/models`` lists it (OpenAI's ``Model``)."""

    id = serializers.CharField()
    object = serializers.ChoiceField(choices=("model",))
    created = serializers.IntegerField(help_text="Unix time, seconds")
    owned_by = serializers.CharField(help_text="the provider's name")


class OpenAIModelListOutputSerializer(serializers.Serializer):
    """``GET /v1/models`` (OpenAI's ``ListModelsResponse``)."""

    object = serializers.ChoiceField(choices=("list",))
    # The metaclass moves declared fields out of the class body: this does not replace ``.data``.
    data = OpenAIModelOutputSerializer(many=True)  # type: ignore[assignment]


class BillingUsageQuerySerializer(serializers.Serializer):
    """The query of ``GET /dashboard/billing/usage``: a date range in ``TIME_ZONE``, end exclusive.

    Either date may be left out (NextChat's server mode relays the request without its query
    string): ``start_date`` then defaults to the first day of the current calendar month,
    ``end_date`` to the first day of the next one, both in ``settings.TIME_ZONE``
    (``accounts.selectors.usage_current_month``).
    """

    start_date = serializers.DateField(
        input_formats=["%Y-%m-%d"],
        required=False,
        help_text="YYYY-MM-DD, inclusive; default: the first day of the current month (TIME_ZONE)",
    )
    end_date = serializers.DateField(
        input_formats=["%Y-%m-%d"],
        required=False,
        help_text="YYYY-MM-DD, exclusive; default: the first day of the next month (TIME_ZONE)",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        month_start, month_end = usage_current_month()
        attrs = {"start_date": month_start, "end_date": month_end, **attrs}
        if attrs["end_date"] < attrs["start_date"]:
            raise serializers.ValidationError({"end_date": "Must not be before start_date."})
        return attrs


class BillingUsageOutputSerializer(serializers.Serializer):
    """The caller's spending in the range, as NextChat reads it."""

    object = serializers.ChoiceField(choices=("list",))
    total_usage = serializers.FloatField(help_text="US cents")


class BillingSubscriptionOutputSerializer(serializers.Serializer):
    """The caller's spending limit, as NextChat reads it (``hard_limit_usd``)."""

    object = serializers.ChoiceField(choices=("billing_subscription",))
    has_payment_method = serializers.BooleanField()
    hard_limit_usd = serializers.FloatField()
    soft_limit_usd = serializers.FloatField()
    system_hard_limit_usd = serializers.FloatField()
    access_until = serializers.IntegerField(help_text="Unix time, seconds; 0: no end")


__all__ = [
    "BillingSubscriptionOutputSerializer",
    "BillingUsageOutputSerializer",
    "BillingUsageQuerySerializer",
    "OpenAIModelListOutputSerializer",
    "OpenAIModelOutputSerializer",
]
