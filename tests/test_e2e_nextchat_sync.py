"""End to end: NextChat's sync clients against a real server process and Celery worker.

The requests are NextChat 2.16's (``app/utils/cloud/webdav.ts``, ``upstash.ts``; ``/work/shared/nextchat.md``):
WebDAV ``MKCOL``/``GET``/``PUT`` as NextChat's server relays them, the browser's proxy form with
its CORS preflight, and Upstash's ``<base>//api/upstash/...`` (a double slash, over real HTTP).
The import runs in the worker; no key of the document reaches a response or a log.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from conversations.models import Conversation
from tests.kit import poll_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

FOLDER = "chatgpt-next-web"
ORIGIN = "http://nextchat.example"
USER_OPENAI_KEY = "users-own-openai-key-" + "q" * 24
ACCESS_CODE = "nextchat-access-code-" + "z" * 16


def _state(topic: str, session_id: str) -> dict[str, Any]:
    return {
        "chat-next-web-store": {
            "sessions": [
                {
                    "id": session_id,
                    "topic": topic,
                    "messages": [
                        {"id": f"{session_id}-u", "date": "", "role": "user", "content": "Hello"},
                        {"id": f"{session_id}-a", "date": "", "role": "assistant", "content": "Hi!"},
                    ],
                    "mask": {"modelConfig": {"model": "sim-model"}},
                }
            ],
            "lastUpdateTime": 1,
        },
        "access-control": {"openaiApiKey": USER_OPENAI_KEY, "accessCode": ACCESS_CODE, "lastUpdateTime": 1},
    }


def _titles(username: str) -> list[str]:
    return sorted(Conversation.objects.filter(owner__username=username).values_list("title", flat=True))


def test_nextchat_syncs_over_webdav_and_upstash(e2e_stack, e2e_user) -> None:
    base = e2e_stack.server_url
    basic = {"authorization": "Basic " + base64.b64encode(f"{e2e_user.username}:{e2e_user.api_key}".encode()).decode()}
    bearer = {"Authorization": f"Bearer {e2e_user.api_key}"}
    bodies: list[str] = []
    with httpx.Client(timeout=30) as http:
        # NextChat's server relaying to the WebDAV endpoint <base>/dav/.
        assert http.request("MKCOL", f"{base}/dav/{FOLDER}", headers=basic).status_code == 201
        assert http.get(f"{base}/dav/{FOLDER}/backup.json", headers=basic).status_code == 404
        put = http.put(
            f"{base}/dav/{FOLDER}/backup.json", content=json.dumps(_state("Over WebDAV", "s1")), headers=basic
        )
        assert put.status_code == 201, put.text
        got = http.get(f"{base}/dav/{FOLDER}/backup.json", headers=basic)
        assert got.status_code == 200
        assert json.loads(got.text)["chat-next-web-store"]["sessions"][0]["topic"] == "Over WebDAV"
        bodies.append(got.text)

        # The browser's proxy form, CORS preflight first.
        url = f"{base}/api/webdav/{FOLDER}/backup.json?" + urlencode({"endpoint": f"{base}/dav/laptop/"})
        preflight = http.options(
            url,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] in ("*", ORIGIN)
        check = http.get(
            f"{base}/api/webdav/{FOLDER}?" + urlencode({"endpoint": f"{base}/dav/laptop/", "proxy_method": "MKCOL"}),
            headers={**basic, "Origin": ORIGIN},
        )
        assert check.status_code == 201
        stored = http.put(
            url,
            content=json.dumps(_state("Over the proxy", "s2")),
            headers={**basic, "Origin": ORIGIN, "Content-Type": "text/plain;charset=UTF-8"},
        )
        assert stored.status_code == 201, stored.text
        assert stored.headers["access-control-allow-origin"] in ("*", ORIGIN)

        # Upstash through the proxy: <base> + "/" + "/api/upstash/...".
        def upstash(action: str, key: str, body: str | None = None) -> httpx.Response:
            target = f"{base}//api/upstash/{action}/{key}/?" + urlencode({"endpoint": base})
            if body is None:
                return http.get(target, headers={**bearer, "Origin": ORIGIN})
            return http.post(target, content=body, headers={**bearer, "Origin": ORIGIN})

        assert upstash("get", FOLDER).json() == {"result": None}
        text = json.dumps(_state("Over Upstash", "s3"))
        assert upstash("set", f"{FOLDER}-chunk-0", text).json() == {"result": "OK"}
        assert upstash("set", f"{FOLDER}-chunk-count", "1").json() == {"result": "OK"}
        count = upstash("get", f"{FOLDER}-chunk-count")
        assert count.headers["access-control-allow-origin"] in ("*", ORIGIN)
        chunk = upstash("get", f"{FOLDER}-chunk-0").json()["result"]
        assert json.loads(chunk)["chat-next-web-store"]["sessions"][0]["topic"] == "Over Upstash"
        bodies.append(chunk)

    # The worker imports each document's session.
    poll_until_sync(
        lambda: _titles(e2e_user.username),
        lambda titles: titles == ["Over Upstash", "Over WebDAV", "Over the proxy"],
        within=30,
        what="the imported conversations",
    )
    for secret in (USER_OPENAI_KEY, ACCESS_CODE):
        assert all(secret not in body for body in bodies)
        for name, log in e2e_stack.logs().items():
            assert secret not in log, name
