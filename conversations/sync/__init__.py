"""NextChat's sync target: its WebDAV and Upstash clients store their whole app state here.

NextChat (``/work/shared/nextchat.md``; ``app/utils/cloud/webdav.ts`` and ``upstash.ts`` in its
source) keeps chats in the browser and syncs one JSON document by GET, merge, PUT. This package
stores that document per user, keeps its versions for ``SYNC_VERSION_RETENTION_DAYS``, strips the
user's own API keys from it before anything is written, and imports its sessions and messages as
conversations (idempotent by NextChat's ids). Interfaces: ``apis`` (WebDAV at ``/dav/``, NextChat's
proxy form ``/api/webdav/...``, the Upstash REST form ``/api/upstash/...``) and ``tasks``.
"""
