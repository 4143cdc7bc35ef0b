"""DRF serializer that validates the top-level fields of ``POST /v1/responses``.

The request follows OpenAI's ``CreateResponse`` (https://platform.openai.com/docs/api-reference/responses/create;
``components.schemas.CreateResponse`` of /work/shared/specs/openai-openapi.yaml). This serializer
checks the JSON types of the fields we take, so a wrong type is a 400 whose ``param`` names the
field; what the fields *mean* (input items, tools, unsupported features) is
``responses_translate``'s job, which names the exact path at fault (``input[2].content[0].type``).
"""

from __future__ import annotations

from rest_framework import serializers

from .fields import (
    JSONObjectField,
    MetadataField,
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
)


class ResponseCreateInputSerializer(serializers.Serializer):
    """The typed top-level fields of a Responses request; nested shapes are checked by the translator."""

    model = StrictCharField(max_length=200)
    input = serializers.JSONField(help_text="A string, or a list of input items (docs/api.md says which).")
    instructions = StrictCharField(required=False, allow_null=True, allow_blank=True)
    stream = StrictBooleanField(required=False, allow_null=True)
    max_output_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    temperature = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=2)
    top_p = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=1)
    parallel_tool_calls = StrictBooleanField(required=False, allow_null=True)
    store = StrictBooleanField(required=False, allow_null=True)
    background = StrictBooleanField(required=False, allow_null=True)
    metadata = MetadataField(required=False, allow_null=True)
    reasoning = JSONObjectField(required=False, allow_null=True)
    text = JSONObjectField(required=False, allow_null=True)
    tools = serializers.ListField(child=JSONObjectField(), required=False, allow_null=True)
    tool_choice = serializers.JSONField(required=False, allow_null=True)
    user = StrictCharField(required=False, allow_null=True, allow_blank=True)
    safety_identifier = StrictCharField(required=False, allow_null=True, allow_blank=True, max_length=64)
    prompt_cache_key = StrictCharField(required=False, allow_null=True, allow_blank=True)
    service_tier = StrictCharField(required=False, allow_null=True)
    truncation = StrictCharField(required=False, allow_null=True)
    previous_response_id = StrictCharField(required=False, allow_null=True, allow_blank=True)
    include = serializers.ListField(child=StrictCharField(), required=False, allow_null=True)
    stream_options = JSONObjectField(required=False, allow_null=True)


class ResponseOutputSerializer(serializers.Serializer):
    """Documents the ``response`` object (OpenAI's ``Response``); the view builds it as a plain dict."""

    id = serializers.CharField(help_text="`resp_` + 32 hex digits; the usage record's `request_id`.")
    object = serializers.ChoiceField(choices=["response"])
    created_at = serializers.IntegerField(help_text="Unix seconds.")
    status = serializers.ChoiceField(choices=["completed", "incomplete", "failed", "in_progress"])
    model = serializers.CharField()
    output = serializers.ListField(
        child=serializers.DictField(), help_text="`reasoning`, `message` and `function_call` items."
    )


__all__ = ["ResponseCreateInputSerializer", "ResponseOutputSerializer"]
