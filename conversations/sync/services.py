"""Writes for NextChat sync: store a document (keys removed, versioned), Upstash chunks, import, prune.

NextChat's document is its whole app state, ``{"chat-next-web-store": {"sessions": [...]},
"access-control": {...}, "app-config": ..., "mask-store": ..., "prompt-store": ...}``
(``app/utils/sync.ts``, ``getLocalAppState``). ``access-control`` holds the user's own API keys
(``openaiApiKey``, ``accessCode``, ``azureApiKey``, ...): they are removed before anything is
written (``document_secrets_remove``). NextChat tolerates that: its merge (``mergeWithUpdate`` ->
``merge`` in ``app/utils/merge.ts``) copies only the keys the remote state has, so a device keeps
its own keys and one without gets none.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.authentication import Principal, principal_for
from accounts.model_access import model_access_for
from accounts.models import Organization, User
from chatbackend.errors import ApplicationError
from chatbackend.parsers import JSONParseError, json_loads
from llm.models import LLMModel
from llm.selectors import llm_model_get_enabled_for, llm_model_list_for

from ..content import content_text, storable_text
from ..conversation_templates.models import ConversationTemplate
from ..conversation_templates.nextchat import mask_template_fields
from ..conversation_templates.services import templates_upsert
from ..models import Conversation, Message
from ..services import message_chain
from .models import SyncDocument, SyncDocumentVersion, SyncUploadChunk

logger = logging.getLogger(__name__)

# NextChat's store keys (``StoreKey`` in ``app/constant.ts``).
CHAT_STORE = "chat-next-web-store"
ACCESS_STORE = "access-control"
MASK_STORE = "mask-store"
APP_CONFIG = "app-config"
# Fields of ``access-control`` holding a credential: ``openaiApiKey``, ``azureApiKey``,
# ``baiduSecretKey``, ``tencentSecretId``, ``iflytekApiSecret``, ``accessCode``, ...
_SECRET_FIELD = re.compile(r"api_?key|secret|access_?code|password|token", re.IGNORECASE)
# Upstash uploads: at most this many chunks (NextChat's are about 1 MB each).
MAX_UPLOAD_CHUNKS = 10_000
# Upstash chunks never completed by a count are deleted after this long (``sync_prune``).
UPLOAD_CHUNK_MAX_AGE = dt.timedelta(days=1)
_TITLE_CHARS = 200
_EXTERNAL_ID_CHARS = 100
_MODEL_NAME_CHARS = 200


def document_too_large_error(size: int | None = None) -> ApplicationError:
    """Return the 413 ``sync_document_too_large`` for a document over ``SYNC_MAX_DOCUMENT_BYTES``."""
    limit = settings.SYNC_MAX_DOCUMENT_BYTES
    told = f" ({size} bytes)" if size is not None else ""
    return ApplicationError(
        f"The sync document{told} is larger than this server keeps ({limit} bytes, SYNC_MAX_DOCUMENT_BYTES).",
        code="sync_document_too_large",
        status=413,
    )


def document_secrets_remove(document: dict[str, Any]) -> int:
    """Delete, in place, every string field of ``document["access-control"]`` (nested objects
    included) whose name says it holds a credential; return how many were removed.

    The values are never logged nor returned.
    """
    access = document.get(ACCESS_STORE)
    return _secrets_remove(access) if isinstance(access, dict) else 0


def _secrets_remove(state: dict[str, Any]) -> int:
    removed = 0
    for name in list(state):
        value = state[name]
        if isinstance(value, dict):
            removed += _secrets_remove(value)
        elif isinstance(value, str) and _SECRET_FIELD.search(name):
            del state[name]
            removed += 1
    return removed


# In JSON text, one escape each: an escaped backslash (so that "\\ud800" is no escape of a
# surrogate), a surrogate pair (kept), or a lone surrogate (replaced). Leftmost first, like a parser.
_SURROGATE_ESCAPE = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
)


def _lone_surrogates_replaced(raw: bytes) -> bytes:
    """Return JSON text ``raw`` with each escaped lone UTF-16 surrogate (``"\\ud800"``) replaced by
    ``\\ufffd`` (U+FFFD, the replacement character); escaped pairs and everything else unchanged."""
    return _SURROGATE_ESCAPE.sub(lambda match: rb"\ufffd" if match.group(1) else match.group(0), raw)


def document_parse(raw: bytes | str) -> dict[str, Any]:
    """Return NextChat's document ``raw`` (JSON) as a dict. Raises ``ApplicationError`` 413 past
    ``SYNC_MAX_DOCUMENT_BYTES``, 400 ``invalid_sync_document`` for anything but a JSON object.

    A lone UTF-16 surrogate in a string (``"\\ud800"``: JavaScript's strings allow it, so NextChat
    writes it, e.g. an emoji cut in half) becomes U+FFFD: refusing it would refuse every later
    upload of the same state, and the user's sync would stay stuck.
    """
    size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
    if size > settings.SYNC_MAX_DOCUMENT_BYTES:
        raise document_too_large_error(size)
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    try:
        document = json_loads(data)
    except JSONParseError as exc:
        repaired = _lone_surrogates_replaced(data)
        try:
            document = json_loads(repaired) if repaired != data else None
        except JSONParseError:
            document = None
        if document is None:
            raise ApplicationError(
                f"The sync document is not JSON: {exc}", code="invalid_sync_document", param="body"
            ) from None
    if not isinstance(document, dict):
        raise ApplicationError(
            "The sync document must be a JSON object (NextChat's app state).", code="invalid_sync_document"
        )
    return document


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """The version a write made, and whether it made the document (``created``)."""

    version: SyncDocumentVersion
    created: bool


def sync_document_store(*, principal: Principal, protocol: str, name: str, raw: bytes | str) -> StoredVersion:
    """Store ``raw`` (NextChat's document, JSON) as the newest version of ``principal``'s document
    ``protocol``/``name`` in the organization it acts in, without its API keys; prune versions past
    ``SYNC_VERSION_RETENTION_DAYS``; import its sessions after the commit (``sync_import_task``).

    Raises ``ApplicationError`` 413 ``sync_document_too_large``, 400 ``invalid_sync_document``.
    """
    document = document_parse(raw)
    removed = document_secrets_remove(document)
    content = orjson.dumps(document)
    if len(content) > settings.SYNC_MAX_DOCUMENT_BYTES:
        raise document_too_large_error(len(content))
    with transaction.atomic():
        sync_document, created = SyncDocument.objects.get_or_create(
            organization=principal.organization, owner=principal.user, protocol=protocol, name=name
        )
        version = SyncDocumentVersion.objects.create(
            document=sync_document,
            content=content.decode("utf-8"),
            size_bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            secrets_removed=removed,
            api_key=principal.api_key,
        )
        SyncDocument.objects.filter(pk=sync_document.pk).update(updated_at=timezone.now())
        sync_versions_prune(document=sync_document)
        transaction.on_commit(lambda: _import_enqueue(version.pk), robust=True)
    logger.info(
        "sync document %s stored: version %s, %s bytes, %s secrets removed",
        sync_document.pk,
        version.pk,
        version.size_bytes,
        removed,
    )
    return StoredVersion(version=version, created=created)


def _import_enqueue(version_id: int) -> None:
    from .tasks import sync_import_task  # the task module imports this one

    sync_import_task.delay(version_id)


# --- Upstash: chunks, then the count ----------------------------------------------------------


def sync_upload_chunk_set(*, principal: Principal, name: str, index: int, data: str) -> None:
    """Keep chunk ``index`` of ``principal``'s Upstash upload ``name`` (encrypted) until its count arrives.

    Raises ``ApplicationError`` 400 ``invalid_chunk`` for an index past ``MAX_UPLOAD_CHUNKS``, 413
    for a chunk over ``SYNC_MAX_DOCUMENT_BYTES``.
    """
    if index >= MAX_UPLOAD_CHUNKS:
        raise ApplicationError(f"A chunk index must be below {MAX_UPLOAD_CHUNKS}.", code="invalid_chunk")
    if len(data.encode("utf-8")) > settings.SYNC_MAX_DOCUMENT_BYTES:
        raise document_too_large_error()
    SyncUploadChunk.objects.update_or_create(
        organization=principal.organization, owner=principal.user, name=name, index=index, defaults={"data": data}
    )


def sync_upload_finish(*, principal: Principal, name: str, count: int) -> StoredVersion:
    """Join chunks ``0 .. count-1`` of ``principal``'s upload ``name`` (as NextChat's ``get`` joins
    them: no separator) and store the result (``sync_document_store``); delete every chunk of it.

    Raises ``ApplicationError`` 400 ``sync_upload_incomplete`` when a chunk is missing (nothing is
    stored), and ``sync_document_store``'s errors.
    """
    if not 0 < count <= MAX_UPLOAD_CHUNKS:
        raise ApplicationError(
            f"The chunk count must be between 1 and {MAX_UPLOAD_CHUNKS}.", code="invalid_chunk_count"
        )
    chunks = SyncUploadChunk.objects.filter(organization=principal.organization, owner=principal.user, name=name)
    parts = dict(chunks.filter(index__lt=count).values_list("index", "data"))
    missing = [index for index in range(count) if index not in parts]
    if missing:
        raise ApplicationError(
            f"Chunks {missing[:10]} of '{name}' were not uploaded; set every chunk, then the count.",
            code="sync_upload_incomplete",
        )
    stored = sync_document_store(
        principal=principal,
        protocol=SyncDocument.Protocol.UPSTASH,
        name=name,
        raw="".join(parts[index] for index in range(count)),
    )
    chunks.delete()
    return stored


# --- Import: sessions become conversations ------------------------------------------------------


def sync_document_import(*, version_id: int) -> int:
    """Import the sessions of version ``version_id`` as its owner's conversations, and its masks as
    templates (``nextchat_masks_import``); return how many conversations.

    Idempotent by NextChat's ids (``Conversation.external_id`` = session id, ``Message.external_id``
    = message id): a session seen before is updated (title, model when its model resolves, changed
    messages; new messages appended) and never copied; messages absent from the document are kept
    (NextChat's merge never deletes either). Sessions without messages are skipped, as NextChat
    skips them. A version older than its document's newest is skipped (the newest is imported).
    The model: the session's ``mask.modelConfig.model`` (``app-config``'s while the mask follows the
    global settings, ``syncGlobalConfig``, as NextChat does) when the owner may use it (an enabled model
    or alias, within the key's, team's and organization's lists), else the first such model by name;
    with none at all, nothing is imported (``failed``). Imports of one document are serialized.
    """
    with transaction.atomic():
        version = SyncDocumentVersion.objects.select_related("document__organization", "document__owner").get(
            pk=version_id
        )
        document = SyncDocument.objects.select_for_update().get(pk=version.document_id)
        if document.versions.filter(created_at__gt=version.created_at).exists():
            _import_result(version, SyncDocumentVersion.ImportStatus.SKIPPED)
            return 0
        try:
            imported = _import_sessions(version, document.organization, document.owner)
        except ApplicationError as exc:
            _import_result(version, SyncDocumentVersion.ImportStatus.FAILED, error=exc.message)
            return 0
        _import_result(version, SyncDocumentVersion.ImportStatus.DONE, imported=imported)
    return imported


def _import_result(version: SyncDocumentVersion, status: str, *, imported: int = 0, error: str = "") -> None:
    version.import_status = status
    version.conversations_imported = imported
    version.import_error = error
    version.save(update_fields=["import_status", "conversations_imported", "import_error"])


def _import_sessions(version: SyncDocumentVersion, organization: Organization, owner: User) -> int:
    principal = principal_for(user=owner, api_key=version.api_key, organization=organization.slug)
    state = json_loads(version.content)
    imported = len(nextchat_sessions_import(principal=principal, state=state))
    nextchat_masks_import(principal=principal, state=state)
    return imported


def is_nextchat_state(state: Any) -> bool:
    """Return whether ``state`` is shaped as NextChat's app state (its ``backup.json``, a synced
    document): an object whose ``chat-next-web-store`` is an object."""
    return isinstance(state, dict) and isinstance(state.get(CHAT_STORE), dict)


def nextchat_sessions_import(*, principal: Principal, state: Any) -> list[Conversation]:
    """Import the sessions of NextChat's app state ``state`` (a synced document, or the
    ``backup.json`` its "export" writes: the same shape) as conversations of ``principal``'s user
    in the organization it acts in; return them, in the document's order.

    Idempotent by NextChat's ids, as ``sync_document_import`` describes (a session seen before is
    updated, never copied; one owner's imports are serialized, so concurrent ones never copy
    either). The model as there: the session's when ``principal`` may use it, else
    the first it may use by name. Null characters are left out of every text and id (PostgreSQL
    cannot store them; the sync that stored the document must not fail on them). Raises
    ``ApplicationError`` 400 when it may use no model at all
    and there is a session to import. Run it in a transaction: a failure leaves the sessions
    before it written.
    """
    store = state.get(CHAT_STORE) if isinstance(state, dict) else None
    sessions = store.get("sessions") if isinstance(store, dict) else None
    if not isinstance(sessions, list):
        return []
    sessions = [s for s in sessions if _external_id(s) and isinstance(s.get("messages"), list) and s["messages"]]
    if not sessions:
        return []
    organization, owner = principal.organization, principal.user
    _imports_serialize(owner)
    models = ModelChooser(principal)
    global_config = _global_model_config(state)
    existing = {
        c.external_id: c
        for c in Conversation.objects.filter(
            organization=organization, owner=owner, external_id__in=[_external_id(s) for s in sessions]
        )
    }
    imported: dict[str, Conversation] = {}
    for session in sessions:
        external_id = _external_id(session)
        conversation = imported.get(external_id) or existing.get(external_id)
        imported[external_id] = _import_session(session, conversation, organization, owner, models, global_config)
    return list(imported.values())


def nextchat_masks_import(*, principal: Principal, state: Any) -> list[ConversationTemplate]:
    """Import the masks of NextChat's app state ``state`` (its ``mask-store``: the masks the user made,
    NextChat's built-in ones are not in it) as private templates of ``principal``'s user in the
    organization it acts in (``conversation_templates.services.templates_upsert``); return them.

    Idempotent by the masks' ids, as the sessions are: a mask seen before updates its template, and a
    template is never deleted because its mask left the document. A mask that follows NextChat's
    global model settings (``syncGlobalConfig``) takes them (``app-config.modelConfig``), as NextChat
    does. A mask that is not valid as a template (``mask_template_fields``: no name, a wrong type) is
    skipped and logged, not an error: the sync that stored the document must not fail on it. Run it
    in a transaction.
    """
    store = state.get(MASK_STORE) if isinstance(state, dict) else None
    masks = store.get("masks") if isinstance(store, dict) else None
    if not isinstance(masks, dict) or not masks:
        return []
    global_config = _global_model_config(state)
    parsed = []
    for key, value in masks.items():
        if not isinstance(value, dict):
            continue
        mask = _effective_mask(value, global_config)
        if not mask.get("id"):  # the store's key is the mask's id (``useMaskStore.create``)
            mask = {**mask, "id": key}
        try:
            parsed.append(mask_template_fields(mask, param=f"{MASK_STORE}.masks.{key}"))
        except ApplicationError as exc:
            logger.info("NextChat mask %r is not imported as a template: %s (%s)", key[:100], exc.message, exc.param)
    if not parsed:
        return []
    _imports_serialize(principal.user)
    return templates_upsert(actor=principal, parsed=parsed)


# The first key of the transaction-level advisory lock that serializes one owner's imports
# (``_imports_serialize``); the second is the owner's id. Any constant no other lock uses.
_IMPORTS_LOCK_CLASS = 0x6E6300  # "nc": NextChat imports


def _imports_serialize(owner: User) -> None:
    """Hold, until the transaction ends, a lock of ``owner``'s own, so that one owner's NextChat
    imports (two synced documents, a sync and a ``backup.json`` import, two imports) run one after
    the other: the second reads the conversations the first committed and updates them. Without it
    both find no conversation for a session and both insert one; ``conversation_external_id_unique``
    refuses the second (no copy, but the import fails: a 500 for ``POST /api/conversations/import/``).

    PostgreSQL: a transaction-level advisory lock (``pg_advisory_xact_lock(class, id)``,
    https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS), not a lock on the
    user's row: that row is what a login updates (``last_login``), and a sign-in must not wait for a
    20 MB import to commit. Ids past 2^31 share a key with another user's (folded): at worst two
    owners' imports then wait for each other. SQLite: nothing to take; its IMMEDIATE transactions
    (settings) serialize writers whole. Raises ``TransactionManagementError`` outside a transaction.
    """
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        raise transaction.TransactionManagementError("_imports_serialize needs a transaction")
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s::integer, %s::integer)", [_IMPORTS_LOCK_CLASS, owner.pk & 0x7FFFFFFF]
            )


class ModelChooser:
    """Resolve a model name to an enabled model ``principal`` may use (``named``), else the first
    such model by name (``fallback``; ``ApplicationError`` 400 when there is none). Names are
    resolved once each."""

    def __init__(self, principal: Principal) -> None:
        self.access = model_access_for(principal=principal)
        self.resolved: dict[str, LLMModel | None] = {}
        self._fallback: LLMModel | None = None

    def named(self, name: str) -> LLMModel | None:
        if name not in self.resolved:
            try:
                self.resolved[name] = llm_model_get_enabled_for(access=self.access, name=name) if name else None
            except ApplicationError:
                self.resolved[name] = None
        return self.resolved[name]

    def fallback(self) -> LLMModel:
        if self._fallback is None:
            self._fallback = llm_model_list_for(access=self.access).order_by("name").first()
            if self._fallback is None:
                raise ApplicationError("No enabled model may be used to hold the imported conversations.")
        return self._fallback


def _external_id(item: Any) -> str:
    value = item.get("id") if isinstance(item, dict) else None
    return storable_text(str(value))[:_EXTERNAL_ID_CHARS] if isinstance(value, str | int) else ""


def _mask(session: dict[str, Any]) -> dict[str, Any]:
    mask = session.get("mask")
    return mask if isinstance(mask, dict) else {}


def _global_model_config(state: Any) -> dict[str, Any] | None:
    """NextChat's global model settings (``app-config.modelConfig``), if the document has them."""
    config = state.get(APP_CONFIG) if isinstance(state, dict) else None
    model_config = config.get("modelConfig") if isinstance(config, dict) else None
    return model_config if isinstance(model_config, dict) else None


def _effective_mask(mask: dict[str, Any], global_config: dict[str, Any] | None) -> dict[str, Any]:
    """``mask`` with the model settings NextChat uses for it: the global ones while its
    ``syncGlobalConfig`` is on (NextChat copies them into the mask when a chat opens,
    ``app/components/chat.tsx``; what the document holds may be older), else its own."""
    if mask.get("syncGlobalConfig") is True and global_config is not None:
        return {**mask, "modelConfig": global_config}
    return mask


def _session_model_name(session: dict[str, Any], global_config: dict[str, Any] | None) -> str:
    config = _effective_mask(_mask(session), global_config).get("modelConfig")
    name = config.get("model") if isinstance(config, dict) else None
    return storable_text(name) if isinstance(name, str) else ""


def _system_prompt(session: dict[str, Any]) -> str:
    """The mask's system messages (its ``context``), which NextChat sends before the chat."""
    context = _mask(session).get("context")
    if not isinstance(context, list):
        return ""
    return "\n\n".join(
        content_text(m.get("content"), separator="\n")
        for m in context
        if isinstance(m, dict) and m.get("role") == Message.Role.SYSTEM
    )


def _import_session(
    session: dict[str, Any],
    conversation: Conversation | None,
    organization: Organization,
    owner: User,
    models: ModelChooser,
    global_config: dict[str, Any] | None,
) -> Conversation:
    topic = session.get("topic")
    title = storable_text(topic if isinstance(topic, str) else "")[:_TITLE_CHARS]
    system_prompt = _system_prompt(session)
    model = models.named(_session_model_name(session, global_config))
    if conversation is None:
        conversation = Conversation.objects.create(
            organization=organization,
            owner=owner,
            external_id=_external_id(session),
            title=title,
            system_prompt=system_prompt,
            model=model or models.fallback(),
        )
    else:
        changed: dict[str, Any] = {"title": title, "system_prompt": system_prompt}
        if model is not None:
            changed["model"] = model
        fields = [name for name, value in changed.items() if getattr(conversation, name) != value]
        for name in fields:
            setattr(conversation, name, changed[name])
        if fields:
            conversation.save(update_fields=[*fields, "updated_at"])
    _import_messages(conversation, session["messages"])
    return conversation


def _import_messages(conversation: Conversation, messages: list[Any]) -> None:
    known = {m.external_id: m for m in conversation.messages.exclude(external_id="")}
    new: list[Message] = []
    changed: list[Message] = []
    seen: set[str] = set()
    ordered: list[Message] = []  # the document's messages in its order: the conversation's active path
    for item in messages:
        external_id = _external_id(item)
        role = item.get("role") if isinstance(item, dict) else None
        if not external_id or external_id in seen or role not in Message.Role.values:
            continue
        seen.add(external_id)
        content = content_text(item.get("content"), separator="\n")
        status = Message.Status.FAILED if item.get("isError") is True else Message.Status.COMPLETED
        model_name = storable_text(item["model"]) if isinstance(item.get("model"), str) else ""
        message = known.get(external_id)
        if message is None:
            message = Message(
                conversation=conversation,
                external_id=external_id,
                role=role,
                content=content,
                status=status,
                model_name=model_name[:_MODEL_NAME_CHARS],
            )
            new.append(message)
        elif (message.role, message.content, message.status) != (role, content, status):
            message.role, message.content, message.status = role, content, status
            changed.append(message)
        ordered.append(message)
    Message.objects.bulk_create(new)  # primary keys set (PostgreSQL and SQLite return them)
    Message.objects.bulk_update(changed, ["role", "content", "status"])
    message_chain(conversation=conversation, messages=ordered)  # one line per session, as in NextChat


# --- Retention ----------------------------------------------------------------------------------


def sync_versions_prune(*, document: SyncDocument | None = None, now: dt.datetime | None = None) -> int:
    """Delete the versions older than ``SYNC_VERSION_RETENTION_DAYS`` (of ``document``, or of every
    document), never a document's newest, and Upstash chunks left unfinished for a day; return how
    many versions were deleted."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(days=settings.SYNC_VERSION_RETENTION_DAYS)
    documents = SyncDocument.objects.filter(pk=document.pk) if document is not None else SyncDocument.objects.all()
    deleted = 0
    for document_id in documents.filter(versions__created_at__lt=cutoff).distinct().values_list("pk", flat=True):
        newest = SyncDocumentVersion.objects.filter(document_id=document_id).order_by("-created_at", "-id").first()
        stale = SyncDocumentVersion.objects.filter(document_id=document_id, created_at__lt=cutoff)
        if newest is not None:
            stale = stale.exclude(pk=newest.pk)
        count, _ = stale.delete()
        deleted += count
    if document is None:
        SyncUploadChunk.objects.filter(created_at__lt=now - UPLOAD_CHUNK_MAX_AGE).delete()
    return deleted
