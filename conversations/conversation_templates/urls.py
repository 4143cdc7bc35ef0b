"""``/api/templates/`` routes, mounted at ``/api/`` (``chatbackend.urls``)."""

from rest_framework.routers import SimpleRouter

from . import apis

app_name = "conversation_templates"

router = SimpleRouter()
router.register("templates", apis.ConversationTemplateViewSet, basename="template")

urlpatterns = router.urls
