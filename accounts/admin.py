"""Django admin for users, API keys, usage records and budgets.

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

from .metering.budgets import BudgetUsage, budget_usage
from .models import APIKey, Budget, UsageRecord, User
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


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    """Budgets with their current period's spend, reservations in flight and what remains.

    The figures come from the budget counters (``accounts.metering.budgets.budget_usage``): settled
    usage plus requests in flight, in the period that holds now.
    """

    list_display = (
        "name",
        "subject_kind",
        "subject",
        "period",
        "limit_usd",
        "token_limit",
        "enabled",
        "spent",
        "reserved",
        "remaining",
        "resets_at",
    )
    list_filter = ("subject_kind", "period", "enabled")
    search_fields = ("name", "=subject_id")
    readonly_fields = ("subject", "spent", "reserved", "remaining", "resets_at", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "enabled")}),
        ("Subject", {"fields": ("subject_kind", "subject_id", "subject")}),
        ("Limit", {"fields": ("period", "limit_usd", "token_limit")}),
        ("Current period", {"fields": ("spent", "reserved", "remaining", "resets_at")}),
        ("Dates", {"fields": ("created_at", "updated_at")}),
    )

    def _usage(self, obj: Budget) -> BudgetUsage | None:
        if obj.pk is None:
            return None
        cached = getattr(obj, "_admin_usage", None)
        if cached is None:
            cached = obj._admin_usage = budget_usage(obj)  # type: ignore[attr-defined]
        return cached

    @admin.display(description="subject")
    def subject(self, obj: Budget) -> str:
        return obj.subject_label if obj.pk is not None else "-"

    @admin.display(description="spent (USD)")
    def spent(self, obj: Budget) -> str:
        usage = self._usage(obj)
        return "-" if usage is None else f"{usage.spent_usd.normalize():f} ({usage.spent_tokens} tokens)"

    @admin.display(description="reserved (USD)")
    def reserved(self, obj: Budget) -> str:
        usage = self._usage(obj)
        return "-" if usage is None else f"{usage.reserved_usd.normalize():f} ({usage.reserved_tokens} tokens)"

    @admin.display(description="remaining (USD)")
    def remaining(self, obj: Budget) -> str:
        usage = self._usage(obj)
        if usage is None:
            return "-"
        tokens = "" if usage.remaining_tokens is None else f" ({usage.remaining_tokens} tokens)"
        return f"{usage.remaining_usd.normalize():f}{tokens}"

    @admin.display(description="resets at")
    def resets_at(self, obj: Budget) -> str:
        usage = self._usage(obj)
        if usage is None:
            return "-"
        return "never" if usage.resets_at is None else usage.resets_at.isoformat()
