"""Writes for conversations: CRUD, and the start, end and stop of a streamed reply."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q, Subquery
from django.utils import timezone

from accounts.authentication import Principal
from accounts.model_access import UNRESTRICTED, ModelAccess, model_access_for
from accounts.models import Organization, UsageRecord, User
from accounts.usage import usage_account, usage_context
from chatbackend.errors import OUTAGE_ERRORS, ApplicationError, NotFoundError
from chatbackend.liveness import PROCESS_ID, process_alive
from chatbackend.text import holds_nul
from llm.metering import max_tokens_check, prompt_budget_for
from llm.models import LLMModel
from llm.plans import model_reply_plan
from llm.selectors import EnabledModel, enabled_model_get_for, llm_model_get_enabled_for
from llm.streaming import ReplyOutcome, ReplyPlan, ReplyStatus, reply_stop_broadcast
from llm.tokens import ESTIMATE_TOKENIZER, tokenizer_for

from .models import Conversation, Message
from .selectors import (
    FittedHistory,
    conversation_get_for,
    history_fitted,
    message_get_in,
    message_latest_leaf_id,
    message_path,
)
from .stored_completions.positions import DeletedCompletion, ListPosition, deleted_positions_keep
from .titles import conversation_title_request, conversation_titles_enabled

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 100_000
# Longest system prompt and title a conversation takes (characters; docs/api.md).
MAX_SYSTEM_PROMPT_CHARS = 100_000
MAX_TITLE_CHARS = 200


def conversation_create(
    *,
    owner: User,
    model_name: str,
    title: str = "",
    system_prompt: str = "",
    access: ModelAccess | None = None,
    organization: Organization | None = None,
) -> Conversation:
    """Create a conversation of ``owner`` in ``organization`` (None: the default organization) with
    the enabled model ``model_name``. Raises ``ApplicationError``.

    ``access``: what the caller may use (``accounts.model_access.model_access_for``; None: every
    model, for callers that act for no request); a model outside it is a 404 ``model_not_found``
    (``llm.selectors.llm_model_get_enabled_for``).
    """
    model = llm_model_get_enabled_for(access=access or UNRESTRICTED, name=model_name)
    if organization is None:
        organization = Organization.objects.default()
    return Conversation.objects.create(
        owner=owner, organization=organization, model=model, title=title, system_prompt=system_prompt
    )


def conversation_update(
    *, conversation: Conversation, data: dict[str, Any], access: ModelAccess | None = None
) -> Conversation:
    """Update ``title``, ``system_prompt``, ``parameters`` (replaced whole: the OpenAI request fields
    sent with every reply), ``model`` (an enabled model's name), ``active_leaf`` (a message id:
    ``conversation_active_leaf_set``), ``pinned`` and/or ``archived`` (booleans:
    ``conversation_organize``) from ``data``.

    ``access``: as ``conversation_create``'s; a model outside it is a 404 ``model_not_found``.
    Raises ``ApplicationError`` 400 (``param`` ``active_leaf``) for an id of no message of the
    conversation.
    """
    if "active_leaf" in data:
        try:
            leaf = message_get_in(conversation=conversation, message_id=data["active_leaf"])
        except NotFoundError:
            raise ApplicationError(
                "active_leaf must be the id of a message of this conversation.",
                code="invalid_active_leaf",
                param="active_leaf",
            ) from None
        conversation_active_leaf_set(conversation=conversation, message=leaf)
    if "pinned" in data or "archived" in data:
        conversation_organize(conversation=conversation, pinned=data.get("pinned"), archived=data.get("archived"))
    fields: list[str] = []
    for name in ("title", "system_prompt", "parameters"):
        if name in data:
            setattr(conversation, name, data[name])
            fields.append(name)
    if "model" in data:
        conversation.model = llm_model_get_enabled_for(access=access or UNRESTRICTED, name=data["model"])
        fields.append("model")
    if fields:
        conversation.save(update_fields=[*fields, "updated_at"])
    return conversation


def conversation_organize(
    *, conversation: Conversation, pinned: bool | None = None, archived: bool | None = None
) -> Conversation:
    """Pin or unpin, archive or unarchive ``conversation`` (None: leave as it is).

    Organizing is not activity: ``updated_at`` (the list's order, and what retention counts from)
    stays. Archiving again keeps the first ``archived_at``.
    """
    changes: dict[str, Any] = {}
    if pinned is not None and pinned != conversation.pinned:
        changes["pinned"] = pinned
    if archived is not None and archived != conversation.archived:
        changes["archived_at"] = timezone.now() if archived else None
    if changes:
        Conversation.objects.filter(pk=conversation.pk).update(**changes)
        for name, value in changes.items():
            setattr(conversation, name, value)
    return conversation


def conversation_active_leaf_set(*, conversation: Conversation, message: Message) -> Conversation:
    """Make ``message`` (of ``conversation``) the active leaf: the branch shown and continued.

    Any message may be the leaf: the next message then follows it, starting a new branch when it
    already has children. Switching is reading, not writing: ``updated_at`` stays.
    """
    Conversation.objects.filter(pk=conversation.pk).update(active_leaf=message)
    conversation.active_leaf = message
    return conversation


def conversation_branch_activate(*, actor: Principal, conversation_id: int, message_id: int) -> Conversation:
    """Switch to the branch through ``message_id``: its latest descendant becomes the active leaf.

    Following the latest child at each step (``message_latest_leaf_id``) is what a UI's "2/3"
    arrows mean: show that alternative as it was last continued. Raises ``NotFoundError`` (a
    conversation ``actor`` may not see, or no such message in it), ``ApplicationError`` 403 when
    ``actor`` is not its owner.
    """
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id, to_change=True)
    message = message_get_in(conversation=conversation, message_id=message_id)
    leaf = Message(pk=message_latest_leaf_id(message=message), conversation=conversation)
    return conversation_active_leaf_set(conversation=conversation, message=leaf)


def message_append(*, conversation: Conversation, **fields: Any) -> Message:
    """Add a message after the active leaf of ``conversation`` and make it the active leaf.

    ``fields``: the ``Message`` fields (``role``, ``content``, ``status``...). For writers that add
    whole turns (imports, fixtures); a streamed reply's messages are ``reply_start``'s. The
    conversation row is locked while the leaf moves, so concurrent appends form a chain.
    """
    with transaction.atomic():
        leaf_id = _conversation_lock_leaf(conversation.pk)
        message = Message.objects.create(conversation=conversation, parent_id=leaf_id, **fields)
        Conversation.objects.filter(pk=conversation.pk).update(active_leaf=message, updated_at=timezone.now())
    conversation.active_leaf = message
    return message


def message_chain(*, conversation: Conversation, messages: list[Message]) -> None:
    """Make ``messages`` (saved, in order) the active branch of ``conversation``: each one's parent
    the one before it (the first a root), the last the active leaf. For writers that keep a whole
    line of messages at once (a synced NextChat session, a stored chat completion), which
    ``message_append`` would write one by one. Changes only what differs: one update per call.
    """
    relinked = []
    parent_id = None
    for message in messages:
        if message.parent_id != parent_id:
            message.parent_id = parent_id
            relinked.append(message)
        parent_id = message.pk
    Message.objects.bulk_update(relinked, ["parent"])
    if parent_id is not None and conversation.active_leaf_id != parent_id:
        conversation.active_leaf_id = parent_id
        Conversation.objects.filter(pk=conversation.pk).update(active_leaf_id=parent_id)


def _conversation_lock_leaf(conversation_id: int) -> int | None:
    """Lock conversation ``conversation_id`` (in the caller's transaction); return its active leaf's id.

    Raises ``NotFoundError`` when the conversation no longer exists or is in the trash.
    """
    # A conversation moved to the trash meanwhile takes no message either (``conversation_trash``).
    live = Conversation.objects.select_for_update().filter(pk=conversation_id, deleted_at__isnull=True)
    rows = list(live.values_list("active_leaf_id"))
    if not rows:
        raise NotFoundError()
    return rows[0][0]


def conversation_deleted_error() -> NotFoundError:
    """Return the error a reply's client gets when its conversation was deleted while it streamed."""
    return NotFoundError("The conversation was deleted while the reply was streaming.", code="conversation_deleted")


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete ``conversation`` and its messages (usage records stay, unlinked).

    A reply still streaming in it is stopped, wherever it streams (``reply_stop_broadcast``): it
    ends ``cancelled`` (billed for what it produced) and its client gets the
    ``conversation_deleted`` error. When the stop request cannot be sent the deletion stands; the
    reply then finds its message gone when it ends, and its client gets the same error.
    Raises ``NotFoundError`` when a concurrent request deleted it first.
    """
    if not conversations_delete(conversation_ids=[conversation.pk]):
        raise NotFoundError()


def conversations_delete(*, conversation_ids: Sequence[int]) -> set[int]:
    """Delete the conversations ``conversation_ids`` and their messages in one transaction, as
    ``conversation_delete`` deletes one; return the ids deleted (those a concurrent request deleted
    first are not). For many at once (retention): a few queries for the whole batch, not per
    conversation.
    """
    with transaction.atomic():
        # Django emulates the CASCADE of messages and the SET_NULL of their usage records: it
        # reads the rows pointing here, unlinks or deletes them, then deletes, and PostgreSQL checks
        # the (deferred) foreign keys at commit. A row another transaction commits in between (a
        # reply's message, the Celery worker's usage record for one) would fail that commit with an
        # IntegrityError. Locking the conversations, then their messages, first makes those writers
        # wait for this deletion, and find their row gone (handled there: ``reply_start``,
        # ``accounts.usage.usage_record_many``). No writer locks existing rows the other way round
        # (a reply's start locks only the conversation, its end only its message), and the rows are
        # locked in id order: no deadlock.
        rows = list(
            Conversation.objects.select_for_update()
            .filter(pk__in=conversation_ids)
            .order_by("pk")
            .values_list("pk", "owner_id", "organization_id", "completion_id", "created_at")
        )
        if not rows:
            return set()
        found = [pk for pk, *_ in rows]
        # A stored completion's list position outlives it: a page ``after`` it goes on from there.
        deleted = [
            DeletedCompletion(owner_id, organization_id, completion_id, ListPosition(created_at, pk))
            for pk, owner_id, organization_id, completion_id, created_at in rows
            if completion_id is not None
        ]
        if deleted:
            transaction.on_commit(lambda: deleted_positions_keep(deleted))
        messages = list(
            Message.objects.select_for_update()
            .filter(conversation_id__in=found)
            .order_by("pk")
            .values_list("pk", "role", "status")
        )
        Conversation.objects.filter(pk__in=found).delete()
    _replies_stop(
        [pk for pk, role, status in messages if role == Message.Role.ASSISTANT and status == Message.Status.STREAMING]
    )
    return set(found)


def conversation_trash(*, conversation: Conversation) -> None:
    """Move ``conversation`` to the trash (``deleted_at``): no lookup but the trash's finds it, and it
    takes no message, until ``conversation_restore``; ``conversation_purge`` deletes it for good.

    A reply still streaming in it is stopped as ``conversation_delete`` stops it (its client gets
    ``conversation_deleted``; the reply ends ``cancelled``, billed, its text kept in the trashed
    conversation). The row is locked first, so a reply starting at the same time either finishes
    its start before (and is stopped) or finds the conversation gone (``_conversation_lock_leaf``).
    Raises ``NotFoundError`` when a concurrent request deleted or trashed it first.
    """
    with transaction.atomic():
        if not Conversation.objects.select_for_update().filter(pk=conversation.pk, deleted_at__isnull=True).exists():
            raise NotFoundError()
        conversation.deleted_at = timezone.now()
        Conversation.objects.filter(pk=conversation.pk).update(deleted_at=conversation.deleted_at)
        streaming = list(
            conversation.messages.filter(role=Message.Role.ASSISTANT, status=Message.Status.STREAMING).values_list(
                "pk", flat=True
            )
        )
    _replies_stop(streaming)


def conversation_restore(*, actor: Principal, conversation_id: int) -> Conversation:
    """Take conversation ``conversation_id`` of ``actor`` out of the trash; return it.

    Raises ``NotFoundError`` when ``actor`` sees no such conversation in the trash (another user's
    is a 404, as everywhere), ``ApplicationError`` 403 when ``actor`` sees it but is not its owner.
    """
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id, to_change=True, deleted=True)
    Conversation.objects.filter(pk=conversation.pk).update(deleted_at=None)
    conversation.deleted_at = None
    return conversation


def conversation_purge(*, actor: Principal, conversation_id: int) -> None:
    """Delete conversation ``conversation_id`` of ``actor`` for good, in the trash or not
    (``conversation_delete``: its messages go, usage records stay unlinked).

    Raises as ``conversation_restore``.
    """
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id, to_change=True, deleted=None)
    conversation_delete(conversation=conversation)


def _replies_stop(message_ids: list[int]) -> None:
    """Stop the replies ``message_ids`` streaming in a conversation that went, wherever they stream."""
    for message_id in message_ids:
        try:
            reply_stop_broadcast(reply_id=conversation_reply_id(message_id), reason=conversation_deleted_error())
        except ApplicationError:
            logger.warning("could not stop reply %s of a deleted conversation", message_id)


def _validate_content(content: str) -> str:
    if not isinstance(content, str) or not content.strip():
        raise ApplicationError("Message content must be a non-empty string.", code="empty_message", param="content")
    if holds_nul(content):  # PostgreSQL cannot store it in text; SQLite could: refuse it on both
        raise ApplicationError("Null characters are not allowed.", code="null_characters_not_allowed", param="content")
    if len(content) > MAX_MESSAGE_CHARS:
        raise ApplicationError(
            f"Message content is longer than {MAX_MESSAGE_CHARS} characters.", code="message_too_long", param="content"
        )
    return content


@dataclass(kw_only=True)
class ConversationReplyPlan(ReplyPlan):
    """A reply in a conversation: the ids its interfaces report, and the end written to its message.

    ``message_id``: the assistant message (``streaming`` until the end); its parent is
    ``user_message_id``, and ``sibling_ids`` are the replies to that message (itself included) when
    it started. ``created_at``: that message's creation time. ``message_written``: set at the end;
    False when the message was gone (its conversation was purged while the reply streamed) or the
    reply was stopped because its conversation went to the trash: its client is told
    ``conversation_deleted`` either way.
    ``user_message_created``: the user message is this reply's own (not a regeneration's);
    ``previous_leaf_id``: the active leaf before, restored when the reply is refused.
    ``context_dropped`` / ``context_dropped_through``: the oldest messages left out of the request
    to fit the context window (``Message`` fields of the same names). ``title_wanted``: the
    conversation has no title and this is a reply to its first message (``titles``).
    """

    conversation_id: int
    user_message_id: int
    message_id: int
    created_at: dt.datetime
    sibling_ids: list[int]
    user_message_created: bool = True
    previous_leaf_id: int | None = None
    context_dropped: int = 0
    context_dropped_through: int | None = None
    title_wanted: bool = False
    message_written: bool = False

    def finish(self, outcome: ReplyOutcome) -> None:
        """Write the end of the reply on its assistant message (``reply_finish``); then, for the
        first reply of an untitled conversation that completed, queue its title (``titles``)."""
        written = reply_finish(outcome, message_id=self.message_id)
        # Stopped because its conversation went to the trash (``conversation_trash``): the text is
        # kept there, but for the client the conversation is gone, as after a purge.
        trashed = outcome.error is not None and outcome.error.code == "conversation_deleted"
        self.message_written = written and not trashed
        if self.title_wanted and self.message_written and outcome.status is ReplyStatus.COMPLETED:
            conversation_title_request(conversation_id=self.conversation_id, message_id=self.message_id)

    def checkpoint(self, content: str, reasoning_content: str, model_name: str) -> None:
        """Write the text so far, and the model generating it, on the assistant message while it streams
        (``reply_checkpoint``)."""
        reply_checkpoint(message_id=self.message_id, content=content, model_name=model_name)

    def refused(self, error: ApplicationError) -> None:
        """Remove the turn a refused reply started (``reply_refused``): it never happened."""
        created = (self.user_message_id, self.message_id) if self.user_message_created else (self.message_id,)
        reply_refused(conversation_id=self.conversation_id, message_ids=created, previous_leaf_id=self.previous_leaf_id)


def conversation_reply_id(message_id: int) -> str:
    """Return the reply id of assistant message ``message_id``: its stop key and usage request id."""
    return f"message-{message_id}"


def reply_start(*, actor: Principal, conversation_id: int, content: str) -> ConversationReplyPlan:
    """Write the user's message and the assistant's placeholder; return the plan for the stream.

    One transaction: the user message (``completed``, after the active leaf) and an empty
    assistant message (``streaming``, after it, now the active leaf) are written before any
    upstream call. The history sent upstream is the conversation's system prompt and the active
    path, its oldest messages left out when it does not fit the model's context window
    (``_reply_messages_create``). Raises ``NotFoundError`` for a conversation ``actor`` may not
    see, ``ApplicationError`` for empty content or a disabled model, 400
    ``context_length_exceeded`` when the system prompt and the message alone do not fit (nothing
    written), 403 when ``actor`` is not the owner, and 404
    ``model_not_found`` when the actor may not use the conversation's model
    (``accounts.model_access``: its organization's, teams' or key's allowlist).
    """
    content = _validate_content(content)
    return _reply_begin(actor=actor, conversation_id=conversation_id, turn=_NewTurn(content=content))


def reply_edit_start(*, actor: Principal, conversation_id: int, message_id: int, content: str) -> ConversationReplyPlan:
    """Edit user message ``message_id``: write a sibling of it with ``content`` and start its reply.

    The old message and its replies stay (another branch); the new user message has the same
    parent, the reply follows it and becomes the active leaf. Raises as ``reply_start``, and
    ``NotFoundError`` (``message_not_found``) when ``message_id`` is no user message of the
    conversation.
    """
    content = _validate_content(content)
    return _reply_begin(actor=actor, conversation_id=conversation_id, turn=_EditTurn(content=content, of=message_id))


def reply_regenerate_start(*, actor: Principal, conversation_id: int, message_id: int) -> ConversationReplyPlan:
    """Regenerate assistant message ``message_id``: start a sibling reply to the same user message.

    The new reply becomes the active leaf; the history sent is the path up to that user message.
    Raises as ``reply_start``, ``NotFoundError`` (``message_not_found``) when ``message_id`` is no
    assistant message of the conversation, and ``ApplicationError`` 400 ``not_a_reply`` when it
    follows no user message.
    """
    return _reply_begin(actor=actor, conversation_id=conversation_id, turn=_RegenerateTurn(of=message_id))


@dataclass(frozen=True)
class _NewTurn:
    content: str


@dataclass(frozen=True)
class _EditTurn:
    content: str
    of: int


@dataclass(frozen=True)
class _RegenerateTurn:
    of: int


@dataclass(frozen=True)
class _ReplyMessages:
    """What ``_reply_messages_create`` wrote: the reply's messages, its siblings, its history."""

    user_message: Message
    assistant_message: Message
    sibling_ids: list[int]
    history: FittedHistory
    user_message_created: bool
    previous_leaf_id: int | None


def _reply_begin(
    *, actor: Principal, conversation_id: int, turn: _NewTurn | _EditTurn | _RegenerateTurn
) -> ConversationReplyPlan:
    """Check the actor and the model, write the turn's messages, and return the reply's plan."""
    user, api_key = actor.user, actor.api_key
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id, to_change=True)
    # Cached in the process: no query on a hit.
    model = enabled_model_get_for(access=model_access_for(principal=actor), name=conversation.model.name)
    # A template's parameters (``Conversation.parameters``) over the model's defaults; the output
    # reserve of the context that fits (``max_tokens``) is among them.
    parameters = {**model.default_parameters, **conversation.parameters}
    max_tokens_check(model=model, parameters=parameters, param_prefix="parameters.")
    try:
        written = _reply_messages_create(conversation=conversation, turn=turn, model=model, parameters=parameters)
    except IntegrityError:  # the conversation was deleted since it was read
        raise NotFoundError() from None
    assistant_message, history = written.assistant_message, written.history.messages
    reply_id = conversation_reply_id(assistant_message.pk)
    return model_reply_plan(
        ConversationReplyPlan,
        model=model,
        messages=history,
        parameters=parameters,
        reply_id=reply_id,
        source=UsageRecord.Source.CONVERSATION,
        user=user,
        api_key=api_key,
        organization=actor.organization,
        usage_message_id=assistant_message.pk,
        prompt_tokens=written.history.prompt_tokens,
        conversation_id=conversation.pk,
        user_message_id=written.user_message.pk,
        message_id=assistant_message.pk,
        created_at=assistant_message.created_at,
        sibling_ids=written.sibling_ids,
        user_message_created=written.user_message_created,
        previous_leaf_id=written.previous_leaf_id,
        context_dropped=written.history.dropped,
        context_dropped_through=written.history.dropped_through,
        title_wanted=(
            not conversation.title and written.user_message.parent_id is None and conversation_titles_enabled()
        ),
    )


def _reply_messages_create(
    *,
    conversation: Conversation,
    turn: _NewTurn | _EditTurn | _RegenerateTurn,
    model: EnabledModel,
    parameters: dict[str, Any],
) -> _ReplyMessages:
    """Write the turn's user message (none for a regeneration) and the assistant's ``streaming``
    placeholder, and move the active leaf to it, in one transaction.

    The history sent upstream is fitted to ``model``'s context window minus the output reserve of
    a request with ``parameters`` (``selectors.history_fitted``, ``llm.metering.prompt_budget_for``);
    what was left out is recorded on the assistant message (``context_dropped``,
    ``context_dropped_through``). The conversation row is locked first (as ``conversation_delete``
    does), so two replies started at once chain rather than both following the same leaf. Raises
    ``NotFoundError`` when the conversation (or the message edited or regenerated) no longer
    exists, ``IntegrityError`` when it went while writing, ``ContextLengthExceeded`` (400) when not
    even the system prompt and the user message fit: nothing is written then.
    """
    with transaction.atomic():
        previous_leaf_id = _conversation_lock_leaf(conversation.pk)
        if isinstance(turn, _RegenerateTurn):
            replaced = message_get_in(conversation=conversation, message_id=turn.of, role=Message.Role.ASSISTANT)
            user_message = replaced.parent
            if user_message is None or user_message.role != Message.Role.USER:
                raise ApplicationError(
                    "This reply follows no user message: it cannot be regenerated.", code="not_a_reply"
                )
            _history_idle_check(conversation=conversation, leaf_id=user_message.pk)
        else:
            parent_id = previous_leaf_id
            if isinstance(turn, _EditTurn):
                edited = message_get_in(conversation=conversation, message_id=turn.of, role=Message.Role.USER)
                parent_id = edited.parent_id
            _history_idle_check(conversation=conversation, leaf_id=parent_id)
            user_message = Message.objects.create(
                conversation=conversation,
                parent_id=parent_id,
                role=Message.Role.USER,
                content=turn.content,
                status=Message.Status.COMPLETED,
            )
        history = history_fitted(
            conversation=conversation,
            leaf_id=user_message.pk,
            tokenizer=model.tokenizer,
            max_prompt_tokens=prompt_budget_for(model=model, parameters=parameters),
        )
        assistant_message = Message.objects.create(
            conversation=conversation,
            parent=user_message,
            role=Message.Role.ASSISTANT,
            status=Message.Status.STREAMING,
            model_name=model.name,
            stream_owner=PROCESS_ID,
            context_dropped=history.dropped,
            context_dropped_through=history.dropped_through,
        )
        if isinstance(turn, _RegenerateTurn):
            sibling_ids = list(user_message.children.order_by("id").values_list("id", flat=True))
        else:
            sibling_ids = [assistant_message.pk]
        Conversation.objects.filter(pk=conversation.pk).update(active_leaf=assistant_message, updated_at=timezone.now())
    return _ReplyMessages(
        user_message=user_message,
        assistant_message=assistant_message,
        sibling_ids=sibling_ids,
        history=history,
        user_message_created=not isinstance(turn, _RegenerateTurn),
        previous_leaf_id=previous_leaf_id,
    )


def _history_idle_check(*, conversation: Conversation, leaf_id: int | None) -> None:
    """Refuse a reply whose history (the path from the root to ``leaf_id``) holds a reply still streaming.

    Such a reply has no text yet (it is written when it ends): the model would not see it, while the
    tree would show the new turn following it. Raises ``ApplicationError`` 409 ``reply_in_progress``
    (the code a share of such a branch gets, ``sharing.services.share_snapshot``). A reply on another
    branch (a sibling, or below an earlier message) does not count: branches stream in parallel.
    An orphan (``reply_recover_orphans``' test: its process has no heartbeat and it has been quiet
    for ``REPLY_ORPHAN_AFTER_SECONDS``) does not count either: it is recovered here, at once, rather
    than at the next periodic recovery, so a dead process never blocks a branch for long.
    Called with the conversation row locked (``_conversation_lock_leaf``): of two turns started at
    once on a branch, the second sees the first's placeholder and is refused. One query when
    nothing streams.
    """
    if leaf_id is None:
        return
    streaming = message_path(conversation=conversation, leaf_id=leaf_id).filter(status=Message.Status.STREAMING)
    quiet_since = timezone.now() - dt.timedelta(seconds=settings.REPLY_ORPHAN_AFTER_SECONDS)
    for message in streaming:
        message.conversation = conversation
        quiet = (message.checkpointed_at or message.created_at) < quiet_since
        if quiet and message.role == Message.Role.ASSISTANT and not _stream_owner_alive(message.stream_owner):
            reply_recover(message=message)
            continue
        raise ApplicationError(
            "A reply of this branch is still streaming: wait for it to end (or stop it), then send.",
            code="reply_in_progress",
            status=409,
        )


def _stream_owner_alive(owner: str) -> bool:
    """Return whether process ``owner`` may still be streaming, as ``reply_recover_orphans`` tells it
    (no owner recorded: dead), except that an unreachable cache answers True: not knowing is not dead."""
    try:
        return bool(owner) and process_alive(owner)
    except OUTAGE_ERRORS:
        return True


def reply_refused(*, conversation_id: int, message_ids: tuple[int, ...], previous_leaf_id: int | None) -> None:
    """Delete the messages a reply that admission refused wrote, and give back the active leaf.

    A refused turn (rate limit, budget) is answered with an error before any reply starts; keeping
    its messages would leave an unanswered user message in the history sent upstream next time.
    The client still has its text. ``message_ids``: the user message (unless the reply was a
    regeneration) and the assistant placeholder. The active leaf returns to ``previous_leaf_id``
    when it is still one of them (and that message still exists). Deleting what is already gone is
    a no-op.
    """
    with transaction.atomic():
        Conversation.objects.filter(pk=conversation_id, active_leaf_id__in=message_ids).update(
            active_leaf_id=Subquery(Message.objects.filter(pk=previous_leaf_id or 0).values("pk")[:1])
        )
        Message.objects.filter(pk__in=message_ids).delete()


def reply_finish(outcome: ReplyOutcome, *, message_id: int) -> bool:
    """Write the end of a reply on its assistant message: text so far, status, the model that served
    it (a fallback's name when one did), tokens, timings, error.

    The text is ``outcome.text``: a refusal (the model declined) is kept as what the model said.

    One UPDATE. Returns False when the message no longer exists (its conversation was deleted
    while the reply streamed).
    """
    written = Message.objects.filter(pk=message_id).update(
        content=outcome.text,
        status=outcome.status.value,
        model_name=outcome.model_name,
        finish_reason=outcome.finish_reason or "",
        prompt_tokens=outcome.usage.prompt_tokens,
        completion_tokens=outcome.usage.completion_tokens,
        time_to_first_token_ms=outcome.time_to_first_token_ms,
        duration_ms=outcome.duration_ms,
        error=outcome.error.message if outcome.error else "",
        error_code=outcome.error.code if outcome.error else "",
        updated_at=timezone.now(),
    )
    return written > 0


def reply_checkpoint(*, message_id: int, content: str, model_name: str | None = None) -> None:
    """Write the text so far of assistant message ``message_id``, only while it is ``streaming``.

    ``model_name``: the model generating it (a fallback's once one serves; None: unchanged), what a
    crash recovery (``reply_recover``) names and prices the reply by. One UPDATE; it never
    overwrites an end already written (the status filter is re-checked under the row lock, so a
    checkpoint racing ``reply_finish`` changes nothing).
    """
    now = timezone.now()
    fields: dict[str, Any] = {"content": content, "checkpointed_at": now, "updated_at": now}
    if model_name is not None:
        fields["model_name"] = model_name
    Message.objects.filter(pk=message_id, status=Message.Status.STREAMING).update(**fields)


INTERRUPTED = "interrupted"


def reply_recover(*, message: Message) -> bool:
    """End orphaned reply ``message`` (its process died): ``failed``, ``interrupted``, billed once.

    Keeps its checkpointed text; its usage is counted from that text and the conversation before
    it with the model's tokenizer (``counted``, or ``estimated`` for a model without a known
    tokenizer or deleted since), billed to the conversation's owner at the model's current prices,
    keyed by the reply (a record the dying process managed to queue wins; nothing is billed twice).
    Returns False when the message was no longer ``streaming`` (its process ended it meanwhile).
    """
    now = timezone.now()
    with transaction.atomic():
        recovered = Message.objects.filter(pk=message.pk, status=Message.Status.STREAMING).update(
            status=Message.Status.FAILED,
            error="The reply was interrupted: the server process streaming it stopped.",
            error_code=INTERRUPTED,
            updated_at=now,
        )
        if not recovered:
            return False
        message.refresh_from_db()
        # What was sent upstream: the path up to the reply's user message (its branch only),
        # without the oldest messages left out to fit the context window.
        earlier = message_path(conversation=message.conversation, leaf_id=message.parent_id or 0)
        if message.context_dropped_through is not None:
            earlier = earlier.filter(pk__gt=message.context_dropped_through)
        system = message.conversation.system_prompt
        prompt: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        prompt += [{"role": role, "content": content} for role, content in earlier.values_list("role", "content")]
        model = LLMModel.objects.filter(name=message.model_name).first()
        tokenizer = (
            tokenizer_for(setting=model.tokenizer, model_name=model.upstream_model)
            if model is not None
            else ESTIMATE_TOKENIZER
        )
        prompt_tokens = tokenizer.count_prompt(prompt)
        completion_tokens = tokenizer.count_text(message.content)
        Message.objects.filter(pk=message.pk).update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        context = usage_context(
            request_id=conversation_reply_id(message.pk),
            source=UsageRecord.Source.CONVERSATION,
            user_id=message.conversation.owner_id,
            api_key_id=None,  # not recorded on the message: billed to the user
            model=model,
            model_name=message.model_name,
            message_id=message.pk,
            # Counted where the conversation lives (its organization's budgets, its usage listing).
            organization_id=message.conversation.organization_id,
        )
        transaction.on_commit(
            lambda: usage_account(
                context=context,
                finish_status=Message.Status.FAILED.value,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                token_source=tokenizer.source,
                produced_output=bool(message.content),
            )
        )
    return True


def reply_recover_orphans(*, orphan_after_seconds: float | None = None) -> int:
    """Recover every orphaned reply: ``streaming``, its process dead, not checkpointed lately.

    An orphan: its ``stream_owner`` has no heartbeat (``chatbackend.liveness``) and its last
    checkpoint (or its start) is older than ``orphan_after_seconds`` (default
    ``settings.REPLY_ORPHAN_AFTER_SECONDS``), so a slow reply of a live process is never taken for
    one. Returns how many were recovered (``reply_recover``). Raises what the cache raises when
    Redis is unreachable: a process's death cannot be told then.
    """
    wait = settings.REPLY_ORPHAN_AFTER_SECONDS if orphan_after_seconds is None else orphan_after_seconds
    quiet_since = timezone.now() - dt.timedelta(seconds=wait)
    streaming = Message.objects.filter(status=Message.Status.STREAMING, role=Message.Role.ASSISTANT)
    candidates = streaming.filter(
        Q(checkpointed_at__lt=quiet_since) | Q(checkpointed_at__isnull=True, created_at__lt=quiet_since)
    ).select_related("conversation")
    alive: dict[str, bool] = {}
    recovered = 0
    for message in candidates:
        owner = message.stream_owner
        if owner not in alive:
            alive[owner] = bool(owner) and process_alive(owner)
        if not alive[owner] and reply_recover(message=message):
            recovered += 1
    return recovered


def reply_stop(*, actor: Principal, conversation_id: int, message_id: int) -> None:
    """Ask the process streaming reply ``message_id`` to stop it, wherever that process runs.

    Raises ``NotFoundError`` (404) when the conversation is not visible to ``actor`` or
    ``message_id`` is not one of its assistant messages still ``streaming``; ``ApplicationError``
    403 when ``actor`` is not its owner (``conversation_get_for``), 503 when the stop request cannot
    be sent. Returns once it is sent: the reply ends ``cancelled`` shortly after, with its text so far.
    """
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id, to_change=True)
    streaming = conversation.messages.filter(
        pk=message_id, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING
    )
    message = streaming.select_related("conversation").first()
    if message is None:
        raise NotFoundError("No reply with this id is streaming in this conversation.", code="reply_not_streaming")
    if message.stream_owner and not process_alive(message.stream_owner):
        reply_recover(message=message)  # nobody streams it any more: end it here
        return
    reply_stop_broadcast(reply_id=conversation_reply_id(message_id))


__all__ = [
    "message_chain",
    "MAX_MESSAGE_CHARS",
    "MAX_SYSTEM_PROMPT_CHARS",
    "MAX_TITLE_CHARS",
    "ConversationReplyPlan",
    "conversation_active_leaf_set",
    "conversation_branch_activate",
    "conversation_create",
    "conversation_delete",
    "conversations_delete",
    "conversation_organize",
    "conversation_purge",
    "conversation_restore",
    "conversation_trash",
    "conversation_deleted_error",
    "conversation_reply_id",
    "conversation_update",
    "message_append",
    "reply_checkpoint",
    "reply_edit_start",
    "reply_regenerate_start",
    "reply_finish",
    "reply_recover",
    "reply_recover_orphans",
    "reply_refused",
    "reply_start",
    "reply_stop",
]
