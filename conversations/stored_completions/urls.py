"""URLs of stored chat completions, mounted at the site root before ``llm.openai.urls`` (its ``/v1`` catch-all).

``v1/chat/completions`` itself is routed here by method: ``POST`` creates a completion
(``llm.openai.apis.chat_completions``), ``GET`` lists the stored ones.
"""

from django.urls import path

from . import apis

urlpatterns = [
    path("v1/chat/completions", apis.chat_completions, name="openai-chat-completions"),
    path("v1/chat/completions/<str:completion_id>", apis.completion_detail, name="openai-chat-completion-detail"),
    path(
        "v1/chat/completions/<str:completion_id>/messages",
        apis.completion_message_list,
        name="openai-chat-completion-messages",
    ),
]
