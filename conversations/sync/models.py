"""What NextChat syncs: one document per user and name, its versions, and Upstash chunks in flight."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from encrypted_fields.fields import EncryptedTextField

from accounts.models import APIKey, Organization


class SyncDocument(models.Model):
    """NextChat's app state as one user stored it under one name, in one organization.

    ``protocol``: the client that wrote it. ``name``: WebDAV's path prefix before
    ``chatgpt-next-web/backup.json`` (``""`` for none), or Upstash's store key (NextChat's
    "username" setting, ``chatgpt-next-web`` by default). The content lives in its versions; the
    newest is the document.
    """

    class Protocol(models.TextChoices):
        WEBDAV = "webdav", "WebDAV"
        UPSTASH = "upstash", "Upstash"

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="sync_documents")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="sync_documents")
    protocol = models.CharField(max_length=16, choices=Protocol.choices)
    name = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "owner", "protocol", "name"], name="sync_document_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.protocol}:{self.name or '/'} of user {self.owner_id}"


class SyncDocumentVersion(models.Model):
    """One PUT of a document: its JSON text with the user's API keys removed, and its import.

    NextChat merges and overwrites without locking, so every version is kept for
    ``SYNC_VERSION_RETENTION_DAYS`` (the newest always). ``api_key``: the key that wrote it (the
    import uses its model restrictions). ``import_status``: ``pending`` until the Celery task
    imported its sessions (``done``, ``conversations_imported`` of them) or gave up (``failed``,
    ``import_error`` saying why) or a newer version made it moot (``skipped``).
    """

    class ImportStatus(models.TextChoices):
        PENDING = "pending", "Pending"
        DONE = "done", "Done"
        SKIPPED = "skipped", "Skipped"
        FAILED = "failed", "Failed"

    document = models.ForeignKey(SyncDocument, on_delete=models.CASCADE, related_name="versions")
    content = models.TextField()
    size_bytes = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64)
    secrets_removed = models.PositiveIntegerField(default=0)
    api_key = models.ForeignKey(APIKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    import_status = models.CharField(max_length=16, choices=ImportStatus.choices, default=ImportStatus.PENDING)
    conversations_imported = models.PositiveIntegerField(default=0)
    import_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["document", "-created_at"])]

    def __str__(self) -> str:
        return f"version {self.pk} of {self.document_id}"


class SyncUploadChunk(models.Model):
    """A chunk of an Upstash upload whose ``<name>-chunk-count`` has not arrived yet.

    NextChat sets ``<name>-chunk-0`` .. ``-chunk-<n-1>`` and then the count; only then is the
    document whole, its keys removable. Until then the raw chunk (which may hold those keys) is
    kept encrypted (Fernet, the key derived from ``SECRET_KEY`` like providers' keys), and deleted
    once assembled or after a day (``sync_prune``).
    """

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=200)
    index = models.PositiveIntegerField()
    data = EncryptedTextField()
    created_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "owner", "name", "index"], name="sync_upload_chunk_unique"),
        ]

    def __str__(self) -> str:
        return f"chunk {self.index} of {self.name}"
