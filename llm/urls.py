"""Models API routes, mounted at ``/api/``."""

from django.urls import path

from . import apis

app_name = "llm"

urlpatterns = [
    path("models/", apis.LLMModelListApi.as_view(), name="model-list"),
]
