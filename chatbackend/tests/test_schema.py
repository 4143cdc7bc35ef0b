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
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4
from rest_framework.exceptions import ValidationError

from chatbackend.errors import as_application_error
from tests.factories import UserFactory
from tests.kit import assert_error, bearer, chat_body, post_chat, sse_data, streamed_content

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
    """Return ``(METHOD, path shape)`` for every HTTP operation docs/api.md lists, but in sections
    whose heading says they are "not in the OpenAPI schema" (wire protocols such as WebDAV, whose
    methods OpenAPI cannot describe)."""
    sections = re.split(r"^(?=## )", (ROOT / "docs" / "api.md").read_text(), flags=re.M)
    text = "".join(part for part in sections if "not in the OpenAPI schema" not in part.partition("\n")[0])
    operations = set()
    for methods, path in _METHODS.findall(text):
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
    # A stream's schema describes one event (OpenAPI 3.2's itemSchema reading, schemathesis's too);
    # its ``data`` names the chunk component, which the document keeps.
    event = ok["text/event-stream"]["schema"]
    assert event["required"] == ["data"] and event["properties"]["event"]["enum"] == ["message"]
    assert "ChatCompletionChunkOutput" in event["properties"]["data"]["description"]
    assert "ChatCompletionChunkOutput" in components["schemas"]
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
    # Optional: NextChat's server mode sends neither (then: the current month).
    assert not usage_parameters["start_date"].get("required") and usage_parameters["end_date"]["in"] == "query"
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


# --- What schemathesis found (tests/test_e2e_schemathesis.py), each fixed on one side ---------


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["0", "-1", "abc", "", "1.5", "last", "٣"])
def test_a_page_that_is_not_a_whole_number_from_1_is_a_documented_400(schema, auth_client, page):
    response = auth_client.get("/api/conversations/", {"page": page})

    error = assert_error(response, 400, code="invalid", param="page")
    assert error["fields"] == {"page": ["A page number is a whole number from 1."]}
    assert_matches(schema, "ErrorOutput", response.json())
    parameters = {p["name"]: p for p in schema["paths"]["/api/conversations/"]["get"]["parameters"]}
    assert parameters["page"]["schema"] == {"type": "integer", "minimum": 1}


@pytest.mark.django_db
def test_a_page_past_the_last_is_a_documented_404(schema, auth_client):
    assert auth_client.get("/api/api-keys/", {"page": "1"}).status_code == 200  # an empty list has page 1

    response = auth_client.get("/api/api-keys/", {"page": "2"})

    assert_error(response, 404, code="not_found")
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if any(p["name"] == "page" for p in operation.get("parameters", [])):
                assert {"400", "404"} <= operation["responses"].keys(), (method, path)


@pytest.mark.django_db
def test_a_blank_email_is_what_the_schema_allows(schema, client_for):
    member = UserFactory(email="")

    response = client_for(member).get("/api/auth/me/")

    assert response.status_code == 200 and response.json()["email"] == ""
    assert_matches(schema, "UserMeOutput", response.json())
    email = OAS30Validator(
        schema["components"]["schemas"]["UserMeOutput"]["properties"]["email"], format_checker=oas30_format_checker
    )
    assert email.is_valid("") and email.is_valid("someone@example.com")
    assert not email.is_valid("not-an-email")


@pytest.mark.django_db
def test_validation_errors_carry_fields_as_an_object_even_from_a_list():
    error = as_application_error(ValidationError(["Not this."]))

    assert error is not None
    assert error.as_dict()["error"]["fields"] == {"non_field_errors": ["Not this."]}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/api/api-keys/", {"name": 0}, "name"),
        ("/api/api-keys/", {"name": True}, "name"),
        ("/api/conversations/", {"model": 1}, "model"),
        ("/api/conversations/", {"model": "sim-model", "title": 5}, "title"),
        ("/api/conversations/", {"model": "sim-model", "system_prompt": ["x"]}, "system_prompt"),
    ],
)
def test_a_number_or_boolean_where_the_schema_says_string_is_a_400(schema, auth_client, path, body, param):
    response = auth_client.post(path, body, format="json")

    assert_error(response, 400, code="invalid", param=param)
    assert_matches(schema, "ErrorOutput", response.json())


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "value"), [("username", 12345678), ("password", 1.5e300), ("email", 0), ("email", False)]
)
def test_registration_takes_strings_only(api_client, field, value):
    body = {"username": "someone", "password": "a-long-password-1", field: value}

    response = api_client.post("/api/auth/register/", body, format="json")

    assert_error(response, 400, code="invalid", param=field)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
@pytest.mark.parametrize("role", [{}, ["user"], 1, None])
async def test_a_message_role_of_the_wrong_type_is_a_400(api_key_secret, sim_model, role):
    body = {"model": "sim-model", "messages": [{"role": role, "content": "hi"}]}

    response = await post_chat(AsyncClient(), body, bearer(api_key_secret))

    assert_error(response, 400, code="invalid", param="messages.0.role")


def test_the_schema_states_the_per_role_message_rules(schema):
    messages = schema["components"]["schemas"]["ChatCompletionCreateInputRequest"]["properties"]["messages"]
    validator = OAS30Validator(messages)

    assert validator.is_valid([{"role": "user", "content": "hi"}])
    assert validator.is_valid([{"role": "assistant", "tool_calls": [_TOOL_CALL]}])
    assert validator.is_valid([{"role": "tool", "content": "42", "tool_call_id": "call_1"}])
    assert not validator.is_valid([{"role": "tool", "content": "42"}])  # tool_call_id required
    assert not validator.is_valid([{"role": "user"}])  # content required
    assert not validator.is_valid([{"role": "assistant", "content": None, "tool_calls": []}])
    assert not validator.is_valid([{"role": "user", "content": [{"type": "text"}]}])  # a text part needs text
    assert not validator.is_valid([])
    n = schema["components"]["schemas"]["ChatCompletionCreateInputRequest"]["properties"]["n"]
    assert (n["minimum"], n["maximum"]) == (1, 1)


_TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("content", ["\x1d", " \t\n", "\u3000", "\x85"])
def test_the_documented_content_pattern_refuses_what_the_server_calls_blank(schema, content):
    pattern = schema["components"]["schemas"]["MessageSendInputRequest"]["properties"]["content"]["pattern"]

    assert not content.strip()  # the server's rule (conversations.serializers.clean_message_content)
    assert re.search(pattern, content) is None
    assert re.search(pattern, content + "a") is not None


@pytest.mark.django_db
def test_login_takes_the_password_as_registered_whitespace_and_all(api_client):
    credentials = {"username": "spacey", "password": "  a long secret  "}
    assert api_client.post("/api/auth/register/", credentials).status_code == 201

    assert api_client.post("/api/auth/token/", credentials).status_code == 200
    trimmed = {**credentials, "password": credentials["password"].strip()}
    assert_error(api_client.post("/api/auth/token/", trimmed), 401)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/auth/token/", {"username": "  ", "password": "  "}),
        ("/api/auth/token/refresh/", {"refresh": "  "}),
        ("/api/auth/logout/", {"refresh": "  "}),
    ],
)
def test_whitespace_credentials_are_wrong_not_malformed(api_client, path, body):
    # The schema's minLength 1 admits them: the answer is "not valid" (401), not a blank-field 400.
    assert_error(api_client.post(path, body), 401)


def _list_views_with_filtersets() -> list[tuple[str, Any]]:
    """Return ``(route, filterset class)`` for every routed DRF view that filters with django-filter."""
    import django_filters
    from django.urls import get_resolver

    found = []

    def walk(patterns: list[Any], prefix: str) -> None:
        for pattern in patterns:
            if hasattr(pattern, "url_patterns"):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
                continue
            view = getattr(pattern.callback, "cls", None)
            filterset = getattr(view, "filterset_class", None)
            if filterset is not None and issubclass(filterset, django_filters.FilterSet):
                found.append((prefix + str(pattern.pattern), filterset))

    walk(get_resolver().url_patterns, "/")
    return found


def test_every_choice_filter_documents_its_empty_value(schema):
    """django-filter answers ``?name=`` (empty) with no filter: the documented enum must admit "" or
    schemathesis (and any client reading the enum) sees a schema-violating request accepted."""
    import django_filters

    choice_filters = 0
    for route, filterset in _list_views_with_filtersets():
        for name, one in filterset.base_filters.items():
            if not isinstance(one, django_filters.ChoiceFilter):
                continue
            for path, operations in schema["paths"].items():
                get = operations.get("get", {})
                for parameter in get.get("parameters", []):
                    if parameter["in"] == "query" and parameter["name"] == name and "enum" in parameter["schema"]:
                        if _matches(route, path):
                            choice_filters += 1
                            assert "" in parameter["schema"]["enum"], f"{path} ?{name}= is documented as refused"
    assert choice_filters >= 6  # messages (2), templates, budgets (2), audit log


def _matches(route: str, path: str) -> bool:
    """Whether Django ``route`` (regex or path converter syntax) is OpenAPI ``path``."""
    shape = re.sub(r"\(\?P<[^>]+>[^)]*\)|<[^>]+>", "{}", route).replace("^", "").replace("$", "").rstrip("/")
    shape = re.sub(r"\\\.\(\?P<format>.*", "", shape).replace("\\", "")
    return _PARAMETER.sub("{}", path).rstrip("/") == shape
