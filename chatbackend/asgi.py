"""ASGI entry point: HTTP through Django, WebSocket through Channels, lifespan through ``chatbackend.lifespan``.

The client address in each connection's scope is first resolved through ``TRUSTED_PROXY_IPS``
(``chatbackend.client_ip``). HTTP goes through one of two Django handlers (``chatbackend.handlers``,
both bounding request bodies at ``REQUEST_BODY_MAX_BYTES`` while they arrive): the streaming
endpoints (``/v1``, ``/dashboard``, ``POST /api/conversations/<id>/messages/``) through a lean
chain of async middleware (``STREAMING_MIDDLEWARE``), everything else through ``MIDDLEWARE``.

Static files (admin, Swagger UI) are served by Django's ASGIStaticFilesHandler, which only
intercepts ``STATIC_URL`` paths; put a CDN or reverse proxy in front for heavy traffic.

With ``GC_TUNING`` the garbage collector is tuned once the application is built (see
``chatbackend.handlers.tune_gc``). Only this entry point does it: management commands keep
CPython's defaults.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbackend.settings")
django.setup(set_prefix=False)  # as django.core.asgi.get_asgi_application does, before the apps import

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from accounts.websocket import TokenAuthMiddleware  # noqa: E402
from conversations.routing import websocket_urlpatterns  # noqa: E402
from llm.anthropic.wire import scope_error_response  # noqa: E402

from .client_ip import TrustedProxyMiddleware  # noqa: E402
from .handlers import BoundedBodyASGIHandler, StreamingASGIHandler, StreamingRouter, tune_gc  # noqa: E402
from .lifespan import LifespanApp  # noqa: E402

# A body too large for /v1/messages (or with anthropic-version) is answered in Anthropic's shape.
django_asgi_app = BoundedBodyASGIHandler(api_error_response=scope_error_response)
streaming_asgi_app = StreamingASGIHandler(api_error_response=scope_error_response)

application = LifespanApp(
    # First of all: every reader of the client address gets the one TRUSTED_PROXY_IPS decides.
    TrustedProxyMiddleware(
        ProtocolTypeRouter(
            {
                # ASGIStaticFilesHandler takes any ASGI app (it only calls it); django-stubs says ASGIHandler.
                "http": ASGIStaticFilesHandler(
                    StreamingRouter(default=django_asgi_app, streaming=streaming_asgi_app)  # type: ignore[arg-type]
                ),
                "websocket": TokenAuthMiddleware(URLRouter(websocket_urlpatterns)),
            }
        )
    )
)

if settings.GC_TUNING:
    tune_gc()
