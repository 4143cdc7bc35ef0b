"""Django admin for organizations and teams, users, API keys, usage records and budgets.

API key secrets are created through the API only (they are shown once, to their owner), so the
admin cannot add keys and never shows ``key_hash``; it can revoke them. Usage records are an
audit trail: read-only. Their changelist links to a usage summary page (usage summed per day,
model, user and API key, ``accounts.selectors.usage_summary``) with a CSV download, and has an
action that exports the selected records as CSV.

Changes made here to users, budgets (and, through ``AuditedModelAdmin``, to ``llm``'s providers,
models, aliases and deployments) are written to the audit log (``accounts.audit``), whose own
page is read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import GroupAdmin as DjangoGroupAdmin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from chatbackend.admin_guard import RelatedFieldGuardMixin, inline_rows_stored_meanwhile
from chatbackend.errors import ApplicationError
from chatbackend.renderers import CSVRenderer

from .audit import AuditState, audit_model_deleted, audit_model_saved, audit_record
from .lifecycle.services import user_deactivate, user_reactivate
from .metering.budgets import BudgetUsage, budget_usage
from .models import (
    APIKey,
    AuditEvent,
    Budget,
    Invitation,
    Membership,
    Organization,
    Team,
    TeamMembership,
    UsageRecord,
    User,
)
from .organizations.services import invitation_revoke
from .selectors import (
    AUDIT_EVENT_CSV_COLUMNS,
    USAGE_SUMMARY_GROUPS,
    ActingOrganization,
    audit_event_csv_rows,
    usage_current_month,
    usage_summary,
    usage_summary_columns,
)
from .serializers import UsageSummaryRowOutputSerializer
from .services import api_key_revoke


class AuditedModelAdmin(admin.ModelAdmin):
    """A ModelAdmin whose every add, change and delete (and those of audited inlines) writes one audit row.

    The state before is read from the database before the save; the row is written after
    ``save_related``, so many-to-many changes (a user's groups) are in the same row as the rest.
    A save that changes nothing writes no row. The actor and IP are the request's
    (``accounts.audit.AuditRequestMiddleware``).
    """

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        request._audit_before = AuditState.of_stored(obj) if change else None  # type: ignore[attr-defined]
        super().save_model(request, obj, form, change)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        # ModelAdmin.save_related's steps, with the object's row between its many-to-many fields
        # (part of its row) and its inlines (rows of their own, after it).
        form.save_m2m()
        audit_model_saved(obj=form.instance, before=getattr(request, "_audit_before", None))
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        model = formset.model
        stored = model._default_manager.filter(pk__in=[f.instance.pk for f in formset.initial_forms if f.instance.pk])
        before = {obj.pk: AuditState(obj) for obj in stored}
        pks = {id(f.instance): f.instance.pk for f in formset.initial_forms}
        super().save_formset(request, form, formset, change)
        for obj in formset.new_objects:
            audit_model_saved(obj=obj, before=None)
        for obj, _fields in formset.changed_objects:
            audit_model_saved(obj=obj, before=before.get(obj.pk))
        for obj in formset.deleted_objects:
            pk = pks.get(id(obj))
            if pk in before:
                audit_model_deleted(obj=obj, before=before[pk])

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        before = AuditState(obj)
        super().delete_model(request, obj)
        audit_model_deleted(obj=obj, before=before)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        # One row per deleted object, as deleting them one by one would write.
        objects = [(obj, AuditState(obj)) for obj in queryset]
        super().delete_queryset(request, queryset)
        for obj, before in objects:
            audit_model_deleted(obj=obj, before=before)


class UserAdminCreationForm(AdminUserCreationForm):
    """Django's add-user form, bound to our user model (its own is bound to ``auth.User``)."""

    class Meta(AdminUserCreationForm.Meta):
        model = User
        fields = ("username", "email", "role")


class UserAdminChangeForm(UserChangeForm):
    """Django's change-user form, bound to our user model."""

    class Meta(UserChangeForm.Meta):
        model = User


_ALREADY_A_MEMBER = "This user is already a member: reload the page to see every member."


class MembershipInlineFormSet(BaseInlineFormSet):
    """The organization page's members, held to the rules the REST API keeps.

    An organization that has an owner keeps one (``last owner``), and a team's service account
    keeps the member role (``accounts.organizations.services``). A member removed here also
    leaves the organization's teams (the ``Membership`` post-delete signal).
    """

    def clean(self) -> None:
        super().clean()
        organization = self.instance
        kept = [form for form in self.forms if form.cleaned_data and not form.cleaned_data.get("DELETE")]
        for form in kept:
            user = form.cleaned_data.get("user")
            if (
                user is not None
                and user.service_team_id is not None
                and form.cleaned_data.get("role") != Membership.Role.MEMBER
            ):
                form.add_error("role", "A team's service account keeps the member role.")
        if organization.pk is None:
            return
        inline_rows_stored_meanwhile(self, ["user"], _ALREADY_A_MEMBER)
        had_owner = Membership.objects.filter(organization=organization, role=Membership.Role.OWNER).exists()
        # The inline lists every member, so the owners kept are those on the page.
        if had_owner and not any(form.cleaned_data.get("role") == Membership.Role.OWNER for form in kept):
            raise ValidationError("The organization must keep an owner: make another member an owner first.")


class MembershipInline(admin.TabularInline):
    model = Membership
    formset = MembershipInlineFormSet
    extra = 0
    raw_id_fields = ("user",)
    fields = ("user", "role", "is_default", "created_at")
    readonly_fields = ("created_at",)


class TeamMembershipInlineFormSet(BaseInlineFormSet):
    """A team's members, who must be members of the team's organization (as over REST)."""

    def clean(self) -> None:
        super().clean()
        organization_id = self.instance.organization_id
        for form in self.forms:
            user = form.cleaned_data.get("user") if form.cleaned_data else None
            if user is None or form.cleaned_data.get("DELETE"):
                continue
            if not Membership.objects.filter(user=user, organization_id=organization_id).exists():
                form.add_error("user", "This user is not a member of the team's organization.")
        inline_rows_stored_meanwhile(self, ["user"], _ALREADY_A_MEMBER)


class TeamMembershipInline(admin.TabularInline):
    model = TeamMembership
    formset = TeamMembershipInlineFormSet
    extra = 0
    raw_id_fields = ("user",)
    fields = ("user", "created_at")
    readonly_fields = ("created_at",)


@admin.register(Organization)
class OrganizationAdmin(AuditedModelAdmin):
    list_display = ("name", "slug", "created_at")
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [MembershipInline]


@admin.register(Team)
class TeamAdmin(AuditedModelAdmin):
    list_display = ("name", "organization", "slug", "created_at")
    list_filter = ("organization",)
    list_select_related = ("organization",)
    search_fields = ("name", "slug", "organization__name")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [TeamMembershipInline]


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    """Invitations, read-only (they are sent over REST: ``POST /api/invitations/``); revoking is an action."""

    list_display = (
        "email",
        "organization",
        "role",
        "invited_by",
        "created_at",
        "expires_at",
        "accepted_at",
        "revoked_at",
    )
    list_filter = (
        "organization",
        ("accepted_at", admin.EmptyFieldListFilter),
        ("revoked_at", admin.EmptyFieldListFilter),
    )
    list_select_related = ("organization", "invited_by")
    search_fields = ("email", "organization__name")
    fields = (
        "email",
        "organization",
        "role",
        "teams",
        "invited_by",
        "created_at",
        "expires_at",
        "accepted_at",
        "accepted_by",
        "revoked_at",
    )
    readonly_fields = fields
    actions = ("revoke_selected",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke selected invitations", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[Invitation]) -> None:
        """Revoke each selected invitation still pending, through ``invitation_revoke`` (audited)."""
        count = 0
        for invitation in queryset.filter(accepted_at=None, revoked_at=None).select_related("organization"):
            # The admin site's operators act as owners of every organization, as the superuser does.
            acting = ActingOrganization(invitation.organization, Membership.Role.OWNER)
            invitation_revoke(actor=request.user, acting=acting, invitation_id=invitation.pk)  # type: ignore[arg-type]
            count += 1
        self.message_user(request, f"Revoked {count} invitation(s).", messages.SUCCESS)


# Django registers auth's groups with its own admin: again, with the guard on their permissions field.
if admin.site.is_registered(Group):
    admin.site.unregister(Group)


@admin.register(Group)
class GroupAdmin(RelatedFieldGuardMixin, DjangoGroupAdmin):
    """Django's admin of auth's groups, whose permissions field refuses an id past a bigint (``admin_guard``)."""


@admin.register(User)
class UserAdmin(RelatedFieldGuardMixin, AuditedModelAdmin, DjangoUserAdmin):
    form = UserAdminChangeForm
    add_form = UserAdminCreationForm

    def get_readonly_fields(self, request: HttpRequest, obj: User | None = None) -> tuple[str, ...]:
        # Memberships are managed on each organization's page; a new user joins the default one.
        return (*super().get_readonly_fields(request, obj), "organizations") if obj is not None else ()

    def get_fieldsets(self, request: HttpRequest, obj: User | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            return fieldsets
        return (*fieldsets, ("Organizations", {"fields": ("organizations",)}))

    @admin.display(description="organizations (role)")
    def organizations(self, obj: User) -> str:
        memberships = obj.memberships.select_related("organization").order_by("organization__name")
        return (
            ", ".join(
                f"{m.organization} ({m.get_role_display().lower()}{', default' if m.is_default else ''})"
                for m in memberships
            )
            or "-"
        )

    list_display = ("username", "email", "role", "is_active", "is_staff", "service_team", "date_joined", "last_login")
    # A set service team marks a team's service user (it owns the team's keys and cannot log in).
    list_filter = (
        "role",
        "is_active",
        "email_verified",
        "is_staff",
        "is_superuser",
        ("service_team", admin.EmptyFieldListFilter),
    )
    # ``role`` decides what the API shows; ``is_staff`` decides who may use this admin site.
    fieldsets = (
        (None, {"fields": ("username", "password")}),
        ("Personal info", {"fields": ("first_name", "last_name", "email", "email_verified")}),
        ("Role", {"fields": ("role",)}),
        # The user's own limits (README, "Rate limits"); its keys, teams and organizations have theirs.
        ("Rate limits", {"fields": ("requests_per_minute", "tokens_per_minute", "concurrent_streams")}),
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
    actions = ("deactivate_selected", "reactivate_selected")

    def _each(self, request: HttpRequest, queryset: QuerySet[User], service: Callable[..., User], verb: str) -> None:
        """Apply ``service`` to each selected user as the operator; report what was done and what was refused."""
        done = 0
        for user in queryset:
            try:
                service(actor=request.user, user_id=user.pk)
            except ApplicationError as exc:
                self.message_user(request, f"{user}: {exc.message}", messages.ERROR)
            else:
                done += 1
        self.message_user(request, f"{verb} {done} user(s).", messages.SUCCESS)

    @admin.action(description="Deactivate selected users (their keys and logins stop working)", permissions=["change"])
    def deactivate_selected(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        """Deactivate each selected user through ``user_deactivate``: what they have open closes; their data stays."""
        self._each(request, queryset.filter(is_active=True), user_deactivate, "Deactivated")

    @admin.action(description="Reactivate selected users", permissions=["change"])
    def reactivate_selected(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        """Reactivate each selected user through ``user_reactivate``."""
        self._each(request, queryset.filter(is_active=False), user_reactivate, "Reactivated")

    def user_change_password(self, request: HttpRequest, id: str, form_url: str = "") -> HttpResponse:
        """Django's change-password page; a changed password writes one ``user.updated`` row, masked."""
        stored = User.objects.filter(pk=id).first() if str(id).isdigit() else None
        before = AuditState(stored) if stored is not None else None
        response = super().user_change_password(request, id, form_url)
        if before is not None and request.method == "POST":
            after = User.objects.filter(pk=stored.pk).first()  # type: ignore[union-attr]
            if after is not None:
                audit_model_saved(obj=after, before=before)  # no row when nothing changed
        return response


@admin.register(APIKey)
class APIKeyAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "user",
        "organization",
        "team",
        "prefix",
        "scopes",
        "expires_at",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    list_filter = (
        ("revoked_at", admin.EmptyFieldListFilter),
        ("expires_at", admin.EmptyFieldListFilter),
        "organization",
        "created_at",
    )
    list_select_related = ("user", "organization", "team")
    search_fields = ("name", "prefix", "user__username")
    fields = (
        "name",
        "user",
        "organization",
        "team",
        "created_by",
        "prefix",
        "created_at",
        "last_used_at",
        "revoked_at",
        "expires_at",
        "allowed_models",
        "scopes",
        "requests_per_minute",
        "tokens_per_minute",
        "concurrent_streams",
    )
    # The key's rate limits (README, "Rate limits") are what an operator sets here; the rest is
    # the owner's (REST), or follows from revoking.
    readonly_fields = fields[:-3]
    actions = ("revoke_selected",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: APIKey, form: Any, change: bool) -> None:
        """Save the key's rate limits; a change writes one ``api_key.updated`` audit row."""
        before = AuditState.of_stored(obj)
        super().save_model(request, obj, form, change)
        if before is not None:
            old, new = before.changes(obj)
            if new:
                audit_record(action=AuditEvent.Action.API_KEY_UPDATED, obj=obj, before=old, after=new)

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        """Revoke each selected key that is still active, through ``api_key_revoke``."""
        active = queryset.filter(revoked_at__isnull=True).select_related("user")
        count = 0
        for api_key in active:
            api_key_revoke(user=api_key.user, api_key_id=api_key.pk)
            count += 1
        self.message_user(request, f"Revoked {count} API key(s).", messages.SUCCESS)


class UsageSummaryForm(forms.Form):
    """The usage summary page's query: a date range (default: the current month), groups, one user."""

    start_date = forms.DateField(required=False, help_text="inclusive; default: this month's first day")
    end_date = forms.DateField(required=False, help_text="exclusive; default: next month's first day")
    group_by = forms.MultipleChoiceField(
        choices=[(name, name.replace("_", " ")) for name in USAGE_SUMMARY_GROUPS],
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="none: one row of totals",
    )
    user = forms.ModelChoiceField(queryset=User.objects.order_by("username"), required=False)


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "user",
        "model_name",
        "source",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost",
        "token_source",
        "finish_status",
        "deployment",
        "request_id",
    )
    list_filter = ("organization", "source", "token_source", "model_name", "finish_status", "deployment")
    list_select_related = ("user",)
    search_fields = ("request_id", "user__username", "model_name")
    date_hierarchy = "created_at"
    raw_id_fields = ("user", "api_key", "model", "message")
    actions = ("export_csv",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        summary = path("summary/", self.admin_site.admin_view(self.summary_view), name="accounts_usagerecord_summary")
        return [summary, *super().get_urls()]

    @admin.action(description="Export selected usage records as CSV", permissions=["view"])
    def export_csv(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> HttpResponse:
        """Download the selected records, one CSV row each (``_RECORD_COLUMNS``), oldest first."""
        records = queryset.select_related("user", "api_key").order_by("created_at", "id")
        rows = [{column: value(record) for column, value in _RECORD_COLUMNS.items()} for record in records]
        return _csv_download(rows, header=tuple(_RECORD_COLUMNS), filename="usage-records.csv")

    def summary_view(self, request: HttpRequest) -> HttpResponse:
        """Show usage summed per day, model, user and API key (``usage_summary``); ``?format=csv`` downloads it."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = UsageSummaryForm(request.GET or None)
        month_start, month_end = usage_current_month()
        query: dict[str, Any] = {"start_date": month_start, "end_date": month_end, "group_by": ["day"]}
        columns: tuple[str, ...] = ()
        rows: list[dict[str, Any]] = []
        if form.is_bound and form.is_valid():
            data = form.cleaned_data
            query = {
                "start_date": data["start_date"] or month_start,
                "end_date": data["end_date"] or month_end,
                "group_by": data["group_by"],
                "user_id": data["user"].pk if data["user"] else None,
            }
        if not form.errors:
            try:
                summary = usage_summary(actor=None, **query)
            except ApplicationError as exc:  # a range the form cannot judge alone: reversed, too long
                form.add_error(exc.param if exc.param in form.fields else None, exc.message)
            else:
                columns = usage_summary_columns(group_by=query["group_by"])
                rows = list(UsageSummaryRowOutputSerializer(summary, many=True).data)
                if request.GET.get("format") == "csv":
                    filename = f"usage-{query['start_date']}-{query['end_date']}.csv"
                    return _csv_download(rows, header=columns, filename=filename)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Usage summary",
            "form": form,
            "columns": columns,
            "table": [[row.get(column) for column in columns] for row in rows],
            "query": {**query, "group_by": ", ".join(query["group_by"]) or "totals"},
            "csv_query": _with_format_csv(request),
        }
        return TemplateResponse(request, "admin/accounts/usagerecord/summary.html", context)


# Columns of the record export: CSV column -> the record's value.
_RECORD_COLUMNS: dict[str, Callable[[UsageRecord], Any]] = {
    "created_at": lambda r: r.created_at.isoformat(),
    "request_id": lambda r: r.request_id,
    "username": lambda r: r.user.username,
    "api_key_prefix": lambda r: r.api_key.prefix if r.api_key else None,
    "model_name": lambda r: r.model_name,
    "source": lambda r: r.source,
    "prompt_tokens": lambda r: r.prompt_tokens,
    "completion_tokens": lambda r: r.completion_tokens,
    "total_tokens": lambda r: r.total_tokens,
    "cached_tokens": lambda r: r.cached_tokens,
    "cache_creation_tokens": lambda r: r.cache_creation_tokens,
    "reasoning_tokens": lambda r: r.reasoning_tokens,
    "cost": lambda r: r.cost,
    "finish_status": lambda r: r.finish_status,
}


def _csv_download(rows: list[dict[str, Any]], *, header: tuple[str, ...], filename: str) -> HttpResponse:
    body = CSVRenderer().render(rows, renderer_context={"header": header})
    response = HttpResponse(body, content_type=f"{CSVRenderer.media_type}; charset={CSVRenderer.charset}")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _with_format_csv(request: HttpRequest) -> str:
    query = request.GET.copy()
    query["format"] = "csv"
    return query.urlencode()


@admin.register(Budget)
class BudgetAdmin(AuditedModelAdmin):
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
    list_filter = ("organization", "subject_kind", "period", "enabled")
    search_fields = ("name", "=subject_id")
    readonly_fields = ("subject", "spent", "reserved", "remaining", "resets_at", "created_at", "updated_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Budget | None = None) -> tuple[str, ...]:
        # Chosen when the budget is made (default: the default organization); a budget does not move.
        return (*self.readonly_fields, "organization") if obj is not None else tuple(self.readonly_fields)

    fieldsets = (
        (None, {"fields": ("name", "organization", "enabled")}),
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


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """The audit log, read-only: filter by action, actor and date; export the selected rows as CSV."""

    list_display = ("created_at", "action", "actor_username", "object_type", "object_id", "object_repr", "ip")
    list_filter = ("action", "organization", ("actor", admin.RelatedOnlyFieldListFilter), "object_type", "created_at")
    search_fields = ("actor_username", "object_repr", "object_id", "=ip")
    date_hierarchy = "created_at"
    fields = (
        "created_at",
        "action",
        "actor",
        "actor_username",
        "organization",
        "object_type",
        "object_id",
        "object_repr",
        "ip",
        "before",
        "after",
    )
    readonly_fields = fields
    actions = ("export_csv",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    @admin.action(description="Export selected audit events as CSV", permissions=["view"])
    def export_csv(self, request: HttpRequest, queryset: QuerySet[AuditEvent]) -> HttpResponse:
        """Download the selected events, one CSV row each (``audit_event_csv_rows``), oldest first."""
        rows = audit_event_csv_rows(queryset.order_by("created_at", "id"))
        return _csv_download(rows, header=AUDIT_EVENT_CSV_COLUMNS, filename="audit-log.csv")
