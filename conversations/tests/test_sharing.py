"""Share links: the owner shares a snapshot of a branch; anyone with the link reads it (HTML, JSON)
until it is revoked or expires; nobody else lists or revokes it."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.keys import hash_secret
from accounts.models import Membership, Organization
from conversations.models import Conversation, Message, SharedConversation
from conversations.services import message_append
from tests.factories import ConversationFactory, MessageFactory, UserFactory
from tests.kit import assert_error

pytestmark = pytest.mark.django_db


@pytest.fixture
def branched(user, model):
    """u1 → a1 (first branch) and u1 → a1b (regenerated, the active one)."""
    conversation = ConversationFactory(owner=user, model=model, title="Trip <plans>")
    u1 = message_append(conversation=conversation, role="user", content="Plan a trip")
    a1 = message_append(conversation=conversation, role="assistant", content="first answer", model_name="gpt-test")
    a1b = MessageFactory(
        conversation=conversation,
        parent=u1,
        role="assistant",
        content="<script>alert(1)</script>",
        model_name="gpt-test",
    )
    Conversation.objects.filter(pk=conversation.pk).update(active_leaf=a1b)
    conversation.refresh_from_db()
    return conversation, {"u1": u1, "a1": a1, "a1b": a1b}


def share(client, conversation, **body):
    response = client.post(f"/api/conversations/{conversation.pk}/shares/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_a_shared_branch_is_readable_anonymously_as_html_and_json(auth_client, branched):
    conversation, m = branched
    created = share(auth_client, conversation)

    token = created["token"]
    assert len(token) >= 22 and created["url"].endswith(f"/share/{token}")
    assert created["json_url"].endswith(f"/api/share/{token}/")
    assert created["leaf"] == m["a1b"].pk and created["message_count"] == 2 and created["active"] is True
    # Only the digest is stored.
    stored = SharedConversation.objects.get(pk=created["id"])
    assert stored.token_hash == hash_secret(token) and token not in str(stored.__dict__)

    anonymous = APIClient()
    page = anonymous.get(f"/share/{token}")
    assert page.status_code == 200 and page["Content-Type"].startswith("text/html")
    assert page["X-Robots-Tag"].startswith("noindex") and page["Referrer-Policy"] == "no-referrer"
    html = page.content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html  # escaped
    assert "Trip &lt;plans&gt;" in html and "Plan a trip" in html
    assert "first answer" not in html  # the other branch is not shared

    data = anonymous.get(f"/api/share/{token}/")
    assert data.status_code == 200 and data["X-Robots-Tag"].startswith("noindex")
    body = data.json()
    assert body["title"] == "Trip <plans>"
    assert [(x["role"], x["content"], x["model"]) for x in body["messages"]] == [
        ("user", "Plan a trip", ""),
        ("assistant", "<script>alert(1)</script>", "gpt-test"),
    ]


def test_a_stale_bearer_token_does_not_stop_a_public_read(auth_client, branched):
    token = share(auth_client, branched[0])["token"]
    response = APIClient(headers={"Authorization": "Bearer sk-revoked-or-unknown"}).get(f"/api/share/{token}/")
    assert response.status_code == 200


def test_a_given_leaf_is_shared_and_the_snapshot_ignores_later_messages(auth_client, branched):
    conversation, m = branched
    token = share(auth_client, conversation, leaf=m["a1"].pk)["token"]
    message_append(conversation=conversation, role="user", content="a later question")

    body = APIClient().get(f"/api/share/{token}/").json()
    assert [x["content"] for x in body["messages"]] == ["Plan a trip", "first answer"]


def test_revoked_expired_and_unknown_links_are_404(auth_client, branched):
    conversation, _ = branched
    created = share(auth_client, conversation)
    anonymous = APIClient()

    assert auth_client.delete(f"/api/shares/{created['id']}/").status_code == 204
    assert auth_client.delete(f"/api/shares/{created['id']}/").status_code == 204  # idempotent
    page = anonymous.get(f"/share/{created['token']}")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")
    assert page["X-Robots-Tag"].startswith("noindex")
    assert_error(anonymous.get(f"/api/share/{created['token']}/"), 404, code="share_not_found")

    expiring = share(auth_client, conversation, expires_at=(timezone.now() + dt.timedelta(hours=1)).isoformat())
    assert anonymous.get(f"/api/share/{expiring['token']}/").status_code == 200
    SharedConversation.objects.filter(pk=expiring["id"]).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert_error(anonymous.get(f"/api/share/{expiring['token']}/"), 404, code="share_not_found")
    assert anonymous.get(f"/share/{expiring['token']}").status_code == 404

    assert_error(anonymous.get("/api/share/not-a-token-at-all-000000/"), 404, code="share_not_found")

    listed = auth_client.get(f"/api/conversations/{conversation.pk}/shares/").json()
    assert [(s["id"], s["active"]) for s in listed] == [(expiring["id"], False), (created["id"], False)]
    assert all("token" not in s for s in listed)


def test_only_the_owner_shares_lists_and_revokes(auth_client, client_for, branched, user):
    conversation, _ = branched
    created = share(auth_client, conversation)
    stranger = client_for(UserFactory())

    assert_error(stranger.post(f"/api/conversations/{conversation.pk}/shares/", {}, format="json"), 404)
    assert_error(stranger.get(f"/api/conversations/{conversation.pk}/shares/"), 404)
    assert_error(stranger.delete(f"/api/shares/{created['id']}/"), 404, code="share_not_found")
    # An organization's admin reads the conversation but does not share it, nor revoke its links.
    admin = UserFactory()
    Membership.objects.update_or_create(
        user=admin, organization=Organization.objects.default(), defaults={"role": Membership.Role.ADMIN}
    )
    admin_client = client_for(admin)
    assert_error(admin_client.post(f"/api/conversations/{conversation.pk}/shares/", {}, format="json"), 403)
    assert_error(admin_client.delete(f"/api/shares/{created['id']}/"), 404)
    assert APIClient().get(f"/api/share/{created['token']}/").status_code == 200


def test_bad_share_requests_are_400(auth_client, branched, user, model):
    conversation, m = branched
    url = f"/api/conversations/{conversation.pk}/shares/"
    past = (timezone.now() - dt.timedelta(minutes=1)).isoformat()
    assert_error(auth_client.post(url, {"expires_at": past}, format="json"), 400, code="invalid_expires_at")
    assert_error(auth_client.post(url, {"leaf": "x"}, format="json"), 400)
    other = ConversationFactory(owner=user, model=model)
    other_message = message_append(conversation=other, role="user", content="elsewhere")
    assert_error(auth_client.post(url, {"leaf": other_message.pk}, format="json"), 404, code="message_not_found")
    empty = ConversationFactory(owner=user, model=model)
    assert_error(
        auth_client.post(f"/api/conversations/{empty.pk}/shares/", {}, format="json"), 400, code="empty_conversation"
    )


def test_a_branch_whose_reply_still_streams_is_not_shared_until_the_reply_ends(auth_client, user, model):
    """A reply's text is written when it ends: a snapshot taken meanwhile would keep an empty reply for good."""
    conversation = ConversationFactory(owner=user, model=model)
    message_append(conversation=conversation, role="user", content="Tell me a story")
    reply = message_append(conversation=conversation, role="assistant", content="", status=Message.Status.STREAMING)
    url = f"/api/conversations/{conversation.pk}/shares/"

    assert_error(auth_client.post(url, {}, format="json"), 409, code="reply_in_progress")
    assert not SharedConversation.objects.filter(conversation=conversation).exists()

    Message.objects.filter(pk=reply.pk).update(status=Message.Status.COMPLETED, content="Once upon a time")
    token = share(auth_client, conversation)["token"]
    shared = APIClient().get(f"/api/share/{token}/").json()
    assert [(m["role"], m["content"]) for m in shared["messages"]] == [
        ("user", "Tell me a story"),
        ("assistant", "Once upon a time"),
    ]


def test_a_conversation_in_the_trash_shares_nothing_until_restored_and_a_purge_ends_its_links(auth_client, branched):
    conversation, _ = branched
    token = share(auth_client, conversation)["token"]
    anonymous = APIClient()

    assert auth_client.delete(f"/api/conversations/{conversation.pk}/").status_code == 204  # to the trash
    assert anonymous.get(f"/share/{token}").status_code == 404
    assert_error(anonymous.get(f"/api/share/{token}/"), 404, code="share_not_found")
    assert auth_client.post(f"/api/conversations/{conversation.pk}/restore/").status_code == 200
    assert anonymous.get(f"/share/{token}").status_code == 200
    assert auth_client.delete(f"/api/conversations/{conversation.pk}/purge/").status_code == 204
    assert anonymous.get(f"/share/{token}").status_code == 404
    assert not SharedConversation.objects.filter(conversation_id=conversation.pk).exists()


def test_operators_revoke_links_in_the_admin(admin_site, auth_client, branched):
    created = share(auth_client, branched[0])
    page = admin_site.get("/admin/conversations/sharedconversation/")
    assert page.status_code == 200 and created["token"] not in page.content.decode()
    response = admin_site.post(
        "/admin/conversations/sharedconversation/", {"action": "revoke", "_selected_action": [created["id"]]}
    )
    assert response.status_code == 302
    assert APIClient().get(f"/api/share/{created['token']}/").status_code == 404


def test_the_home_page_still_renders_from_the_shared_layout(client):
    page = client.get("/").content.decode()
    assert "<title>chatbackend</title>" in page and "Quick start" in page and "--accent" in page
