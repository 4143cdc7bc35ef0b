"""What removing a member from an organization (or changing their role) ends, in a running server.

Through the full ASGI application, one process, as ``tests/test_user_lifecycle.py``: the
revocation broadcast closes the member's sockets, the principal caches forget them, and their
API key of that organization stops working on every interface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from accounts.models import Membership, Organization
from accounts.services import api_key_create
from chatbackend.asgi import application
from chatbackend.asyncdb import run_sync
from tests.factories import ConversationFactory, UserFactory
from tests.kit import access_token, bearer, chat_body, post_chat

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients", "broadcast_listener"),
]

TIMEOUT = 10


@pytest.fixture
async def acme_member(user) -> AsyncIterator[tuple[Organization, Membership, str]]:
    acme = await Organization.objects.acreate(name="Acme", slug="acme")
    membership = await Membership.objects.acreate(user=user, organization=acme)
    secret = (await run_sync(api_key_create, user=user, name="acme key", organization=acme)).secret
    yield acme, membership, secret


async def test_a_removed_members_socket_closes_and_their_key_stops_working(user, sim_model, acme_member):
    acme, membership, secret = acme_member
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model, organization=acme)
    socket = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={secret}")
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected
    client = AsyncClient()
    assert (await post_chat(client, chat_body("sim-model"), bearer(secret))).status_code == 200  # cached now
    assert (await client.get("/api/api-keys/", headers=bearer(secret))).status_code == 200

    await membership.adelete()

    assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    refused = await post_chat(client, chat_body("sim-model"), bearer(secret))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_organization"
    # Every REST endpoint, not only those that list the organization's objects.
    for path in ("/api/api-keys/", "/api/usage/", "/api/auth/me/", "/api/models/"):
        response = await client.get(path, headers=bearer(secret))
        assert response.status_code == 401, (path, response.content)


async def test_a_role_change_closes_the_members_sockets(user, sim_model, acme_member):
    acme, membership, secret = acme_member
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model, organization=acme)
    socket = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={secret}")
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected

    membership.role = Membership.Role.VIEWER
    await membership.asave(update_fields=["role"])

    assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}


async def test_a_malformed_organization_is_a_4401_not_a_crash(user, token, sim_model):
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    socket = WebsocketCommunicator(
        application, f"/ws/conversations/{conversation.pk}/?token={token}&organization=%00bad"
    )
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected  # accepted, then closed with the authentication failure
    assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    response = await AsyncClient().get("/v1/models", headers={**bearer(token), "OpenAI-Organization": "a b"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_organization"


@pytest.fixture
async def acme_owner_headers(acme_member) -> dict[str, str]:
    """Headers of an owner of Acme calling the REST API with a JWT, acting in Acme."""
    acme, _, _ = acme_member
    owner = await run_sync(UserFactory)
    await Membership.objects.acreate(user=owner, organization=acme, role=Membership.Role.OWNER)
    return {**bearer(await run_sync(access_token, owner)), "OpenAI-Organization": "acme"}


async def test_a_role_changed_over_rest_closes_the_members_sockets(user, sim_model, acme_member, acme_owner_headers):
    acme, membership, secret = acme_member
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model, organization=acme)
    socket = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={secret}")
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected

    response = await AsyncClient().patch(
        f"/api/organization/members/{user.pk}/",
        {"role": "viewer"},
        content_type="application/json",
        headers=acme_owner_headers,
    )

    assert response.status_code == 200, response.content
    assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    # Reconnected, the member acts as a viewer now: read-only, so the chat socket is refused.
    again = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={secret}")
    connected, _ = await again.connect(timeout=TIMEOUT)
    assert connected
    assert await again.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4403}


async def test_a_member_removed_over_rest_loses_their_sockets_and_key(user, sim_model, acme_member, acme_owner_headers):
    acme, membership, secret = acme_member
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model, organization=acme)
    socket = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={secret}")
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected

    client = AsyncClient()
    response = await client.delete(f"/api/organization/members/{user.pk}/", headers=acme_owner_headers)

    assert response.status_code == 204, response.content
    assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    refused = await post_chat(client, chat_body("sim-model"), bearer(secret))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_organization"
