"""Conversation templates ("masks" in NextChat): a system prompt, a model, parameters and starter
messages that a conversation starts from; private, or shared with a team or the organization.

Modules: ``models`` (``ConversationTemplate``, registered with the ``conversations`` app through
``conversations.models``), ``selectors`` (what a caller sees, and may change), ``services`` (CRUD,
a conversation from a template, NextChat mask import), ``nextchat`` (NextChat's mask JSON, both
ways), ``serializers``, ``apis`` (``/api/templates/``), ``urls``.
"""
