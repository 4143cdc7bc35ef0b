"""Request and response shapes of share links (``docs/api.md``, "Share links")."""

from __future__ import annotations

from django.utils import timezone
from rest_framework import serializers

from chatbackend.fields import ID_MAX

from ..models import Message
from .models import SharedConversation


class ShareCreateInputSerializer(serializers.Serializer):
    """``{leaf?, expires_at?}``: the branch ending at message ``leaf`` (default: the active branch)."""

    leaf = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=ID_MAX,
        help_text="Share the branch ending at this message of the conversation (default: the active branch).",
    )
    expires_at = serializers.DateTimeField(
        required=False, allow_null=True, help_text="When the link stops answering (default: never)."
    )


class ShareOutputSerializer(serializers.ModelSerializer):
    """A share link as its owner sees it (never its token, which only the creation answer shows)."""

    conversation = serializers.IntegerField(source="conversation_id", read_only=True)
    leaf = serializers.IntegerField(source="leaf_message_id", allow_null=True, read_only=True)
    message_count = serializers.SerializerMethodField()
    active = serializers.SerializerMethodField(help_text="Neither revoked nor expired: the link answers.")

    class Meta:
        model = SharedConversation
        fields = [
            "id", "conversation", "title", "leaf", "message_count", "created_at", "expires_at", "revoked_at", "active"
        ]  # fmt: skip
        read_only_fields = fields

    def get_message_count(self, share: SharedConversation) -> int:
        return len(share.messages)

    def get_active(self, share: SharedConversation) -> bool:
        return share.revoked_at is None and (share.expires_at is None or share.expires_at > timezone.now())


class ShareCreatedOutputSerializer(ShareOutputSerializer):
    """A new link, with its token and URLs: shown once, never stored in clear."""

    token = serializers.CharField(read_only=True, help_text="The link's secret (43 characters); shown only now.")
    url = serializers.CharField(read_only=True, help_text="The HTML page: https://<host>/share/<token>")
    json_url = serializers.CharField(read_only=True, help_text="The JSON form: https://<host>/api/share/<token>/")

    class Meta(ShareOutputSerializer.Meta):
        fields = [*ShareOutputSerializer.Meta.fields, "token", "url", "json_url"]
        read_only_fields = fields


class SharedMessageOutputSerializer(serializers.Serializer):
    """One message of a shared snapshot."""

    role = serializers.ChoiceField(choices=Message.Role.choices)
    content = serializers.CharField()
    model = serializers.CharField(help_text="The model that wrote it (assistant messages; empty otherwise).")
    created_at = serializers.DateTimeField()


class SharedConversationOutputSerializer(serializers.Serializer):
    """What a share link shows: the snapshot's title and messages, root first."""

    title = serializers.CharField()
    messages = SharedMessageOutputSerializer(many=True)
    shared_at = serializers.DateTimeField(source="created_at")
    expires_at = serializers.DateTimeField(allow_null=True)
