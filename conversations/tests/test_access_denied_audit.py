"""Another organization's conversation: the same 404 as a missing one, and one ``access.denied`` row.

Over REST, the SSE send view and the WebSocket. The caller acts in Globex; the conversation is
Acme's, an organization the caller is no member of. Another Globex member's conversation (also a
404) and a missing id write nothing: they are no tenant breach.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from accounts.models import AuditEvent, Membership, Organization, User
from chatbackend.asgi import application
from chatbackend.asyncdb import run_sync
from conversations.models import Conversation, Message
from tests.factories import ConversationFactory, UserFactory
from tests.kit import access_token, assert_error, bearer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

GLOBEX = {"OpenAI-Organization": "globex"}
DENIED = AuditEvent.Action.ACCESS_DENIED
MISSING_ID = 987654
TIMEOUT = 10


@pytest.fixture
def world(db, sim_model) -> dict[str, Any]:
    """``caller``: a member of Globex (and of the default organization, as every user); ``acme_chat``:
    a conversation in Acme; ``neighbour_chat``: another Globex member's conversation."""
    acme = Organization.objects.create(name="Acme", slug="acme")
    globex = Organization.objects.create(name="Globex", slug="globex")
    caller = UserFactory(username="caller")
    Membership.objects.create(user=caller, organization=globex)
    acme_member = UserFactory()
    Membership.objects.create(user=acme_member, organization=acme)
    neighbour = UserFactory()
    Membership.objects.create(user=neighbour, organization=globex)
    return {
        "globex": globex,
        "caller": caller,
        "acme_chat": ConversationFactory(owner=acme_member, organization=acme, model=sim_model, title="Acme secrets"),
        "neighbour_chat": ConversationFactory(owner=neighbour, organization=globex, model=sim_model),
    }


def _denied_rows() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=DENIED).order_by("id"))


def _assert_one_row(*, caller: User, globex: Organization, conversation: Conversation, via: str, ip: str) -> None:
    [row] = _denied_rows()
    assert (row.actor_id, row.actor_username, row.organization_id) == (caller.pk, "caller", globex.pk)
    assert (row.object_type, row.object_id) == ("conversations.conversation", str(conversation.pk))
    assert row.after == {"via": via, "object_organization": conversation.organization_id}
    assert str(row.ip) == ip
    # Nothing of the conversation itself: no title, no content.
    assert row.object_repr == "" and row.before is None
    assert "Acme secrets" not in json.dumps(row.after)


# --- REST ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("get", "", None),
        ("patch", "", {"title": "mine now"}),
        ("delete", "", None),
        ("get", "messages/", None),
        ("post", "messages/1/stop/", None),
    ],
)
def test_rest_on_another_organizations_conversation_is_a_404_and_one_audit_row(
    client_for, world, method, suffix, body
) -> None:
    client = client_for(world["caller"])

    def call(conversation_id: int) -> Any:
        path = f"/api/conversations/{conversation_id}/{suffix}"
        return getattr(client, method)(path, body, format="json", headers=GLOBEX)

    missing = call(MISSING_ID)
    assert_error(missing, 404)
    neighbours = call(world["neighbour_chat"].pk)
    assert neighbours.status_code == 404 and neighbours.json() == missing.json()
    assert _denied_rows() == []

    acme_chat = world["acme_chat"]
    response = call(acme_chat.pk)

    # Exactly the answer of a missing conversation: nothing tells that it exists.
    assert response.status_code == 404 and response.json() == missing.json()
    path = f"/api/conversations/{acme_chat.pk}/{suffix}"
    _assert_one_row(
        caller=world["caller"],
        globex=world["globex"],
        conversation=acme_chat,
        via=f"{method.upper()} {path}",
        ip="127.0.0.1",
    )
    acme_chat.refresh_from_db()
    assert acme_chat.title == "Acme secrets"


def test_a_member_of_both_organizations_acting_in_one_is_not_audited(client_for, world) -> None:
    """A conversation of an organization the caller also belongs to is no other tenant's."""
    acme_chat = world["acme_chat"]
    Membership.objects.create(user=world["caller"], organization=acme_chat.organization)
    response = client_for(world["caller"]).get(f"/api/conversations/{acme_chat.pk}/", headers=GLOBEX)
    assert response.status_code == 404
    assert _denied_rows() == []


def test_the_platform_superuser_is_not_audited(client_for, world, superuser) -> None:
    Membership.objects.create(user=superuser, organization=world["globex"])
    # The superuser sees every organization's conversation; a missing one is merely missing.
    assert client_for(superuser).get(f"/api/conversations/{world['acme_chat'].pk}/", headers=GLOBEX).status_code == 200
    assert client_for(superuser).get(f"/api/conversations/{MISSING_ID}/", headers=GLOBEX).status_code == 404
    assert _denied_rows() == []


# --- SSE send view -------------------------------------------------------------------------------


async def _send(conversation_id: int, token: str) -> Any:
    return await AsyncClient().post(
        f"/api/conversations/{conversation_id}/messages/",
        data=json.dumps({"content": "hi"}),
        content_type="application/json",
        headers={**bearer(token), **GLOBEX, "Accept": "text/event-stream"},
    )


async def test_sse_send_to_another_organizations_conversation_is_a_404_and_one_audit_row(world) -> None:
    token = access_token(world["caller"])
    missing = await _send(MISSING_ID, token)
    assert_error(missing, 404, code="conversation_not_found")
    assert_error(await _send(world["neighbour_chat"].pk, token), 404, code="conversation_not_found")
    assert await run_sync(_denied_rows) == []

    acme_chat = world["acme_chat"]
    response = await _send(acme_chat.pk, token)

    assert response.status_code == 404 and json.loads(response.content) == json.loads(missing.content)
    assert not await Message.objects.filter(conversation=acme_chat).aexists()
    await run_sync(
        _assert_one_row,
        caller=world["caller"],
        globex=world["globex"],
        conversation=acme_chat,
        via=f"POST /api/conversations/{acme_chat.pk}/messages/",
        ip="127.0.0.1",
    )


# --- WebSocket -----------------------------------------------------------------------------------


async def _connect_and_close_code(conversation_id: int, token: str) -> int:
    communicator = WebsocketCommunicator(
        application, f"/ws/conversations/{conversation_id}/?organization=globex&token={token}"
    )
    communicator.scope["client"] = ["203.0.113.7", 50123]  # as the server (and TrustedProxyMiddleware) set it
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected  # accepted, then closed: a refused handshake reaches browsers as a bare 1006
    closed = await communicator.receive_output(timeout=TIMEOUT)
    assert closed["type"] == "websocket.close"
    await communicator.disconnect(timeout=TIMEOUT)
    return int(closed["code"])


async def test_websocket_to_another_organizations_conversation_closes_4404_and_writes_one_audit_row(world) -> None:
    token = access_token(world["caller"])
    assert await _connect_and_close_code(MISSING_ID, token) == 4404
    assert await _connect_and_close_code(world["neighbour_chat"].pk, token) == 4404
    assert await run_sync(_denied_rows) == []

    acme_chat = world["acme_chat"]
    assert await _connect_and_close_code(acme_chat.pk, token) == 4404

    await run_sync(
        _assert_one_row,
        caller=world["caller"],
        globex=world["globex"],
        conversation=acme_chat,
        via=f"websocket /ws/conversations/{acme_chat.pk}/",  # the path only: never the ?token=
        ip="203.0.113.7",
    )
