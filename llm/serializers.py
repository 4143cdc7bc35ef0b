"""Response shapes of the models API."""

from __future__ import annotations

from rest_framework import serializers

from .models import LLMModel


class LLMModelOutputSerializer(serializers.ModelSerializer):
    """A model users may pick; prices are US dollars per million tokens, as decimal strings (the cache
    prices null when the model has none: the input price applies)."""

    default_parameters = serializers.DictField(
        read_only=True, help_text="OpenAI request fields applied when the client does not send them"
    )

    class Meta:
        model = LLMModel
        fields = [
            "name",
            "context_window",
            "input_price_per_million",
            "output_price_per_million",
            "cached_input_price_per_million",
            "cache_write_price_per_million",
            "default_parameters",
        ]
        read_only_fields = fields
