"""End to end: an untitled conversation's first reply gets a title, written by the Celery worker.

Real server, worker (with Redis) and simulator processes (tests/conftest.py). The title model is
the default: the conversation's own model (``CONVERSATION_TITLE_MODEL`` unset). Issue 11, item 3.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from accounts.models import UsageRecord
from conversations.models import Conversation
from conversations.titles import TITLE_INSTRUCTIONS, title_clean
from llm.simulator import reply_text
from tests.kit import E2E_REPLY_TOKENS, bearer, poll_until_sync
from tests.test_e2e import DEADLINE_SECONDS, recorded_sse_events, send_over_sse, usage_records

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def untitled_conversation(http: httpx.Client, user: Any) -> int:
    response = http.post("/api/conversations/", json={"model": "sim-model"}, headers=bearer(user.access))
    assert response.status_code == 201, response.text
    assert response.json()["title"] == ""
    return response.json()["id"]


def reply_over_sse(stack: Any, http: httpx.Client, user: Any, conversation_id: int, content: str) -> dict[str, Any]:
    with send_over_sse(http, user, conversation_id, content) as source:
        events = list(recorded_sse_events(stack, source))
    assert events[-1][0] == "reply.done", events[-1]
    return events[-1][1]["message"]


def test_the_first_reply_gets_a_title_and_later_replies_do_not(e2e_stack, e2e_user, http):
    conversation_id = untitled_conversation(http, e2e_user)

    first = reply_over_sse(e2e_stack, http, e2e_user, conversation_id, "How do tides work?")

    asked = [
        {"role": "system", "content": TITLE_INSTRUCTIONS},
        {"role": "user", "content": f"User: How do tides work?\n\nAssistant: {first['content']}"},
    ]
    expected = title_clean(reply_text(asked, E2E_REPLY_TOKENS))
    title = poll_until_sync(
        lambda: Conversation.objects.get(pk=conversation_id).title, bool, within=DEADLINE_SECONDS, what="the title"
    )
    assert title == expected
    response = http.get(f"/api/conversations/{conversation_id}/", headers=bearer(e2e_user.access))
    assert response.json()["title"] == expected
    if e2e_stack.worker_running:  # with Redis: the worker ran it, not the server
        assert re.search(r"Task conversations\.conversation_title\[[0-9a-f-]+\] succeeded", e2e_stack.logs()["worker"])

    # Untitled again: a later reply (not the first) still asks for no title.
    response = http.patch(f"/api/conversations/{conversation_id}/", json={"title": ""}, headers=bearer(e2e_user.access))
    assert response.status_code == 200
    reply_over_sse(e2e_stack, http, e2e_user, conversation_id, "And the moon?")
    records = usage_records(e2e_stack, e2e_user.username, expected=3)  # two replies and one title
    assert sorted(r.request_id for r in records if r.request_id.startswith("title-")) == [
        f"title-{conversation_id}-{first['id']}"
    ]
    title_record = next(r for r in records if r.request_id.startswith("title-"))
    assert title_record.source == UsageRecord.Source.CONVERSATION and title_record.model_name == "sim-model"
    assert Conversation.objects.get(pk=conversation_id).title == ""
