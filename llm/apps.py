from django.apps import AppConfig


class LlmConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "llm"

    def ready(self) -> None:
        # Bad provider configuration stops start-up (ImproperlyConfigured), not the first request.
        from .models import Provider
        from .providers import load_provider_backends

        load_provider_backends(required_kinds=Provider.Kind.values)
