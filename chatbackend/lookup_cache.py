"""Lookups cached in each process, dropped in every process as soon as what they read changes.

Per request, ``/v1`` read the caller's API key and the model with its provider from the database,
in a worker-thread hop: ~16 % of the time the GIL was held at 50 streams (FIELD-NOTES, "Measured
on main"). A ``LookupCache`` keeps such results in the process, in a bounded
``cachetools.TTLCache``, so that a hit costs a dict lookup on the event loop: no hop, no query.

Invalidation, in every process:

- A change. ``invalidate_on(Model)`` connects ``post_save``/``post_delete`` of ``Model``: a save or
  delete clears the cache in this process at once, and again when its transaction commits (a
  lookup racing the transaction may have read the old row meanwhile); at that commit it
  broadcasts ``{"type": "lookup_cache.clear", "cache": name}`` (``chatbackend.broadcast``), on
  which every process clears its copy. A change clears the whole cache, not one entry: changes
  are rare (a revocation, an admin edit), a user's change concerns all of its keys, and a whole
  clear cannot miss an entry. Changes that bypass model signals (``QuerySet.update``, raw SQL)
  are not seen: write what a cache reads through ``save()`` / ``delete()``.
- A fill. A value read from the database may be stored only by a process that receives
  broadcasts (it joined the group before it read, so an invalidation sent after the read reaches
  it), and only if no clear happened since the read began: take a ticket before reading
  (``await fill_ticket_async()`` on the event loop, ``fill_ticket()`` in a worker thread), then
  ``put(key, value, ticket)``, which refuses the value when a clear came in between (a generation
  counter). A revocation that lands while a lookup is in flight therefore never leaves the
  pre-revocation result in the cache.
- A lost channel layer. A listener that could not receive for a while dispatches
  ``broadcast.RESYNC`` when it receives again, and every cache clears: it may have missed a clear.

Bounds: entries expire ``LOOKUP_CACHE_SECONDS`` after they were stored. That is the bound on
staleness when the channel layer is unreachable (another process's change cannot reach this one
until then) and when a change bypasses model signals. ``LOOKUP_CACHE_SECONDS=0`` disables caching.
With the embedded defaults (``InMemoryChannelLayer``), invalidation covers the one process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterable
from typing import Any, Generic, TypeVar

from cachetools import TTLCache
from django.conf import settings
from django.db import connections, models, transaction
from django.db.models.signals import post_delete, post_save

from chatbackend import broadcast

logger = logging.getLogger(__name__)

CLEAR_MESSAGE_TYPE = "lookup_cache.clear"

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LookupCache(Generic[K, V]):
    """A bounded, expiring cache of ``V`` by ``K`` in this process, cleared in every process on change.

    ``name``: unique; the broadcast clear message names it. ``maxsize``: most entries kept (when
    full, ``TTLCache`` drops expired entries, then the least recently used). Create at import
    time (it registers its broadcast handlers). Thread-safe: the event
    loop reads, worker threads and signal handlers store and clear. Values are shared between
    requests: store immutable ones, or treat them as read-only.
    """

    def __init__(self, name: str, *, maxsize: int) -> None:
        self.name = name
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._generation = 0  # bumped by every clear; a fill stores only under the same generation
        self._entries: TTLCache[K, V] = self._new_entries()
        broadcast.on_broadcast(CLEAR_MESSAGE_TYPE, self._on_clear_message)
        broadcast.on_broadcast(broadcast.RESYNC, self._on_clear_message)

    def _new_entries(self) -> TTLCache[K, V]:
        # ``settings`` read at each clear, so a test's override applies from the next clear on.
        return TTLCache(maxsize=self.maxsize, ttl=max(float(settings.LOOKUP_CACHE_SECONDS), 1e-9))

    @property
    def enabled(self) -> bool:
        """Return False when ``LOOKUP_CACHE_SECONDS`` is 0: nothing is stored."""
        return settings.LOOKUP_CACHE_SECONDS > 0

    def get(self, key: K) -> V | None:
        """Return the value stored for ``key`` and not expired, or None. Cheap: any thread, the event loop."""
        with self._lock:
            return self._entries.get(key)

    def fill_ticket(self) -> int | None:
        """Return a ticket for ``put`` before reading the value, or None (then ``put`` stores nothing).

        Sync, any thread: None unless a listener of this process has joined the broadcast group
        (``broadcast.listening``). Take it *before* the read.
        """
        if not self.enabled or not broadcast.listening():
            return None
        return self._generation

    async def fill_ticket_async(self) -> int | None:
        """``fill_ticket`` on the event loop: joins the broadcast group first (``broadcast.listen``)."""
        if not self.enabled or not await broadcast.listen():
            return None
        return self._generation

    def put(self, key: K, value: V, ticket: int | None) -> bool:
        """Store ``value`` for ``key`` unless ``ticket`` is None or a clear happened since it was taken.

        Returns whether it was stored.
        """
        if ticket is None:
            return False
        with self._lock:
            if ticket != self._generation:
                return False
            self._entries[key] = value
            return True

    def clear(self) -> None:
        """Drop every entry in this process, and refuse the fills already in flight."""
        with self._lock:
            self._generation += 1
            self._entries = self._new_entries()  # O(1); TTLCache.clear() pops entry by entry

    def invalidate(self) -> None:
        """Clear this cache in this process now and in every process (a broadcast). Sync.

        A broadcast that fails (channel layer unreachable) is logged, not raised: the change is
        made; other processes then hold the old value until it expires (``LOOKUP_CACHE_SECONDS``).
        """
        self.clear()
        try:
            broadcast.broadcast_sync({"type": CLEAR_MESSAGE_TYPE, "cache": self.name})
        except Exception:
            logger.warning(
                "could not broadcast the clear of lookup cache %s; other processes may use the old "
                "value for up to LOOKUP_CACHE_SECONDS",
                self.name,
                exc_info=True,
            )

    def invalidate_on(self, model: type[models.Model], *, unless_only: Iterable[str] = ()) -> None:
        """Invalidate this cache whenever a ``model`` row is saved or deleted (call in ``AppConfig.ready``).

        ``unless_only``: field names whose saves alone (``save(update_fields=...)`` within them)
        change nothing this cache holds, e.g. ``last_login`` on every login.
        """
        ignored = frozenset(unless_only)

        def changed(sender: type[models.Model], *, using: str = "default", **kwargs: Any) -> None:
            update_fields = kwargs.get("update_fields")
            if ignored and update_fields and ignored.issuperset(update_fields):
                return
            self._invalidate_at_commit(using)

        uid = f"lookup_cache:{self.name}:{model._meta.label}"
        post_save.connect(changed, sender=model, weak=False, dispatch_uid=uid)
        post_delete.connect(changed, sender=model, weak=False, dispatch_uid=uid)

    def _invalidate_at_commit(self, using: str) -> None:
        self.clear()  # now: this process stops serving the old value at once
        connection = connections[using]
        callback = self.invalidate
        # One broadcast per transaction however many rows it changes (a user deleted with its
        # keys); Django drops a callback registered in a savepoint that rolls back.
        if connection.in_atomic_block and any(entry[1] == callback for entry in connection.run_on_commit):
            return
        transaction.on_commit(callback, using=using)

    def _on_clear_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == broadcast.RESYNC or message.get("cache") == self.name:
            self.clear()


__all__ = ["CLEAR_MESSAGE_TYPE", "LookupCache"]
