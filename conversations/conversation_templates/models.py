"""A conversation template: what a new conversation starts with, and who may use it."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from accounts.models import Organization, Team


class ConversationTemplate(models.Model):
    """A system prompt, a model name, parameters and starter messages to start conversations from.

    NextChat calls it a mask (``app/store/mask.ts``); ``external_id``, ``avatar``, ``lang`` and
    ``nextchat`` keep what a NextChat mask carries beyond that, so an imported mask exports as it
    came (``conversation_templates.nextchat``).

    ``model_name``: a model or alias name, resolved against what the caller may use when a
    conversation starts (a shared template may name a model some members may not use). The
    parameters are OpenAI request fields (null: the model's default). ``starter_messages``:
    ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, the first turns of every
    conversation made from it. ``visibility``: ``private`` (the owner), ``team`` (``team``'s
    members), ``organization`` (every member of ``organization``).
    """

    class Visibility(models.TextChoices):
        PRIVATE = "private", "Private"
        TEAM = "team", "Team"
        ORGANIZATION = "organization", "Organization"

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="conversation_templates")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversation_templates")
    name = models.CharField(max_length=200)
    system_prompt = models.TextField(blank=True, default="")
    model_name = models.CharField(max_length=200, blank=True, default="", help_text="a model or alias name")
    temperature = models.FloatField(null=True, blank=True)
    top_p = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    presence_penalty = models.FloatField(null=True, blank=True)
    frequency_penalty = models.FloatField(null=True, blank=True)
    starter_messages = models.JSONField(default=list, blank=True)
    visibility = models.CharField(max_length=16, choices=Visibility.choices, default=Visibility.PRIVATE)
    # With ``team`` visibility: the team shared with (of ``organization``). A deleted team leaves
    # the template to its owner alone.
    team = models.ForeignKey(
        Team, on_delete=models.SET_NULL, null=True, blank=True, related_name="conversation_templates"
    )
    # NextChat's mask id when imported from a mask: importing it again updates this template.
    external_id = models.CharField(max_length=100, blank=True, default="")
    avatar = models.CharField(max_length=100, blank=True, default="")
    lang = models.CharField(max_length=16, blank=True, default="")
    # The rest of an imported mask (``hideContext``, ``plugin``, ``modelConfig``'s other fields...).
    nextchat = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]
        indexes = [
            models.Index(fields=["organization", "owner"], name="template_org_owner_idx"),
            models.Index(fields=["organization", "visibility"], name="template_org_visibility_idx"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "owner", "external_id"],
                condition=~models.Q(external_id=""),
                name="template_external_id_unique",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def parameters(self) -> dict[str, float | int]:
        """Return the parameters set, as OpenAI request fields (``{"temperature": 0.5, ...}``)."""
        values = {name: getattr(self, name) for name in PARAMETER_NAMES}
        return {name: value for name, value in values.items() if value is not None}


# The OpenAI request fields a template (and a conversation made from one) may set.
PARAMETER_NAMES = ("temperature", "top_p", "max_tokens", "presence_penalty", "frequency_penalty")
