"""URLs of the project's own HTML pages (rendered from ``templates/``)."""

from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.generic import TemplateView

# csrf_exempt: a read-only page (TemplateView answers an unsafe method with 405), so CSRF protects
# nothing, and without it CsrfViewMiddleware, which runs first, answered a POST with 403 instead.
urlpatterns = [path("", csrf_exempt(TemplateView.as_view(template_name="home.html")), name="home")]
