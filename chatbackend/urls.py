"""Root URLs: admin, REST API (/api), OpenAI-compatible API (/v1), OpenAPI docs, health probes, web pages."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from . import health

urlpatterns = [
    path("health/live", health.live, name="health-live"),
    path("health/ready", health.ready, name="health-ready"),
    path("admin/", admin.site.urls),
    path("", include("conversations.sync.urls")),  # NextChat sync: /dav/, /api/webdav/, /api/upstash/
    path("api/", include("accounts.urls")),
    path("api/", include("llm.urls")),
    path("api/", include("conversations.urls")),
    path("api/", include("conversations.conversation_templates.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("llm.anthropic.urls")),  # before llm.openai.urls: it ends with the /v1 catch-all
    path("", include("conversations.stored_completions.urls")),  # /v1/chat/completions (POST and GET) and stored ones
    path("", include("llm.openai.urls")),
    path("", include("conversations.sharing.urls")),  # /share/<token>: a share link's HTML page
    path("", include("chatbackend.pages")),
]

# Django's own errors (unknown URL, body too large, bad Host, a bug) as JSON under /api, /v1, /dashboard.
handler400 = "chatbackend.exception_handlers.bad_request"
handler404 = "chatbackend.exception_handlers.page_not_found"
handler500 = "chatbackend.exception_handlers.server_error"
