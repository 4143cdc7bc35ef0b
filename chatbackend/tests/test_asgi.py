"""The ASGI entry point: streaming endpoints through the lean chain, the rest through MIDDLEWARE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import SyncToAsync
from django.core.signals import request_finished, request_started

from chatbackend.asgi import django_asgi_app, streaming_asgi_app
from chatbackend.asyncdb import run_sync
from chatbackend.handlers import StreamingASGIHandler, is_streaming_request
from conversations.models import Message
from llm.simulator import reply_text
from tests.kit import (
    FAST_REPLY_TOKENS,
    SLOW_REPLY_TOKENS,
    asgi_request,
    assert_error,
    bearer,
    chat_body,
    chunk_objects,
    chunk_text,
    run_python,
    sse_data,
    usage_records,
)

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = "https://nextchat.example"


def _scope(path: str, method: str = "GET", root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "path": path, "method": method, "root_path": root_path}


@pytest.mark.parametrize(
    ("method", "path", "lean"),
    [
        ("POST", "/v1/chat/completions", True),
        ("GET", "/v1/models", True),
        ("GET", "/v1/models/gpt-4o", True),
        ("GET", "/v1", True),
        ("GET", "/dashboard/billing/usage", True),
        ("POST", "/api/conversations/12/messages/", True),
        ("GET", "/api/conversations/12/messages/", False),  # DRF list
        ("OPTIONS", "/api/conversations/12/messages/", False),  # CorsMiddleware heads both chains
        ("POST", "/api/conversations/12/messages", False),  # CommonMiddleware's APPEND_SLASH
        ("POST", "/api/conversations/12/messages/3/stop/", False),
        ("GET", "/v1x", False),
        ("GET", "/admin/login/", False),
        ("GET", "/api/docs/", False),
        ("GET", "/", False),
    ],
)
def test_routing(method: str, path: str, lean: bool) -> None:
    assert is_streaming_request(_scope(path, method)) is lean


def test_routing_strips_the_script_prefix() -> None:
    assert is_streaming_request(_scope("/chat/v1/models", root_path="/chat"))
    assert not is_streaming_request(_scope("/chat/admin/", root_path="/chat"))


def test_lean_handler_loads_streaming_middleware_only() -> None:
    from corsheaders.middleware import CorsMiddleware

    assert isinstance(streaming_asgi_app, StreamingASGIHandler)
    # Full chain: process_view of CsrfViewMiddleware (a thread hop) and of the admin's query guard
    # (a coroutine: none); lean chain: none (CorsMiddleware has none).
    assert len(django_asgi_app._view_middleware) == 2
    assert sum(isinstance(method, SyncToAsync) for method in django_asgi_app._view_middleware) == 1
    assert streaming_asgi_app._view_middleware == []
    assert CorsMiddleware.async_capable


def test_lean_handler_reads_the_list_it_is_given(settings) -> None:  # noqa: ANN001 - pytest-django fixture
    settings.STREAMING_MIDDLEWARE = ["django.middleware.csrf.CsrfViewMiddleware"]
    assert len(StreamingASGIHandler()._view_middleware) == 1
    settings.STREAMING_MIDDLEWARE = []
    assert StreamingASGIHandler()._view_middleware == []


async def test_v1_goes_through_the_lean_chain() -> None:
    response = await asgi_request("GET", "/v1/models", headers={"Origin": ORIGIN})

    assert_error(response, 401, code="missing_api_key")
    headers = response.headers
    assert "x-frame-options" not in headers  # XFrameOptionsMiddleware is not in the chain
    assert "referrer-policy" not in headers  # nor SecurityMiddleware
    assert "Cookie" not in headers.get("vary", "")  # nor SessionMiddleware
    assert headers.get_list("access-control-allow-origin") == ["*"]
    assert headers.get_list("x-content-type-options") == ["nosniff"]


async def test_v1_preflight_is_unchanged() -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }

    lean = await asgi_request("OPTIONS", "/v1/chat/completions", headers=preflight)
    full = await asgi_request("OPTIONS", "/api/conversations/", headers=preflight)

    assert lean.status_code == full.status_code == 200
    assert lean.headers.get_list("access-control-max-age") == ["86400"]
    assert "authorization" in lean.headers["access-control-allow-headers"]
    assert "POST" in lean.headers["access-control-allow-methods"]
    cors = {name: value for name, value in lean.headers.multi_items() if name.startswith("access-control-")}
    assert cors == {name: value for name, value in full.headers.multi_items() if name.startswith("access-control-")}


async def test_sse_send_goes_through_the_lean_chain() -> None:
    response = await asgi_request("POST", "/api/conversations/1/messages/", body=b"{}")

    assert_error(response, 401, code="missing_api_key")
    assert "x-frame-options" not in response.headers
    assert response.headers.get_list("x-content-type-options") == ["nosniff"]


async def test_lean_chain_still_checks_allowed_hosts() -> None:
    response = await asgi_request("GET", "/v1/models", headers={"Host": "evil.example"})

    assert response.status_code == 400


async def test_lean_chain_sends_request_signals() -> None:
    seen: list[str] = []

    def started(**kwargs: Any) -> None:
        seen.append("started")

    def finished(**kwargs: Any) -> None:
        seen.append("finished")

    request_started.connect(started)
    request_finished.connect(finished)
    try:
        await asgi_request("GET", "/v1/models")
    finally:
        request_started.disconnect(started)
        request_finished.disconnect(finished)

    assert seen == ["started", "finished"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_an_event_stream_goes_out_as_its_encoder_yields_it(api_key_secret: str, sim_model: Any) -> None:
    body = json.dumps(chat_body(sim_model.name, stream=True, stream_options={"include_usage": True})).encode()
    headers = {**bearer(api_key_secret), "content-type": "application/json"}

    response = await asgi_request("POST", "/v1/chat/completions", headers=headers, body=body)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    # One http.response.body message per part the encoder yielded: whole SSE events, each part
    # written as it came (no re-chunking), the usage chunk and [DONE] together in the last one.
    assert len(response.frames) >= 3
    assert all(frame.startswith(b"data: ") and frame.endswith(b"\n\n") for frame in response.frames)
    assert response.frames[-1].endswith(b"data: [DONE]\n\n")
    assert b'"choices":[],"usage":{' in response.frames[-1]
    chunks = chunk_objects(sse_data(response.content))
    assert chunk_text(chunks) == reply_text(json.loads(body)["messages"], FAST_REPLY_TOKENS)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients", "slow_simulator")
@pytest.mark.parametrize("stream", [True, False])
async def test_a_request_the_server_cancels_ends_its_reply_with_what_was_sent(
    api_key_secret: str, slow_model: Any, stream: bool
) -> None:
    # uvicorn past --timeout-graceful-shutdown and daphne on SIGTERM cancel the request's task.
    # Django's handler leaves the task that streams the response running then (it cancels it
    # only on a client disconnect), and uvicorn drops what that task sends once it closed the
    # connection, without an error: the reply must end at the cancellation, saved with the text
    # its client received, not run on writing into a closed connection.
    body = json.dumps(chat_body(slow_model.name, stream=stream, store=True)).encode()
    headers = {**bearer(api_key_secret), "content-type": "application/json"}

    result = await asgi_request(
        "POST",
        "/v1/chat/completions",
        headers=headers,
        body=body,
        cancel_after_frames=3 if stream else None,
        cancel_after_seconds=None if stream else 0.5,
    )

    assert result.sent_after_cancel == []
    [record] = await usage_records()  # written before the cancelled request's task ended
    assert record.finish_status == "cancelled"
    reply = await run_sync(lambda: Message.objects.get(role=Message.Role.ASSISTANT))
    assert reply.status == Message.Status.CANCELLED
    assert reply.error_code == "server_shutdown"  # the server's doing, not a client's stop
    if stream:
        # The stream was cut before [DONE]: its chunks as received, unlike chunk_objects.
        assert reply.content == chunk_text(json.loads(payload) for payload in sse_data(result.content))
        assert 3 <= record.completion_tokens < SLOW_REPLY_TOKENS


@pytest.mark.django_db(transaction=True)
async def test_admin_keeps_the_full_chain() -> None:
    response = await asgi_request("GET", "/admin/login/")

    assert response.status_code == 200
    assert response.headers.get_list("x-frame-options") == ["DENY"]
    assert response.headers.get_list("x-content-type-options") == ["nosniff"]
    assert any(cookie.startswith("csrftoken=") for cookie in response.headers.get_list("set-cookie"))


def _python(code: str) -> str:
    """Run ``python -c code`` with the project's settings, outside pytest; return what it printed."""
    result = run_python("-c", code, env={"DJANGO_SETTINGS_MODULE": "chatbackend.settings"}, unset=("PYTEST_VERSION",))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_asgi_entry_point_tunes_gc() -> None:
    out = _python("import gc, chatbackend.asgi; print(gc.get_threshold(), gc.get_freeze_count() > 0)")

    assert out == "(50000, 20, 100) True"


def test_gc_tuning_can_be_turned_off_and_django_setup_alone_does_not_tune() -> None:
    off = (
        "from django.conf import settings; settings.GC_TUNING = False;"
        " import gc, chatbackend.asgi; print(gc.get_threshold(), gc.get_freeze_count())"
    )
    setup = "import django, gc; django.setup(); print(gc.get_threshold(), gc.get_freeze_count())"

    assert _python(off) == _python(setup) == f"{_python('import gc; print(gc.get_threshold())')} 0"
