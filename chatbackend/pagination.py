"""Page-number pagination for the REST API's lists, with errors a client can act on.

``?page=N``: N a whole number from 1. DRF's ``PageNumberPagination`` answers 404 "Invalid page."
for ``?page=0`` and ``?page=abc`` alike, which reads as "this list does not exist". Here a page
number that is not a positive integer is the client's malformed input, 400 (``param: page``); a
well-formed page past the last one is 404 ``not_found``, as DRF has it. Both are documented in
OpenAPI on every paginated operation (``chatbackend.schema.document_pagination_errors``).
"""

from __future__ import annotations

from typing import Any

from django.core.paginator import Paginator
from rest_framework import pagination
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request


class PageNumberPagination(pagination.PageNumberPagination):
    """``?page=N`` (N >= 1, default 1); ``PAGE_SIZE`` items a page."""

    # DRF also takes ``?page=last``; the documented parameter is an integer, so it is not offered.
    last_page_strings = ()

    def get_page_number(self, request: Request, paginator: Paginator) -> Any:
        raw = request.query_params.get(self.page_query_param)
        if raw is None:
            return 1
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            raise ValidationError({self.page_query_param: ["A page number is a whole number from 1."]}, code="invalid")
        return int(raw)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_query_param:
                parameter["schema"] = {**parameter["schema"], "minimum": 1}
                parameter["description"] = "A page number from 1; past the last page is a 404."
        return parameters
