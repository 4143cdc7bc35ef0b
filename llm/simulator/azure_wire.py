"""Azure OpenAI's deployment route, as the simulator answers it: auth and URL checks before the OpenAI handler.

Spec: https://learn.microsoft.com/en-us/azure/ai-services/openai/reference#chat-completions —
``POST {endpoint}/openai/deployments/{deployment-id}/chat/completions?api-version=YYYY-MM-DD[-preview]``
with an ``api-key`` header; the body and the answer are OpenAI's chat completions (the
deployment, not the body's ``model``, picks the model). Errors are OpenAI-shaped with a string
``code``: ``{"error": {"code": "401", "message": ...}}``.
"""

from __future__ import annotations

import hmac

from aiohttp import web


def azure_error(status: int, message: str) -> web.Response:
    """Return Azure's error body ``{"error": {"code": "<status>", "message": ...}}``."""
    return web.json_response({"error": {"code": str(status), "message": message}}, status=status)


def azure_denied(request: web.Request, api_key: str) -> web.Response | None:
    """Return Azure's answer to a request without ``api-version`` or a right ``api-key``, or None.

    Azure answers a missing ``api-version`` with 404 "Resource not found", and a missing or wrong
    key with 401.
    """
    if not request.query.get("api-version"):
        return azure_error(404, "Resource not found")
    if api_key and not hmac.compare_digest(request.headers.get("api-key", "").encode(), api_key.encode()):
        message = (
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
            "key for an active subscription and use a correct regional API endpoint for your resource."
        )
        return azure_error(401, message)
    return None


__all__ = ["azure_denied", "azure_error"]
