"""Conversations API routes, mounted at ``/api/``."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import apis, sse

app_name = "conversations"

router = SimpleRouter()
router.register("conversations", apis.ConversationViewSet, basename="conversation")

urlpatterns = [
    # GET lists through DRF, POST sends through the async view: one path, two handlers.
    path("conversations/<int:conversation_id>/messages/", sse.conversation_messages_view, name="message-list"),
    path(
        "conversations/<int:conversation_id>/messages/<int:message_id>/stop/",
        apis.ConversationMessageStopApi.as_view(),
        name="message-stop",
    ),
    path(
        "conversations/<int:conversation_id>/messages/<int:message_id>/edit/",
        sse.message_edit,
        name="message-edit",
    ),
    path(
        "conversations/<int:conversation_id>/messages/<int:message_id>/regenerate/",
        sse.message_regenerate,
        name="message-regenerate",
    ),
    path(
        "conversations/<int:conversation_id>/messages/<int:message_id>/activate/",
        apis.ConversationMessageActivateApi.as_view(),
        name="message-activate",
    ),
    path("conversations/<int:conversation_id>/tree/", apis.ConversationTreeApi.as_view(), name="conversation-tree"),
    *router.urls,
]
