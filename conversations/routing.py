"""WebSocket routes (``chatbackend.asgi`` mounts them behind ``TokenAuthMiddleware``).

The last route takes every other path: closed with 4404 (``UnknownRouteConsumer``), not a 500.
"""

from django.urls import path, re_path

from .consumers import ConversationConsumer, UnknownRouteConsumer

websocket_urlpatterns = [
    path("ws/conversations/<int:conversation_id>/", ConversationConsumer.as_asgi()),
    re_path(r"^.*$", UnknownRouteConsumer.as_asgi()),
]
