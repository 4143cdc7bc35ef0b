"""Strings from a request on their way to the database: the NUL character, which PostgreSQL text cannot hold.

PostgreSQL can neither store a NUL (U+0000) in a text column nor compare text with one: psycopg raises
``DataError`` ("PostgreSQL text fields cannot contain NUL (0x00) bytes"), a 500. SQLite takes it, so a
check per backend would let the two disagree. DRF's ``CharField`` and Django's form ``CharField``
refuse it already (``ProhibitNullCharactersValidator``); what reaches a query any other way (a path
segment, a query parameter read by hand, a dictionary key) passes one of these first:

- ``holds_nul``: for a lookup by an id or a name, which then finds nothing without a query (no
  stored text holds one), answered as an unknown id is (404).
- ``refuse_nul``: for a query parameter, a 400 naming it, as the project answers a NUL in any
  request string (docs/api.md, "Errors").
"""

from __future__ import annotations

from chatbackend.errors import ApplicationError

NUL = "\x00"


def holds_nul(value: str) -> bool:
    """Return whether ``value`` holds a NUL character, which no text stored in PostgreSQL holds."""
    return NUL in value


def refuse_nul(value: str, *, param: str) -> None:
    """Refuse ``value``, the request's ``param`` (a query parameter, a key of one), if it holds a NUL character.

    Raises ``ApplicationError`` 400 ``invalid`` naming ``param`` (DRF's code and words for a NUL in
    a request string).
    """
    if holds_nul(value):
        raise ApplicationError(f"'{param}': null characters are not allowed.", code="invalid", param=param)


__all__ = ["NUL", "holds_nul", "refuse_nul"]
