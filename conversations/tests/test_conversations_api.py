"""The conversations REST API: CRUD, owner scoping, filters, pagination, the message list."""

from __future__ import annotations

import pytest

from conversations.models import Conversation, Message
from llm.models import ModelAlias
from tests.factories import ConversationFactory, LLMModelFactory, MessageFactory
from tests.kit import assert_error

pytestmark = pytest.mark.django_db


def test_create_conversation(auth_client, user, model):
    response = auth_client.post(
        "/api/conversations/", {"model": "gpt-test", "title": "Hi", "system_prompt": "Be brief."}, format="json"
    )

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {
        "id", "title", "model", "system_prompt", "parameters", "template", "active_leaf", "completion_id",
        "pinned", "archived", "archived_at", "deleted_at", "created_at", "updated_at",
    }  # fmt: skip
    assert body["active_leaf"] is None and body["completion_id"] is None
    assert body["parameters"] == {} and body["template"] is None
    assert body["model"] == "gpt-test"
    assert body["title"] == "Hi"
    conversation = Conversation.objects.get(pk=body["id"])
    assert conversation.owner == user
    assert conversation.system_prompt == "Be brief."


def test_create_conversation_defaults_title_and_prompt(auth_client, model):
    response = auth_client.post("/api/conversations/", {"model": "gpt-test"}, format="json")

    assert response.status_code == 201
    assert response.json()["title"] == ""
    assert response.json()["system_prompt"] == ""


def test_create_conversation_with_a_model_alias_uses_its_target(auth_client, model):
    ModelAlias.objects.create(name="gpt-4o-mini", model=model)

    response = auth_client.post("/api/conversations/", {"model": "gpt-4o-mini"}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["model"] == "gpt-test"
    assert Conversation.objects.get(pk=response.json()["id"]).model == model


def test_create_conversation_with_unknown_model_is_404(auth_client):
    response = auth_client.post("/api/conversations/", {"model": "no-such-model"}, format="json")

    assert_error(response, 404, code="model_not_found", param="model")


def test_create_conversation_with_disabled_model_is_400(auth_client):
    LLMModelFactory(name="off-model", enabled=False)

    response = auth_client.post("/api/conversations/", {"model": "off-model"}, format="json")

    assert_error(response, 400, code="model_disabled", param="model")


def test_create_conversation_without_model_is_400_with_fields(auth_client):
    response = auth_client.post("/api/conversations/", {"title": "x"}, format="json")

    error = assert_error(response, 400, code="invalid", param="model")
    assert "model" in error["fields"]


def test_anonymous_is_401(api_client):
    assert_error(api_client.get("/api/conversations/"), 401, code="not_authenticated")
    assert_error(api_client.post("/api/conversations/", {"model": "x"}, format="json"), 401, code="not_authenticated")
    assert not Conversation.objects.exists()


def test_list_shows_only_own_conversations(auth_client, user, other_user):
    mine = ConversationFactory(owner=user)
    ConversationFactory(owner=other_user)

    response = auth_client.get("/api/conversations/")

    assert response.status_code == 200
    assert response.json()["count"] == 1
    assert [c["id"] for c in response.json()["results"]] == [mine.pk]


def test_admin_sees_every_conversation(client_for, admin_user, user, other_user):
    ConversationFactory(owner=user)
    ConversationFactory(owner=other_user)

    response = client_for(admin_user).get("/api/conversations/")

    assert response.json()["count"] == 2


def test_retrieve_update_delete_own_conversation(auth_client, user, model):
    conversation = ConversationFactory(owner=user, title="Old")
    url = f"/api/conversations/{conversation.pk}/"

    assert auth_client.get(url).json()["title"] == "Old"
    response = auth_client.patch(url, {"title": "New", "model": "gpt-test", "system_prompt": "S"}, format="json")
    assert response.status_code == 200
    assert response.json()["title"] == "New"
    assert response.json()["model"] == "gpt-test"
    conversation.refresh_from_db()
    assert (conversation.title, conversation.model, conversation.system_prompt) == ("New", model, "S")

    assert auth_client.delete(url).status_code == 204  # into the trash: a 404 for every lookup
    assert Conversation.objects.get(pk=conversation.pk).deleted_at is not None
    assert_error(auth_client.get(url), 404, code="not_found")


def test_patch_replaces_the_parameters_sent_with_every_reply(auth_client, user):
    conversation = ConversationFactory(owner=user, parameters={"top_p": 0.5})
    url = f"/api/conversations/{conversation.pk}/"

    response = auth_client.patch(
        url, {"parameters": {"temperature": 0.2, "max_tokens": 300, "top_p": None}}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["parameters"] == {"temperature": 0.2, "max_tokens": 300}  # null: the model's default
    conversation.refresh_from_db()
    assert conversation.parameters == {"temperature": 0.2, "max_tokens": 300}

    assert auth_client.patch(url, {"title": "Renamed"}, format="json").json()["parameters"] == {
        "temperature": 0.2,
        "max_tokens": 300,
    }  # left out: kept
    assert auth_client.patch(url, {"parameters": {}}, format="json").json()["parameters"] == {}


@pytest.mark.parametrize(
    ("parameters", "param"),
    [
        ({"temperature": 2.5}, "parameters.temperature"),
        ({"max_tokens": 0}, "parameters.max_tokens"),
        ({"top_p": "high"}, "parameters.top_p"),
        ("warm", "parameters"),
    ],
)
def test_patch_with_parameters_out_of_range_is_a_400_and_changes_nothing(auth_client, user, parameters, param):
    conversation = ConversationFactory(owner=user, parameters={"top_p": 0.5}, title="Kept")

    response = auth_client.patch(
        f"/api/conversations/{conversation.pk}/", {"parameters": parameters, "title": "Changed"}, format="json"
    )

    assert_error(response, 400, code="invalid", param=param)
    conversation.refresh_from_db()
    assert (conversation.parameters, conversation.title) == ({"top_p": 0.5}, "Kept")


def test_patch_with_unknown_model_is_404_and_changes_nothing(auth_client, user):
    conversation = ConversationFactory(owner=user, title="Kept")
    before = Conversation.objects.values().get(pk=conversation.pk)

    response = auth_client.patch(
        f"/api/conversations/{conversation.pk}/", {"model": "nope", "title": "Changed"}, format="json"
    )

    assert_error(response, 404, code="model_not_found", param="model")
    assert Conversation.objects.values().get(pk=conversation.pk) == before


def test_put_is_not_allowed(auth_client, user):
    conversation = ConversationFactory(owner=user)

    response = auth_client.put(f"/api/conversations/{conversation.pk}/", {"title": "x"}, format="json")

    assert_error(response, 405, code="method_not_allowed")


def test_other_users_conversation_is_404_everywhere(auth_client, other_user):
    theirs = ConversationFactory(owner=other_user, title="Private")
    message = MessageFactory(conversation=theirs, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING)
    base = f"/api/conversations/{theirs.pk}/"

    assert_error(auth_client.get(base), 404, code="not_found")
    assert_error(auth_client.patch(base, {"title": "Mine now"}, format="json"), 404, code="conversation_not_found")
    assert_error(auth_client.delete(base), 404, code="conversation_not_found")
    assert_error(auth_client.get(f"{base}messages/"), 404, code="conversation_not_found")
    assert_error(auth_client.post(f"{base}messages/{message.pk}/stop/"), 404, code="conversation_not_found")

    theirs.refresh_from_db()
    assert theirs.title == "Private"


def test_admin_can_read_another_users_conversation(client_for, admin_user, other_user):
    theirs = ConversationFactory(owner=other_user)
    MessageFactory(conversation=theirs)

    client = client_for(admin_user)

    assert client.get(f"/api/conversations/{theirs.pk}/").status_code == 200
    assert client.get(f"/api/conversations/{theirs.pk}/messages/").json()["count"] == 1


@pytest.mark.django_db(transaction=True)  # the send view (async) reads the user in a worker thread
def test_admin_may_not_change_or_chat_in_another_users_conversation(client_for, admin_user, other_user):
    theirs = ConversationFactory(owner=other_user, title="Private")
    message = MessageFactory(conversation=theirs, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING)
    base = f"/api/conversations/{theirs.pk}/"
    client = client_for(admin_user)

    for response in (
        client.patch(base, {"title": "Moderated"}, format="json"),
        client.delete(base),
        client.post(f"{base}messages/", {"content": "hi"}, format="json"),
        client.post(f"{base}messages/{message.pk}/stop/"),
    ):
        assert_error(response, 403, code="permission_denied")
    theirs.refresh_from_db()
    assert theirs.title == "Private"
    message.refresh_from_db()
    assert theirs.messages.count() == 1 and message.status == Message.Status.STREAMING


def test_missing_conversation_is_404(auth_client):
    assert_error(auth_client.get("/api/conversations/999999/"), 404, code="not_found")
    assert_error(auth_client.get("/api/conversations/999999/messages/"), 404, code="conversation_not_found")


def test_filter_by_model_name(auth_client, user):
    alpha, beta = LLMModelFactory(name="alpha"), LLMModelFactory(name="beta")
    a = ConversationFactory(owner=user, model=alpha)
    ConversationFactory(owner=user, model=beta)

    response = auth_client.get("/api/conversations/", {"model": "alpha"})

    assert [c["id"] for c in response.json()["results"]] == [a.pk]
    assert response.json()["results"][0]["model"] == "alpha"


def test_search_by_title(auth_client, user):
    match = ConversationFactory(owner=user, title="Trip to Lisbon")
    ConversationFactory(owner=user, title="Tax return")

    response = auth_client.get("/api/conversations/", {"search": "lisbon"})

    assert [c["id"] for c in response.json()["results"]] == [match.pk]


def test_ordering(auth_client, user):
    first = ConversationFactory(owner=user, title="b")
    second = ConversationFactory(owner=user, title="a")

    by_default = [c["id"] for c in auth_client.get("/api/conversations/").json()["results"]]
    by_title = [c["id"] for c in auth_client.get("/api/conversations/", {"ordering": "title"}).json()["results"]]
    by_created = [c["id"] for c in auth_client.get("/api/conversations/", {"ordering": "created_at"}).json()["results"]]

    assert by_default == [second.pk, first.pk]  # most recently updated first
    assert by_title == [second.pk, first.pk]
    assert by_created == [first.pk, second.pk]


def test_conversation_list_is_paginated(auth_client, user):
    ConversationFactory.create_batch(55, owner=user)

    page1 = auth_client.get("/api/conversations/").json()
    page2 = auth_client.get("/api/conversations/", {"page": 2}).json()

    assert page1["count"] == 55
    assert len(page1["results"]) == 50
    assert page1["next"] is not None
    assert len(page2["results"]) == 5
    assert page2["next"] is None


def test_message_list_oldest_first_with_message_shape(auth_client, user):
    conversation = ConversationFactory(owner=user)
    question = MessageFactory(conversation=conversation, role=Message.Role.USER, content="Hi?")
    answer = MessageFactory(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        content="Hello.",
        model_name="gpt-test",
        prompt_tokens=5,
        completion_tokens=2,
        finish_reason="stop",
    )

    response = auth_client.get(f"/api/conversations/{conversation.pk}/messages/")

    assert response.status_code == 200
    results = response.json()["results"]
    assert [m["id"] for m in results] == [question.pk, answer.pk]
    assert set(results[1]) == {
        "id",
        "role",
        "content",
        "status",
        "model",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "time_to_first_token_ms",
        "duration_ms",
        "error",
        "error_code",
        "created_at",
        "parent_id",
        "sibling_ids",
        "context_dropped",
        "context_dropped_through",
    }
    assert results[1]["model"] == "gpt-test"
    assert (results[1]["context_dropped"], results[1]["context_dropped_through"]) == (0, None)
    assert (results[0]["parent_id"], results[1]["parent_id"]) == (None, question.pk)
    assert (results[0]["sibling_ids"], results[1]["sibling_ids"]) == ([question.pk], [answer.pk])
    assert (results[1]["prompt_tokens"], results[1]["completion_tokens"]) == (5, 2)


def test_message_list_filters_role_and_status(auth_client, user):
    conversation = ConversationFactory(owner=user)
    MessageFactory(conversation=conversation, role=Message.Role.USER)
    done = MessageFactory(conversation=conversation, role=Message.Role.ASSISTANT)
    stopped = MessageFactory(conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.CANCELLED)
    url = f"/api/conversations/{conversation.pk}/messages/"

    assistant = auth_client.get(url, {"role": "assistant"}).json()["results"]
    cancelled = auth_client.get(url, {"status": "cancelled"}).json()["results"]
    bad = auth_client.get(url, {"status": "nonsense"})

    assert [m["id"] for m in assistant] == [done.pk, stopped.pk]
    assert [m["id"] for m in cancelled] == [stopped.pk]
    assert_error(bad, 400, code="invalid", param="status")


def test_message_list_is_paginated(auth_client, user):
    conversation = ConversationFactory(owner=user)
    messages = MessageFactory.create_batch(51, conversation=conversation)

    page2 = auth_client.get(f"/api/conversations/{conversation.pk}/messages/", {"page": 2}).json()

    assert page2["count"] == 51
    assert [m["id"] for m in page2["results"]] == [messages[-1].pk]


def test_message_list_rejects_other_methods(auth_client, user):
    conversation = ConversationFactory(owner=user)

    response = auth_client.delete(f"/api/conversations/{conversation.pk}/messages/")

    assert_error(response, 405, code="method_not_allowed")


def test_stop_endpoint_is_404_for_a_reply_that_is_not_streaming(auth_client, user):
    conversation = ConversationFactory(owner=user)
    finished = MessageFactory(conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.COMPLETED)
    question = MessageFactory(conversation=conversation, role=Message.Role.USER)
    elsewhere = MessageFactory(
        conversation=ConversationFactory(owner=user), role=Message.Role.ASSISTANT, status=Message.Status.STREAMING
    )

    for message in (finished, question, elsewhere):
        response = auth_client.post(f"/api/conversations/{conversation.pk}/messages/{message.pk}/stop/")
        assert_error(response, 404, code="reply_not_streaming")


def test_stop_endpoint_needs_authentication(api_client, user):
    conversation = ConversationFactory(owner=user)

    response = api_client.post(f"/api/conversations/{conversation.pk}/messages/1/stop/")

    assert_error(response, 401, code="not_authenticated")


def test_openapi_documents_the_conversation_endpoints(auth_client):
    schema = auth_client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()

    paths = schema["paths"]
    assert set(paths["/api/conversations/"]) == {"get", "post"}
    assert set(paths["/api/conversations/{id}/"]) == {"get", "patch", "delete"}
    messages = paths["/api/conversations/{conversation_id}/messages/"]
    assert set(messages) == {"get", "post"}
    assert set(messages["post"]["responses"]["200"]["content"]) == {"text/event-stream"}
    assert "/api/conversations/{conversation_id}/messages/{message_id}/stop/" in paths


def test_admin_pages_list_conversations_and_messages(admin_site, user):
    conversation = ConversationFactory(owner=user, title="Findable")
    message = MessageFactory(conversation=conversation, role=Message.Role.ASSISTANT, content="A reply")
    question = MessageFactory(conversation=conversation, role=Message.Role.USER)

    assert b"Findable" in admin_site.get("/admin/conversations/conversation/").content
    assert b"A reply" in admin_site.get(f"/admin/conversations/conversation/{conversation.pk}/change/").content
    listed = admin_site.get("/admin/conversations/message/", {"status": "completed", "role": "assistant"})
    assert listed.status_code == 200
    assert f"/admin/conversations/message/{message.pk}/change/".encode() in listed.content
    assert f"/admin/conversations/message/{question.pk}/change/".encode() not in listed.content  # filtered out
    assert admin_site.get(f"/admin/conversations/message/{message.pk}/change/").status_code == 200
