"""Share links: a read-only snapshot of one branch of a conversation behind an unguessable, revocable URL.

The owner of a conversation creates a link (``POST /api/conversations/{id}/shares/``); its token
(``secrets.token_urlsafe``, 43 characters) is shown once and stored only as its SHA-256 digest, as
API keys are (``accounts.keys``). Anyone holding the link reads the snapshot, without logging in,
as an HTML page (``/share/<token>``, ``views``) or JSON (``/api/share/<token>/``, ``apis``) until
the owner revokes it or it expires. The snapshot is taken when the link is made: later messages
never appear. Interfaces: ``apis`` (REST), ``views`` (the HTML page).
"""
