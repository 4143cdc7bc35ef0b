"""ASGI entry point: HTTP through Django, WebSocket through Channels.

Static files (admin, Swagger UI) are served by Django's ASGIStaticFilesHandler, which only
intercepts ``STATIC_URL`` paths; put a CDN or reverse proxy in front for heavy traffic.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbackend.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from accounts.websocket import TokenAuthMiddleware  # noqa: E402
from conversations.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": ASGIStaticFilesHandler(django_asgi_app),
        "websocket": TokenAuthMiddleware(URLRouter(websocket_urlpatterns)),
    }
)
