"""Conversation templates (NextChat's masks): CRUD, who sees and changes which, a conversation from
one (what the upstream then receives), and NextChat mask JSON in and out."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from accounts.models import Membership, Organization, Team, TeamMembership, User
from accounts.services import api_key_create
from conversations.models import Conversation, ConversationTemplate
from llm.simulator import count_prompt_tokens
from tests.factories import UserFactory
from tests.kit import access_token, assert_error, bearer

pytestmark = pytest.mark.django_db

Visibility = ConversationTemplate.Visibility
BASE = "/api/templates/"

# A mask as NextChat v2.16 exports it from its masks page (``masks.json`` is a list of these).
NEXTCHAT_MASK: dict[str, Any] = {
    "id": "mGcQ3Jq1bXrn4dPSjTL6k",
    "avatar": "1f5bc-fe0f",
    "name": "Copywriter",
    "context": [
        {
            "id": "writer-0",
            "role": "system",
            "content": "You are a copywriter. Write short, vivid product copy in plain English.",
            "date": "",
        },
        {"id": "writer-1", "role": "user", "content": "Write a tagline for a tea shop.", "date": "12/3/2026, 9:00 AM"},
        {"id": "writer-2", "role": "assistant", "content": "Steeped in calm, poured with care.", "date": ""},
    ],
    "syncGlobalConfig": False,
    "modelConfig": {
        "model": "gpt-4o-mini",
        "providerName": "OpenAI",
        "temperature": 1,
        "top_p": 1,
        "max_tokens": 2000,
        "presence_penalty": 0,
        "frequency_penalty": 0.5,
        "sendMemory": True,
        "historyMessageCount": 4,
        "compressMessageLengthThreshold": 1000,
        "compressModel": "",
        "compressProviderName": "",
        "enableInjectSystemPrompts": True,
        "template": "{{input}}",
        "size": "1024x1024",
        "quality": "standard",
        "style": "vivid",
    },
    "lang": "en",
    "builtin": False,
    "createdAt": 1688899480537,
    "hideContext": False,
    "plugin": [],
    "enableArtifacts": False,
    "enableCodeFold": True,
}


@dataclass
class Acme:
    """The default organization's people: ``member`` and ``teammate`` in team red, ``blue`` in team
    blue, an ``admin``, a ``viewer``; ``outsider`` in organization globex."""

    red: Team
    blue: Team
    member: User
    teammate: User
    blue_member: User
    admin: User
    viewer: User
    outsider: User
    globex: Organization


def _role(user: User, role: str) -> User:
    Membership.objects.filter(user=user).update(role=role)
    return user


@pytest.fixture
def acme(db) -> Acme:
    organization = Organization.objects.default()
    red = Team.objects.create(organization=organization, name="Red", slug="red")
    blue = Team.objects.create(organization=organization, name="Blue", slug="blue")
    member, teammate, blue_member = UserFactory(), UserFactory(), UserFactory()
    TeamMembership.objects.create(team=red, user=member)
    TeamMembership.objects.create(team=red, user=teammate)
    TeamMembership.objects.create(team=blue, user=blue_member)
    globex = Organization.objects.create(name="Globex", slug="globex")
    outsider = UserFactory()
    Membership.objects.filter(user=outsider).delete()
    Membership.objects.create(user=outsider, organization=globex, is_default=True)
    return Acme(
        red=red,
        blue=blue,
        member=member,
        teammate=teammate,
        blue_member=blue_member,
        admin=_role(UserFactory(), Membership.Role.ADMIN),
        viewer=_role(UserFactory(), Membership.Role.VIEWER),
        outsider=outsider,
        globex=globex,
    )


def _template(owner: User, visibility: str = Visibility.PRIVATE, team: Team | None = None, **fields: Any):
    organization = fields.pop("organization", None) or Organization.objects.default()
    return ConversationTemplate.objects.create(
        owner=owner, organization=organization, visibility=visibility, team=team, name=fields.pop("name", "t"), **fields
    )


def _ids(response: Any) -> set[int]:
    assert response.status_code == 200, response.content
    return {row["id"] for row in response.json()["results"]}


# --- CRUD ---------------------------------------------------------------------------------------


def test_create_read_update_delete(auth_client, user, model):
    body = {
        "name": "Reviewer",
        "system_prompt": "Review code.",
        "model": "gpt-test",
        "temperature": 0.2,
        "max_tokens": 300,
        "starter_messages": [{"role": "user", "content": "Here is my diff"}, {"role": "assistant", "content": "Go"}],
    }
    created = auth_client.post(BASE, body, format="json")
    assert created.status_code == 201, created.content
    data = created.json()
    assert data["model"] == "gpt-test" and data["visibility"] == "private" and data["team"] is None
    assert data["temperature"] == 0.2 and data["top_p"] is None and data["max_tokens"] == 300
    assert data["starter_messages"] == body["starter_messages"]
    assert data["owner"] == user.pk and data["can_change"] is True
    url = f"{BASE}{data['id']}/"

    assert auth_client.get(url).json()["name"] == "Reviewer"
    assert _ids(auth_client.get(BASE)) == {data["id"]}

    patched = auth_client.patch(url, {"top_p": 0.9, "name": "Code reviewer"}, format="json")
    assert patched.status_code == 200, patched.content
    assert patched.json()["top_p"] == 0.9 and patched.json()["temperature"] == 0.2

    replaced = auth_client.put(url, {"name": "Plain"}, format="json")
    assert replaced.status_code == 200
    assert replaced.json()["temperature"] is None and replaced.json()["starter_messages"] == []

    assert auth_client.delete(url).status_code == 204
    assert not ConversationTemplate.objects.exists()
    assert_error(auth_client.get(url), 404, code="template_not_found")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "name"),
        ({"name": "  "}, "name"),
        ({"name": "x", "temperature": 3}, "temperature"),
        ({"name": "x", "temperature": "0.5"}, "temperature"),
        ({"name": "x", "max_tokens": 0}, "max_tokens"),
        ({"name": "x", "starter_messages": [{"role": "tool", "content": "hi"}]}, "starter_messages"),
        ({"name": "x", "starter_messages": "hi"}, "starter_messages"),
        ({"name": "x", "visibility": "team"}, "team"),
        ({"name": "x", "visibility": "world"}, "visibility"),
    ],
)
def test_invalid_template_is_a_400(auth_client, body, param):
    error = assert_error(auth_client.post(BASE, body, format="json"), 400)
    assert error["param"] == param or param in json.dumps(error.get("fields", {})), error
    assert not ConversationTemplate.objects.exists()


def test_a_model_the_caller_may_not_use_is_refused(auth_client):
    assert_error(auth_client.post(BASE, {"name": "x", "model": "nope"}, format="json"), 404, code="model_not_found")


# --- Who sees and changes which -------------------------------------------------------------


def test_each_caller_sees_their_own_their_teams_and_the_organizations(client_for, acme):
    own = _template(acme.member)
    red = _template(acme.member, Visibility.TEAM, acme.red)
    org = _template(acme.member, Visibility.ORGANIZATION)
    blue = _template(acme.blue_member, Visibility.TEAM, acme.blue)
    blue_private = _template(acme.blue_member)
    globex = _template(acme.outsider, Visibility.ORGANIZATION, organization=acme.globex)

    assert _ids(client_for(acme.member).get(BASE)) == {own.pk, red.pk, org.pk}
    assert _ids(client_for(acme.teammate).get(BASE)) == {red.pk, org.pk}
    assert _ids(client_for(acme.blue_member).get(BASE)) == {org.pk, blue.pk, blue_private.pk}
    assert _ids(client_for(acme.viewer).get(BASE)) == {org.pk}
    # Admins see every team's shared templates (they may change them), never a private one.
    assert _ids(client_for(acme.admin).get(BASE)) == {red.pk, org.pk, blue.pk}
    assert _ids(client_for(acme.outsider).get(BASE)) == {globex.pk}
    assert _ids(client_for(acme.member).get(BASE, {"visibility": "team"})) == {red.pk}

    teammate = client_for(acme.teammate)
    assert teammate.get(f"{BASE}{red.pk}/").json()["can_change"] is False
    for template in (own, blue, globex):
        assert_error(teammate.get(f"{BASE}{template.pk}/"), 404, code="template_not_found")
    # Another organization's template does not exist for the outsider's neighbours, and vice versa.
    assert_error(client_for(acme.outsider).get(f"{BASE}{org.pk}/"), 404, code="template_not_found")


def test_only_the_owner_or_an_admin_of_a_shared_template_changes_it(client_for, acme):
    red = _template(acme.member, Visibility.TEAM, acme.red, name="Red")
    private = _template(acme.member, name="Mine")

    teammate = client_for(acme.teammate)
    assert_error(teammate.patch(f"{BASE}{red.pk}/", {"name": "Taken"}, format="json"), 403, code="permission_denied")
    assert_error(teammate.delete(f"{BASE}{red.pk}/"), 403, code="permission_denied")

    admin = client_for(acme.admin)
    response = admin.patch(f"{BASE}{red.pk}/", {"name": "Moderated"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["owner"] == acme.member.pk  # the owner stays
    assert_error(admin.patch(f"{BASE}{private.pk}/", {"name": "x"}, format="json"), 404, code="template_not_found")
    # Who it is shared with is the owner's choice.
    assert_error(
        admin.patch(f"{BASE}{red.pk}/", {"visibility": "organization"}, format="json"), 403, code="permission_denied"
    )
    assert ConversationTemplate.objects.get(pk=red.pk).visibility == Visibility.TEAM

    # Viewers read only; so does an API key without the chat scope.
    viewer = client_for(acme.viewer)
    assert_error(viewer.post(BASE, {"name": "x"}, format="json"), 403, code="insufficient_permissions")
    read_key = api_key_create(user=acme.member, name="read", scopes=["read"]).secret
    reader = client_for(acme.member)
    reader.credentials(**{"HTTP_AUTHORIZATION": f"Bearer {read_key}"})
    assert reader.get(f"{BASE}{private.pk}/").status_code == 200
    assert_error(reader.patch(f"{BASE}{private.pk}/", {"name": "x"}, format="json"), 403)
    assert ConversationTemplate.objects.get(pk=private.pk).name == "Mine"


def test_sharing_with_a_team_needs_a_team_of_ones_own(client_for, acme):
    member = client_for(acme.member)
    assert_error(
        member.post(BASE, {"name": "x", "visibility": "team", "team": acme.blue.pk}, format="json"),
        400,
        code="invalid_team",
        param="team",
    )
    other_org_team = Team.objects.create(organization=acme.globex, name="G", slug="g")
    assert_error(
        client_for(acme.admin).post(
            BASE, {"name": "x", "visibility": "team", "team": other_org_team.pk}, format="json"
        ),
        400,
        code="invalid_team",
    )
    shared = member.post(BASE, {"name": "x", "visibility": "team", "team": acme.red.pk}, format="json")
    assert shared.status_code == 201 and shared.json()["team"] == acme.red.pk
    assert client_for(acme.teammate).get(f"{BASE}{shared.json()['id']}/").status_code == 200


# --- A conversation from a template -------------------------------------------------------------


def test_a_conversation_from_a_template_starts_with_its_messages(client_for, acme, model):
    template = _template(
        acme.member,
        Visibility.TEAM,
        acme.red,
        name="Coach",
        system_prompt="Be encouraging.",
        model_name="gpt-test",
        temperature=0.3,
        starter_messages=[{"role": "user", "content": "I run 5k."}, {"role": "assistant", "content": "Great!"}],
    )
    # A teammate starts one from the shared template: it is theirs.
    client = client_for(acme.teammate)
    response = client.post(f"{BASE}{template.pk}/conversations/", {}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["title"] == "Coach" and body["system_prompt"] == "Be encouraging." and body["model"] == "gpt-test"
    assert body["parameters"] == {"temperature": 0.3} and body["template"] == template.pk
    conversation = Conversation.objects.get(pk=body["id"])
    assert conversation.owner == acme.teammate
    listed = client.get(f"/api/conversations/{conversation.pk}/messages/").json()["results"]
    assert [(m["role"], m["content"]) for m in listed] == [("user", "I run 5k."), ("assistant", "Great!")]
    assert body["active_leaf"] == listed[-1]["id"]

    titled = client.post(f"{BASE}{template.pk}/conversations/", {"title": "Tuesday"}, format="json")
    assert titled.json()["title"] == "Tuesday"
    assert_error(
        client.post(f"{BASE}{template.pk}/conversations/", {"model": "nope"}, format="json"),
        404,
        code="model_not_found",
    )
    assert_error(client_for(acme.blue_member).post(f"{BASE}{template.pk}/conversations/", {}, format="json"), 404)
    # Viewers may not chat: refused before the lookup.
    assert_error(client_for(acme.viewer).post(f"{BASE}{template.pk}/conversations/", {}, format="json"), 403)


def test_a_template_without_a_model_needs_one(auth_client, user, model):
    template = _template(user)
    assert_error(auth_client.post(f"{BASE}{template.pk}/conversations/", {}, format="json"), 400, code="model_required")
    response = auth_client.post(f"{BASE}{template.pk}/conversations/", {"model": "gpt-test"}, format="json")
    assert response.status_code == 201 and response.json()["model"] == "gpt-test"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_the_upstream_receives_the_templates_prompt_messages_and_parameters(user, sim_model):
    template = await sync_to_async(_template)(
        user,
        name="Poet",
        system_prompt="Answer in verse.",
        model_name=sim_model.name,
        max_tokens=3,
        starter_messages=[{"role": "user", "content": "Rhyme moon"}, {"role": "assistant", "content": "June"}],
    )
    headers = bearer(await sync_to_async(access_token)(user))
    client = AsyncClient()
    created = await client.post(
        f"{BASE}{template.pk}/conversations/", data="{}", content_type="application/json", headers=headers
    )
    assert created.status_code == 201, created.content
    sent = await client.post(
        f"/api/conversations/{created.json()['id']}/messages/",
        data=json.dumps({"content": "And sun?"}),
        content_type="application/json",
        headers=headers,
    )
    assert sent.status_code == 201, sent.content
    reply = sent.json()["assistant_message"]
    history = [
        {"role": "system", "content": "Answer in verse."},
        {"role": "user", "content": "Rhyme moon"},
        {"role": "assistant", "content": "June"},
        {"role": "user", "content": "And sun?"},
    ]
    # The simulator counts the words of every message it received: the system prompt and the
    # starter messages were sent; max_tokens (the template's) cut the reply at 3 tokens.
    assert reply["prompt_tokens"] == count_prompt_tokens(history)
    assert reply["completion_tokens"] == 3 and reply["finish_reason"] == "length"


# --- NextChat masks ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_a_masks_max_tokens_is_kept_for_nextchat_not_sent_with_every_reply(user, sim_model):
    # Every NextChat mask carries modelConfig.max_tokens (4000 by default), which NextChat never
    # sends for a text model (only for vision ones, and then at least 4000). Imported as the
    # template's max_tokens, it went with every reply: over a smaller context window every message
    # was a 400 max_tokens_too_large, over a model's smaller output cap the budget reservation was
    # sized for 4000 tokens and the history trimmed to leave them free.
    sim_model.context_window, sim_model.max_output_tokens = 3000, 64
    await sync_to_async(sim_model.save)()
    mask = copy.deepcopy(NEXTCHAT_MASK)
    mask["modelConfig"].update(model=sim_model.name, max_tokens=4000)
    headers = bearer(await sync_to_async(access_token)(user))
    client = AsyncClient()

    imported = await client.post(
        f"{BASE}import/", data=json.dumps(mask), content_type="application/json", headers=headers
    )
    assert imported.status_code == 201, imported.content
    template = imported.json()["templates"][0]
    assert template["max_tokens"] is None and template["temperature"] == 1.0  # what NextChat sends stays
    created = await client.post(
        f"{BASE}{template['id']}/conversations/", data="{}", content_type="application/json", headers=headers
    )
    assert created.status_code == 201, created.content
    assert "max_tokens" not in created.json()["parameters"]
    sent = await client.post(
        f"/api/conversations/{created.json()['id']}/messages/",
        data=json.dumps({"content": "A tagline, please."}),
        content_type="application/json",
        headers=headers,
    )
    assert sent.status_code == 201, sent.content
    assert sent.json()["assistant_message"]["status"] == "completed"
    # ... and NextChat gets its mask back as it was.
    exported = await client.get(f"{BASE}{template['id']}/export/", headers=headers)
    assert exported.json()["modelConfig"]["max_tokens"] == 4000


def test_mask_import_then_export_gives_nextchat_its_mask(auth_client, user):
    other = {**copy.deepcopy(NEXTCHAT_MASK), "id": "second", "name": "Plain", "context": []}
    del other["modelConfig"]
    imported = auth_client.post(f"{BASE}import/", [NEXTCHAT_MASK, other], format="json")
    assert imported.status_code == 201, imported.content
    first = imported.json()["templates"][0]
    assert first["name"] == "Copywriter" and first["visibility"] == "private"
    assert first["system_prompt"] == NEXTCHAT_MASK["context"][0]["content"]
    assert first["starter_messages"] == [
        {"role": "user", "content": "Write a tagline for a tea shop."},
        {"role": "assistant", "content": "Steeped in calm, poured with care."},
    ]
    # max_tokens stays NextChat's (it never sends it for a text model), exported as it came.
    assert (first["model"], first["temperature"], first["max_tokens"], first["frequency_penalty"]) == (
        "gpt-4o-mini",
        1.0,
        None,
        0.5,
    )

    exported = auth_client.get(f"{BASE}{first['id']}/export/")
    assert exported.status_code == 200
    assert "attachment" in exported.headers["Content-Disposition"]
    mask = exported.json()
    strip = lambda m: {**m, "context": [(c["role"], c["content"]) for c in m["context"]]}  # noqa: E731
    assert strip(mask) == strip(NEXTCHAT_MASK)

    everything = auth_client.get(f"{BASE}export/").json()
    assert [m["name"] for m in everything] == ["Copywriter", "Plain"]
    assert everything[1]["modelConfig"]["model"] == "gpt-4o-mini"  # NextChat's defaults fill the gaps

    # Importing the same masks again updates them: no copies.
    changed = {**copy.deepcopy(NEXTCHAT_MASK), "name": "Copywriter v2"}
    again = auth_client.post(f"{BASE}import/", changed, format="json")
    assert again.status_code == 201
    assert again.json()["templates"][0]["id"] == first["id"]
    assert ConversationTemplate.objects.filter(owner=user).count() == 2


def test_a_template_made_here_exports_as_a_mask_nextchat_takes(auth_client, user):
    template = _template(user, name="Short", system_prompt="Be brief.", model_name="gpt-x", top_p=0.5)
    mask = auth_client.get(f"{BASE}{template.pk}/export/").json()
    assert mask["name"] == "Short" and mask["builtin"] is False and isinstance(mask["createdAt"], int)
    assert mask["context"][0]["role"] == "system" and mask["context"][0]["content"] == "Be brief."
    assert mask["modelConfig"]["model"] == "gpt-x" and mask["modelConfig"]["top_p"] == 0.5
    assert {"temperature", "max_tokens", "sendMemory", "historyMessageCount"} <= mask["modelConfig"].keys()
    # ... and comes back the same.
    back = auth_client.post(f"{BASE}import/", mask, format="json").json()["templates"][0]
    assert (back["system_prompt"], back["model"], back["top_p"]) == ("Be brief.", "gpt-x", 0.5)


@pytest.mark.parametrize("blank", ["\t", " \n "])
def test_a_template_with_a_blank_system_prompt_exports_a_mask_that_imports_again(auth_client, user, blank):
    template = _template(user, name="Blank", system_prompt=blank)

    mask = auth_client.get(f"{BASE}{template.pk}/export/").json()

    assert mask["context"] == []  # NextChat, and the import, take no blank message
    response = auth_client.post(f"{BASE}import/", mask, format="json")
    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    ("document", "param"),
    [
        ([], "masks"),
        ("masks", "masks"),
        ([1], "masks[0]"),
        ([{"context": []}], "masks[0].name"),
        ({"name": "x", "context": "hi"}, "mask.context"),
        ({"name": "x", "context": [{"role": "tool", "content": "x"}]}, "mask.context[0].role"),
        ({"name": "x", "context": [{"role": "user", "content": ["part"]}]}, "mask.context[0].content"),
        ({"name": "x", "modelConfig": {"temperature": "hot"}}, "mask.modelConfig.temperature"),
        ({"name": "x", "modelConfig": {"max_tokens": 1.5}}, "mask.modelConfig.max_tokens"),
        ({"name": "x", "modelConfig": []}, "mask.modelConfig"),
        ([NEXTCHAT_MASK, {"name": "x", "modelConfig": {"top_p": 7}}], "masks[1].modelConfig.top_p"),
        ({"name": "x", "modelConfig": {"model": 4}}, "mask.modelConfig.model"),
        ({"name": "x", "context": [{"role": "system", "content": " "}]}, "mask.context[0].content"),
        ({"name": "x", "createdAt": "yesterday"}, "mask.createdAt"),
        ({"name": "x", "createdAt": 2**53}, "mask.createdAt"),
        ({"name": "x", "createdAt": 1.5}, "mask.createdAt"),
        ({"name": "x", "avatar": None}, "mask.avatar"),
        ({"name": "x", "id": 7}, "mask.id"),
        ({"name": "x", "plugin": "all"}, "mask.plugin"),
        ({"name": "x", "builtin": "no"}, "mask.builtin"),
        # Null characters: PostgreSQL's text and jsonb cannot hold them.
        ({"name": "x\x00"}, "mask.name"),
        ({"name": "x", "id": "mask-\x00"}, "mask.id"),
        ({"name": "x", "avatar": "\x00"}, "mask.avatar"),
        ({"name": "x", "modelConfig": {"model": "gpt\x00"}}, "mask.modelConfig.model"),
        ({"name": "x", "modelConfig": {"template": "{{input}}\x00"}}, "mask.modelConfig.template"),
        ({"name": "x", "context": [{"role": "system", "content": "Be\x00 brief."}]}, "mask.context[0].content"),
        ({"name": "x", "context": [{"role": "user", "content": "hi\x00"}]}, "mask.context[0].content"),
        ({"name": "x", "plugin": ["\x00"]}, "mask.plugin[0]"),
        ({"name": "x", "nested": {"deep": [{"a": "\x00"}]}}, "mask.nested.deep[0].a"),
        ({"name": "x", "odd\x00key": 1}, "mask"),
        ([NEXTCHAT_MASK, {"name": "x", "lang": "e\x00n"}], "masks[1].lang"),
    ],
)
def test_a_bad_mask_is_a_400_naming_it_and_nothing_is_imported(auth_client, document, param):
    assert_error(auth_client.post(f"{BASE}import/", document, format="json"), 400, param=param)
    assert not ConversationTemplate.objects.exists()


def test_a_created_at_past_64_bits_is_a_400_not_a_float(auth_client):
    """orjson reads an integer past 64 bits as a float: still a clear 400 naming the field."""
    body = '{"name": "x", "createdAt": -62821695471222381346816}'
    response = auth_client.post(f"{BASE}import/", data=body, content_type="application/json")
    assert_error(response, 400, param="mask.createdAt")
    assert not ConversationTemplate.objects.exists()


def test_an_integral_created_at_is_kept_as_an_integer(auth_client):
    body = '{"name": "x", "createdAt": 1688899480537.0}'
    response = auth_client.post(f"{BASE}import/", data=body, content_type="application/json")
    assert response.status_code == 201, response.content
    template = ConversationTemplate.objects.get()
    assert template.nextchat["createdAt"] == 1688899480537 and isinstance(template.nextchat["createdAt"], int)


def test_import_of_malformed_json_is_a_400(auth_client):
    response = auth_client.post(f"{BASE}import/", data="{not json", content_type="application/json")
    assert_error(response, 400)
    assert_error(auth_client.post(f"{BASE}import/", data="", content_type="application/json"), 400)
    assert not ConversationTemplate.objects.exists()


def test_viewers_may_not_import(client_for, acme):
    assert_error(client_for(acme.viewer).post(f"{BASE}import/", NEXTCHAT_MASK, format="json"), 403)
    assert not ConversationTemplate.objects.exists()


def test_admin_lists_and_filters_templates(admin_site, user):
    _template(user, name="Listed", visibility=Visibility.ORGANIZATION)
    response = admin_site.get("/admin/conversations/conversationtemplate/", {"visibility": "organization"})
    assert response.status_code == 200 and b"Listed" in response.content
    assert admin_site.get("/admin/conversations/conversationtemplate/", {"q": "Listed"}).status_code == 200


def test_admin_keeps_templates_their_owners_and_only_deletes_them(admin_site, user):
    # The admin's add page answers 403 by design, as for API keys and messages: a template is its
    # owner's (made over REST in an organization they belong to); operators moderate by deleting.
    template = _template(user, name="Moderated", visibility=Visibility.ORGANIZATION)
    base = "/admin/conversations/conversationtemplate/"

    assert admin_site.get(f"{base}add/").status_code == 403
    assert admin_site.post(f"{base}add/", {"name": "By an operator", "owner": user.pk}).status_code == 403
    change = admin_site.get(f"{base}{template.pk}/change/")
    assert change.status_code == 200 and b'name="name"' not in change.content  # read-only
    assert admin_site.post(f"{base}{template.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not ConversationTemplate.objects.exists()
