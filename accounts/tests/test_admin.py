"""The Django admin for users, API keys and usage records, as an operator uses it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import APIKey, AuditEvent, User
from accounts.services import api_key_create
from tests.factories import UsageRecordFactory

pytestmark = pytest.mark.django_db


def test_user_pages_show_the_role(admin_site, user):
    changelist = admin_site.get("/admin/accounts/user/", {"role__exact": "member"})
    change = admin_site.get(f"/admin/accounts/user/{user.pk}/change/")

    assert changelist.status_code == 200
    assert user.username in changelist.content.decode()
    assert change.status_code == 200
    assert 'name="role"' in change.content.decode()


def test_an_operator_adds_an_admin_user(admin_site):
    response = admin_site.post(
        "/admin/accounts/user/add/",
        {
            "username": "ops",
            "email": "ops@example.com",
            "role": "admin",
            "usable_password": "true",
            "password1": "a-long-passphrase-42",
            "password2": "a-long-passphrase-42",
        },
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    created = User.objects.get(username="ops")
    assert created.role == User.Role.ADMIN
    assert created.is_admin
    assert created.check_password("a-long-passphrase-42")


def test_api_key_pages_never_show_the_hash_and_cannot_add(admin_site, user):
    api_key = api_key_create(user=user, name="laptop").api_key

    changelist = admin_site.get("/admin/accounts/apikey/")
    change = admin_site.get(f"/admin/accounts/apikey/{api_key.pk}/change/")
    add = admin_site.get("/admin/accounts/apikey/add/")

    assert changelist.status_code == 200
    assert api_key.prefix in changelist.content.decode()
    assert change.status_code == 200
    for page in (changelist, change):
        assert api_key.key_hash not in page.content.decode()
    assert add.status_code == 403


def test_api_key_pages_show_expiry_allowlist_and_scopes(admin_site, user):
    expires_at = timezone.now() + dt.timedelta(days=3)
    api_key = api_key_create(
        user=user, name="ci", expires_at=expires_at, allowed_models=["only-this-model"], scopes=["chat"]
    ).api_key

    changelist = admin_site.get("/admin/accounts/apikey/").content.decode()
    change = admin_site.get(f"/admin/accounts/apikey/{api_key.pk}/change/").content.decode()

    assert "Expires at" in changelist and "Scopes" in changelist
    for label in ("Expires at", "Allowed models", "Scopes"):
        assert label in change, label
    assert "only-this-model" in change
    assert "chat" in change


def test_an_operator_sets_a_keys_rate_limits_and_nothing_else(admin_site, user):
    # README: keys have rate limits "set in the admin"; every field of the key page was read-only.
    api_key = api_key_create(user=user, name="ci", scopes=["chat"]).api_key
    url = f"/admin/accounts/apikey/{api_key.pk}/change/"
    assert 'name="requests_per_minute"' in admin_site.get(url).content.decode()

    data = {"requests_per_minute": "30", "tokens_per_minute": "", "concurrent_streams": "1", "name": "renamed"}
    response = admin_site.post(url, data)

    assert response.status_code == 302, response.content.decode()[:3000]
    api_key.refresh_from_db()
    assert (api_key.requests_per_minute, api_key.tokens_per_minute, api_key.concurrent_streams) == (30, None, 1)
    assert (api_key.name, api_key.scopes, api_key.revoked_at) == ("ci", ["chat"], None)  # read-only stays
    row = AuditEvent.objects.get(action=AuditEvent.Action.API_KEY_UPDATED)
    assert (row.object_id, row.before, row.after) == (
        str(api_key.pk),
        {"requests_per_minute": None, "concurrent_streams": None},
        {"requests_per_minute": 30, "concurrent_streams": 1},
    )
    assert api_key.key_hash not in str(row.before) + str(row.after)


def test_the_revoke_action_revokes_the_selected_keys(admin_site, user, other_user):
    first = api_key_create(user=user, name="one").api_key
    second = api_key_create(user=other_user, name="two").api_key
    kept = api_key_create(user=user, name="kept").api_key

    response = admin_site.post(
        "/admin/accounts/apikey/",
        {"action": "revoke_selected", "_selected_action": [first.pk, second.pk]},
        follow=True,
    )

    assert response.status_code == 200
    assert "Revoked 2 API key(s)." in response.content.decode()
    assert set(APIKey.objects.filter(revoked_at__isnull=False).values_list("pk", flat=True)) == {first.pk, second.pk}
    kept.refresh_from_db()
    assert kept.revoked_at is None


def test_usage_records_are_read_only(admin_site, user):
    record = UsageRecordFactory(
        request_id="req-1",
        user=user,
        model_name="some-model",
        prompt_tokens=3,
        completion_tokens=4,
        token_source="estimated",
        finish_status="cancelled",
    )

    changelist = admin_site.get("/admin/accounts/usagerecord/", {"token_source__exact": "estimated"})
    view = admin_site.get(f"/admin/accounts/usagerecord/{record.pk}/change/")
    add = admin_site.get("/admin/accounts/usagerecord/add/")
    delete = admin_site.get(f"/admin/accounts/usagerecord/{record.pk}/delete/")

    assert changelist.status_code == 200
    assert "req-1" in changelist.content.decode()
    assert view.status_code == 200
    assert 'name="_save"' not in view.content.decode()
    assert add.status_code == 403
    assert delete.status_code == 403


def _registered_admins() -> list[tuple[str, Any]]:
    from django.contrib import admin

    return sorted(
        (
            (f"{model._meta.app_label}.{model._meta.model_name}", model_admin)
            for model, model_admin in admin.site._registry.items()
        ),
        key=lambda item: item[0],
    )


@pytest.mark.parametrize(
    ("label", "model_admin"), _registered_admins(), ids=lambda value: value if isinstance(value, str) else ""
)
def test_no_changelist_query_string_is_a_500(admin_site, user, label, model_admin):
    """Any text field as a lookup with a NUL (PostgreSQL cannot compare it: a 500 before), and the
    date hierarchy's years past 9998 (Django builds the next year's date: a 500 before), are Django's
    answer to an invalid lookup, a redirect to ``?e=1``; the autocomplete's ``term`` likewise a 400."""
    UsageRecordFactory(user=user)
    opts = model_admin.model._meta
    url = f"/admin/{opts.app_label}/{opts.model_name}/"
    texts = [
        field.name
        for field in opts.get_fields()
        if getattr(field, "get_internal_type", None) and field.get_internal_type() in ("CharField", "TextField")
    ]
    queries: list[dict[str, str]] = [{name: "\x00"} for name in texts[:3]]
    queries += [{"q": "x", "all": "\x00"}, {"\x00": "1"}]
    for lookup in ("exact", "startswith"):
        queries += [{f"{name}__{lookup}": "a\x00"} for name in texts[:1]]
    if model_admin.date_hierarchy:
        year = f"{model_admin.date_hierarchy}__year"
        queries += [
            {year: "9999"},
            {year: "99999999999999999999"},
            {year: "9999", f"{model_admin.date_hierarchy}__month": "12"},
            {year: "2026", f"{model_admin.date_hierarchy}__month": "99999999999999999999"},
            {
                year: "2026",
                f"{model_admin.date_hierarchy}__month": "1",
                f"{model_admin.date_hierarchy}__day": "99999999999999999999",
            },
        ]
    for query in queries:
        response = admin_site.get(url, query)
        assert response.status_code == 302, (label, query, response.status_code)
        assert response["Location"] == f"{url}?e=1"
    # A query string Django checks itself still gets Django's answer; a plain one the page.
    assert admin_site.get(url).status_code == 200
    if model_admin.date_hierarchy:
        assert admin_site.get(url, {f"{model_admin.date_hierarchy}__year": "2026"}).status_code == 200


def test_the_autocomplete_term_with_a_nul_is_a_400(admin_site):
    response = admin_site.get(
        "/admin/autocomplete/", {"app_label": "llm", "model_name": "llmmodel", "field_name": "provider", "term": "\x00"}
    )
    assert response.status_code == 400
    ok = admin_site.get(
        "/admin/autocomplete/", {"app_label": "llm", "model_name": "llmmodel", "field_name": "provider", "term": "sim"}
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("label", "model_admin"), _registered_admins(), ids=lambda value: value if isinstance(value, str) else ""
)
def test_no_action_on_an_id_that_is_not_a_primary_key_is_a_500(admin_site, superuser, rf, label, model_admin):
    """Every action of every model admin, posted with a selected id that is not a primary key (Django
    filters pk__in with it: a ValueError, a 500 before), is a 400; a real selection still works."""
    opts = model_admin.model._meta
    url = f"/admin/{opts.app_label}/{opts.model_name}/"
    request = rf.get(url)
    request.user = superuser
    actions = list(model_admin.get_actions(request))  # none for a read-only admin (messages, outstanding tokens)
    for action in actions:
        for selected in ("abc", "1.5", "", "\x00", str(2**63), "-" + str(2**63 + 1)):  # past a bigint too
            response = admin_site.post(url, {"action": action, "_selected_action": selected, "index": "0"})
            assert response.status_code == 400, (label, action, selected, response.status_code)
    # An id that names nothing gets Django's own answer (no 500), as before.
    for action in actions[:1]:
        response = admin_site.post(url, {"action": action, "_selected_action": "99999999", "index": "0"})
        assert response.status_code in (200, 302), (label, response.status_code)


@pytest.mark.parametrize(
    ("label", "model_admin"),
    [(label, model_admin) for label, model_admin in _registered_admins() if model_admin.list_editable],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_list_editable_row_id_past_a_bigint_is_a_400(admin_site, label, model_admin):
    """Saving a changelist's editable rows filters pk__in their posted ids: past a bigint, SQLite (the
    demo's database) raised OverflowError, a 500."""
    opts = model_admin.model._meta
    url = f"/admin/{opts.app_label}/{opts.model_name}/"
    rows = {"form-TOTAL_FORMS": "1", "form-INITIAL_FORMS": "1", "form-MIN_NUM_FORMS": "0", "form-MAX_NUM_FORMS": "1000"}

    for value in (str(2**63), "-" + str(2**63 + 1)):
        response = admin_site.post(url, {**rows, f"form-0-{opts.pk.name}": value, "_save": "Save"})
        assert response.status_code == 400, (label, value, response.status_code)
    # A row id in range gets Django's own answer, as before.
    response = admin_site.post(url, {**rows, f"form-0-{opts.pk.name}": "99999999", "_save": "Save"})
    assert response.status_code in (200, 302), (label, response.status_code)


@pytest.mark.parametrize(
    ("label", "model_admin"),
    [(label, model_admin) for label, model_admin in _registered_admins() if model_admin.autocomplete_fields],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_form_posted_with_an_autocomplete_value_that_is_no_key_shows_its_error(
    admin_site, superuser, rf, label, model_admin
):
    """An autocomplete field (and one of an inline) posted with a value that is not a key: the form
    again with the field's error (Django's widget looked the value up to render it: a 500 before)."""
    opts = model_admin.model._meta
    url = f"/admin/{opts.app_label}/{opts.model_name}/add/"
    request = rf.get(url)
    request.user = superuser
    posts: list[dict[str, str]] = []
    for value in ("abc", "1.5", "\x00", "99999999999999999999"):
        posts += [{name: value} for name in model_admin.autocomplete_fields]
        for inline in model_admin.get_inline_instances(request):
            prefix = inline.get_formset(request).get_default_prefix()
            management = {f"{prefix}-TOTAL_FORMS": "1", f"{prefix}-INITIAL_FORMS": "0"}
            posts += [{**management, f"{prefix}-0-{name}": value} for name in inline.autocomplete_fields]
    for data in posts:
        response = admin_site.post(url, data)
        assert response.status_code == 200, (label, data, response.status_code)
        assert "errornote" in response.content.decode()


@pytest.mark.parametrize("value", [str(2**63), "-" + str(2**63 + 1), "99999999999999999999"])
def test_an_autocomplete_value_past_a_bigint_is_never_looked_up(rf, superuser, django_assert_num_queries, value):
    """Rendering the form again, the autocomplete widget looked up every posted value that parsed as an
    integer: past a bigint, SQLite (the demo's database) raises OverflowError, a 500. Such a value
    can be no key: no query, the field's own error only."""
    from django.contrib import admin as django_admin

    from llm.models import LLMModel

    request = rf.get("/admin/llm/llmmodel/add/")
    request.user = superuser
    field = django_admin.site._registry[LLMModel].get_form(request).base_fields["provider"]
    widget = field.widget.widget  # inside the related-field wrapper

    with django_assert_num_queries(0):
        groups = widget.optgroups("provider", [value])

    assert all(not option["selected"] for _, options, _ in groups for option in options)


def _m2m_forms(rf: Any, superuser: User) -> list[tuple[str, str, list[str], dict[str, str]]]:
    """Every admin form with many-to-many fields: (label, URL, the m2m field names, the rest of a valid post).

    Add pages of the admins that may add, and the change page of ``superuser`` (the user admin's add
    form has no groups or permissions)."""
    from django.forms import ModelMultipleChoiceField

    from chatbackend import admin_guard

    found = []
    for label, model_admin in _registered_admins():
        opts = model_admin.model._meta
        pages = []
        request = rf.get("/")
        request.user = superuser
        if model_admin.has_add_permission(request):
            pages.append((f"/admin/{opts.app_label}/{opts.model_name}/add/", None))
        if model_admin.model is User:
            pages.append((f"/admin/{opts.app_label}/{opts.model_name}/{superuser.pk}/change/", superuser))
        for url, obj in pages:
            form = model_admin.get_form(request, obj, change=obj is not None)
            names = [name for name, field in form.base_fields.items() if isinstance(field, ModelMultipleChoiceField)]
            # The guarded field (PostgreSQL matches nothing without it: only SQLite would fail below).
            for name in names:
                assert isinstance(form.base_fields[name], admin_guard.ModelMultipleChoiceField), (label, name)
            if names:
                found.append((label, url, names, {"username": superuser.username, "date_joined_0": "2026-12-01"}))
    assert {label for label, *_ in found} >= {"accounts.user", "auth.group"}, found
    return found


@pytest.mark.parametrize("value", [str(2**63), "-" + str(2**63 + 1)])
def test_a_many_to_many_value_past_a_bigint_is_the_fields_error(admin_site, superuser, rf, value):
    """A form's many-to-many field (a user's groups and permissions, a group's permissions) posted with
    an id past a bigint: Django filters ``pk__in`` it, which SQLite (the demo's database) could not
    take, an OverflowError, a 500. It is the field's "not a valid value" error, as for any id that is
    no key."""
    for label, url, names, rest in _m2m_forms(rf, superuser):
        for name in names:
            response = admin_site.post(url, {**rest, name: [value]})
            assert response.status_code == 200, (label, url, name, response.status_code)
            assert name in response.context["adminform"].form.errors, (label, name)
    # An id in range still saves.
    from django.contrib.auth.models import Group, Permission

    permission = Permission.objects.first()
    response = admin_site.post("/admin/auth/group/add/", {"name": "ops", "permissions": [permission.pk]})
    assert response.status_code == 302, response.content.decode()[:2000]
    assert list(Group.objects.get(name="ops").permissions.all()) == [permission]
