from django.apps import AppConfig


class LlmConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "llm"

    def ready(self) -> None:
        # Bad provider configuration stops start-up (ImproperlyConfigured), not the first request.
        from .models import Deployment, LLMModel, ModelAlias, Provider
        from .openai.services import completion_store
        from .providers import load_provider_backends
        from .selectors import enabled_model_cache

        load_provider_backends(required_kinds=Provider.Kind.values)
        completion_store()  # OPENAI_COMPLETION_STORE imports, or start-up stops (ImproperlyConfigured)
        # Every process drops its cached models when a model, a provider or an alias changes:
        # disabled, repriced, pointed elsewhere, its key rotated, an alias re-targeted.
        enabled_model_cache.invalidate_on(LLMModel)
        enabled_model_cache.invalidate_on(Provider)
        enabled_model_cache.invalidate_on(ModelAlias)
        enabled_model_cache.invalidate_on(Deployment)  # the snapshot holds the model's deployments
