"""Export and import of conversations: our own lossless JSON (branches included) and Markdown out;
our JSON and NextChat's ``backup.json`` in.

The JSON document (``FORMAT``, ``FORMAT_VERSION``) holds whole trees: every message with its id and
its parent's, the active leaf, the conversation's title, system prompt, model and metadata.
Importing it recreates each tree with new ids (parents and the active leaf mapped). NextChat's
``backup.json`` is its app state, the document its sync sends (``conversations.sync``), and is
imported by the same code as a synced one: idempotent by NextChat's ids. Interfaces: ``apis``.
"""
