"""NextChat sync: requests shaped exactly as NextChat 2.16's WebDAV and Upstash clients send them.

The shapes come from NextChat's source (``app/utils/cloud/webdav.ts``, ``upstash.ts``,
``app/api/webdav/[...path]/route.ts``) and ``/work/shared/nextchat.md``:

- WebDAV through NextChat's server: ``MKCOL <endpoint>chatgpt-next-web``, ``GET`` / ``PUT
  <endpoint>chatgpt-next-web/backup.json``, only ``authorization: Basic`` forwarded, the body a stream.
- WebDAV through the browser proxy: ``GET <base>/api/webdav/chatgpt-next-web?endpoint=...&proxy_method=MKCOL``,
  then ``GET`` and ``PUT <base>/api/webdav/chatgpt-next-web/backup.json?endpoint=...`` (URLSearchParams
  encoding; a string body is ``text/plain;charset=UTF-8``).
- Upstash through the browser proxy: ``<base>//api/upstash/get/<key>/?endpoint=...`` (GET) and
  ``.../set/<key>/?endpoint=...`` (POST, raw chunk), ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from accounts.authentication import principal_for
from accounts.models import Membership, Organization
from accounts.services import api_key_create
from conversations.conversation_templates.models import ConversationTemplate
from conversations.models import Conversation, Message, SyncDocument, SyncDocumentVersion, SyncUploadChunk
from conversations.selectors import message_list
from conversations.sync.selectors import content_chunks
from conversations.sync.services import sync_versions_prune
from tests.factories import LLMModelFactory, UserFactory
from tests.kit import assert_error

pytestmark = pytest.mark.django_db

FOLDER = "chatgpt-next-web"
BASE = "http://testserver"
DAV_ENDPOINT = f"{BASE}/dav/"
OPENAI_KEY = "sk-users-own-openai-key-0123456789abcdefXYZ"
ACCESS_CODE = "nk-the-access-code-of-nextchat-4711"
AZURE_KEY = "azure-key-that-must-not-be-stored-9876"
BAIDU_SECRET = "baidu-secret-key-never-stored-5555"


def _document(*, topic: str = "Trip to Lisbon", extra_messages: int = 0) -> dict[str, Any]:
    """NextChat 2.16's app state (``getLocalAppState``) with one chat and the user's keys."""
    messages = [
        {"id": "msg-u1", "date": "12/2/2026, 10:00:00 AM", "role": "user", "content": "Plan a trip to Lisbon"},
        {
            "id": "msg-a1",
            "date": "12/2/2026, 10:00:05 AM",
            "role": "assistant",
            "content": "Day 1: Alfama.",
            "streaming": False,
            "model": "gpt-4o-mini",
        },
    ]
    messages += [
        {"id": f"msg-x{i}", "date": "12/2/2026, 10:01:00 AM", "role": "user", "content": f"more {i}"}
        for i in range(extra_messages)
    ]
    return {
        "chat-next-web-store": {
            "sessions": [
                {
                    "id": "sess-lisbon",
                    "topic": topic,
                    "memoryPrompt": "",
                    "messages": messages,
                    "stat": {"tokenCount": 0, "wordCount": 0, "charCount": 0},
                    "lastUpdate": 1764669605000,
                    "lastSummarizeIndex": 0,
                    "mask": {
                        "id": "mask-1",
                        "avatar": "gpt-bot",
                        "name": "New Conversation",
                        "context": [
                            {"id": "ctx-1", "role": "system", "content": "You are a travel agent.", "date": ""}
                        ],
                        "syncGlobalConfig": True,
                        "modelConfig": {
                            "model": "gpt-4o-mini",
                            "providerName": "OpenAI",
                            "temperature": 0.5,
                            "top_p": 1,
                            "max_tokens": 4000,
                        },
                        "lang": "en",
                        "builtin": False,
                        "createdAt": 1764669600000,
                    },
                },
                {
                    "id": "sess-unknown-model",
                    "topic": "Images",
                    "messages": [
                        {
                            "id": "msg-img",
                            "date": "",
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "What is this?"},
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                            ],
                        }
                    ],
                    "mask": {"modelConfig": {"model": "no-such-model"}},
                },
                {"id": "sess-empty", "topic": "New Conversation", "messages": [], "mask": {}},
            ],
            "currentSessionIndex": 0,
            "lastInput": "",
            "lastUpdateTime": 1764669605000,
        },
        "access-control": {
            "accessCode": ACCESS_CODE,
            "useCustomConfig": True,
            "provider": "OpenAI",
            "openaiUrl": "http://localhost:8000",
            "openaiApiKey": OPENAI_KEY,
            "azureUrl": "",
            "azureApiKey": AZURE_KEY,
            "baiduSecretKey": BAIDU_SECRET,
            "googleApiKey": "",
            "hideUserApiKey": False,
            "lastUpdateTime": 1764669605000,
        },
        "app-config": {"theme": "auto", "modelConfig": {"model": "gpt-4o-mini"}, "lastUpdateTime": 1764669605000},
        "mask-store": {"masks": {}, "language": None, "lastUpdateTime": 0},
        "prompt-store": {"counter": 0, "prompts": {}, "lastUpdateTime": 0},
    }


def _without_secrets(document: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(document)
    for name in ("accessCode", "openaiApiKey", "azureApiKey", "baiduSecretKey", "googleApiKey"):
        del stripped["access-control"][name]
    return stripped


def _basic(username: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


@pytest.fixture
def models(db) -> None:
    LLMModelFactory(name="gpt-4o-mini")
    LLMModelFactory(name="aaa-first-model")


@pytest.fixture
def secret(user) -> str:
    return api_key_create(user=user, name="nextchat sync").secret


@pytest.fixture
def dav(user, secret) -> dict[str, str]:
    return _basic(user.username, secret)


def _proxy_url(path: str, **params: str) -> str:
    return f"/api/webdav/{path}?" + urlencode({"endpoint": DAV_ENDPOINT, **params})


def _put(client: Client, url: str, body: str, headers: dict[str, str], content_type: str = "") -> Any:
    return client.generic("PUT", url, body.encode("utf-8"), content_type=content_type, headers=headers)


def _conversations(user: Any) -> list[tuple[str, str, str, list[tuple[str, str, str]]]]:
    return [
        (
            c.external_id,
            c.title,
            c.model.name,
            [(m.external_id, m.role, m.content) for m in c.messages.all()],
        )
        for c in Conversation.objects.filter(owner=user).order_by("external_id")
    ]


# --- WebDAV, as NextChat's server relays it -------------------------------------------------


def test_webdav_through_nextchats_server_stores_returns_and_versions(
    client, user, dav, models, django_capture_on_commit_callbacks
) -> None:
    assert client.generic("MKCOL", f"/dav/{FOLDER}", headers=dav).status_code == 201
    # Nothing synced yet: NextChat reads the 404 as "empty" and PUTs its state.
    empty = client.get(f"/dav/{FOLDER}/backup.json", headers=dav)
    assert empty.status_code == 404
    assert empty.json()["error"]["code"] == "not_found"

    first = _document()
    with django_capture_on_commit_callbacks(execute=True):
        created = _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(first), dav)
    assert created.status_code == 201
    # The collection now exists: MKCOL answers 405, which NextChat's check also counts as success.
    assert client.generic("MKCOL", f"/dav/{FOLDER}", headers=dav).status_code == 405

    got = client.get(f"/dav/{FOLDER}/backup.json", headers=dav)
    assert got.status_code == 200
    assert got["Content-Type"].startswith("application/json")
    assert json.loads(got.content) == _without_secrets(first)

    second = _document(topic="Lisbon, revised")
    with django_capture_on_commit_callbacks(execute=True):
        assert _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(second), dav).status_code == 204
    assert json.loads(client.get(f"/dav/{FOLDER}/backup.json", headers=dav).content) == _without_secrets(second)
    document = SyncDocument.objects.get(owner=user)
    assert (document.protocol, document.name) == ("webdav", "")
    assert document.versions.count() == 2
    assert [json.loads(v.content)["chat-next-web-store"]["sessions"][0]["topic"] for v in document.versions.all()] == [
        "Lisbon, revised",
        "Trip to Lisbon",
    ]


def test_webdav_prefix_names_its_own_document(client, user, dav, models, django_capture_on_commit_callbacks) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        assert _put(client, f"/dav/laptop/{FOLDER}/backup.json", json.dumps(_document()), dav).status_code == 201
    assert client.get(f"/dav/{FOLDER}/backup.json", headers=dav).status_code == 404
    assert client.get(f"/dav/laptop/{FOLDER}/backup.json", headers=dav).status_code == 200
    assert SyncDocument.objects.get(owner=user).name == "laptop"


def test_webdav_refuses_other_paths_and_methods(client, dav) -> None:
    assert _put(client, "/dav/notes.txt", "hi", dav).status_code == 403
    assert client.generic("MKCOL", "/dav/other", headers=dav).status_code == 403
    refused = client.generic("PROPPATCH", f"/dav/{FOLDER}/backup.json", headers=dav)
    assert refused.status_code == 405
    assert "MKCOL" in refused["Allow"]
    assert refused.json()["error"]["code"] == "method_not_allowed"


# --- Authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [f"/dav/{FOLDER}/backup.json", _proxy_url(f"{FOLDER}/backup.json")],
    ids=["webdav", "webdav-proxy"],
)
def test_webdav_without_credentials_is_a_401_asking_for_basic(client, url) -> None:
    response = client.get(url)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Basic ")
    assert response.json()["error"]["type"] == "authentication_error"


def test_webdav_refuses_a_wrong_key_and_another_users_name(client, user, other_user, secret) -> None:
    url = f"/dav/{FOLDER}/backup.json"
    assert client.get(url, headers=_basic(user.username, "sk-" + "x" * 40)).status_code == 401
    assert client.get(url, headers=_basic(user.username, "not-an-api-key")).status_code == 401
    wrong_name = client.get(url, headers=_basic(other_user.username, secret))
    assert wrong_name.status_code == 401
    assert wrong_name.json()["error"]["code"] == "invalid_username"


def test_upstash_without_a_key_is_a_401(client) -> None:
    response = client.get(f"{BASE}//api/upstash/get/{FOLDER}-chunk-count/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"


def test_a_read_only_key_reads_but_does_not_write(client, user, models) -> None:
    reader = api_key_create(user=user, name="reader", scopes=["read"]).secret
    headers = _basic(user.username, reader)
    assert client.get(f"/dav/{FOLDER}/backup.json", headers=headers).status_code == 404
    refused = _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(_document()), headers)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_permissions"
    assert not SyncDocument.objects.exists()


def test_documents_are_per_user_and_organization(client, user, secret, dav, models, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(_document()), dav)
    someone = UserFactory()
    theirs = api_key_create(user=someone, name="k").secret
    assert client.get(f"/dav/{FOLDER}/backup.json", headers=_basic(someone.username, theirs)).status_code == 404
    acme = Organization.objects.create(name="Acme", slug="acme")
    Membership.objects.create(user=user, organization=acme, role=Membership.Role.MEMBER)
    at_acme = api_key_create(user=user, name="acme key", organization=acme).secret
    assert client.get(f"/dav/{FOLDER}/backup.json", headers=_basic(user.username, at_acme)).status_code == 404
    assert Conversation.objects.filter(owner=someone).count() == 0
    assert Conversation.objects.filter(organization=acme).count() == 0


# --- WebDAV through NextChat's browser proxy ----------------------------------------------------


def test_webdav_proxy_form_stores_and_returns(client, user, dav, models, django_capture_on_commit_callbacks) -> None:
    check = client.get(_proxy_url(FOLDER, proxy_method="MKCOL"), headers=dav)
    assert check.status_code == 201
    assert client.get(_proxy_url(f"{FOLDER}/backup.json"), headers=dav).status_code == 404
    document = _document()
    with django_capture_on_commit_callbacks(execute=True):
        stored = _put(
            client, _proxy_url(f"{FOLDER}/backup.json"), json.dumps(document), dav, "text/plain;charset=UTF-8"
        )
    assert stored.status_code == 201
    got = client.get(_proxy_url(f"{FOLDER}/backup.json"), headers=dav)
    assert got.status_code == 200
    assert json.loads(got.content) == _without_secrets(document)
    # The same document as at the WebDAV URL itself.
    assert client.get(f"/dav/{FOLDER}/backup.json", headers=dav).content == got.content


def test_webdav_proxy_serves_an_endpoint_folder_as_prefix(client, user, dav, models) -> None:
    url = f"/api/webdav/{FOLDER}/backup.json?" + urlencode({"endpoint": f"{BASE}/dav/phone"})
    assert _put(client, url, json.dumps(_document()), dav).status_code == 201
    assert SyncDocument.objects.get(owner=user).name == "phone"


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://dav.example.com/remote.php/dav/",
        "http://169.254.169.254/dav/",
        f"{BASE}/",
        "file:///etc/passwd",
        "",
        "http://[::1/dav/",  # not a URL (urlsplit raises): a 500 before
    ],
)
def test_webdav_proxy_refuses_endpoints_that_are_not_this_servers_dav(client, dav, endpoint) -> None:
    url = f"/api/webdav/{FOLDER}/backup.json?" + urlencode({"endpoint": endpoint})
    response = client.get(url, headers=dav)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_endpoint"


def test_webdav_proxy_refuses_other_proxy_methods(client, dav) -> None:
    response = client.get(_proxy_url(f"{FOLDER}/backup.json", proxy_method="DELETE"), headers=dav)
    assert response.status_code == 405


_NUL_PROXY = "/api/webdav/{path}?endpoint=http://127.0.0.1/dav/a%00b/&proxy_method={method}"


# No stored name holds a NUL character and PostgreSQL cannot compare text with one (a 500): a WebDAV
# path with one is no document's, whichever way it is sent.
@pytest.mark.parametrize(
    ("method", "url", "status", "code"),
    [
        ("GET", f"/dav/a%00b/{FOLDER}/backup.json", 404, "not_found"),
        ("PUT", f"/dav/a%00b/{FOLDER}/backup.json", 403, "forbidden_path"),
        ("MKCOL", f"/dav/a%00b/{FOLDER}", 403, "forbidden_path"),
        ("GET", _NUL_PROXY.format(path=f"{FOLDER}/backup.json", method="GET"), 404, "not_found"),
        ("GET", _NUL_PROXY.format(path=FOLDER, method="MKCOL"), 403, "forbidden_path"),
        ("PUT", _NUL_PROXY.format(path=f"{FOLDER}/backup.json", method="PUT"), 403, "forbidden_path"),
    ],
)
def test_a_nul_character_in_a_webdav_path_names_no_document(client, dav, method, url, status, code) -> None:
    response = client.generic(method, url, json.dumps(_document()).encode(), headers=dav)
    assert_error(response, status, code=code)
    assert not SyncDocument.objects.exists()


# --- Upstash, as NextChat's client sends it through the proxy -----------------------------------


def _upstash(client: Client, action: str, key: str, secret: str, body: str | None = None) -> Any:
    url = f"{BASE}//api/upstash/{action}/{key}/?" + urlencode({"endpoint": BASE})
    headers = {"Authorization": f"Bearer {secret}"}
    if body is None:
        return client.get(url, headers=headers)
    return client.post(url, body.encode("utf-8"), content_type="text/plain;charset=UTF-8", headers=headers)


def _nextchat_chunks(text: str, max_bytes: int) -> list[str]:
    """NextChat's ``chunks`` (``app/utils/format.ts``): cut at the last space before ``max_bytes``, dropping it."""
    data = text.encode("utf-8")
    pieces = []
    while data:
        i = data.rfind(b" ", 0, max_bytes + 2)
        if i < 0:
            i = data.find(b" ", max_bytes)
        if i < 0:
            i = len(data)
        pieces.append(data[:i].decode("utf-8"))
        data = data[i + 1 :]
    return pieces


def _upstash_sync_set(client: Client, secret: str, text: str, name: str = FOLDER) -> None:
    chunks = _nextchat_chunks(text, 1_000_000)
    for index, chunk in enumerate(chunks):
        assert _upstash(client, "set", f"{name}-chunk-{index}", secret, chunk).json() == {"result": "OK"}
    assert _upstash(client, "set", f"{name}-chunk-count", secret, str(len(chunks))).json() == {"result": "OK"}


def _upstash_sync_get(client: Client, secret: str, name: str = FOLDER) -> str:
    count = _upstash(client, "get", f"{name}-chunk-count", secret)
    assert count.status_code == 200
    result = count.json()["result"]
    return "".join(
        _upstash(client, "get", f"{name}-chunk-{i}", secret).json()["result"] for i in range(int(result or 0))
    )


def test_upstash_stores_returns_and_versions_a_chunked_document(
    client, user, secret, models, django_capture_on_commit_callbacks
) -> None:
    check = _upstash(client, "get", FOLDER, secret)
    assert (check.status_code, check.json()) == (200, {"result": None})
    assert _upstash(client, "get", f"{FOLDER}-chunk-count", secret).json() == {"result": None}

    document = _document()
    # Over 2 MB with multi-byte text: three chunks each way.
    document["chat-next-web-store"]["sessions"][0]["messages"][1]["content"] = "Ölçü " * 250_000
    text = json.dumps(document, ensure_ascii=False)
    with django_capture_on_commit_callbacks(execute=True):
        _upstash_sync_set(client, secret, text)
    assert not SyncUploadChunk.objects.exists()
    joined = _upstash_sync_get(client, secret)
    assert int(_upstash(client, "get", f"{FOLDER}-chunk-count", secret).json()["result"]) == 3
    # NextChat's own chunking drops the space at each cut; the stored document is what it joins.
    expected = json.loads("".join(_nextchat_chunks(text, 1_000_000)))
    assert json.loads(joined) == _without_secrets(expected)

    with django_capture_on_commit_callbacks(execute=True):
        _upstash_sync_set(client, secret, json.dumps(_document(topic="Second")))
    assert json.loads(_upstash_sync_get(client, secret))["chat-next-web-store"]["sessions"][0]["topic"] == "Second"
    document_row = SyncDocument.objects.get(owner=user)
    assert (document_row.protocol, document_row.name, document_row.versions.count()) == ("upstash", FOLDER, 2)


def test_a_lone_surrogate_becomes_a_replacement_character_and_the_rest_syncs(
    client, user, secret, dav, models, django_capture_on_commit_callbacks
) -> None:
    # JavaScript strings may hold half a surrogate pair (an emoji cut in two) and JSON.stringify writes
    # it as "\ud83d": refused with a 400, every later upload of the same state was refused too.
    document = _document(topic="Half \ud83d an emoji")
    messages = document["chat-next-web-store"]["sessions"][0]["messages"]
    messages[0]["content"] = "low \udc00, whole \U0001f600, escaped \\ud800"
    text = json.dumps(document)  # ASCII, surrogates escaped as JSON.stringify writes them
    assert "\\ud83d" in text

    with django_capture_on_commit_callbacks(execute=True):
        assert _put(client, f"/dav/{FOLDER}/backup.json", text, dav).status_code == 201
    with django_capture_on_commit_callbacks(execute=True):
        _upstash_sync_set(client, secret, text)

    for protocol in ("webdav", "upstash"):
        stored = json.loads(SyncDocument.objects.get(owner=user, protocol=protocol).versions.get().content)
        session = stored["chat-next-web-store"]["sessions"][0]
        assert session["topic"] == "Half \ufffd an emoji"
        assert session["messages"][0]["content"] == "low \ufffd, whole \U0001f600, escaped \\ud800"
    conversations = [c for c in _conversations(user) if c[0] == "sess-lisbon"]
    assert conversations
    for _, title, _, conversation_messages in conversations:
        assert title == "Half \ufffd an emoji"
        assert [content for _, _, content in conversation_messages] == [
            "low \ufffd, whole \U0001f600, escaped \\ud800",
            "Day 1: Alfama.",
        ]


def test_upstash_count_without_its_chunks_stores_nothing(client, secret) -> None:
    _upstash(client, "set", f"{FOLDER}-chunk-0", secret, '{"a":')
    response = _upstash(client, "set", f"{FOLDER}-chunk-count", secret, "2")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "sync_upload_incomplete"
    assert not SyncDocumentVersion.objects.exists()


def test_upstash_refuses_other_keys_and_commands(client, secret) -> None:
    assert _upstash(client, "set", "some-key", secret, "x").status_code == 400
    assert _upstash(client, "get", "some-key", secret).json() == {"result": None}
    assert _upstash(client, "del", f"{FOLDER}-chunk-0", secret).status_code == 404


@pytest.mark.parametrize("part", ["count", "0"])
def test_a_nul_character_in_an_upstash_key_is_no_nextchat_key(client, secret, part) -> None:
    # Read: null, as for any key that is not NextChat's (its check wants a 200); written: a 400.
    assert _upstash(client, "get", f"a%00b-chunk-{part}", secret).json() == {"result": None}
    response = _upstash(client, "set", f"a%00b-chunk-{part}", secret, "1")
    assert_error(response, 400, code="unsupported_key", param="key")
    assert not SyncDocument.objects.exists() and not SyncUploadChunk.objects.exists()


@pytest.mark.parametrize("endpoint", ["https://x.upstash.io", "http://[::1"])
def test_upstash_refuses_a_foreign_endpoint(client, secret, endpoint) -> None:
    url = f"{BASE}//api/upstash/get/{FOLDER}-chunk-count/?" + urlencode({"endpoint": endpoint})
    response = client.get(url, headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_endpoint"


def test_content_chunks_cut_on_characters_and_join_back() -> None:
    text = "añ€😀" * 1000
    pieces = content_chunks(text, max_bytes=7)
    assert "".join(pieces) == text
    assert all(len(p.encode("utf-8")) <= 7 for p in pieces)


# --- Size limit -----------------------------------------------------------------------------------


def test_a_document_over_the_limit_is_a_413(client, dav, settings) -> None:
    settings.SYNC_MAX_DOCUMENT_BYTES = 2000
    response = _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(_document(extra_messages=50)), dav)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "sync_document_too_large"
    assert not SyncDocumentVersion.objects.exists()


def test_a_body_that_is_not_a_json_object_is_a_400(client, dav) -> None:
    response = _put(client, f"/dav/{FOLDER}/backup.json", "[1, 2]", dav)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_sync_document"


# --- Import --------------------------------------------------------------------------------------


def test_import_twice_yields_the_same_conversations(client, user, dav, models, django_capture_on_commit_callbacks):
    url = f"/dav/{FOLDER}/backup.json"
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, url, json.dumps(_document()), dav)
    first = _conversations(user)
    assert first == [
        (
            "sess-lisbon",
            "Trip to Lisbon",
            "gpt-4o-mini",
            [("msg-u1", "user", "Plan a trip to Lisbon"), ("msg-a1", "assistant", "Day 1: Alfama.")],
        ),
        # Its model does not exist: the first enabled model by name holds it; images are dropped.
        ("sess-unknown-model", "Images", "aaa-first-model", [("msg-img", "user", "What is this?")]),
    ]
    lisbon = Conversation.objects.get(owner=user, external_id="sess-lisbon")
    assert lisbon.system_prompt == "You are a travel agent."
    assert lisbon.organization == Organization.objects.default()

    with django_capture_on_commit_callbacks(execute=True):
        _put(client, url, json.dumps(_document()), dav)
    assert _conversations(user) == first
    assert Conversation.objects.filter(owner=user).count() == 2
    assert Message.objects.filter(conversation__owner=user).count() == 3

    # A later sync with a new title and a new message updates, never duplicates.
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, url, json.dumps(_document(topic="Lisbon in May", extra_messages=1)), dav)
    updated = Conversation.objects.get(owner=user, external_id="sess-lisbon")
    assert updated.pk == lisbon.pk
    assert updated.title == "Lisbon in May"
    assert [m.external_id for m in updated.messages.all()] == ["msg-u1", "msg-a1", "msg-x0"]
    # The session is the conversation's active branch, as if it had been chatted here.
    path = [m.external_id for m in message_list(actor=principal_for(user=user), conversation_id=updated.pk)]
    assert path == ["msg-u1", "msg-a1", "msg-x0"]
    assert updated.active_leaf is not None and updated.active_leaf.external_id == "msg-x0"
    assert Conversation.objects.filter(owner=user).count() == 2
    assert set(SyncDocumentVersion.objects.values_list("import_status", flat=True)) == {"done"}


def _masks() -> dict[str, Any]:
    """NextChat 2.16's ``mask-store.masks`` (``app/store/mask.ts``): the masks the user made, by id."""
    return {
        "mask-own": {
            "id": "mask-own",
            "avatar": "1f4da",
            "name": "Latin tutor",
            "context": [
                {"id": "c1", "role": "system", "content": "You teach Latin.", "date": ""},
                {"id": "c2", "role": "user", "content": "Salve!", "date": ""},
            ],
            "syncGlobalConfig": False,
            "modelConfig": {"model": "aaa-first-model", "temperature": 0.2, "max_tokens": 1000},
            "lang": "en",
            "builtin": False,
            "createdAt": 1764669600000,
        },
        # Follows the global settings: NextChat uses app-config's, whatever the mask still holds.
        "mask-global": {
            "id": "mask-global",
            "avatar": "gpt-bot",
            "name": "Follows the settings",
            "context": [],
            "syncGlobalConfig": True,
            "modelConfig": {"model": "an-old-model", "temperature": 1},
            "lang": "en",
            "builtin": False,
            "createdAt": 1764669600000,
        },
        "mask-nameless": {"id": "mask-nameless", "name": "", "context": [], "modelConfig": {}},  # skipped
        "mask-no-id": {"name": "Keyed only", "context": [], "modelConfig": {}},  # the store's key is its id
    }


def _templates(user: Any) -> list[tuple[str, str, str, float | None, str]]:
    return sorted(
        (t.external_id, t.name, t.model_name, t.temperature, t.system_prompt)
        for t in ConversationTemplate.objects.filter(owner=user)
    )


def test_synced_masks_become_templates_once_and_follow_the_global_settings(
    client, user, dav, models, django_capture_on_commit_callbacks
) -> None:
    document = _document()
    document["mask-store"]["masks"] = _masks()
    document["app-config"]["modelConfig"] = {"model": "gpt-4o-mini", "temperature": 0.7}
    url = f"/dav/{FOLDER}/backup.json"
    for _ in range(2):  # a second sync updates, never copies
        with django_capture_on_commit_callbacks(execute=True):
            assert _put(client, url, json.dumps(document), dav).status_code in (200, 201, 204)

        assert _templates(user) == [
            ("mask-global", "Follows the settings", "gpt-4o-mini", 0.7, ""),
            ("mask-no-id", "Keyed only", "", None, ""),
            ("mask-own", "Latin tutor", "aaa-first-model", 0.2, "You teach Latin."),
        ]
    own = ConversationTemplate.objects.get(owner=user, external_id="mask-own")
    assert own.starter_messages == [{"role": "user", "content": "Salve!"}]
    unchanged_since = {t.external_id: t.updated_at for t in ConversationTemplate.objects.filter(owner=user)}
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, url, json.dumps(document), dav)
    # The same masks again: nothing is rewritten.
    assert {t.external_id: t.updated_at for t in ConversationTemplate.objects.filter(owner=user)} == unchanged_since
    assert own.visibility == ConversationTemplate.Visibility.PRIVATE
    assert set(SyncDocumentVersion.objects.values_list("import_status", flat=True)) == {"done"}

    # The mask changed in NextChat: its template follows; one the user deleted there stays here.
    document["mask-store"]["masks"] = {"mask-own": {**_masks()["mask-own"], "name": "Latin and Greek tutor"}}
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, url, json.dumps(document), dav)
    assert [name for _, name, *_ in _templates(user)] == ["Follows the settings", "Keyed only", "Latin and Greek tutor"]


def test_a_session_following_the_global_settings_takes_their_model(
    client, user, dav, models, django_capture_on_commit_callbacks
) -> None:
    document = _document()  # its session's mask says gpt-4o-mini and syncGlobalConfig
    document["app-config"]["modelConfig"] = {"model": "aaa-first-model"}
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(document), dav)
    assert Conversation.objects.get(owner=user, external_id="sess-lisbon").model.name == "aaa-first-model"

    document["chat-next-web-store"]["sessions"][0]["mask"]["syncGlobalConfig"] = False  # its own, then
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(document), dav)
    assert Conversation.objects.get(owner=user, external_id="sess-lisbon").model.name == "gpt-4o-mini"


def test_imported_conversations_are_listed_by_the_api(
    client, client_for, user, dav, models, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(_document()), dav)
    listed = client_for(user).get("/api/conversations/")
    assert listed.status_code == 200
    assert {row["title"] for row in listed.json()["results"]} == {"Trip to Lisbon", "Images"}


# --- Secrets ------------------------------------------------------------------------------------


def _every_stored_value() -> str:
    """Every cell of every table, as the database holds it."""
    cells = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")  # noqa: S608 - table names from the DB
            cells.extend(repr(row) for row in cursor.fetchall())
    return "\n".join(cells)


def test_no_key_from_the_document_is_stored_in_clear_or_logged(
    client, user, secret, dav, models, caplog, django_capture_on_commit_callbacks
) -> None:
    caplog.set_level(logging.DEBUG)
    document = _document()
    document["access-control"]["openaiApiKey"] = secret  # the user's key for this very server, as is common
    with django_capture_on_commit_callbacks(execute=True):
        assert _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(document), dav).status_code == 201
        _upstash_sync_set(client, secret, json.dumps(_document()), name="phone")
    # Upstash chunks waiting for their count hold the raw document: encrypted.
    _upstash(client, "set", "tablet-chunk-0", secret, json.dumps(_document()))
    assert SyncUploadChunk.objects.get().data == json.dumps(_document())  # decrypted by the field only

    stored = _every_stored_value()
    assert "sess-lisbon" in stored  # the scan sees the documents
    for value in (secret, OPENAI_KEY, ACCESS_CODE, AZURE_KEY, BAIDU_SECRET):
        assert value not in stored
        assert value not in caplog.text
    for version in SyncDocumentVersion.objects.all():
        assert version.secrets_removed >= 4
        access = json.loads(version.content)["access-control"]
        assert "openaiApiKey" not in access
        assert access["openaiUrl"] == "http://localhost:8000"  # the rest of its settings stay
    # What NextChat gets back has no key fields: its merge keeps each device's own keys.
    got = json.loads(client.get(f"/dav/{FOLDER}/backup.json", headers=dav).content)
    assert {"openaiApiKey", "accessCode", "azureApiKey"}.isdisjoint(got["access-control"])


# --- Retention ----------------------------------------------------------------------------------


def test_old_versions_are_pruned_but_never_the_newest(client, user, dav, models, settings) -> None:
    settings.SYNC_VERSION_RETENTION_DAYS = 30
    for topic in ("one", "two", "three"):
        _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(_document(topic=topic)), dav)
    old = timezone.now() - dt.timedelta(days=31)
    SyncDocumentVersion.objects.update(created_at=old)
    newest = SyncDocumentVersion.objects.order_by("-id").first()
    assert newest is not None
    SyncDocumentVersion.objects.filter(pk=newest.pk).update(created_at=old + dt.timedelta(seconds=1))
    assert sync_versions_prune() == 2
    assert list(SyncDocumentVersion.objects.values_list("pk", flat=True)) == [newest.pk]
    # A write prunes its own document too.
    _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(_document(topic="four")), dav)
    assert SyncDocumentVersion.objects.count() == 1


def test_the_admin_shows_documents_and_versions(client, user, dav, models) -> None:
    _put(client, f"/dav/{FOLDER}/backup.json", json.dumps(_document()), dav)
    operator = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(operator)
    document = SyncDocument.objects.get()
    assert client.get("/admin/conversations/syncdocument/").status_code == 200
    page = client.get(f"/admin/conversations/syncdocument/{document.pk}/change/")
    assert page.status_code == 200
    assert OPENAI_KEY.encode() not in page.content


def test_a_document_larger_than_djangos_upload_limit_is_stored(client, user, dav, models, settings) -> None:
    """NextChat's state easily passes ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (2.5 MB): only the sync limit applies."""
    document = _document()
    document["chat-next-web-store"]["sessions"][0]["messages"][1]["content"] = "x" * 3_000_000
    body = json.dumps(document)
    assert len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert _put(client, f"/dav/{FOLDER}/backup.json", body, dav).status_code == 201
    got = client.get(f"/dav/{FOLDER}/backup.json", headers=dav)
    assert json.loads(got.content) == _without_secrets(document)


def test_a_resync_leaves_a_trashed_conversation_in_the_trash_and_a_purged_one_comes_back(
    client, client_for, user, dav, models, django_capture_on_commit_callbacks
) -> None:
    """The import finds a session's conversation by NextChat's id, trashed or not: a re-sync updates
    it where it is (never a copy, never out of the trash). A purged one is gone here but still in
    NextChat, so the next sync imports it again, as a new conversation."""
    url, api = f"/dav/{FOLDER}/backup.json", client_for(user)
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, url, json.dumps(_document()), dav)
    lisbon = Conversation.objects.get(owner=user, external_id="sess-lisbon")
    assert api.delete(f"/api/conversations/{lisbon.pk}/").status_code == 204

    with django_capture_on_commit_callbacks(execute=True):
        _put(client, url, json.dumps(_document(topic="Lisbon in May", extra_messages=1)), dav)
    again = Conversation.objects.get(owner=user, external_id="sess-lisbon")
    assert again.pk == lisbon.pk and again.deleted_at is not None and again.title == "Lisbon in May"
    assert again.messages.count() == 3  # the new message is kept, in the trash
    assert {row["title"] for row in api.get("/api/conversations/").json()["results"]} == {"Images"}

    assert api.delete(f"/api/conversations/{lisbon.pk}/purge/").status_code == 204
    with django_capture_on_commit_callbacks(execute=True):
        _put(client, url, json.dumps(_document()), dav)
    back = Conversation.objects.get(owner=user, external_id="sess-lisbon")
    assert back.pk != lisbon.pk and back.deleted_at is None


# --- Null characters ------------------------------------------------------------------------------


def document_with_null_characters() -> dict[str, Any]:
    """``_document()`` with U+0000 in every text the import reads, and some it does not: NextChat's
    ``JSON.stringify`` writes them as ``\\u0000``, which PostgreSQL's text and jsonb cannot hold."""
    document = _document()
    lisbon, images = document["chat-next-web-store"]["sessions"][:2]
    lisbon.update(id="sess-\x00lisbon", topic="Trip to\x00 Lisbon")
    lisbon["mask"]["context"][0].update(id="ctx-\x00", date="\x00", content="You are a\x00 travel agent.")
    lisbon["mask"]["modelConfig"]["model"] = "gpt-4o\x00-mini"
    question, answer = lisbon["messages"]
    question.update(id="msg-\x00u1", date="12/2/2026,\x00 10:00:00 AM", content="Plan a trip\x00 to Lisbon")
    answer.update(content="Day 1:\x00 Alfama.", model="gpt-4o-mini\x00")
    images["messages"][0]["content"][0]["text"] = "What is\x00 this?"
    document["app-config"]["\x00odd"] = "a value\x00 kept"
    return document


# What ``document_with_null_characters()`` imports as: the clean document's conversations.
NULL_FREE_CONVERSATIONS = [
    (
        "sess-lisbon",
        "Trip to Lisbon",
        "gpt-4o-mini",
        [("msg-u1", "user", "Plan a trip to Lisbon"), ("msg-a1", "assistant", "Day 1: Alfama.")],
    ),
    ("sess-unknown-model", "Images", "aaa-first-model", [("msg-img", "user", "What is this?")]),
]


def _assert_imported_without_null_characters(user: Any) -> None:
    assert _conversations(user) == NULL_FREE_CONVERSATIONS
    lisbon = Conversation.objects.get(owner=user, external_id="sess-lisbon")
    assert lisbon.system_prompt == "You are a travel agent."
    assert lisbon.messages.get(external_id="msg-a1").model_name == "gpt-4o-mini"
    assert set(SyncDocumentVersion.objects.values_list("import_status", "import_error")) == {("done", "")}


def test_webdav_stores_null_characters_as_sent_and_imports_without_them(
    client, user, dav, models, django_capture_on_commit_callbacks
) -> None:
    """A sync must succeed whatever the user typed: the document is stored and served back as
    NextChat sent it (``\\u0000`` escapes and all), its sessions imported without null characters;
    a second sync of it changes nothing (the ids, stripped, still match)."""
    document = document_with_null_characters()
    body = json.dumps(document)
    assert "\\u0000" in body
    url = f"/dav/{FOLDER}/backup.json"
    with django_capture_on_commit_callbacks(execute=True):
        assert _put(client, url, body, dav).status_code == 201
    got = client.get(url, headers=dav)
    assert got.status_code == 200 and json.loads(got.content) == _without_secrets(document)
    _assert_imported_without_null_characters(user)

    with django_capture_on_commit_callbacks(execute=True):
        assert _put(client, url, body, dav).status_code == 204
    _assert_imported_without_null_characters(user)
    assert Message.objects.filter(conversation__owner=user).count() == 3


def test_upstash_stores_null_characters_as_sent_and_imports_without_them(
    client, user, secret, models, django_capture_on_commit_callbacks
) -> None:
    document = document_with_null_characters()
    with django_capture_on_commit_callbacks(execute=True):
        _upstash_sync_set(client, secret, json.dumps(document))
    assert json.loads(_upstash_sync_get(client, secret)) == _without_secrets(document)
    _assert_imported_without_null_characters(user)


# --- Concurrent syncs -----------------------------------------------------------------------------


def many_sessions(count: int) -> dict:
    """NextChat's state with ``count`` sessions of two messages each (ids ``sess-<i>``, ``msg-<i>-u|a``)."""
    document = _document()
    template = document["chat-next-web-store"]["sessions"][0]
    sessions = []
    for index in range(count):
        session = json.loads(json.dumps(template))
        session["id"] = f"sess-{index}"
        for message in session["messages"]:
            message["id"] = f"msg-{index}-{message['role'][0]}"
        sessions.append(session)
    document["chat-next-web-store"]["sessions"] = sessions
    return document


def run_at_once(*works: Callable[[], Any]) -> list[Any]:
    """Run each of ``works`` in its own thread (its own database connection), released together by a
    barrier; return their results in order, re-raising the first exception one raised."""
    barrier = threading.Barrier(len(works))
    results: list[Any] = [None] * len(works)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = works[index]()
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(len(works))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "an import is still blocked"
    if errors:
        raise errors[0]
    return results


@pytest.mark.django_db(transaction=True)
def test_two_documents_synced_at_once_make_one_conversation_per_session(user, dav, models) -> None:
    """Two devices syncing the same chats into two documents (WebDAV folders) at the same moment:
    each import finds the other's conversations or waits for them, never a copy, never a failure."""
    body = json.dumps(many_sessions(60))

    def put(folder: str) -> Any:
        return lambda: _put(Client(), f"/dav/{folder}/{FOLDER}/backup.json", body, dav)

    responses = run_at_once(put("laptop"), put("phone"))
    assert [r.status_code for r in responses] == [201, 201]
    assert sorted(SyncDocumentVersion.objects.values_list("import_status", "conversations_imported")) == [
        ("done", 60),
        ("done", 60),
    ]
    conversations = Conversation.objects.filter(owner=user)
    assert sorted(conversations.values_list("external_id", flat=True)) == sorted(f"sess-{i}" for i in range(60))
    assert Message.objects.filter(conversation__owner=user).count() == 120
