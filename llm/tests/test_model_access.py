"""Model access per organization and team, over real requests: ``/v1``, ``/api/models``, SSE, WebSocket.

What a request may use is its organization's list ∩ its teams' (union) ∩ its key's
(``accounts.model_access``); anything else is a 404 ``model_not_found``, as a model that does not
exist, and is not listed. Requests go through Django's ASGI handler; the upstream is the simulator.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext

from accounts.authentication import principal_for
from accounts.model_access import model_access_cache, model_access_for, model_access_for_async
from accounts.models import Membership, Organization, Team, TeamMembership
from accounts.services import api_key_create
from chatbackend.asgi import application
from chatbackend.asyncdb import run_sync
from conversations.models import Message
from llm.models import ModelAlias
from tests.factories import ConversationFactory, LLMModelFactory, UserFactory
from tests.kit import access_token, assert_error, bearer, chat_body, post_chat, streamed_content, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients", "broadcast_listener"),
]

ALL = ["fast", "other-alias", "other-model", "sim-model"]


@pytest.fixture
def other_models(db, sim_model):
    """``other-model`` (enabled), alias ``fast`` to ``sim-model`` and ``other-alias`` to ``other-model``."""
    other = LLMModelFactory(name="other-model", provider=sim_model.provider, upstream_model="sim-1")
    ModelAlias.objects.create(name="fast", model=sim_model)
    ModelAlias.objects.create(name="other-alias", model=other)


def organization_restrict(names: list[str], slug: str = "default") -> Organization:
    """Set the ``allowed_models`` of organization ``slug`` with ``save()`` (as the admin does)."""
    organization = Organization.objects.default() if slug == "default" else Organization.objects.get(slug=slug)
    organization.allowed_models = names
    organization.save()
    return organization


def team_with(names: list[str], *members: Any, slug: str = "team") -> Team:
    """Create a team of the default organization with ``allowed_models`` ``names`` and ``members``."""
    team = Team.objects.create(organization=Organization.objects.default(), name=slug, slug=slug, allowed_models=names)
    for member in members:
        TeamMembership.objects.create(team=team, user=member)
    return team


async def listed(headers: dict[str, str]) -> list[str]:
    response = await AsyncClient().get("/v1/models", headers=headers)
    assert response.status_code == 200, response.content
    return [entry["id"] for entry in response.json()["data"]]


async def listed_rest(headers: dict[str, str]) -> list[str]:
    response = await AsyncClient().get("/api/models/", headers=headers)
    assert response.status_code == 200, response.content
    return [row["name"] for row in response.json()["results"]]


async def chat_status(headers: dict[str, str], model: str) -> int:
    return (await post_chat(AsyncClient(), chat_body(model), headers)).status_code


async def post_json(path: str, body: Any, headers: dict[str, str]) -> Any:
    return await AsyncClient().post(path, data=json.dumps(body), content_type="application/json", headers=headers)


async def new_key(user: Any, **restrictions: Any) -> dict[str, str]:
    created = await run_sync(api_key_create, user=user, name="k", **restrictions)
    return bearer(created.secret)


async def test_an_organizations_list_filters_v1_models_and_api_models_for_jwt_and_keys(user, other_models):
    await run_sync(organization_restrict, ["sim-model", "other-alias"])
    jwt = bearer(access_token(user))
    key = await new_key(user)

    for headers in (jwt, key):
        # sim-model and its alias fast (a model's name allows its aliases); other-alias, not its model.
        assert await listed(headers) == ["fast", "other-alias", "sim-model"]
        assert await listed_rest(headers) == ["sim-model"]
        for name in ("sim-model", "fast", "other-alias"):
            retrieved = await AsyncClient().get(f"/v1/models/{name}", headers=headers)
            assert retrieved.status_code == 200 and retrieved.json()["id"] == name
        assert_error(await AsyncClient().get("/v1/models/other-model", headers=headers), 404, code="model_not_found")


async def test_a_model_outside_the_organizations_list_is_a_404_on_every_inference_endpoint(user, other_models):
    await run_sync(organization_restrict, ["sim-model"])
    key = await new_key(user)
    missing = assert_error(await post_chat(AsyncClient(), chat_body("no-such-model"), key), 404, code="model_not_found")

    for name in ("other-model", "other-alias"):
        for stream in (True, False):
            response = await post_chat(AsyncClient(), chat_body(name, stream=stream), key)
            error = assert_error(response, 404, code="model_not_found", param="model")
            assert error["message"] == missing["message"].replace("no-such-model", name)  # as if it did not exist
        assert_error(await post_json("/v1/responses", {"model": name, "input": "hi"}, key), 404, code="model_not_found")
        body = {"model": name, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        anthropic = await post_json("/v1/messages", body, {"x-api-key": key["Authorization"].split()[1]})
        assert anthropic.status_code == 404 and anthropic.json()["error"]["type"] == "not_found_error"
    assert await usage_records() == []
    assert await chat_status(key, "sim-model") == 200
    assert await chat_status(key, "fast") == 200


async def test_a_team_members_list_narrows_the_organizations_and_other_members_are_not_restricted(
    user, other_user, other_models
):
    await run_sync(team_with, ["other-model"], user)
    await run_sync(team_with, [], user, other_user, slug="open")  # an empty list imposes nothing
    member, outsider = bearer(access_token(user)), bearer(access_token(other_user))

    assert await listed(member) == ["other-alias", "other-model"]
    assert await listed_rest(member) == ["other-model"]
    assert await listed(outsider) == ALL
    assert_error(await post_chat(AsyncClient(), chat_body("sim-model"), member), 404, code="model_not_found")
    assert_error(await post_chat(AsyncClient(), chat_body("fast"), member), 404, code="model_not_found")
    assert await chat_status(member, "other-alias") == 200
    assert await chat_status(outsider, "sim-model") == 200


async def test_two_teams_lists_unite_then_meet_the_organizations_and_the_keys(user, other_models):
    await run_sync(team_with, ["sim-model"], user, slug="a")
    await run_sync(team_with, ["other-alias"], user, slug="b")
    assert await listed(bearer(access_token(user))) == ["fast", "other-alias", "sim-model"]

    await run_sync(organization_restrict, ["fast", "other-alias", "other-model"])
    # org ∩ (team a ∪ team b): fast (org names it; team a names its model), other-alias.
    assert await listed(bearer(access_token(user))) == ["fast", "other-alias"]
    key = await new_key(user, allowed_models=["fast"])
    assert await listed(key) == ["fast"]
    assert_error(await post_chat(AsyncClient(), chat_body("other-alias"), key), 404, code="model_not_found")
    assert_error(await post_chat(AsyncClient(), chat_body("sim-model"), key), 404, code="model_not_found")
    assert await chat_status(key, "fast") == 200


async def test_an_alias_in_the_list_allows_that_alias_only(user, other_models):
    await run_sync(organization_restrict, ["fast"])
    jwt = bearer(access_token(user))

    assert await listed(jwt) == ["fast"]
    assert await chat_status(jwt, "fast") == 200
    assert_error(await post_chat(AsyncClient(), chat_body("sim-model"), jwt), 404, code="model_not_found")


async def test_the_superuser_acting_in_an_organization_follows_its_list(other_models):
    acme = await Organization.objects.acreate(name="Acme", slug="acme", allowed_models=["other-model"])
    root = await run_sync(UserFactory, is_superuser=True, is_staff=True)
    assert not await Membership.objects.filter(user=root, organization=acme).aexists()  # acts in it as its owner
    in_acme = {**bearer(access_token(root)), "OpenAI-Organization": "acme"}

    assert await listed(in_acme) == ["other-alias", "other-model"]
    assert_error(await post_chat(AsyncClient(), chat_body("sim-model"), in_acme), 404, code="model_not_found")
    assert await listed(bearer(access_token(root))) == ALL  # the default organization has no list


async def test_a_change_of_a_list_or_of_a_team_is_seen_by_the_next_request(user, other_models):
    key = await new_key(user)
    jwt = bearer(access_token(user))
    assert await chat_status(key, "sim-model") == 200
    assert await listed(jwt) == ALL
    cached_key = (await Organization.objects.aget(slug="default")).pk, user.pk, None
    assert model_access_cache.get(cached_key) is not None  # the next request reads no list

    await run_sync(organization_restrict, ["other-model"])
    assert await chat_status(key, "sim-model") == 404
    assert await listed(jwt) == ["other-alias", "other-model"]

    await run_sync(organization_restrict, [])
    team = await run_sync(team_with, ["fast"], user)
    assert await chat_status(key, "sim-model") == 404
    assert await listed(jwt) == ["fast"]

    team.allowed_models = ["fast", "other-model"]
    await team.asave()
    assert await listed(jwt) == ["fast", "other-alias", "other-model"]

    await TeamMembership.objects.filter(team=team, user=user).adelete()
    assert await chat_status(key, "sim-model") == 200
    assert await listed(jwt) == ALL


async def test_the_sse_send_view_and_an_open_websocket_refuse_a_model_the_organization_no_longer_allows(
    user, other_models, sim_model
):
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    token = access_token(user)
    socket = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={token}")
    connected, _ = await socket.connect(timeout=10)
    assert connected

    await run_sync(organization_restrict, ["other-model"])

    sse = await AsyncClient().post(
        f"/api/conversations/{conversation.pk}/messages/",
        data=json.dumps({"content": "hi"}),
        content_type="application/json",
        headers={**bearer(token), "Accept": "text/event-stream"},
    )
    assert_error(sse, 404, code="model_not_found", param="model")
    await socket.send_json_to({"type": "message.send", "content": "hi"})
    frame = await socket.receive_json_from(timeout=10)
    assert frame["type"] == "error" and frame["error"]["code"] == "model_not_found", frame
    assert not await Message.objects.filter(conversation=conversation).aexists()  # no turn was written

    await run_sync(organization_restrict, ["sim-model"])
    await socket.send_json_to({"type": "message.send", "content": "hi"})
    types = []
    while not types or types[-1] not in ("reply.done", "error"):
        types.append((await socket.receive_json_from(timeout=10))["type"])
    assert types[-1] == "reply.done", types
    await socket.disconnect(timeout=10)
    allowed = await AsyncClient().post(
        f"/api/conversations/{conversation.pk}/messages/",
        data=json.dumps({"content": "hi"}),
        content_type="application/json",
        headers={**bearer(token), "Accept": "text/event-stream"},
    )
    assert allowed.status_code == 200
    assert b"event: reply.done" in await streamed_content(allowed)


async def test_creating_a_conversation_with_a_model_outside_the_teams_list_is_a_404(user, other_models):
    await run_sync(team_with, ["other-model"], user)
    headers = bearer(access_token(user))

    refused = await post_json("/api/conversations/", {"model": "sim-model"}, headers)
    created = await post_json("/api/conversations/", {"model": "other-model"}, headers)

    assert_error(refused, 404, code="model_not_found", param="model")
    assert created.status_code == 201, created.content
    changed = await AsyncClient().patch(
        f"/api/conversations/{created.json()['id']}/",
        data=json.dumps({"model": "fast"}),
        content_type="application/json",
        headers=headers,
    )
    assert_error(changed, 404, code="model_not_found", param="model")


async def test_a_callers_access_read_once_is_answered_without_a_query(user, other_models):
    await run_sync(team_with, ["fast"], user)
    principal = await run_sync(principal_for, user=user)
    first = await model_access_for_async(principal=principal)  # a miss: read, then cached

    def again() -> tuple[Any, int]:
        with CaptureQueriesContext(connection) as queries:
            access = model_access_for(principal=principal)
        return access, len(queries)

    access, queries = await run_sync(again)

    assert (access, queries) == (first, 0)
    assert access.allows("fast", "sim-model") and not access.allows("sim-model")
