"""Reads for NextChat sync: the newest version of a document, and it cut into Upstash chunks."""

from __future__ import annotations

from accounts.authentication import Principal

from .models import SyncDocument, SyncDocumentVersion

# Chunks served to NextChat's Upstash client, in UTF-8 bytes: its own upload size
# (``chunks`` in ``app/utils/format.ts``), under Upstash's 1 MB request limit.
CHUNK_BYTES = 1_000_000


def sync_document_exists(*, principal: Principal, protocol: str, name: str) -> bool:
    """Return whether ``principal``'s document ``protocol``/``name`` exists in the organization it acts in."""
    return SyncDocument.objects.filter(
        organization=principal.organization, owner=principal.user, protocol=protocol, name=name
    ).exists()


def sync_document_latest(*, principal: Principal, protocol: str, name: str) -> SyncDocumentVersion | None:
    """Return the newest version of ``principal``'s document ``protocol``/``name`` in the
    organization it acts in, or None when it has none (another user's or organization's: None too)."""
    return (
        SyncDocumentVersion.objects.filter(
            document__organization=principal.organization,
            document__owner=principal.user,
            document__protocol=protocol,
            document__name=name,
        )
        .order_by("-created_at", "-id")
        .first()
    )


def content_chunks(content: str, *, max_bytes: int = CHUNK_BYTES) -> list[str]:
    """Cut ``content`` into pieces of at most ``max_bytes`` UTF-8 bytes, never inside a character,
    whose concatenation is ``content`` (NextChat's Upstash ``get`` joins them with ``""``)."""
    data = content.encode("utf-8")
    pieces: list[str] = []
    start = 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # a continuation byte: step back
            end -= 1
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    return pieces
