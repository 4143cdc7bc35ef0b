"""A CSV renderer for DRF views: ``?format=csv`` or ``Accept: text/csv``.

Written on Python's ``csv`` module rather than taken from djangorestframework-csv: that package
(DRF's docs point to it) had one burst of releases in 2023 after years without one, guesses its
column order by sorting keys, and writes spreadsheet formulas through unchanged. Ours is short:
the view names the columns, and text cells that a spreadsheet would run as a formula are
neutralised as OWASP advises (https://owasp.org/www-community/attacks/CSV_Injection).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer

from .errors import ApplicationError

# A text cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """Return ``value`` as a CSV cell: None as empty, a Decimal in fixed-point notation (``0.00000000``,
    never ``str(Decimal)``'s ``0E-8``), text that would run as a formula prefixed with ``'``."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


class CSVRenderer(BaseRenderer):
    """Render a list of flat dicts as CSV (RFC 4180: CRLF line ends, a header row first), UTF-8.

    The columns are ``renderer_context["header"]`` (a sequence of keys) when the view sets it, else
    the first row's keys; a key a row lacks is an empty cell. ``data`` that is a single dict is one
    row.
    """

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        rows: Sequence[Mapping[str, Any]] = [data] if isinstance(data, Mapping) else list(data or ())
        header = list((renderer_context or {}).get("header") or (rows[0].keys() if rows else ()))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([csv_cell(row.get(key)) for key in header])
        return buffer.getvalue().encode(self.charset)


class FormatContentNegotiation(DefaultContentNegotiation):
    """DRF's content negotiation, but a ``?format=`` no renderer of the view has is a 400 naming
    ``format`` and the formats it has (code ``invalid``, as other bad query parameters), not DRF's
    404 "Not found." (the URL is right; a query parameter is wrong)."""

    def filter_renderers(self, renderers: Iterable[BaseRenderer], format: str) -> list[BaseRenderer]:  # noqa: A002 - DRF's name
        renderers = list(renderers)
        kept = [renderer for renderer in renderers if renderer.format == format]
        if not kept:
            formats = ", ".join(dict.fromkeys(str(renderer.format) for renderer in renderers))
            raise ApplicationError(f"'format' must be one of: {formats}.", code="invalid", param="format")
        return kept


__all__ = ["CSVRenderer", "FormatContentNegotiation", "csv_cell"]
