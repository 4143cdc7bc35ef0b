"""Where a deleted stored completion stood in its owner's list, so that a page ``after`` it goes on.

``GET /v1/chat/completions?after=<id>`` asks for the completions after ``<id>``, the last one of
the previous page (https://platform.openai.com/docs/api-reference/chat/list; the openai SDK's
auto-pagination sends the last item's id). A client that deletes what it lists (a cleanup loop)
asks for the page after a completion that is gone, whose row held its position (``created_at``,
then the row id). Deleting a stored completion therefore notes that position in the default cache
(Redis, shared by every process, when ``REDIS_URL`` is set) for ``POSITION_SECONDS``, keyed by its
owner, organization and id, and the list continues from it. Past that, or when the cache lost it,
the id is unknown again (404 on ``after``). The note holds no content: the id's hash and two numbers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Iterable
from typing import NamedTuple

from django.core.cache import cache

logger = logging.getLogger(__name__)

# A paginating client asks for its next page within seconds; a day covers a slow one, and a
# cleanup script run again the next day starts over from the first page.
POSITION_SECONDS = 24 * 3600


class ListPosition(NamedTuple):
    """Where a completion stands in a list ordered by ``created_at``, then the conversation's id."""

    created_at: dt.datetime
    pk: int


class DeletedCompletion(NamedTuple):
    """A stored completion being deleted: whose it was, its ``chatcmpl-...`` id and its position."""

    owner_id: int
    organization_id: int
    completion_id: str
    position: ListPosition


def _key(*, owner_id: int, organization_id: int, completion_id: str) -> str:
    # Hashed: ``after`` is any string a client sends, and a cache key must be short and plain.
    digest = hashlib.sha256(completion_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"stored-completion-position:{organization_id}:{owner_id}:{digest}"


def deleted_positions_keep(deleted: Iterable[DeletedCompletion]) -> None:
    """Note where each of ``deleted`` stood, for ``POSITION_SECONDS``. A cache error is logged, not raised:
    the deletion stands, and a page after one of them is a 404 as for an unknown id."""
    values = {
        _key(owner_id=d.owner_id, organization_id=d.organization_id, completion_id=d.completion_id): tuple(d.position)
        for d in deleted
    }
    if not values:
        return
    try:
        cache.set_many(values, timeout=POSITION_SECONDS)
    except Exception:  # the cache's own errors vary by backend (redis-py's, or none for locmem)
        logger.warning("could not note where %d deleted stored completion(s) stood", len(values), exc_info=True)


def deleted_position(*, owner_id: int, organization_id: int, completion_id: str) -> ListPosition | None:
    """Return where ``owner_id``'s deleted stored completion ``completion_id`` in ``organization_id``
    stood, or None when none is noted (never deleted, too long ago, or the cache is unreachable)."""
    try:
        value = cache.get(_key(owner_id=owner_id, organization_id=organization_id, completion_id=completion_id))
    except Exception:
        logger.warning("could not read the list position of deleted stored completion %r", completion_id, exc_info=True)
        return None
    if value is None:
        return None
    created_at, pk = value
    return ListPosition(created_at, pk)


__all__ = ["POSITION_SECONDS", "DeletedCompletion", "ListPosition", "deleted_position", "deleted_positions_keep"]
