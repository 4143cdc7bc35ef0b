"""URLs of the Anthropic Messages API, mounted at the site root before ``llm.openai.urls``.

``llm.openai.urls`` ends with a catch-all for unknown ``/v1`` URLs, so this module is included first.
"""

from django.urls import path

from . import apis

urlpatterns = [
    path("v1/messages", apis.messages_create, name="anthropic-messages"),
    path("v1/messages/count_tokens", apis.messages_count_tokens, name="anthropic-messages-count-tokens"),
]
