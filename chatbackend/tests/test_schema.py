"""The OpenAPI document: generated without warnings, complete, served, and true to the responses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.test import AsyncClient
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from tests.kit import bearer, chat_body, post_chat, sse_data, streamed_content

ROOT = Path(__file__).resolve().parents[2]
_METHODS = re.compile(r"\b((?:GET|POST|PUT|PATCH|DELETE)(?:/(?:GET|POST|PUT|PATCH|DELETE))*) (/[^\s|?`,]+)")
_PARAMETER = re.compile(r"\{[^}]+\}")


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Generate the document the way CI does: validated, any warning fatal."""
    path = tmp_path_factory.mktemp("schema") / "openapi.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(path))
    return yaml.safe_load(path.read_text())


def documented_operations() -> set[tuple[str, str]]:
    """Return ``(METHOD, path shape)`` for every HTTP operation docs/api.md lists."""
    operations = set()
    for methods, path in _METHODS.findall((ROOT / "docs" / "api.md").read_text()):
        for method in methods.split("/"):
            operations.add((method, _PARAMETER.sub("{}", path)))
    return operations


def test_schema_generates_without_warnings_and_has_every_documented_operation(schema):
    documented = documented_operations()
    assert ("POST", "/v1/chat/completions") in documented and len(documented) > 20  # the parse works
    present = {
        (method.upper(), _PARAMETER.sub("{}", path))
        for path, operations in schema["paths"].items()
        for method in operations
    }
    assert documented - present == set()


def test_async_endpoints_are_documented_from_their_serializers(schema):
    paths, components = schema["paths"], schema["components"]
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionCreateInputRequest"
    }
    request = components["schemas"]["ChatCompletionCreateInputRequest"]
    assert {"model", "messages", "stream", "stream_options", "temperature", "tools", "max_completion_tokens"} <= set(
        request["properties"]
    )
    assert set(request["required"]) == {"model", "messages"}
    ok = chat["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletionOutput")
    assert ok["text/event-stream"]["schema"]["$ref"].endswith("/ChatCompletionChunkOutput")
    for status in ("400", "401", "404", "429", "502"):
        assert chat["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOutput")

    for path, method in [
        ("/v1/models", "get"),
        ("/v1/models/{model}", "get"),
        ("/dashboard/billing/usage", "get"),
        ("/dashboard/billing/subscription", "get"),
        ("/api/conversations/{conversation_id}/messages/", "post"),
    ]:
        operation = paths[path][method]
        assert operation["operationId"] and operation["description"], path
        schemes = {name for requirement in operation["security"] for name in requirement}
        assert schemes and all(components["securitySchemes"][name]["scheme"] == "bearer" for name in schemes)
    usage_parameters = {p["name"]: p for p in paths["/dashboard/billing/usage"]["get"]["parameters"]}
    assert usage_parameters["start_date"]["required"] and usage_parameters["end_date"]["in"] == "query"
    send = paths["/api/conversations/{conversation_id}/messages/"]["post"]["responses"]
    assert "application/json" in send["201"]["content"] and "text/event-stream" in send["200"]["content"]


@pytest.mark.django_db
def test_schema_and_swagger_ui_are_served_without_a_cdn(client):
    response = client.get("/api/schema/")
    assert response.status_code == 200
    assert "/v1/chat/completions" in response.content.decode()

    response = client.get("/api/docs/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page
    assert not re.search(r"https?://(cdn\.|unpkg|cdnjs)", page)
    assert finders.find("drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")


# --- The document tells the truth: real responses validate against its components -----------


def _validator(schema: dict[str, Any], component: str) -> OAS30Validator:
    # OpenAPI 3.0 schemas are JSON Schema draft 4 plus ``nullable``; refs resolve in the document.
    uri = "https://chatbackend.invalid/openapi.json"
    registry = Registry().with_resource(uri, Resource.from_contents(schema, default_specification=DRAFT4))
    return OAS30Validator({"$ref": f"{uri}#/components/schemas/{component}"}, registry=registry)


def assert_matches(schema: dict[str, Any], component: str, instance: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator(schema, component).iter_errors(instance)]
    assert errors == [], (component, errors, instance)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_real_responses_match_the_documented_components(schema, api_key_secret, sim_model):
    client = AsyncClient()
    response = await post_chat(client, chat_body("sim-model"), bearer(api_key_secret))
    assert_matches(schema, "ChatCompletionOutput", json.loads(response.content))

    body = chat_body("sim-model", stream=True, stream_options={"include_usage": True})
    response = await post_chat(client, body, bearer(api_key_secret))
    payloads = sse_data(await streamed_content(response))
    for payload in payloads[:-1]:
        assert_matches(schema, "ChatCompletionChunkOutput", json.loads(payload))

    response = await client.get("/v1/models", headers=bearer(api_key_secret))
    assert_matches(schema, "OpenAIModelListOutput", json.loads(response.content))
    response = await client.get("/v1/models/sim-model", headers=bearer(api_key_secret))
    assert_matches(schema, "OpenAIModelOutput", json.loads(response.content))
    query = "start_date=2026-01-01&end_date=2026-02-01"
    response = await client.get(f"/dashboard/billing/usage?{query}", headers=bearer(api_key_secret))
    assert_matches(schema, "BillingUsageOutput", json.loads(response.content))
    response = await client.get("/dashboard/billing/subscription", headers=bearer(api_key_secret))
    assert_matches(schema, "BillingSubscriptionOutput", json.loads(response.content))
    response = await post_chat(client, {"model": "sim-model", "messages": []}, bearer(api_key_secret))
    assert_matches(schema, "ErrorOutput", json.loads(response.content))
