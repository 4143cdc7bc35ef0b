"""Query strings of the Django admin that would reach the database as a 500: refused before any view runs.

The admin passes its query string to the ORM with little checking, for every model admin (ours and
those of ``auth`` and ``token_blacklist``):

- a changelist turns each parameter naming a field (``?username=``, ``?status__exact=``, any local
  field, not only the ``list_filter`` ones) into a lookup, and the autocomplete view's ``term``
  into a search. PostgreSQL can neither store nor compare text holding a NUL character
  (``chatbackend.text``): ``DataError``, a 500;
- ``date_hierarchy`` (``?created_at__year=&__month=&__day=``) builds ``datetime(year, month, day)``
  and the next year, month or day; Django turns only a ``ValueError`` of the first into its
  "invalid lookup" answer, so a year past 9998 or too large for a C long is an ``OverflowError`` or
  ``ValueError``, a 500 (``django.contrib.admin.views.main.ChangeList.get_filters``).

- an action posted to a changelist filters ``pk__in`` the posted ``_selected_action`` values
  (``ModelAdmin.response_action``): one that is not a primary key (``abc``, ``1.5``, empty) is a
  ``ValueError`` in the ORM, a 500; one past the column's range (``2**63``) an ``OverflowError`` on
  SQLite, a 500. So does the id of a ``list_editable`` row (``form-0-id``) saved from a changelist.

- a form posted with a value that is not a key of the related model in an ``autocomplete_fields``
  field is shown again with the field's error, but Django's ``AutocompleteSelect`` first looks the
  posted value up to render it as selected (``pk__in``): a ``ValueError``, a 500.
  ``RelatedFieldGuardMixin`` (on every model admin and inline with autocomplete or many-to-many
  fields) gives them ``AutocompleteSelect``, which renders only values that are keys.

- a form's many-to-many field (a user's groups and permissions, a group's permissions) checks the
  posted ids one by one with an exact lookup (which Django answers "no row" past the column's
  range), then all at once with ``pk__in`` (which it does not): an id past a bigint is an
  ``OverflowError`` on SQLite, a 500. ``RelatedFieldGuardMixin`` gives every many-to-many field
  ``ModelMultipleChoiceField``, whose ids past the range are the field's "not a valid value" error
  (``accounts.admin`` registers ``auth.Group``'s admin again with it).

``AdminQueryGuardMiddleware`` answers such a query string on a changelist as Django answers any
invalid lookup there (``ModelAdmin.changelist_view``: a redirect to ``?e=1``, which shows "Database
error" once, then the page), and on any other admin view, or such an action, with a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from django import forms
from django.contrib.admin import widgets
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.options import BaseModelAdmin
from django.contrib.admin.views.main import ERROR_FLAG
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponseBadRequest, HttpResponseRedirect
from django.http.response import HttpResponseBase
from django.utils.deprecation import MiddlewareMixin

from .text import holds_nul

# A date hierarchy's parameters, and the values ``ChangeList.get_filters`` can build dates from
# (the year's next year must exist too: datetime.MAXYEAR is 9999).
_DATE_PART = re.compile(r"__(year|month|day)$")
_DATE_RANGES = {"year": (1, 9998), "month": (1, 12), "day": (1, 31)}


def _date_part_ok(part: str, value: str) -> bool:
    low, high = _DATE_RANGES[part]
    return value.isascii() and value.isdigit() and low <= int(value) <= high


def admin_query_refused(request: HttpRequest) -> bool:
    """Return whether ``request``'s query string holds what the admin would send the database as a 500.

    A NUL character in any parameter's name or value, or a date hierarchy part (``<field>__year``,
    ``__month``, ``__day``) that is not a whole number in a date's range (years 1 to 9998).
    """
    for key, values in request.GET.lists():
        if holds_nul(key) or any(holds_nul(value) for value in values):
            return True
        part = _DATE_PART.search(key)
        if part and not all(_date_part_ok(part.group(1), value) for value in values):
            return True
    return False


def admin_selection_refused(request: HttpRequest, view_func: Callable[..., Any]) -> bool:
    """Return whether ``request`` posts, to a changelist, an admin action with a selected object id, or
    a ``list_editable`` row's id (``form-<n>-<pk name>``), that is not a primary key of its model
    (``view_func.model_admin``: Django sets it on each model admin view), or is one outside its
    column's range."""
    if request.method != "POST":
        return False
    model_admin = getattr(view_func, "model_admin", None)
    if model_admin is None:
        return False
    pk = model_admin.model._meta.pk
    edited = re.compile(rf"form-\d+-{re.escape(pk.name)}")  # ModelAdmin._get_edited_object_pks
    values = request.POST.getlist(ACTION_CHECKBOX_NAME)
    if model_admin.list_editable:
        values += [value for key in request.POST if edited.fullmatch(key) for value in request.POST.getlist(key)]
    for value in values:
        if holds_nul(value) or value in pk.empty_values:
            return True
        try:
            pk.run_validators(pk.to_python(value))  # the validators: the column's range (a bigint's)
        except ValidationError:
            return True
    return False


def inline_rows_stored_meanwhile(formset: Any, fields: Sequence[str], message: str) -> None:
    """Add ``message`` as an error on ``fields[0]`` of each new row of ``formset`` (an inline formset)
    whose ``fields`` equal those of a stored row of the same parent that is not on the page.

    For a unique constraint on the parent key and ``fields``: Django leaves it to the database for
    inline rows (the parent key is excluded from their validation) and the formset compares only the
    rows on the page, so a row stored since the page was loaded (another operator, another tab) made
    the save an ``IntegrityError``, a 500. Rows on the page are left to the formset (changed or
    deleted, they are saved before the new rows).
    """
    parent = formset.instance
    if parent.pk is None:
        return
    on_page = [form.instance.pk for form in formset.initial_forms if form.instance.pk is not None]
    stored = formset.model._default_manager.filter(**{formset.fk.name: parent}).exclude(pk__in=on_page)
    for form in formset.extra_forms:
        values = {name: (form.cleaned_data or {}).get(name) for name in fields}
        if form.cleaned_data.get("DELETE") or any(value is None for value in values.values()):
            continue
        if stored.filter(**values).exists():
            form.add_error(fields[0], message)


class AutocompleteSelect(widgets.AutocompleteSelect):
    """Django's autocomplete widget, rendering as selected only values that are keys of the related model."""

    def optgroups(self, name: str, value: Sequence[str], attr: dict[str, Any] | None = None) -> Any:
        remote = self.field.remote_field
        opts = remote.model._meta
        target = opts.get_field(getattr(remote, "field_name", None) or opts.pk.name)
        keys = []
        for item in value:
            try:
                if not holds_nul(str(item)):
                    target.run_validators(target.to_python(item))  # past a bigint: OverflowError on SQLite
                    keys.append(item)
            except ValidationError:
                pass  # not a key: the form's field reports it; nothing to render as selected
        return super().optgroups(name, keys, attr)


class ModelMultipleChoiceField(forms.ModelMultipleChoiceField):
    """Django's many-to-many form field, refusing an id outside its column's range before any query."""

    def _check_values(self, value: Any) -> Any:
        opts = self.queryset.model._meta  # type: ignore[union-attr]  # a choice field always has one
        target = opts.get_field(self.to_field_name) if self.to_field_name else opts.pk
        if isinstance(value, list | tuple | set | frozenset):
            for item in value:
                try:
                    if item is not None and not holds_nul(str(item)):
                        target.run_validators(target.to_python(item))  # past a bigint: OverflowError on SQLite
                except ValidationError:
                    raise ValidationError(
                        self.error_messages["invalid_pk_value"], code="invalid_pk_value", params={"pk": item}
                    ) from None
        return super()._check_values(value)  # type: ignore[misc]  # Django's, missing from django-stubs


class RelatedFieldGuardMixin(BaseModelAdmin):
    """Give a model admin's or inline's ``autocomplete_fields`` foreign keys ``AutocompleteSelect``, and its
    many-to-many fields ``ModelMultipleChoiceField``.

    Put it before ``admin.ModelAdmin`` or an inline class: both derive from ``BaseModelAdmin``."""

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if "widget" not in kwargs and db_field.name in self.get_autocomplete_fields(request):
            kwargs["widget"] = AutocompleteSelect(db_field, self.admin_site, using=kwargs.get("using"))
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("form_class", ModelMultipleChoiceField)
        return super().formfield_for_manytomany(db_field, request, **kwargs)  # type: ignore[arg-type]


class AdminQueryGuardMiddleware(MiddlewareMixin):
    """Refuse an admin request that would be a 500 (``admin_query_refused``, ``admin_selection_refused``).

    Runs in ``process_view``, where the URL is resolved: only views of the ``admin`` application
    (``admin.site.urls``) are checked, whatever their URL prefix. ``process_view`` is a coroutine:
    under ASGI the handler awaits it on the event loop (a sync one would cost every request a thread
    hop, FIELD-NOTES); the test client's sync handler adapts it.
    """

    async def process_view(
        self, request: HttpRequest, view_func: Callable[..., Any], view_args: Any, view_kwargs: Any
    ) -> HttpResponseBase | None:
        match = request.resolver_match
        if match is None or match.app_name != "admin":
            return None
        changelist = (match.url_name or "").endswith("_changelist")
        if admin_query_refused(request):
            if changelist:  # as ModelAdmin.changelist_view answers a bad lookup
                return HttpResponseRedirect(f"{request.path}?{ERROR_FLAG}=1")
            return HttpResponseBadRequest("This query string is not valid here.", content_type="text/plain")
        if changelist and admin_selection_refused(request, view_func):
            return HttpResponseBadRequest("A selected object id is not valid.", content_type="text/plain")
        return None


__all__ = [
    "AdminQueryGuardMiddleware",
    "RelatedFieldGuardMixin",
    "AutocompleteSelect",
    "ModelMultipleChoiceField",
    "admin_query_refused",
    "admin_selection_refused",
    "inline_rows_stored_meanwhile",
]
