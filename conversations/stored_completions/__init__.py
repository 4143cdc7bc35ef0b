"""OpenAI's stored chat completions: ``store: true`` on ``POST /v1/chat/completions``, kept as conversations.

In this app, not in ``llm.openai``, because they are conversations and ``llm`` may not import this
app. The store itself is reached from ``llm`` through ``settings.OPENAI_COMPLETION_STORE``
(``services.stored_completion_save``), the way Django reaches its email or cache backends.

Modules: ``services`` (keep one, change its metadata, delete it), ``selectors`` (read them, scoped
to the caller), ``apis`` (the ``/v1/chat/completions`` list, retrieve, update, delete and
messages endpoints), ``serializers`` (validation and OpenAPI documentation), ``urls``.
"""
