"""URLs of the Anthropic Messages API, mounted at the site root before ``llm.openai.urls``.

``llm.openai.urls`` ends with a catch-all for unknown ``/v1`` URLs, so this module is included first;
its own catch-all answers unknown ``/v1/messages/...`` URLs (the Message Batches API, for one) in
Anthropic's error shape, which an Anthropic client reads.
"""

from django.urls import path, re_path

from . import apis

urlpatterns = [
    path("v1/messages", apis.messages_create, name="anthropic-messages"),
    path("v1/messages/count_tokens", apis.messages_count_tokens, name="anthropic-messages-count-tokens"),
    re_path(r"^v1/messages/", apis.unknown_url, name="anthropic-unknown-url"),
]
