"""Django admin where operators find conversations and replies (read-only: chats are the users').

Operators may delete a conversation (moderation) but not write into one; a reply's status,
tokens, timings and error are what they come to read.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from chatbackend.admin_guard import RelatedFieldGuardMixin

from .models import (
    Conversation,
    ConversationTemplate,
    Message,
    RetentionPolicy,
    SharedConversation,
    SyncDocument,
    SyncDocumentVersion,
)

_MESSAGE_FIELDS = (
    "conversation",
    "parent",
    "role",
    "status",
    "content",
    "model_name",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "time_to_first_token_ms",
    "duration_ms",
    "error",
    "created_at",
    "updated_at",
)


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("parent", "role", "status", "content", "model_name", "prompt_tokens", "completion_tokens", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ("created_at", "id")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Message]:
        return super().get_queryset(request).select_related("parent")  # the parent column: no query per row

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("id", "title", "owner", "model", "pinned", "archived_at", "deleted_at", "updated_at")
    list_select_related = ("owner", "model")
    list_filter = (
        "model",
        "pinned",
        ("archived_at", admin.EmptyFieldListFilter),
        ("deleted_at", admin.EmptyFieldListFilter),
    )
    search_fields = ("title", "owner__username")
    fields = (
        "title",
        "owner",
        "model",
        "system_prompt",
        "active_leaf",
        "external_id",
        "pinned",
        "archived_at",
        "deleted_at",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields
    inlines = (MessageInline,)
    date_hierarchy = "updated_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "conversation",
        "role",
        "status",
        "model_name",
        "prompt_tokens",
        "completion_tokens",
        "created_at",
    )
    list_select_related = ("conversation",)
    list_filter = ("role", "status", "model_name")
    search_fields = ("content", "conversation__title", "conversation__owner__username")
    fields = _MESSAGE_FIELDS
    readonly_fields = _MESSAGE_FIELDS
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class SyncDocumentVersionInline(admin.TabularInline):
    """A document's versions: size, keys removed, import outcome (the content stays out of the page)."""

    model = SyncDocumentVersion
    fields = (
        "created_at",
        "size_bytes",
        "sha256",
        "secrets_removed",
        "api_key",
        "import_status",
        "conversations_imported",
        "import_error",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("-created_at", "-id")


@admin.register(SyncDocument)
class SyncDocumentAdmin(admin.ModelAdmin):
    """NextChat documents synced here (``conversations.sync``): who, where, and each version (read-only)."""

    list_display = ("id", "owner", "organization", "protocol", "name", "updated_at")
    list_select_related = ("owner", "organization")
    list_filter = ("protocol",)
    search_fields = ("owner__username", "name")
    fields = ("owner", "organization", "protocol", "name", "created_at", "updated_at")
    readonly_fields = fields
    inlines = (SyncDocumentVersionInline,)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(SharedConversation)
class SharedConversationAdmin(admin.ModelAdmin):
    """Share links (``conversations.sharing``): who shared what and until when; operators revoke
    (moderation) but never see a token (only its digest is stored)."""

    list_display = ("id", "conversation", "created_by", "organization", "created_at", "expires_at", "revoked_at")
    list_select_related = ("conversation", "created_by", "organization")
    list_filter = ("revoked_at",)
    search_fields = ("created_by__username", "title")
    fields = ("conversation", "created_by", "organization", "title", "leaf_message_id", "created_at", "expires_at",
              "revoked_at")  # fmt: skip
    readonly_fields = fields
    actions = ("revoke",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Revoke the selected links", permissions=["delete"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[SharedConversation]) -> None:
        revoked = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"{revoked} link(s) revoked.")


@admin.register(ConversationTemplate)
class ConversationTemplateAdmin(admin.ModelAdmin):
    """Conversation templates (``conversations.conversation_templates``): users' own, so read-only;
    operators may delete one (moderation)."""

    list_display = ("id", "name", "owner", "organization", "visibility", "team", "model_name", "updated_at")
    list_select_related = ("owner", "organization", "team")
    list_filter = ("visibility", "organization", "model_name")
    search_fields = ("name", "owner__username", "system_prompt")
    fields = (
        "name",
        "owner",
        "organization",
        "visibility",
        "team",
        "model_name",
        "system_prompt",
        "temperature",
        "top_p",
        "max_tokens",
        "presence_penalty",
        "frequency_penalty",
        "starter_messages",
        "external_id",
        "avatar",
        "lang",
        "nextchat",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields
    date_hierarchy = "updated_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(RetentionPolicy)
class RetentionPolicyAdmin(RelatedFieldGuardMixin, admin.ModelAdmin):
    """How long each organization keeps conversations (applied hourly: ``conversations.retention``)."""

    list_display = ("organization", "delete_after_days", "trash_purge_after_days", "updated_at")
    list_select_related = ("organization",)
    search_fields = ("organization__name", "organization__slug")
    autocomplete_fields = ("organization",)
    fields = ("organization", "delete_after_days", "trash_purge_after_days", "updated_at")
    readonly_fields = ("updated_at",)
