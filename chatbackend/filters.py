"""Query-string filters shared by the apps' list endpoints (django-filter)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django_filters.fields import IsoDateTimeField
from drf_spectacular.utils import extend_schema_field
from rest_framework import filters, serializers
from rest_framework.request import Request

from .fields import ID_MAX, ID_SCHEMA


def in_utc(value: dt.datetime) -> dt.datetime:
    """Return the aware ``value`` in UTC; the earliest or latest datetime when UTC has no such time
    (year 1 at +10:00 is year 0, year 9999 at -10:00 is year 10000).

    ISO 8601 offsets go up to ±23:59, but PostgreSQL refuses a timestamp whose offset is 16 hours or
    more (``time zone displacement out of range``), so queries only ever carry UTC.
    """
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        offset = value.utcoffset() or dt.timedelta(0)
        return (dt.datetime.min if offset > dt.timedelta(0) else dt.datetime.max).replace(tzinfo=dt.UTC)


class UTCIsoDateTimeField(IsoDateTimeField):
    """django-filter's ISO 8601 date-time field, cleaned to UTC (``in_utc``)."""

    def to_python(self, value: Any) -> dt.datetime | None:
        parsed = super().to_python(value)
        return None if parsed is None else in_utc(parsed)


class UTCIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    """``IsoDateTimeFilter`` whose value reaches the database in UTC: any valid offset is a filter,
    never a database error (a 500)."""

    field_class = UTCIsoDateTimeField


class AnyChoiceFilter(django_filters.ChoiceFilter):
    """``ChoiceFilter`` whose empty value (``?name=``) means any, as django-filter answers it, and
    whose OpenAPI enum says so: ``""`` is one of its choices (clients and schemathesis otherwise
    read the enum as refusing it)."""

    def __init__(self, *args: Any, choices: Any, **kwargs: Any) -> None:
        kwargs.setdefault("empty_label", None)  # the "" choice below is the empty one
        super().__init__(*args, choices=[*choices, ("", "any")], **kwargs)


class IdFormField(forms.IntegerField):
    """A row id as the schema's ``ID_SCHEMA`` says: a whole number from 1 to ``ID_MAX``.

    ``1.0``, ``0.5``, an empty value and a number out of that range are invalid (a 400 naming the
    parameter): outside it no row has the id, and SQLite cannot take the number (a 500).
    """

    default_error_messages = {"invalid": f"A row id: a whole number from 1 to {ID_MAX}."}

    def to_python(self, value: Any) -> int | None:
        if value is not None and not re.fullmatch(r"-?[0-9]+", str(value)):
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        number: int | None = super().to_python(value)
        if number is not None and not 1 <= number <= ID_MAX:
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        return number


@extend_schema_field(ID_SCHEMA)
class IdFilter(django_filters.NumberFilter):
    """``?name=<row id>``: the rows whose field is that id; anything but an id (``IdFormField``) is a 400."""

    field_class = IdFormField


class SearchFilter(filters.SearchFilter):
    """DRF's ``?search=`` filter whose refusal (a NUL character) names the parameter.

    DRF validates the value with a bare ``CharField``, whose error is a list: rendered as
    ``non_field_errors`` with ``param: null``, where every other query parameter's 400 names it.
    """

    def get_search_terms(self, request: Request) -> Any:
        try:
            return super().get_search_terms(request)
        except serializers.ValidationError as exc:
            raise serializers.ValidationError({self.search_param: exc.detail}) from exc
