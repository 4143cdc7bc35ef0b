"""URLs of the OpenAI-compatible API, mounted at the site root (``/v1/...``, ``/dashboard/...``).

No trailing slashes, as OpenAI's URLs. ``/v1/chat/completions`` is routed by method in
``conversations.stored_completions.urls`` (its ``GET`` lists stored completions: conversations).
The last pattern turns any other ``/v1`` or ``/dashboard`` URL into OpenAI's 404 JSON instead of
Django's HTML page.
"""

from django.urls import path, re_path

from ..anthropic import models_apis as anthropic_models_apis
from ..anthropic.wire import by_wire_format
from . import apis, billing_apis, models_apis, responses_apis

urlpatterns = [
    path("v1/responses", responses_apis.responses_create, name="openai-responses-create"),
    # Both SDKs call these: a request with anthropic-version gets Anthropic's shape (llm.anthropic.wire).
    path(
        "v1/models",
        by_wire_format(openai=models_apis.model_list, anthropic=anthropic_models_apis.model_list),
        name="openai-model-list",
    ),
    path(
        "v1/models/<path:model>",
        by_wire_format(openai=models_apis.model_retrieve, anthropic=anthropic_models_apis.model_retrieve),
        name="openai-model-retrieve",
    ),
    path("dashboard/billing/usage", billing_apis.billing_usage, name="openai-billing-usage"),
    path("dashboard/billing/subscription", billing_apis.billing_subscription, name="openai-billing-subscription"),
    re_path(r"^(?:v1|dashboard)(?:/.*)?$", apis.unknown_url, name="openai-unknown-url"),
]
