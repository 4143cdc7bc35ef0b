"""A server process killed mid-reply (SIGKILL) leaves no reply "streaming" for ever.

The doomed server checkpoints its reply's text every half second and beats every half second;
after the kill its heartbeat lapses, the recovery task (sent through the broker to the real Celery
worker) marks the reply ``failed`` / ``interrupted`` with the checkpointed text and bills it once,
while a slow reply streaming on a live server at the same moment is left alone.
"""

from __future__ import annotations

import json
import signal
import threading
import warnings
from typing import Any

import httpx
import pytest
from celery.exceptions import AlwaysEagerIgnored

from accounts.models import UsageRecord, User
from chatbackend.celery import app as celery_app
from chatbackend.liveness import process_alive
from conversations.models import Message
from llm.tests.simulator_process import SimulatorProcess
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory
from tests.kit import conversation_sse, poll_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _stream_sse(url: str, conversation_id: int, api_key: str, received: list[str]) -> None:
    """Stream one conversation reply over SSE; append each delta's text to ``received``."""
    try:
        with (
            httpx.Client(base_url=url, timeout=60, trust_env=False) as http,
            conversation_sse(http, conversation_id, api_key) as source,
        ):
            received.extend(json.loads(sse.data)["content"] for sse in source.iter_sse() if sse.event == "reply.delta")
    except httpx.HTTPError:  # the doomed server dies under it
        pass


def test_a_reply_of_a_killed_process_is_recovered_and_a_live_one_is_not(
    e2e_stack: Any, e2e_user: Any, slow_simulator: SimulatorProcess, start_server: Any
) -> None:
    if not e2e_stack.shares_state:
        pytest.skip("heartbeats are shared through Redis and recovery runs in the Celery worker (CI)")
    provider = ProviderFactory(base_url=slow_simulator.base_url, api_key="", read_timeout=30)
    model = LLMModelFactory(provider=provider, upstream_model="sim-1")
    owner = User.objects.get(username=e2e_user.username)
    doomed_conversation, live_conversation = (ConversationFactory(owner=owner, model=model) for _ in range(2))
    doomed, doomed_url = start_server(env={"REPLY_CHECKPOINT_SECONDS": "0.5", "PROCESS_HEARTBEAT_SECONDS": "0.5"})

    doomed_text: list[str] = []
    live_text: list[str] = []
    threads = [
        threading.Thread(target=_stream_sse, args=(doomed_url, doomed_conversation.pk, e2e_user.api_key, doomed_text)),
        threading.Thread(
            target=_stream_sse, args=(e2e_stack.server_url, live_conversation.pk, e2e_user.api_key, live_text)
        ),
    ]
    for thread in threads:
        thread.start()

    def assistant(conversation: Any) -> Message | None:
        return Message.objects.filter(conversation=conversation, role=Message.Role.ASSISTANT).first()

    # The doomed reply has been checkpointed with some text: kill its process without warning.
    poll_until_sync(lambda: assistant(doomed_conversation), lambda m: m is not None and len(m.content.split()) >= 5)
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(timeout=10)
    threads[0].join(10)
    message = assistant(doomed_conversation)
    assert message is not None and message.status == Message.Status.STREAMING
    checkpointed = message.content
    poll_until_sync(lambda: process_alive(message.stream_owner), lambda alive: not alive, within=10)

    with warnings.catch_warnings():  # through the broker to the real worker, on purpose
        warnings.simplefilter("ignore", AlwaysEagerIgnored)
        celery_app.send_task("conversations.reply_recover_orphans", kwargs={"orphan_after_seconds": 0.5})
    recovered = poll_until_sync(
        lambda: assistant(doomed_conversation), lambda m: m.status != Message.Status.STREAMING, within=20
    )

    assert recovered.status == Message.Status.FAILED
    assert recovered.error_code == "interrupted"
    assert recovered.content == checkpointed
    assert "".join(doomed_text).startswith(recovered.content)
    [record] = poll_until_sync(lambda: list(UsageRecord.objects.filter(message=recovered)), lambda r: len(r) == 1)
    assert record.finish_status == "failed"
    assert record.token_source == "estimated"
    assert record.completion_tokens >= len(checkpointed.split())
    # The live reply, checkpointed less often than the recovery's threshold, was not touched ...
    live = assistant(live_conversation)
    assert live is not None and live.status == Message.Status.STREAMING, live and live.status
    threads[1].join(30)
    # ... and ends as it would have.
    finished = poll_until_sync(lambda: assistant(live_conversation), lambda m: m.status != Message.Status.STREAMING)
    assert finished.status == Message.Status.COMPLETED
    assert finished.content == "".join(live_text)
    poll_until_sync(lambda: UsageRecord.objects.filter(message=recovered).count(), lambda n: n == 1)
