"""Titles for untitled conversations, written by a model after their first reply.

When a conversation without a title gets its first reply (``ConversationReplyPlan.finish``), a
Celery task (``tasks.conversation_title_task``) asks the title model for a short title and sets it,
unless the user has set one meanwhile. The title model is ``settings.CONVERSATION_TITLE_MODEL``:
unset, the conversation's own model; ``""`` (or ``off``), no titles. The title model must be one the
owner may use in the conversation's organization (its and the owner's teams' model allowlists, as
for a reply; no API key: the conversation records none): otherwise, or when the owner is no longer
a member there, the owner's account is inactive, or the conversation is in the trash, no title. The
request goes through the streaming engine like any reply (``llm.services.reply_run``): admitted by
the owner's rate limits and budgets, billed to the conversation's owner in its organization (a ``conversation`` usage
record, request id ``title-<conversation>-<reply>``). Failures are logged, never shown.

Never in the reply's way: the reply's end is written first; the task is handed, once that write
has committed, to a thread of this process that queues it (a broker publish, or, with the embedded
defaults' eager Celery, the whole task), so neither the event loop nor the end of the reply waits.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from django.conf import settings
from django.db import connections, transaction

from accounts.authentication import principal_for
from accounts.model_access import model_access_for
from accounts.models import UsageRecord
from accounts.selectors import AuthenticationFailed
from chatbackend.errors import ApplicationError
from llm.metering import TOKEN_LIMIT_PARAMETERS
from llm.plans import model_reply_plan
from llm.selectors import EnabledModel, enabled_model_get_for
from llm.services import reply_run
from llm.streaming import ReplyPlan, ReplyStatus

from .models import Conversation, Message
from .selectors import message_path

logger = logging.getLogger(__name__)

TITLE_INSTRUCTIONS = (
    "Write a short title (at most six words) for the conversation below, in its language. "
    "Answer with the title only: no quotes, no trailing period."
)
# Characters of the first message and of its reply shown to the title model.
TITLE_SOURCE_CHARS = 2000
# The most tokens the title may take, unless the title model's default parameters set a limit.
TITLE_MAX_TOKENS = 60

# One thread queues the titles of this process; ``conversation_titles_flush`` waits for it.
_queuer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conversation-titles")


def conversation_titles_enabled() -> bool:
    """Return whether conversations get titles written (``CONVERSATION_TITLE_MODEL`` is not off)."""
    return settings.CONVERSATION_TITLE_MODEL != ""


def conversation_title_request(*, conversation_id: int, message_id: int) -> None:
    """Queue the title of ``conversation_id`` after its reply ``message_id``, once the current
    transaction commits (at once outside one). Returns at once: a thread of this process queues the
    Celery task (``tasks.conversation_title_task``)."""
    transaction.on_commit(lambda: _submit(conversation_id, message_id))


def _submit(conversation_id: int, message_id: int) -> None:
    try:
        _queuer.submit(_queue_title, conversation_id, message_id)
    except RuntimeError:  # the interpreter is shutting down (a reply ended at exit): no title
        logger.warning("the title of conversation %s was not queued: the process is exiting", conversation_id)


def _queue_title(conversation_id: int, message_id: int) -> None:
    from .tasks import conversation_title_task  # tasks import this module

    try:
        conversation_title_task.delay(conversation_id, message_id)
    except Exception:
        logger.exception("could not queue the title of conversation %s", conversation_id)
    finally:
        # An eager task ran here: hand its connection back (this thread never ends a request).
        for connection in connections.all(initialized_only=True):
            if not connection.in_atomic_block:
                connection.close()


def conversation_titles_flush(timeout: float = 30.0) -> bool:
    """Wait until every title this process queued so far is handed to Celery (eager: written).

    Returns False when ``timeout`` (seconds) passed first. For tests and shutdown.
    """
    try:
        _queuer.submit(lambda: None).result(timeout)
    except FutureTimeout:
        return False
    return True


def title_clean(text: str) -> str:
    """Return ``text`` as a title: one line, no surrounding quotes, label or final period, at most
    ``Conversation.title``'s length ("" when nothing is left)."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^(title)\s*:\s*", "", text, flags=re.IGNORECASE)
    text = text.strip(" \"'`*#“”‘’«»").rstrip(".").strip()
    return text[: Conversation._meta.get_field("title").max_length].strip()


def conversation_title_generate(*, conversation_id: int, message_id: int) -> str | None:
    """Ask the title model for a title of ``conversation_id`` and set it; return it (None: none set).

    Nothing is asked (and nothing billed) when titles are off, the conversation is gone, in the
    trash or has a title, its owner's account is inactive, the branch up to reply ``message_id`` has
    no first message with a reply, the owner is no longer a member of the conversation's
    organization, or the title model is not one the owner may use there (``_title_model``); the last
    three are logged. The prompt: ``TITLE_INSTRUCTIONS``, then the first user message and its reply
    (``TITLE_SOURCE_CHARS`` of each). The title is set only while the conversation is still
    untitled (one conditional UPDATE: a title the user set meanwhile wins; ``updated_at`` stays).
    Raises ``llm.streaming.ReplyRefused`` when admission refuses the request, ``TimeoutError``
    after ``CONVERSATION_TITLE_TIMEOUT_SECONDS``; the task
    logs them.
    """
    if not conversation_titles_enabled():
        return None
    conversation = (
        Conversation.objects.select_related("owner", "organization", "model").filter(pk=conversation_id).first()
    )
    if conversation is None or conversation.title or conversation.deleted_at is not None:
        return None
    if not conversation.owner.is_active:  # a deactivated account is billed for nothing more
        logger.info("the title of conversation %s was not written: its owner's account is inactive", conversation.pk)
        return None
    first_turn = list(
        message_path(conversation=conversation, leaf_id=message_id)
        .filter(role__in=(Message.Role.USER, Message.Role.ASSISTANT))
        .exclude(content="")
        .values_list("role", "content")[:2]
    )
    if [role for role, _ in first_turn] != [Message.Role.USER, Message.Role.ASSISTANT]:
        return None
    (_, question), (_, answer) = first_turn
    model = _title_model(conversation)
    if model is None:
        return None
    messages = [
        {"role": "system", "content": TITLE_INSTRUCTIONS},
        {
            "role": "user",
            "content": f"User: {question[:TITLE_SOURCE_CHARS]}\n\nAssistant: {answer[:TITLE_SOURCE_CHARS]}",
        },
    ]
    parameters = dict(model.default_parameters)
    if not any(name in parameters for name in TOKEN_LIMIT_PARAMETERS):
        parameters["max_tokens"] = TITLE_MAX_TOKENS
    reply_id = f"title-{conversation.pk}-{message_id}"
    plan = model_reply_plan(
        ReplyPlan,
        model=model,
        messages=messages,
        parameters=parameters,
        reply_id=reply_id,
        source=UsageRecord.Source.CONVERSATION,
        user=conversation.owner,
        api_key=None,
        organization=conversation.organization,
    )
    outcome = reply_run(plan=plan, timeout_seconds=settings.CONVERSATION_TITLE_TIMEOUT_SECONDS)
    if outcome.status is not ReplyStatus.COMPLETED:
        error = outcome.error
        logger.warning(
            "the title of conversation %s was not written: the reply ended %s (%s)",
            conversation.pk,
            outcome.status.value,
            error.code if error else "",
        )
        return None
    title = title_clean(outcome.content)
    if not title:
        return None
    if not Conversation.objects.filter(pk=conversation.pk, title="").update(title=title):
        return None  # titled meanwhile, or deleted
    return title


def _title_model(conversation: Conversation) -> EnabledModel | None:
    """Return the title model of ``conversation`` as its owner may use it in its organization, or
    None (logged) when the owner is no longer a member there or may not use it (or it is not enabled).

    The owner's access there (``accounts.model_access.model_access_for``, no API key); the
    fallbacks outside it are left out (``llm.selectors.enabled_model_get_for``).
    """
    name = settings.CONVERSATION_TITLE_MODEL or conversation.model.name
    owner, organization = conversation.owner, conversation.organization
    try:
        principal = principal_for(user=owner, organization=organization.slug)
    except AuthenticationFailed:
        logger.info(
            "the title of conversation %s was not written: its owner is no longer a member of %r",
            conversation.pk,
            organization.slug,
        )
        return None
    try:
        return enabled_model_get_for(access=model_access_for(principal=principal), name=name)
    except ApplicationError as error:  # outside the owner's access, unknown or disabled
        logger.warning(
            "the title of conversation %s was not written: title model %r is not available to its owner in %r (%s)",
            conversation.pk,
            name,
            organization.slug,
            error.code,
        )
        return None


__all__ = [
    "conversation_title_generate",
    "conversation_title_request",
    "conversation_titles_enabled",
    "conversation_titles_flush",
    "title_clean",
]
