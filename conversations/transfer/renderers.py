"""The Markdown renderer of an export (``?format=markdown``, or ``Accept: text/markdown``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework.renderers import BaseRenderer, JSONRenderer

from .selectors import document_markdown


class MarkdownRenderer(BaseRenderer):
    """Render an export document as Markdown (``selectors.document_markdown``); an error stays JSON.

    DRF picks a renderer before the view runs, so an error answer (a 404) would otherwise be written
    by this one: it is written as JSON and labelled so instead.
    """

    media_type = "text/markdown"
    format = "markdown"
    charset = "utf-8"

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Mapping[str, Any] | None = None
    ) -> bytes:
        response = (renderer_context or {}).get("response")
        if response is not None and response.status_code >= 400:
            response["Content-Type"] = "application/json"
            return JSONRenderer().render(data)
        return document_markdown(data).encode("utf-8")
