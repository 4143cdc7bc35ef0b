"""``EventStreamResponse``: a ``text/event-stream`` answer that the streaming handler writes part by part.

A ``StreamingHttpResponse`` is read through two generator layers per part (``__aiter__`` and
``streaming_content``'s ``make_bytes`` wrapper) and a third in ``ASGIHandler.send_response``
(``chunk_bytes``). For a body that already yields ``bytes``, one per write, those layers do
nothing but cost CPU on every token; ``chatbackend.handlers.StreamingASGIHandler`` sends an
``EventStreamResponse``'s parts as they come instead (measured: ~3–6 µs per part on this project's
2-core machine, ~5 % of the server's CPU per token). Under any other handler (WSGI, the test
client) it behaves as the ``StreamingHttpResponse`` it is.

Headers: ``Cache-Control: no-cache`` and ``X-Accel-Buffering: no`` so proxies pass each part on at
once (FIELD-NOTES, "HTTP streaming"). Never gzip it: each part would become its own gzip member.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from django.http import StreamingHttpResponse


class EventStreamResponse(StreamingHttpResponse):
    """Stream ``body`` (an async iterator of ``bytes``, e.g. SSE events) as ``text/event-stream``.

    ``body_parts``: the iterator itself, for a handler that writes each part unwrapped. It must
    yield ``bytes`` only.
    """

    def __init__(self, body: AsyncIterator[bytes], *, status: int = 200) -> None:
        super().__init__(body, content_type="text/event-stream", status=status)
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"
        self.body_parts = body


def sse_event_schema(description: str, *, events: Sequence[str] = (), data: str = "") -> dict[str, Any]:
    """Return the OpenAPI schema of one server-sent event of a ``text/event-stream`` response.

    A stream is a sequence of events, so the media type's schema describes one event, as OpenAPI
    3.2's ``itemSchema`` does (https://spec.openapis.org/oas/v3.2.0.html#sequential-media-types)
    and as schemathesis reads a 3.0 document: ``{event, data, id, retry}`` after the SSE parsing
    rules (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation;
    ``event`` is ``message`` when the stream names none). ``events``: the event types sent (an
    enum), if the stream names them. ``data``: what each ``data`` string holds. OpenAPI 3.0 has no
    keyword for "a string holding JSON of this schema", so that is said in prose.
    """
    event: dict[str, Any] = {"type": "string"}
    if events:
        event["enum"] = list(events)
    return {
        "type": "object",
        "description": description,
        "properties": {
            "event": event,
            "data": {"type": "string", "description": data},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "required": ["data"],
    }


__all__ = ["EventStreamResponse", "sse_event_schema"]
