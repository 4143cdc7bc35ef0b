"""An untitled conversation gets a title from a model after its first reply, through Celery.

In-process: the unit tests run Celery eagerly (the root conftest), which is what the embedded
defaults do; the title task then runs in the thread that queues titles, never in the reply's way.
The upstream is the simulator over real HTTP; its reply to the title request is a function of the
messages it received (``llm.simulator.reply_text``), so the title tells what was asked.
``tests/test_e2e_titles.py`` runs the same with a real Celery worker.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.test import AsyncClient

from accounts.models import Membership, Organization, Team, TeamMembership, UsageRecord
from chatbackend.asyncdb import run_sync
from conversations.models import Conversation
from conversations.tasks import conversation_title_task
from conversations.titles import TITLE_INSTRUCTIONS, conversation_titles_flush, title_clean
from llm.selectors import enabled_model_cache
from llm.simulator import reply_text
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory
from tests.kit import FAST_REPLY_TOKENS, SLEEPY_REPLY_TOKENS, bearer, poll_until, sse_events, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]


def expected_title(question: str, answer: str, tokens: int = FAST_REPLY_TOKENS) -> str:
    """The title the simulator writes for a first exchange (``conversations.titles``' prompt)."""
    asked = [
        {"role": "system", "content": TITLE_INSTRUCTIONS},
        {"role": "user", "content": f"User: {question}\n\nAssistant: {answer}"},
    ]
    return title_clean(reply_text(asked, tokens))


async def send(conversation: Conversation, token: str, content: str, *, sse: bool = False) -> dict[str, Any]:
    """Send ``content``; return the assistant message (SSE: from ``reply.done``, the stream read to its end)."""
    response = await AsyncClient().post(
        f"/api/conversations/{conversation.pk}/messages/",
        data=json.dumps({"content": content}),
        content_type="application/json",
        headers={**bearer(token), **({"Accept": "text/event-stream"} if sse else {})},
    )
    if sse:
        assert response.status_code == 200
        events = await sse_events(response)
        assert events[-1].event == "reply.done", events[-1].data
        return events[-1].json()["message"]
    assert response.status_code == 201, response.content
    return response.json()["assistant_message"]


async def title_of(conversation: Conversation) -> str:
    return (await Conversation.objects.aget(pk=conversation.pk)).title


async def titles_flushed() -> None:
    assert await run_sync(conversation_titles_flush, 30)


@pytest.fixture
def untitled(user, sim_model) -> Conversation:
    return ConversationFactory(owner=user, model=sim_model, title="")


@pytest.fixture
def sleepy_title_model(settings, sleepy_simulator):
    """Titles by ``sleepy-titler``, a model whose replies start after 5 s."""
    provider = ProviderFactory(name="sim-sleepy-titles", base_url=sleepy_simulator.base_url, api_key="")
    LLMModelFactory(name="sleepy-titler", provider=provider, upstream_model="sim-1")
    enabled_model_cache.clear()
    settings.CONVERSATION_TITLE_MODEL = "sleepy-titler"
    yield
    enabled_model_cache.clear()


async def test_the_first_reply_gets_a_title_from_the_conversations_own_model(untitled, user, token, settings):
    settings.CONVERSATION_TITLE_MODEL = None  # the default: the conversation's own model

    reply = await send(untitled, token, "How do tides work?", sse=True)

    title = await poll_until(lambda: title_of(untitled), bool, within=10, what="the title")
    assert title == expected_title("How do tides work?", reply["content"])
    # Billed like any reply: the owner's, in the conversation's organization, at the model's prices.
    await titles_flushed()
    records = await usage_records(request_id__startswith="title-")
    assert [r.request_id for r in records] == [f"title-{untitled.pk}-{reply['id']}"]
    record = records[0]
    assert (record.user_id, record.organization_id, record.model_name) == (
        user.pk,
        untitled.organization_id,
        "sim-model",
    )
    assert record.source == UsageRecord.Source.CONVERSATION and record.finish_status == "completed"
    assert record.prompt_tokens > 0 and record.completion_tokens == FAST_REPLY_TOKENS


async def test_a_configured_title_model_writes_it_without_holding_the_reply(
    untitled, token, sleepy_title_model, sleepy_simulator
):
    reply = await send(untitled, token, "Plan a trip to Lisbon", sse=True)

    # The reply's stream ended while the title model had not answered yet (it waits 5 s).
    assert await title_of(untitled) == ""
    title = await poll_until(lambda: title_of(untitled), bool, within=15, what="the title")
    assert title == expected_title("Plan a trip to Lisbon", reply["content"], SLEEPY_REPLY_TOKENS)
    await titles_flushed()
    records = await usage_records(request_id=f"title-{untitled.pk}-{reply['id']}")
    assert [record.model_name for record in records] == ["sleepy-titler"]


async def test_a_title_the_user_sets_meanwhile_is_not_overwritten(untitled, token, sleepy_title_model):
    await send(untitled, token, "Plan a trip to Lisbon")

    response = await AsyncClient().patch(
        f"/api/conversations/{untitled.pk}/",
        data=json.dumps({"title": "My trip"}),
        content_type="application/json",
        headers=bearer(token),
    )
    assert response.status_code == 200
    await titles_flushed()  # the title request has ended

    assert await title_of(untitled) == "My trip"
    # It was asked (and is billed), only not applied.
    assert len(await usage_records(request_id__startswith=f"title-{untitled.pk}-")) == 1


async def test_a_titled_conversation_and_later_replies_ask_for_no_title(untitled, conversation, token, settings):
    settings.CONVERSATION_TITLE_MODEL = "off"
    await send(untitled, token, "First question")
    await titles_flushed()
    assert await title_of(untitled) == ""

    settings.CONVERSATION_TITLE_MODEL = None
    await send(untitled, token, "Second question")  # not the first reply
    await send(conversation, token, "Hello")  # titled ("Fast chat")
    await titles_flushed()

    assert await title_of(untitled) == ""
    assert await title_of(conversation) == "Fast chat"
    assert await usage_records(request_id__startswith="title-") == []


@pytest.fixture
def failing_title_model(settings, simulator):
    """Titles by ``failing-titler``, whose upstream answers 500."""
    provider = ProviderFactory(name="sim-failing-titles", base_url=simulator.base_url, api_key="")
    LLMModelFactory(name="failing-titler", provider=provider, upstream_model="sim-error-500")
    enabled_model_cache.clear()
    settings.CONVERSATION_TITLE_MODEL = "failing-titler"
    yield
    enabled_model_cache.clear()


async def test_a_failing_title_model_is_logged_and_never_surfaces(
    untitled, token, settings, failing_title_model, caplog
):
    with caplog.at_level(logging.WARNING, logger="conversations"):
        reply = await send(untitled, token, "Hello there", sse=True)
        await titles_flushed()
    assert reply["status"] == "completed"
    assert await title_of(untitled) == ""
    assert any("title of conversation" in record.getMessage() for record in caplog.records)

    settings.CONVERSATION_TITLE_MODEL = "no-such-model"
    other = await run_sync(ConversationFactory, owner=untitled.owner, model=untitled.model, title="")
    with caplog.at_level(logging.WARNING, logger="conversations"):
        assert (await send(other, token, "Hello again"))["status"] == "completed"
        await titles_flushed()
    assert await title_of(other) == ""


@pytest.fixture
def other_title_model(settings, sim_model):
    """Titles by ``titler``, a model of the fast simulator other than the conversations' ``sim-model``."""
    LLMModelFactory(name="titler", provider=sim_model.provider, upstream_model="sim-fast")
    enabled_model_cache.clear()
    settings.CONVERSATION_TITLE_MODEL = "titler"
    yield
    enabled_model_cache.clear()


def organization_restrict(names: list[str]) -> None:
    """Set the default organization's ``allowed_models`` with ``save()`` (as the admin does)."""
    organization = Organization.objects.default()
    organization.allowed_models = names
    organization.save()


async def test_a_title_model_outside_the_owners_allowlist_writes_no_title_and_bills_nothing(
    untitled, user, token, other_title_model, caplog
):
    # The organization allows the conversation's model only: the reply runs, the title may not.
    await run_sync(organization_restrict, ["sim-model"])
    with caplog.at_level(logging.INFO, logger="conversations"):
        reply = await send(untitled, token, "How do tides work?", sse=True)
        await titles_flushed()

    assert reply["status"] == "completed"
    assert await title_of(untitled) == ""
    assert await usage_records(request_id__startswith="title-") == []
    assert any("'titler' is not available to its owner" in record.getMessage() for record in caplog.records)

    # A team of the owner's narrows it the same way, though the organization allows the title model.
    def team_restrict() -> None:
        organization_restrict(["sim-model", "titler"])
        team = Team.objects.create(
            organization=Organization.objects.default(), name="t", slug="t", allowed_models=["sim-model"]
        )
        TeamMembership.objects.create(team=team, user=user)

    await run_sync(team_restrict)
    other = await run_sync(ConversationFactory, owner=user, model=untitled.model, title="")
    assert (await send(other, token, "Hello"))["status"] == "completed"
    await titles_flushed()
    assert await title_of(other) == ""
    assert await usage_records(request_id__startswith="title-") == []


async def test_a_title_model_inside_the_owners_allowlist_writes_the_title(untitled, token, other_title_model):
    await run_sync(organization_restrict, ["sim-model", "titler"])

    reply = await send(untitled, token, "How do tides work?", sse=True)

    title = await poll_until(lambda: title_of(untitled), bool, within=10, what="the title")
    assert title == expected_title("How do tides work?", reply["content"])
    await titles_flushed()
    records = await usage_records(request_id__startswith="title-")
    assert [record.model_name for record in records] == ["titler"]


async def test_a_conversation_in_the_trash_gets_no_title(untitled, token, settings):
    settings.CONVERSATION_TITLE_MODEL = "off"  # the reply queues none: the task runs below, once trashed
    reply = await send(untitled, token, "How do tides work?")
    response = await AsyncClient().delete(f"/api/conversations/{untitled.pk}/", headers=bearer(token))
    assert response.status_code == 204

    settings.CONVERSATION_TITLE_MODEL = None
    assert await run_sync(conversation_title_task, untitled.pk, reply["id"]) is None

    assert (await Conversation.objects.aget(pk=untitled.pk)).deleted_at is not None
    assert await title_of(untitled) == ""
    assert await usage_records(request_id__startswith="title-") == []


async def test_an_owner_who_left_the_organization_gets_no_title(untitled, user, token, settings, caplog):
    settings.CONVERSATION_TITLE_MODEL = "off"
    reply = await send(untitled, token, "How do tides work?")
    await Membership.objects.filter(user=user, organization_id=untitled.organization_id).adelete()

    settings.CONVERSATION_TITLE_MODEL = None
    with caplog.at_level(logging.INFO, logger="conversations"):
        assert await run_sync(conversation_title_task, untitled.pk, reply["id"]) is None

    assert await title_of(untitled) == ""
    assert await usage_records(request_id__startswith="title-") == []
    assert any("no longer a member" in record.getMessage() for record in caplog.records)


async def test_an_owner_whose_account_was_deactivated_gets_no_title(untitled, user, token, settings, caplog):
    settings.CONVERSATION_TITLE_MODEL = "off"
    reply = await send(untitled, token, "How do tides work?")
    await type(user).objects.filter(pk=user.pk).aupdate(is_active=False)

    settings.CONVERSATION_TITLE_MODEL = None
    with caplog.at_level(logging.INFO, logger="conversations"):
        assert await run_sync(conversation_title_task, untitled.pk, reply["id"]) is None

    assert await title_of(untitled) == ""
    assert await usage_records(request_id__startswith="title-") == []
    assert any("account is inactive" in record.getMessage() for record in caplog.records)


def test_title_clean():
    assert title_clean('  Title: "Tides and the Moon."\n') == "Tides and the Moon"
    assert title_clean("**Lisbon trip**") == "Lisbon trip"
    assert title_clean("  \n ") == ""
    assert title_clean("word " * 100) == ("word " * 40).strip()  # 200 characters at most
