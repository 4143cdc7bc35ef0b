"""Request and response shapes of ``/api/templates/`` (``docs/api.md``, "Templates").

Input serializers validate; the services write. NextChat's mask is documented here
(``NextChatMaskSerializer``) and converted by ``nextchat``.
"""

from __future__ import annotations

from typing import Any

from django.core.validators import RegexValidator
from rest_framework import serializers

from chatbackend.fields import ID_MAX, StrictCharField
from conversations.serializers import NOT_BLANK_PATTERN, parameter_field
from conversations.services import MAX_MESSAGE_CHARS, MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS
from llm.openai.fields import StrictIntegerField

from .models import ConversationTemplate
from .nextchat import MAX_NAME_CHARS, MAX_SAFE_INTEGER, MAX_STARTER_MESSAGES, PARAMETER_RANGES, STARTER_ROLES
from .selectors import template_may_change


class TemplateStarterMessageSerializer(serializers.Serializer):
    """One starter message: ``{role, content}``."""

    role = serializers.ChoiceField(choices=STARTER_ROLES)
    content = StrictCharField(
        max_length=MAX_MESSAGE_CHARS, trim_whitespace=False, validators=[RegexValidator(NOT_BLANK_PATTERN)]
    )


class ConversationTemplateInputSerializer(serializers.Serializer):
    """A template to create (``name`` required), or replace (PUT) / change (PATCH, any subset).

    ``team``: with ``visibility`` ``team``, the id of a team of the organization the caller belongs
    to (admins: any team there); ignored otherwise.
    """

    name = StrictCharField(max_length=MAX_NAME_CHARS, validators=[RegexValidator(NOT_BLANK_PATTERN)])
    system_prompt = StrictCharField(
        max_length=MAX_SYSTEM_PROMPT_CHARS, allow_blank=True, required=False, default="", trim_whitespace=False
    )
    model = StrictCharField(
        source="model_name",
        max_length=200,
        allow_blank=True,
        required=False,
        default="",
        help_text="A model or alias name; blank: the conversation names it.",
    )
    temperature = parameter_field("temperature")
    top_p = parameter_field("top_p")
    max_tokens = parameter_field("max_tokens")
    presence_penalty = parameter_field("presence_penalty")
    frequency_penalty = parameter_field("frequency_penalty")
    starter_messages = serializers.ListField(
        child=TemplateStarterMessageSerializer(), max_length=MAX_STARTER_MESSAGES, required=False, default=list
    )
    visibility = serializers.ChoiceField(
        choices=ConversationTemplate.Visibility.choices, required=False, default=ConversationTemplate.Visibility.PRIVATE
    )
    team = StrictIntegerField(min_value=1, max_value=ID_MAX, allow_null=True, required=False, default=None)

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        values = super().to_internal_value(data)
        if "starter_messages" in values:
            values["starter_messages"] = [dict(message) for message in values["starter_messages"]]
        return values


class ConversationTemplateOutputSerializer(serializers.ModelSerializer):
    """A template. ``can_change``: whether the caller may change or delete it."""

    model = serializers.CharField(source="model_name", read_only=True)
    owner = serializers.IntegerField(source="owner_id", read_only=True)
    team = serializers.IntegerField(source="team_id", allow_null=True, read_only=True)
    starter_messages = TemplateStarterMessageSerializer(many=True, read_only=True)
    can_change = serializers.SerializerMethodField()

    class Meta:
        model = ConversationTemplate
        fields = [
            "id",
            "name",
            "system_prompt",
            "model",
            "temperature",
            "top_p",
            "max_tokens",
            "presence_penalty",
            "frequency_penalty",
            "starter_messages",
            "visibility",
            "team",
            "owner",
            "can_change",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_can_change(self, template: ConversationTemplate) -> bool:
        actor = self.context.get("actor")
        return actor is not None and template_may_change(actor=actor, template=template)


class TemplateConversationCreateInputSerializer(serializers.Serializer):
    """``{title?, model?}``: the conversation's title (default: the template's name) and a model
    instead of the template's."""

    title = StrictCharField(max_length=MAX_TITLE_CHARS, allow_blank=True, required=False, default="")
    model = StrictCharField(max_length=200, allow_blank=True, required=False, default="")


_STRING = {"type": "string"}
# NextChat's mask (``app/store/mask.ts``), as a raw OpenAPI schema: a serializer cannot have a field
# named ``context`` (DRF's serializer context). Other properties (``enableArtifacts``...) pass through.
NEXTCHAT_MASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A NextChat mask (app/store/mask.ts). The first context message, when a system one, is the "
    "system prompt.",
    "required": ["name"],
    "properties": {
        "id": {"type": "string", "maxLength": 100},
        "createdAt": {
            "type": "integer",
            "minimum": -MAX_SAFE_INTEGER,
            "maximum": MAX_SAFE_INTEGER,
            "description": "Unix milliseconds (a JavaScript number: at most Number.MAX_SAFE_INTEGER in size)",
        },
        "avatar": {"type": "string", "maxLength": 100},
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS, "pattern": NOT_BLANK_PATTERN},
        "hideContext": {"type": "boolean"},
        "context": {
            "type": "array",
            "maxItems": MAX_STARTER_MESSAGES,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "id": _STRING,
                    "date": _STRING,
                    "role": {"type": "string", "enum": list(STARTER_ROLES)},
                    "content": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_MESSAGE_CHARS,
                        "pattern": NOT_BLANK_PATTERN,
                    },
                },
            },
        },
        "syncGlobalConfig": {"type": "boolean"},
        "modelConfig": {
            "type": "object",
            "properties": {
                "model": {"type": "string", "maxLength": 200},
                **{
                    name: {
                        "type": "integer" if integer else "number",
                        "minimum": low,
                        "maximum": high,
                        "nullable": True,
                    }
                    for name, (low, high, integer) in PARAMETER_RANGES.items()
                },
            },
        },
        "lang": {"type": "string", "maxLength": 16},
        "builtin": {"type": "boolean"},
        "plugin": {"type": "array", "items": _STRING},
    },
}


class TemplateImportOutputSerializer(serializers.Serializer):
    """The templates an import created or updated, in the document's order."""

    templates = ConversationTemplateOutputSerializer(many=True)
