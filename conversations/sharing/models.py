"""A shared snapshot of one branch of a conversation."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from accounts.models import Organization


class SharedConversation(models.Model):
    """A link to a snapshot of one branch of ``conversation``, as it was when ``created_by`` made it.

    ``token_hash``: the hex SHA-256 of the link's token (the token itself is shown once and never
    stored). ``title`` and ``messages`` are the snapshot: ``messages`` is a list of ``{role,
    content, model, created_at}`` (ISO 8601), root first, the path from the conversation's root to
    ``leaf_message_id``. The link answers until ``revoked_at`` is set or ``expires_at`` passes.
    Deleting the conversation deletes its links.
    """

    conversation = models.ForeignKey("conversations.Conversation", on_delete=models.CASCADE, related_name="shares")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    token_hash = models.CharField(max_length=64, unique=True)
    title = models.CharField(max_length=200, blank=True, default="")
    messages = models.JSONField(default=list)
    # The last message of the shared branch (an id of the conversation when shared; kept as a number
    # so that deleting messages later never touches the snapshot).
    leaf_message_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["conversation", "-created_at"], name="share_conversation_idx")]

    def __str__(self) -> str:
        return f"share {self.pk} of conversation {self.conversation_id}"
