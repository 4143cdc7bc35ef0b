"""An LLM simulator: a separate process that speaks OpenAI's chat-completions wire format.

It is the fake upstream for tests and the benchmark's direct-path upstream, so it follows the
wire format exactly and stays cheap per token (thousands of concurrent streams per process).
Specs: https://platform.openai.com/docs/api-reference/chat/streaming (chunk objects and SSE
framing), https://platform.openai.com/docs/api-reference/chat/create, and the OpenAPI file
/work/shared/specs/openai-openapi.yaml (``CreateChatCompletionResponse``,
``CreateChatCompletionStreamResponse``, ``ListModelsResponse``, ``ErrorResponse``).

Endpoints:

- ``POST /v1/chat/completions``: ``stream: true`` answers ``text/event-stream`` frames
  ``data: {chat.completion.chunk}\\n\\n`` in OpenAI's order: a role-only chunk (``"delta":
  {"role": "assistant", "content": "", "refusal": null}``), one chunk per word (``"delta":
  {"content": ...}``), a finish chunk (``"delta": {}``, ``finish_reason`` ``stop``, or ``length``
  when ``max_tokens`` / ``max_completion_tokens`` cut the reply), then with
  ``stream_options.include_usage`` a usage chunk (``choices: []``; every earlier chunk carries
  ``"usage": null``), then ``data: [DONE]``. The role chunk arrives with the first word, the
  finish and usage chunks and ``[DONE]`` with the last (see ``app._Simulator._stream``).
  ``stream: false`` answers one ``chat.completion`` object.
- ``GET /v1/models``: the OpenAI model list.
- ``GET /_simulator/stats``: ``requests_started``, ``requests_completed``, ``requests_failed``,
  ``requests_disconnected`` (client left before the end), ``active_streams``.

Replies are deterministic: word ``i`` of the reply is picked from a fixed word list by a CRC32 of
the last user message (see ``reply_text``). ``prompt_tokens`` is the number of words in all
messages plus 3 per message; ``completion_tokens`` the number of content chunks.

Failures on demand, chosen by the request's ``model``:

- ``sim-error-NNN`` (NNN in 400..599): status NNN with an OpenAI error body.
- ``sim-fail-midstream``: the role chunk and three word chunks, then the TCP connection is
  closed mid-body.
- ``sim-malformed-chunk``: the role chunk and one word chunk, then a ``data:`` line that is not
  JSON, then ``[DONE]``.

With ``api_key`` set, ``/v1`` requests need ``Authorization: Bearer <api_key>``; a wrong key is
echoed back *unmasked* in the 401 message (OpenAI masks it), so tests prove that clients redact it.

Modules: ``replies`` (deterministic reply text and token counts), ``wire`` (OpenAI request
parsing, bodies and SSE frames), ``app`` (the aiohttp handlers, stats and server loop).
"""

from .app import (
    MIDSTREAM_FAILURE_CHUNKS,
    SimulatorConfig,
    SimulatorStats,
    create_app,
    run_event_loop,
    run_simulator,
    serve,
)
from .replies import count_prompt_tokens, reply_text

__all__ = [
    "MIDSTREAM_FAILURE_CHUNKS",
    "SimulatorConfig",
    "SimulatorStats",
    "count_prompt_tokens",
    "create_app",
    "reply_text",
    "run_event_loop",
    "run_simulator",
    "serve",
]
