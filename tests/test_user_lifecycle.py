"""What a deactivation or a password change ends, in a running server: streams, sockets, cached credentials.

Through the full ASGI application, one process: the revocation broadcast (``accounts.revocation``)
and the lookup-cache clears (``chatbackend.lookup_cache``) go through this process's channel
layer, as they do across processes (``tests/test_e2e_revocation.py`` checks that part).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient
from httpx_sse import ServerSentEvent, aconnect_sse

from accounts.services import api_key_create
from chatbackend.asgi import application
from chatbackend.asyncdb import run_sync
from conversations.models import Message
from tests.factories import PASSWORD, ConversationFactory, UserFactory
from tests.kit import SLOW_REPLY_TOKENS, access_token, assert_error, bearer, chat_body, post_chat

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients", "broadcast_listener"),
]

TIMEOUT = 10
NEW_PASSWORD = "an-entirely-new-passphrase-77"


def messages_url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/messages/"


@pytest.fixture
async def sockets() -> AsyncIterator[list[WebsocketCommunicator]]:
    """Sockets opened by a test; any still open are disconnected at its end."""
    opened: list[WebsocketCommunicator] = []
    yield opened
    for communicator in opened:
        await communicator.disconnect(timeout=TIMEOUT)


async def open_socket(sockets: list[WebsocketCommunicator], conversation, credential: str) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={credential}")
    sockets.append(communicator)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    await communicator.send_json_to({"type": "ping"})
    assert await communicator.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}
    return communicator


async def login(client: AsyncClient, username: str, password: str) -> dict[str, str]:
    response = await client.post("/api/auth/token/", {"username": username, "password": password}, "application/json")
    assert response.status_code == 200, response.content
    return response.json()


async def test_a_deactivated_users_sse_stream_ends_at_once(asgi_server, user, slow_model, admin_user, token):
    conversation = await run_sync(ConversationFactory, owner=user, model=slow_model)
    admin_headers = bearer(access_token(admin_user))
    events: list[ServerSentEvent] = []
    async with httpx.AsyncClient(base_url=asgi_server, timeout=TIMEOUT) as client:
        body = {"content": "a long story"}
        async with aconnect_sse(client, "POST", messages_url(conversation), json=body, headers=bearer(token)) as source:
            async for event in source.aiter_sse():
                events.append(event)
                if event.event == "reply.delta" and sum(e.event == "reply.delta" for e in events) == 2:
                    response = await client.post(f"/api/users/{user.pk}/deactivate/", headers=admin_headers)
                    assert response.status_code == 200, response.text

    assert events[-1].event == "reply.done"
    done = events[-1].json()["message"]
    assert done["status"] == "cancelled"
    streamed = "".join(e.json()["content"] for e in events if e.event == "reply.delta")
    assert 0 < len(streamed.split()) < SLOW_REPLY_TOKENS
    assert (await Message.objects.aget(pk=done["id"])).status == "cancelled"  # the data stays


async def test_a_deactivated_users_websockets_close_4401(sockets, user, sim_model, admin_user, token, api_key_secret):
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    by_jwt = await open_socket(sockets, conversation, token)
    by_key = await open_socket(sockets, conversation, api_key_secret)

    response = await AsyncClient().post(f"/api/users/{user.pk}/deactivate/", headers=bearer(access_token(admin_user)))

    assert response.status_code == 200
    for socket in (by_jwt, by_key):
        assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}


async def test_a_deactivated_users_cached_key_and_jwt_are_refused_on_v1(sim_model, user, admin_user, api_key_secret):
    token = access_token(user)
    client = AsyncClient()
    for credential in (api_key_secret, token):  # both now cached in this process
        assert (await post_chat(client, chat_body("sim-model"), bearer(credential))).status_code == 200

    assert (
        await client.post(f"/api/users/{user.pk}/deactivate/", headers=bearer(access_token(admin_user)))
    ).status_code == 200

    refused = await post_chat(client, chat_body("sim-model"), bearer(api_key_secret))
    assert_error(refused, 401, code="user_inactive", type="authentication_error")
    assert (await post_chat(client, chat_body("sim-model"), bearer(token))).status_code == 401

    assert (
        await client.post(f"/api/users/{user.pk}/reactivate/", headers=bearer(access_token(admin_user)))
    ).status_code == 200
    assert (await post_chat(client, chat_body("sim-model"), bearer(api_key_secret))).status_code == 200


async def test_an_unverified_accounts_key_is_a_403_on_v1(sim_model, settings):
    settings.EMAIL_VERIFICATION_REQUIRED = True
    unverified = await run_sync(UserFactory, email_verified=False)
    secret = (await run_sync(api_key_create, user=unverified, name="early")).secret

    response = await post_chat(AsyncClient(), chat_body("sim-model"), bearer(secret))

    assert_error(response, 403, code="email_not_verified", type="permission_error")


async def test_a_password_change_closes_the_websockets_of_earlier_logins_only(sockets, user, sim_model, api_key_secret):
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    client = AsyncClient()
    earlier = await login(client, user.username, PASSWORD)
    by_earlier_login = await open_socket(sockets, conversation, earlier["access"])
    by_key = await open_socket(sockets, conversation, api_key_secret)

    response = await client.post(
        "/api/auth/password/change/",
        {"old_password": PASSWORD, "new_password": NEW_PASSWORD},
        "application/json",
        headers=bearer(earlier["access"]),
    )

    assert response.status_code == 200, response.content
    assert await by_earlier_login.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    # The new login's socket and the API key's stay open.
    by_new_login = await open_socket(sockets, conversation, response.json()["access"])
    for socket in (by_key, by_new_login):
        await socket.send_json_to({"type": "ping"})
        assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}
