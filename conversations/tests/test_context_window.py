"""A history over the model's context window is trimmed before it is sent upstream.

The upstream is the simulator over real HTTP: its ``prompt_tokens`` (the words of every message it
received plus 3 per message) and its reply text (chosen from the messages it received) tell
exactly which history it got. The models here count with the estimate tokenizer (``sim-1`` is no
OpenAI model): ``ceil(characters / 4)`` per text, with OpenAI's chat framing.
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
from chatbackend.asgi import application
from conversations.models import Conversation, Message
from conversations.selectors import ContextLengthExceeded, history_fitted
from conversations.services import message_append, reply_recover, reply_start
from llm.metering import max_completion_tokens_for, prompt_budget_for
from llm.selectors import enabled_model_cache, enabled_model_get
from llm.simulator import count_prompt_tokens, reply_text
from llm.tokens import ESTIMATE_TOKENIZER
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory
from tests.kit import FAST_REPLY_TOKENS, assert_error, bearer, listed_messages, sse_events

SYSTEM = "You answer in one short sentence."
# Each turn's text: 40 words of 5 characters, 240 characters with the spaces: 60 estimated tokens.
TURN_WORDS = 40


def turn_text(n: int) -> str:
    return " ".join(f"w{n:03d}x" for _ in range(TURN_WORDS))


def small_model(simulator: Any, *, context_window: int = 400, max_output_tokens: int | None = 100, **fields: Any):
    """An enabled model on the fast simulator with a small context window (estimated tokens)."""
    enabled_model_cache.clear()
    provider = ProviderFactory(name=f"sim-small-{context_window}", base_url=simulator.base_url, api_key="")
    return LLMModelFactory(
        name=f"small-{context_window}",
        provider=provider,
        upstream_model="sim-1",
        tokenizer="estimate",
        context_window=context_window,
        max_output_tokens=max_output_tokens,
        **fields,
    )


def long_history(conversation: Conversation, turns: int) -> list[Message]:
    """Append ``turns`` user/assistant pairs to ``conversation``; return them, oldest first."""
    written = []
    for n in range(turns):
        written.append(message_append(conversation=conversation, role="user", content=turn_text(2 * n)))
        written.append(message_append(conversation=conversation, role="assistant", content=turn_text(2 * n + 1)))
    return written


def as_turns(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


@pytest.fixture
def small(db, simulator):
    """A model whose window (400) minus its output reserve (100) takes about four turns of history."""
    yield small_model(simulator)
    enabled_model_cache.clear()


@pytest.fixture
def trimmed_conversation(user, small) -> tuple[Conversation, list[Message]]:
    """A conversation of ``user`` on ``small`` with a system prompt and 10 turns (~1,200 tokens)."""
    conversation = ConversationFactory(owner=user, model=small, title="Long chat", system_prompt=SYSTEM)
    return conversation, long_history(conversation, 10)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_a_history_over_the_window_is_trimmed_and_the_reply_streams(trimmed_conversation, small, token):
    conversation, history = trimmed_conversation
    question = "And what about the last one?"

    response = await AsyncClient().post(
        f"/api/conversations/{conversation.pk}/messages/",
        data=json.dumps({"content": question}),
        content_type="application/json",
        headers={**bearer(token), "Accept": "text/event-stream"},
    )

    assert response.status_code == 200
    events = await sse_events(response)
    assert events[-1].event == "reply.done", events[-1].data
    done = events[-1].json()["message"]
    assert done["status"] == "completed"
    dropped = done["context_dropped"]
    assert 0 < dropped < len(history)
    kept = history[dropped:]
    # Oldest dropped first, whole turns: what is kept starts with a user message.
    assert kept[0].role == "user"
    assert done["context_dropped_through"] == history[dropped - 1].pk
    sent = [{"role": "system", "content": SYSTEM}, *as_turns(kept), {"role": "user", "content": question}]
    # What the upstream received, told by its own answers: exactly the system prompt and the kept turns.
    assert done["prompt_tokens"] == count_prompt_tokens(sent)
    assert done["content"] == reply_text(sent, FAST_REPLY_TOKENS)
    # It fits the window minus the output reserve, and one more turn would not have.
    budget = small.context_window - small.max_output_tokens
    assert ESTIMATE_TOKENIZER.count_prompt(sent) <= budget
    one_more = [sent[0], *as_turns(history[dropped - 2 : dropped]), *sent[1:]]
    assert ESTIMATE_TOKENIZER.count_prompt(one_more) > budget

    # Recorded on the reply, and shown by the messages API; nothing was deleted.
    reply = await Message.objects.aget(pk=done["id"])
    assert (reply.context_dropped, reply.context_dropped_through) == (dropped, history[dropped - 1].pk)
    listed = await listed_messages(conversation.pk, token)
    assert listed[done["id"]]["context_dropped"] == dropped
    assert listed[done["id"]]["context_dropped_through"] == history[dropped - 1].pk
    assert listed[history[0].pk]["context_dropped"] == 0
    assert listed[history[0].pk]["context_dropped_through"] is None
    assert await Message.objects.filter(conversation=conversation).acount() == len(history) + 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_a_history_that_fits_is_sent_whole(conversation, token):
    response = await AsyncClient().post(
        f"/api/conversations/{conversation.pk}/messages/",
        data=json.dumps({"content": "Hello"}),
        content_type="application/json",
        headers=bearer(token),
    )

    assert response.status_code == 201, response.content
    reply = response.json()["assistant_message"]
    assert (reply["context_dropped"], reply["context_dropped_through"]) == (0, None)
    assert reply["prompt_tokens"] == count_prompt_tokens([{"role": "user", "content": "Hello"}])


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_a_message_that_cannot_fit_is_a_400_before_any_stream_and_loses_nothing(trimmed_conversation, token):
    conversation, history = trimmed_conversation
    before = (await Conversation.objects.aget(pk=conversation.pk)).active_leaf_id
    too_long = " ".join(["word"] * 400)  # 2,000 characters: 500 tokens, over the 300 left for a prompt

    for accept in ("text/event-stream", "application/json"):
        response = await AsyncClient().post(
            f"/api/conversations/{conversation.pk}/messages/",
            data=json.dumps({"content": too_long}),
            content_type="application/json",
            headers={**bearer(token), "Accept": accept},
        )
        assert_error(response, 400, code="context_length_exceeded", param="messages")

    assert await Message.objects.filter(conversation=conversation).acount() == len(history)
    assert (await Conversation.objects.aget(pk=conversation.pk)).active_leaf_id == before


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_a_max_tokens_over_the_context_window_is_a_400_naming_it_not_a_prompt_too_long(
    trimmed_conversation, token
):
    conversation, history = trimmed_conversation
    name = "max_tokens"
    patched = await AsyncClient().patch(
        f"/api/conversations/{conversation.pk}/",
        data=json.dumps({"parameters": {name: 9_999_999}}),
        content_type="application/json",
        headers=bearer(token),
    )
    assert patched.status_code == 200, patched.content

    response = await AsyncClient().post(
        f"/api/conversations/{conversation.pk}/messages/",
        data=json.dumps({"content": "Hello"}),
        content_type="application/json",
        headers={**bearer(token), "Accept": "text/event-stream"},
    )

    error = assert_error(response, 400, code="max_tokens_too_large", param=f"parameters.{name}")
    assert "9999999" in error["message"] and "context window" in error["message"]
    assert await Message.objects.filter(conversation=conversation).acount() == len(history)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_over_the_websocket_a_message_that_cannot_fit_is_an_error_frame(trimmed_conversation, token):
    conversation, history = trimmed_conversation
    socket = WebsocketCommunicator(application, f"/ws/conversations/{conversation.pk}/?token={token}")
    connected, _ = await socket.connect(timeout=10)
    assert connected
    try:
        await socket.send_json_to({"type": "message.send", "content": " ".join(["word"] * 400)})
        frame = await socket.receive_json_from(timeout=10)
    finally:
        await socket.disconnect(timeout=10)

    assert frame["type"] == "error"
    assert (frame["error"]["code"], frame["error"]["param"]) == ("context_length_exceeded", "messages")
    assert await Message.objects.filter(conversation=conversation).acount() == len(history)


def test_the_system_prompt_and_the_newest_message_are_always_kept(user, small):
    conversation = ConversationFactory(owner=user, model=small, system_prompt=SYSTEM)
    history = long_history(conversation, 3)
    last = message_append(conversation=conversation, role="user", content=turn_text(99))
    system_and_last = ESTIMATE_TOKENIZER.count_prompt(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": last.content}]
    )

    fitted = history_fitted(
        conversation=conversation, leaf_id=last.pk, tokenizer=ESTIMATE_TOKENIZER, max_prompt_tokens=system_and_last
    )

    assert fitted.messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": last.content}]
    assert fitted.prompt_tokens == system_and_last
    assert (fitted.dropped, fitted.dropped_through) == (len(history), history[-1].pk)
    with pytest.raises(ContextLengthExceeded) as refused:
        history_fitted(
            conversation=conversation,
            leaf_id=last.pk,
            tokenizer=ESTIMATE_TOKENIZER,
            max_prompt_tokens=system_and_last - 1,
        )
    assert (refused.value.status, refused.value.code) == (400, "context_length_exceeded")


def test_replies_without_text_are_neither_sent_nor_counted_as_dropped(user, small):
    conversation = ConversationFactory(owner=user, model=small)
    first = message_append(conversation=conversation, role="user", content=turn_text(0))
    message_append(conversation=conversation, role="assistant", content="", status="failed")
    second = message_append(conversation=conversation, role="user", content=turn_text(1))

    whole = history_fitted(
        conversation=conversation, leaf_id=second.pk, tokenizer=ESTIMATE_TOKENIZER, max_prompt_tokens=10_000
    )
    trimmed = history_fitted(
        conversation=conversation, leaf_id=second.pk, tokenizer=ESTIMATE_TOKENIZER, max_prompt_tokens=100
    )

    assert whole.messages == as_turns([first, second]) and whole.dropped == 0
    assert trimmed.messages == as_turns([second])
    assert (trimmed.dropped, trimmed.dropped_through) == (1, first.pk)


def test_the_output_reserve_is_the_requests_max_tokens_else_the_models(db, simulator):
    """The budget is the metering code's reservation (``llm.metering.output_reserve_for``)."""
    model = small_model(simulator, context_window=1000, max_output_tokens=300)
    enabled = enabled_model_get(name=model.name)
    assert prompt_budget_for(model=enabled, parameters={}) == 700
    assert prompt_budget_for(model=enabled, parameters={"max_tokens": 50}) == 950
    assert prompt_budget_for(model=enabled, parameters={"max_completion_tokens": 900}) == 100
    # Metering reserves the same output for a prompt that fits it.
    assert max_completion_tokens_for(model=enabled, parameters={}, prompt_tokens=700) == 300
    # Nothing bounds the reply: the history still leaves CONTEXT_OUTPUT_RESERVE_TOKENS (1024) free,
    # at most a quarter of the window; admission still sizes the reply to what the window leaves.
    unbounded = enabled_model_get(name=small_model(simulator, context_window=999, max_output_tokens=None).name)
    assert prompt_budget_for(model=unbounded, parameters={}) == 999 - 249
    assert prompt_budget_for(model=unbounded, parameters={"max_tokens": 10}) == 989
    assert max_completion_tokens_for(model=unbounded, parameters={}, prompt_tokens=700) == 299
    enabled_model_cache.clear()


@pytest.mark.parametrize(
    ("setting", "reserve"),
    [
        (None, 500),  # the default, 1024, over a quarter of the 2,000-token window
        (300, 300),
        (0, 0),  # the history may fill the window
    ],
)
def test_with_nothing_bounding_the_reply_the_history_leaves_the_context_output_reserve_free(
    user, simulator, settings, setting, reserve
):
    if setting is None:
        assert settings.CONTEXT_OUTPUT_RESERVE_TOKENS == 1024
    else:
        settings.CONTEXT_OUTPUT_RESERVE_TOKENS = setting
    # No max_output_tokens on the model, no max_tokens in its parameters nor the conversation's.
    model = small_model(simulator, context_window=2000, max_output_tokens=None)
    conversation = ConversationFactory(owner=user, model=model, system_prompt=SYSTEM)
    history = long_history(conversation, 20)  # ~2,600 tokens

    plan = reply_start(actor=principal_for(user=user), conversation_id=conversation.pk, content="And then?")

    sent = plan.request.messages
    assert not {"max_tokens", "max_completion_tokens"} & set(plan.request.parameters)
    dropped = Message.objects.get(pk=plan.message_id).context_dropped
    assert 0 < dropped < len(history)
    assert sent == [
        {"role": "system", "content": SYSTEM},
        *as_turns(history[dropped:]),
        {"role": "user", "content": "And then?"},
    ]
    # What is sent fits the window minus the reserve, and one more turn would not have.
    budget = model.context_window - reserve
    assert ESTIMATE_TOKENIZER.count_prompt(sent) <= budget
    one_more = [sent[0], *as_turns(history[dropped - 2 : dropped]), *sent[1:]]
    assert ESTIMATE_TOKENIZER.count_prompt(one_more) > budget
    # Admission is unchanged: the reply may still take whatever the window leaves after the prompt.
    assert plan.metering is not None
    assert plan.metering.max_completion_tokens == model.context_window - plan.metering.prompt_tokens
    enabled_model_cache.clear()


def test_the_models_default_max_tokens_shrink_what_a_reply_sends(user, simulator):
    model = small_model(simulator, context_window=400, max_output_tokens=100, default_parameters={"max_tokens": 300})
    conversation = ConversationFactory(owner=user, model=model)
    history = long_history(conversation, 2)

    plan = reply_start(actor=principal_for(user=user), conversation_id=conversation.pk, content="And then?")

    # 100 tokens of prompt left: only the new message fits.
    assert plan.request.messages == [{"role": "user", "content": "And then?"}]
    assert Message.objects.get(pk=plan.message_id).context_dropped == len(history)
    assert plan.metering is not None
    assert plan.metering.prompt_tokens == ESTIMATE_TOKENIZER.count_prompt(plan.request.messages)
    enabled_model_cache.clear()


def long_chain(conversation: Conversation, length: int) -> None:
    """``length`` alternating messages in one chain, written in bulk; the last is the active leaf."""
    messages = Message.objects.bulk_create(
        Message(conversation=conversation, role=("user", "assistant")[i % 2], content=turn_text(i))
        for i in range(length)
    )
    for previous, message in zip(messages, messages[1:], strict=False):
        message.parent_id = previous.pk
    Message.objects.bulk_update(messages[1:], ["parent"], batch_size=1000)
    Conversation.objects.filter(pk=conversation.pk).update(active_leaf=messages[-1])


def test_a_reply_in_a_10000_message_conversation_starts_in_the_queries_of_a_10_message_one(user, small):
    actor = principal_for(user=user)
    short = ConversationFactory(owner=user, model=small)
    long = ConversationFactory(owner=user, model=small)
    long_chain(short, 10)
    long_chain(long, 10_000)
    warm = ConversationFactory(owner=user, model=small)
    long_chain(warm, 10)
    reply_start(actor=actor, conversation_id=warm.pk, content="warm the caches")

    with CaptureQueriesContext(connection) as short_queries:
        short_plan = reply_start(actor=actor, conversation_id=short.pk, content="Next?")
    with CaptureQueriesContext(connection) as long_queries:
        long_plan = reply_start(actor=actor, conversation_id=long.pk, content="Next?")

    assert len(long_queries) == len(short_queries)
    for plan, length in ((short_plan, 10), (long_plan, 10_000)):
        sent = plan.request.messages
        assert sent[-1] == {"role": "user", "content": "Next?"} and sent[0]["role"] == "user"
        assert 1 < len(sent) < 10
        assert Message.objects.get(pk=plan.message_id).context_dropped == length - (len(sent) - 1)


def test_a_recovered_trimmed_reply_is_billed_for_what_was_sent(trimmed_conversation, user):
    conversation, history = trimmed_conversation
    plan = reply_start(actor=principal_for(user=user), conversation_id=conversation.pk, content="Go on")
    reply = Message.objects.get(pk=plan.message_id)
    assert reply.context_dropped > 0

    assert reply_recover(message=reply)  # its process died mid-stream

    reply.refresh_from_db()
    assert reply.prompt_tokens == ESTIMATE_TOKENIZER.count_prompt(plan.request.messages)
