"""Conversations and their messages."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from accounts.models import Organization, default_organization_id


class Conversation(models.Model):
    """A chat between one user and one model; its messages form a tree (``Message.parent``).

    ``active_leaf`` ends the active path (from it up to the root): the branch shown, the history
    sent upstream, and the parent of the next message.

    ``completion_id`` marks a stored chat completion: a ``POST /v1/chat/completions`` with
    ``store: true`` kept as a conversation (``services.stored_completion_save``), its ``chatcmpl-...``
    id; None for every other conversation. ``metadata``: OpenAI's key/value strings of a stored
    completion (at most 16 pairs; ``{}`` otherwise).

    ``parameters``: OpenAI request fields sent with every reply over the model's
    ``default_parameters`` (``temperature``, ``top_p``, ``max_tokens``, ``presence_penalty``,
    ``frequency_penalty``; set from a template). ``template``: the template it was made from, if any.
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="conversations", default=default_organization_id
    )
    title = models.CharField(max_length=200, blank=True, default="")
    model = models.ForeignKey("llm.LLMModel", on_delete=models.PROTECT, related_name="conversations")
    system_prompt = models.TextField(blank=True, default="")
    # NextChat's session id when the conversation came from a synced NextChat document
    # (``conversations.sync``): re-syncing updates it instead of adding a copy. Blank otherwise.
    external_id = models.CharField(max_length=100, blank=True, default="")
    # The branch shown and continued: the last message of the active path (``Message.parent``).
    # Null only while the conversation has no message.
    active_leaf = models.ForeignKey("Message", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    completion_id = models.CharField(max_length=64, null=True, blank=True, unique=True, default=None)
    metadata = models.JSONField(default=dict, blank=True)
    parameters = models.JSONField(default=dict, blank=True)
    template = models.ForeignKey(
        "ConversationTemplate", on_delete=models.SET_NULL, null=True, blank=True, related_name="conversations"
    )
    # Organizing (``services.conversation_organize``): pinned ones first in lists; archived ones
    # leave the default list; deleted ones sit in the trash (``deleted_at``: when they went there),
    # found by no lookup but the trash's, until restored or purged (``services.conversation_purge``).
    pinned = models.BooleanField(default=False)
    archived_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [
            models.Index(fields=["owner", "-updated_at"]),
            # The retention task's scans per organization: the trash by age.
            models.Index(
                fields=["organization", "deleted_at"],
                name="conversation_trash_idx",
                condition=models.Q(deleted_at__isnull=False),
            ),
            models.Index(fields=["organization", "-updated_at"]),
            # ``GET /v1/chat/completions``: a caller's stored completions in creation order.
            models.Index(
                fields=["owner", "organization", "created_at", "id"],
                name="stored_completion_idx",
                condition=models.Q(completion_id__isnull=False),
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "owner", "external_id"],
                condition=~models.Q(external_id=""),
                name="conversation_external_id_unique",
            ),
        ]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"

    @property
    def archived(self) -> bool:
        return self.archived_at is not None


class Message(models.Model):
    """One turn. Assistant messages are written at stream start and at stream end, never per token.

    ``time_to_first_token_ms`` and ``duration_ms`` are milliseconds measured by the backend from
    the upstream request's start. A ``cancelled`` or ``failed`` reply keeps the text generated;
    ``error`` says why in words and ``error_code`` in a machine-readable code (e.g.
    ``upstream_error``, ``interrupted``). While a reply streams, ``stream_owner`` names the server
    process streaming it (``chatbackend.liveness``) and its text so far is written every few
    seconds (``checkpointed_at``): a reply whose process died is recovered from that.

    A stored ``/v1`` completion's reply (``stored_completions``) also keeps what OpenAI answers apart:
    ``refusal``, the end of ``content`` that the model said declining (``content`` holds the whole
    text, as a person reads it), and ``cached_tokens`` / ``reasoning_tokens``, the provider's usage
    breakdown (None when the provider reported no usage: counted by our tokenizer), and ``tool_calls``,
    an assistant message's OpenAI tool calls (``[{"id", "type", "function": {"name", "arguments"}}]``;
    None when it made none): the request's assistant turns' and the reply's; a request's ``tool``
    message keeps ``tool_call_id``, the id of the call it answers ("" for any other message).
    """

    class Role(models.TextChoices):
        SYSTEM = "system", "System"
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"
        # Only in stored chat completions, which keep the request's messages as they came.
        DEVELOPER = "developer", "Developer"
        TOOL = "tool", "Tool"

    class Status(models.TextChoices):
        STREAMING = "streaming", "Streaming"
        COMPLETED = "completed", "Completed"
        CANCELLED = "cancelled", "Cancelled"
        FAILED = "failed", "Failed"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    # The message this one follows (None: a first message). Editing a user message or regenerating
    # a reply adds a sibling: a message with the same parent. Always of the same conversation.
    parent = models.ForeignKey(
        "self",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="children",
        db_index=False,  # message_parent_id_idx serves it
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETED)
    model_name = models.CharField(max_length=200, blank=True, default="")
    finish_reason = models.CharField(max_length=32, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    cached_tokens = models.PositiveIntegerField(null=True, blank=True)
    reasoning_tokens = models.PositiveIntegerField(null=True, blank=True)
    refusal = models.TextField(blank=True, default="")
    tool_calls = models.JSONField(null=True, blank=True)
    tool_call_id = models.TextField(blank=True, default="")
    time_to_first_token_ms = models.FloatField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    error_code = models.CharField(max_length=64, blank=True, default="")
    stream_owner = models.CharField(max_length=200, blank=True, default="")
    checkpointed_at = models.DateTimeField(null=True, blank=True)
    # NextChat's message id for a message imported from a synced document (blank otherwise).
    external_id = models.CharField(max_length=100, blank=True, default="")
    # A reply whose branch did not fit the model's context window was asked with its oldest
    # messages left out (``selectors.history_fitted``): how many, and the id of the newest of them
    # (every message of the branch up to it was left out). 0 and None: the whole branch was sent.
    context_dropped = models.PositiveIntegerField(default=0)
    context_dropped_through = models.PositiveBigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["conversation", "created_at"]),
            # Children of a message, and the roots of a conversation (parent IS NULL), by conversation.
            models.Index(fields=["conversation", "parent"], name="message_conv_parent_idx"),
            # The walk down to a message's latest child (``message_latest_leaf``).
            models.Index(fields=["parent", "id"], name="message_parent_id_idx"),
            # The recovery task's scan: the few messages still streaming.
            models.Index(fields=["status"], name="message_streaming_idx", condition=models.Q(status="streaming")),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "external_id"],
                condition=~models.Q(external_id=""),
                name="message_external_id_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"


class RetentionPolicy(models.Model):
    """How long an organization keeps conversations (``conversations.retention.retention_apply``).

    ``delete_after_days``: a conversation whose last activity (``Conversation.updated_at``: its last
    message, rename or setting change) is older than this many days is purged, trashed or not.
    ``trash_purge_after_days``: a conversation in the trash longer than this many days
    (``Conversation.deleted_at``) is purged. None keeps forever. Purging keeps usage records
    (``accounts.UsageRecord.message`` is set to null). An organization without a policy keeps all.
    """

    organization = models.OneToOneField(Organization, on_delete=models.CASCADE, related_name="retention_policy")
    delete_after_days = models.PositiveIntegerField(
        null=True, blank=True, help_text="Purge conversations inactive for this many days (empty: never)."
    )
    trash_purge_after_days = models.PositiveIntegerField(
        null=True, blank=True, help_text="Purge conversations in the trash for this many days (empty: never)."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "retention policies"
        constraints = [
            models.CheckConstraint(
                condition=models.Q(delete_after_days__isnull=True) | models.Q(delete_after_days__gte=1),
                name="retention_delete_after_days_positive",
            ),
            models.CheckConstraint(
                condition=models.Q(trash_purge_after_days__isnull=True) | models.Q(trash_purge_after_days__gte=1),
                name="retention_trash_purge_after_days_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"Retention of {self.organization}"


# Defined in their packages, registered with this app here: conversation templates
# (``conversations.conversation_templates``), share links (``conversations.sharing``) and NextChat's
# synced documents (``conversations.sync``).
from .conversation_templates.models import ConversationTemplate  # noqa: E402
from .sharing.models import SharedConversation  # noqa: E402
from .sync.models import SyncDocument, SyncDocumentVersion, SyncUploadChunk  # noqa: E402

__all__ = [
    "Conversation",
    "ConversationTemplate",
    "Message",
    "RetentionPolicy",
    "SharedConversation",
    "SyncDocument",
    "SyncDocumentVersion",
    "SyncUploadChunk",
]
