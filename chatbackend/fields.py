"""DRF fields shared by the apps' input serializers: JSON types as sent, no coercion.

DRF's ``CharField`` turns ``0`` or ``true`` into ``"0"`` / ``"True"``, so a request whose JSON
breaks the published OpenAPI schema (``type: string``) would be accepted. These fields answer
400 instead, like every other schema violation; the error's ``param`` names the field.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

# The largest PostgreSQL bigint (SQLite's INTEGER too): a larger number cannot be stored or even be
# a query parameter on SQLite (OverflowError, a 500).
BIGINT_MAX = 2**63 - 1
# The largest row id (Django's BigAutoField is a bigint): a larger number names no row.
ID_MAX = BIGINT_MAX
# A row id in OpenAPI: what every id parameter and field admits.
ID_SCHEMA = {"type": "integer", "minimum": 1, "maximum": ID_MAX}
# A row id in a router's URL (a ViewSet's ``lookup_value_regex``): ASCII digits, as Django's ``<int:>``.
# Not ``\d+``, which matches any Unicode digit (``３９``, ``٣٩``) that ``int()`` then reads as the id,
# so one object answered at many URLs where docs/api.md promises 404 ``unknown_url``.
ID_LOOKUP_REGEX = "[0-9]+"


class StrictCharField(serializers.CharField):
    """A JSON string: numbers, booleans, arrays and objects are rejected (400 ``invalid``)."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A JSON boolean: ``"true"``, ``"yes"``, ``1`` and the like are rejected (400 ``invalid``)."""

    def to_internal_value(self, data: Any) -> bool:
        if data is not True and data is not False:
            self.fail("invalid")
        return data


# OpenAPI 3.0 has no "empty or an email": the blank string is its own branch (``maxLength: 0``).
_BLANK_OR_EMAIL_SCHEMA = {
    "anyOf": [{"type": "string", "format": "email"}, {"type": "string", "maxLength": 0}],
    "description": "An email address, or the empty string when none was given.",
}


@extend_schema_field(_BLANK_OR_EMAIL_SCHEMA)
class BlankableEmailField(serializers.EmailField):
    """An email address or ``""`` (a user's ``email`` is optional and stored blank, not null).

    Strict about the JSON type like ``StrictCharField``. Documented as ``oneOf`` an email or the
    empty string, since ``format: email`` alone would call the blank value invalid.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_blank", True)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


__all__ = [
    "BIGINT_MAX",
    "ID_LOOKUP_REGEX",
    "ID_MAX",
    "ID_SCHEMA",
    "BlankableEmailField",
    "StrictBooleanField",
    "StrictCharField",
]
