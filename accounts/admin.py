"""Django admin for users, API keys and usage records.

API key secrets are created through the API only (they are shown once, to their owner), so the
admin cannot add keys and never shows ``key_hash``; it can revoke them. Usage records are an
audit trail: read-only.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import APIKey, UsageRecord, User
from .services import api_key_revoke


class UserAdminCreationForm(AdminUserCreationForm):
    """Django's add-user form, bound to our user model (its own is bound to ``auth.User``)."""

    class Meta(AdminUserCreationForm.Meta):
        model = User
        fields = ("username", "email", "role")


class UserAdminChangeForm(UserChangeForm):
    """Django's change-user form, bound to our user model."""

    class Meta(UserChangeForm.Meta):
        model = User


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    form = UserAdminChangeForm
    add_form = UserAdminCreationForm
    list_display = ("username", "email", "role", "is_active", "is_staff", "date_joined", "last_login")
    list_filter = ("role", "is_active", "is_staff", "is_superuser")
    # ``role`` decides what the API shows; ``is_staff`` decides who may use this admin site.
    fieldsets = (
        (None, {"fields": ("username", "password")}),
        ("Personal info", {"fields": ("first_name", "last_name", "email")}),
        ("Role", {"fields": ("role",)}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")}),
        ("Important dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = (
        (
            None,
            {
                "classes": ("wide",),
                "fields": ("username", "email", "role", "usable_password", "password1", "password2"),
            },
        ),
    )


@admin.register(APIKey)
class APIKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "created_at")
    list_select_related = ("user",)
    search_fields = ("name", "prefix", "user__username")
    fields = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    actions = ("revoke_selected",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        """Revoke each selected key that is still active, through ``api_key_revoke``."""
        active = queryset.filter(revoked_at__isnull=True).select_related("user")
        count = 0
        for api_key in active:
            api_key_revoke(user=api_key.user, api_key_id=api_key.pk)
            count += 1
        self.message_user(request, f"Revoked {count} API key(s).", messages.SUCCESS)


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "user",
        "model_name",
        "source",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "token_source",
        "finish_status",
        "request_id",
    )
    list_filter = ("source", "token_source", "model_name", "finish_status")
    list_select_related = ("user",)
    search_fields = ("request_id", "user__username", "model_name")
    date_hierarchy = "created_at"
    raw_id_fields = ("user", "api_key", "model", "message")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False
