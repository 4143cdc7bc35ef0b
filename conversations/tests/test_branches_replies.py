"""Editing and regenerating stream a sibling's reply over SSE, JSON and the WebSocket; what the
upstream receives follows the active branch.

The upstream is the simulator over real HTTP. It answers ``prompt_tokens`` = the words of every
message it received plus 3 per message (``llm.simulator.count_prompt_tokens``), so a reply's
``prompt_tokens`` tells which history was sent.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from chatbackend.asgi import application
from conversations.models import Conversation, Message
from llm.simulator import count_prompt_tokens, reply_text
from tests.kit import FAST_REPLY_TOKENS, access_token, bearer, listed_messages, sse_events

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

TIMEOUT = 10


async def post(path: str, token: str, body: Any = None, *, sse: bool = False) -> Any:
    headers = {**bearer(token), **({"Accept": "text/event-stream"} if sse else {})}
    data = json.dumps(body) if body is not None else ""
    return await AsyncClient().post(path, data=data, content_type="application/json", headers=headers)


async def send(conversation, token: str, content: str) -> dict[str, Any]:
    response = await post(f"/api/conversations/{conversation.pk}/messages/", token, {"content": content})
    assert response.status_code == 201, response.content
    return response.json()


async def edit(conversation, token: str, message_id: int, content: str) -> Any:
    return await post(f"/api/conversations/{conversation.pk}/messages/{message_id}/edit/", token, {"content": content})


async def regenerate(conversation, token: str, message_id: int, **kwargs: Any) -> Any:
    return await post(f"/api/conversations/{conversation.pk}/messages/{message_id}/regenerate/", token, **kwargs)


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


async def active_leaf(conversation) -> int | None:
    return (await Conversation.objects.aget(pk=conversation.pk)).active_leaf_id


async def test_edit_streams_a_sibling_and_its_reply_over_sse(conversation, token):
    first = await send(conversation, token, "Tell me a story")
    question = first["user_message"]

    response = await post(
        f"/api/conversations/{conversation.pk}/messages/{question['id']}/edit/",
        token,
        {"content": "Tell me a joke"},
        sse=True,
    )

    assert response.status_code == 200
    events = await sse_events(response)
    assert [e.event for e in events][0] == "reply.start"
    assert events[-1].event == "reply.done"
    start, done = events[0].json(), events[-1].json()["message"]
    text = "".join(e.json()["content"] for e in events if e.event == "reply.delta")
    assert text == reply_text(turns(("user", "Tell me a joke")), FAST_REPLY_TOKENS) == done["content"]
    edited = await Message.objects.aget(pk=start["user_message_id"])
    assert (edited.parent_id, edited.content) == (None, "Tell me a joke")  # a sibling of the first question
    assert done["parent_id"] == edited.pk
    # Only the edit was sent upstream, not the first question and its reply.
    assert done["prompt_tokens"] == count_prompt_tokens(turns(("user", "Tell me a joke")))
    assert await active_leaf(conversation) == done["id"]
    listed = await listed_messages(conversation.pk, token)
    assert list(listed) == [edited.pk, done["id"]]
    assert listed[edited.pk]["sibling_ids"] == [question["id"], edited.pk]
    assert done == listed[done["id"]]  # built from what the reply wrote: what the API shows


async def test_regenerate_answers_with_the_same_question_and_a_sibling_reply(conversation, token):
    first = await send(conversation, token, "Hello")
    question, answer = first["user_message"], first["assistant_message"]

    response = await regenerate(conversation, token, answer["id"])

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["user_message"]["id"] == question["id"]
    again = body["assistant_message"]
    assert (again["status"], again["parent_id"]) == ("completed", question["id"])
    assert again["sibling_ids"] == [answer["id"], again["id"]]
    assert again["prompt_tokens"] == count_prompt_tokens(turns(("user", "Hello")))
    assert await active_leaf(conversation) == again["id"]
    listed = await listed_messages(conversation.pk, token)
    assert list(listed) == [question["id"], again["id"]]
    assert await Message.objects.filter(conversation=conversation).acount() == 3


async def test_switching_branches_changes_what_the_upstream_receives(conversation, token):
    alpha = await send(conversation, token, "alpha words")
    beta = await send(conversation, token, "beta more words here")
    edited = await edit(conversation, token, alpha["user_message"]["id"], "gamma")
    assert edited.status_code == 201
    gamma = edited.json()

    # The active branch is gamma's: its history is gamma alone.
    on_gamma = await send(conversation, token, "delta")
    gamma_history = turns(("user", "gamma"), ("assistant", gamma["assistant_message"]["content"]), ("user", "delta"))
    assert on_gamma["assistant_message"]["prompt_tokens"] == count_prompt_tokens(gamma_history)

    # Switch to the first branch: from alpha's question down its latest children, to beta's reply.
    switched = await AsyncClient().post(
        f"/api/conversations/{conversation.pk}/messages/{alpha['user_message']['id']}/activate/",
        headers=bearer(token),
    )
    assert (switched.status_code, switched.json()["active_leaf"]) == (200, beta["assistant_message"]["id"])
    on_alpha = await send(conversation, token, "delta")
    alpha_history = turns(
        ("user", "alpha words"),
        ("assistant", alpha["assistant_message"]["content"]),
        ("user", "beta more words here"),
        ("assistant", beta["assistant_message"]["content"]),
        ("user", "delta"),
    )
    assert on_alpha["assistant_message"]["prompt_tokens"] == count_prompt_tokens(alpha_history)
    assert count_prompt_tokens(alpha_history) != count_prompt_tokens(gamma_history)
    assert on_alpha["user_message"]["parent_id"] == beta["assistant_message"]["id"]

    # And back to gamma's branch, exactly at its reply (PATCH): the next turn continues it.
    patched = await AsyncClient().patch(
        f"/api/conversations/{conversation.pk}/",
        data=json.dumps({"active_leaf": on_gamma["assistant_message"]["id"]}),
        content_type="application/json",
        headers=bearer(token),
    )
    assert patched.json()["active_leaf"] == on_gamma["assistant_message"]["id"]
    back = await send(conversation, token, "epsilon")
    back_history = [
        *gamma_history,
        *turns(("assistant", on_gamma["assistant_message"]["content"]), ("user", "epsilon")),
    ]
    assert back["assistant_message"]["prompt_tokens"] == count_prompt_tokens(back_history)


async def test_edit_and_regenerate_refusals(conversation, token, admin_user, other_user):
    first = await send(conversation, token, "Hello")
    question, answer = first["user_message"], first["assistant_message"]
    admin_token, stranger_token = access_token(admin_user), access_token(other_user)

    wrong_kind = await edit(conversation, token, answer["id"], "x")
    empty = await edit(conversation, token, question["id"], "  ")
    not_a_reply = await regenerate(conversation, token, question["id"])
    by_admin = await edit(conversation, admin_token, question["id"], "x")
    regenerated_by_admin = await regenerate(conversation, admin_token, answer["id"])
    by_stranger = await regenerate(conversation, stranger_token, answer["id"])

    assert (wrong_kind.status_code, wrong_kind.json()["error"]["code"]) == (404, "message_not_found")
    assert (empty.status_code, empty.json()["error"]["param"]) == (400, "content")
    assert not_a_reply.status_code == 404
    assert by_admin.status_code == regenerated_by_admin.status_code == 403
    assert by_stranger.status_code == 404
    assert await Message.objects.filter(conversation=conversation).acount() == 2
    assert await active_leaf(conversation) == answer["id"]


@pytest.fixture
async def socket(conversation, token):
    communicator = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={token}")
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    yield communicator
    await communicator.disconnect(timeout=TIMEOUT)


async def frames_until_end(communicator: WebsocketCommunicator) -> list[dict[str, Any]]:
    frames = []
    while not frames or frames[-1]["type"] not in ("reply.done", "error"):
        frames.append(await communicator.receive_json_from(timeout=TIMEOUT))
    return frames


async def test_websocket_edit_and_regenerate_frames(socket, conversation, token):
    await socket.send_json_to({"type": "message.send", "content": "Hello there"})
    sent = await frames_until_end(socket)
    question_id, answer_id = sent[0]["user_message_id"], sent[0]["message_id"]

    await socket.send_json_to({"type": "message.regenerate", "message_id": answer_id})
    regenerated = await frames_until_end(socket)
    await socket.send_json_to({"type": "message.edit", "message_id": question_id, "content": "General Kenobi"})
    edited = await frames_until_end(socket)
    await socket.send_json_to({"type": "message.edit", "message_id": "x", "content": "y"})
    bad = await socket.receive_json_from(timeout=TIMEOUT)

    assert regenerated[0]["type"] == "reply.start"
    assert regenerated[0]["user_message_id"] == question_id
    again = regenerated[-1]["message"]
    assert (regenerated[-1]["type"], again["parent_id"], again["sibling_ids"]) == (
        "reply.done",
        question_id,
        [answer_id, again["id"]],
    )
    assert edited[-1]["type"] == "reply.done"
    edit_id = edited[0]["user_message_id"]
    reply = edited[-1]["message"]
    assert reply["content"] == reply_text(turns(("user", "General Kenobi")), FAST_REPLY_TOKENS)
    assert reply["prompt_tokens"] == count_prompt_tokens(turns(("user", "General Kenobi")))
    assert (await Message.objects.aget(pk=edit_id)).parent_id is None
    assert await active_leaf(conversation) == reply["id"]
    assert (bad["type"], bad["error"]["param"]) == ("error", "message_id")
    listed = await listed_messages(conversation.pk, token)
    assert listed[edit_id]["sibling_ids"] == [question_id, edit_id]


async def test_reply_start_reports_nothing_new(conversation, token):
    # reply.start keeps its shape: branches add parent_id and sibling_ids to messages only.
    events = await sse_events(
        await post(f"/api/conversations/{conversation.pk}/messages/", token, {"content": "hi"}, sse=True)
    )
    assert list(events[0].json()) == ["conversation_id", "user_message_id", "message_id", "model"]
    assert events[-1].json()["message"]["sibling_ids"] == [events[0].json()["message_id"]]
