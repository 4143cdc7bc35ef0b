"""An LLM simulator: a separate process speaking OpenAI's chat completions (also on Azure's URLs), Anthropic, Gemini.

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
  ``stream: false`` answers one ``chat.completion`` object. With ``logprobs: true`` each content
  chunk (and the whole object) carries OpenAI's ``"logprobs": {"content": [ChatCompletionTokenLogprob],
  "refusal": null}`` — deterministic numbers, ``top_logprobs`` (0..20) alternatives per token, the
  token itself first — and the role and finish chunks ``"logprobs": null``; ``top_logprobs``
  without ``logprobs: true`` is OpenAI's 400.
- ``POST /openai/deployments/{deployment}/chat/completions?api-version=...``: Azure OpenAI's
  route (``azure_wire``): the same chat completion, of the model the deployment names; without
  ``api-version`` Azure's 404, and with ``api_key`` set the key goes in an ``api-key`` header
  (Azure's 401 otherwise).
- ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` and ``:generateContent`` (and ``/v1/...``): Google
  Gemini's (``gemini_wire``, ``gemini_handlers``): SSE events that are each a whole
  ``GenerateContentResponse`` (one part per word, ``finishReason`` and the full ``usageMetadata``
  on the last; no ``[DONE]``), or one response. Model ids containing ``think`` think (thought
  parts with ``thinkingConfig.includeThoughts``, ``thoughtsTokenCount`` always); declared
  ``tools`` get a ``functionCall`` until the last turn is a ``functionResponse``; a system
  instruction of 32+ words is reported as ``cachedContentTokenCount``; ``responseMimeType:
  application/json`` answers JSON (shaped by ``responseJsonSchema``); ``responseLogprobs`` adds a
  ``logprobsResult`` to each word's event (the OpenAI route's numbers, ``logprobs``
  alternatives per step), and a ``generationConfig``
  Google refuses (an unknown field, over 5 ``stopSequences``, ...) is its 400. The key, when required,
  goes in ``x-goog-api-key`` or ``?key=`` (Google's 403 without one, its 400 ``API_KEY_INVALID``
  for a wrong one); errors are Google's ``{"error": {"code", "message", "status"}}``, a 429 with a
  ``RetryInfo`` detail. Faults as below, by header or model name.
- ``POST /v1/messages``: Anthropic's Messages API (``stream`` true or false), in
  ``anthropic_wire``: SSE events ``message_start``, ``ping``, ``content_block_start`` /
  ``content_block_delta`` (``text_delta``, ``thinking_delta`` + ``signature_delta``,
  ``input_json_delta``) / ``content_block_stop``, ``message_delta`` (``stop_reason``, ``usage``),
  ``message_stop``; errors ``{"type": "error", "error": {"type", "message"}}``. It needs the
  ``anthropic-version`` header, and when ``api_key`` is set ``x-api-key`` (or a bearer token,
  which the anthropic SDK 2.x sends). Triggers: ``thinking: {"type": "enabled", ...}`` or a
  model name containing ``think`` → a thinking block first; ``tools`` (unless the last turn
  holds ``tool_result`` blocks, or ``tool_choice`` is ``none``) → a ``tool_use`` block calling
  the first tool after the text (no text when ``tool_choice`` forces a tool, and thinking with a
  forced tool is Anthropic's 400); ``output_config.format`` → the text is a JSON value of its
  schema, which must close every object with ``additionalProperties: false`` as Anthropic's does;
  ``cache_control`` anywhere or a model name containing ``cache`` → usage with
  ``cache_read_input_tokens`` (half the input) and ``cache_creation_input_tokens`` (a quarter);
  a ``stop_sequences`` entry equal to a reply word → ``stop_sequence``. Faults: the same header
  and model names as below; the error bodies are Anthropic's (429 ``rate_limit_error`` with
  ``retry-after``, 529 ``overloaded_error``, other 5xx ``api_error``).
- ``GET /v1/models``: the OpenAI model list.
- ``GET /_simulator/stats``: ``requests_started``, ``requests_completed``, ``requests_failed``,
  ``requests_disconnected`` (client left before the end), ``active_streams``, and
  ``requests_by_model`` (OpenAI chat completions received, by the model id they asked for).
- ``PUT /_simulator/faults/{model}`` (body: directives in the ``X-Simulator-Fault`` syntax below)
  makes every later request for that model id (OpenAI, Azure, Anthropic or Gemini) fail that way, until ``DELETE
  /_simulator/faults/{model}``; e.g. ``status=500``, ``status=429, retry-after=5`` or ``ttft=30``
  (a hang before the first token). The header, when a request sends one, takes precedence. For
  tests of routing: one upstream model id fails, then recovers, without touching the server's
  configuration. A body that does not parse is OpenAI's 400; success is 204.

Replies are deterministic: word ``i`` of the reply is picked from a fixed word list by a CRC32 of
the last user message (see ``reply_text``). ``prompt_tokens`` is the number of words in all
messages plus 3 per message; ``completion_tokens`` the number of content chunks.

Failures on demand, chosen per request by the header ``X-Simulator-Fault`` (so a test, or a
provider's configured extra headers, picks them): directives separated by commas or semicolons,
combinable, e.g. ``X-Simulator-Fault: ttft=2, stall=3, stall-after=4, drop-after=10``.

- ``status=NNN`` (400..599): answer status NNN before streaming, with OpenAI's error body
  (``{"error": {"message", "type", "param", "code"}}``; 429 is ``type: requests``, ``code:
  rate_limit_exceeded`` with ``Retry-After: 1`` and ``retry-after-ms: 1000``, or ``retry-after=S``
  seconds; 5xx are ``type: server_error``).
- ``drop-after=K``: the role chunk and K word chunks, then the TCP connection is closed mid-body
  (the chunked body is never terminated). ``stream: false``: the connection closes unanswered.
- ``malformed-line`` or ``malformed-line=K``: after 1 (or K) word chunks a ``data:`` line that is
  not JSON, then ``[DONE]``. ``stream: false``: a 200 body that is not JSON.
- ``stall=S``: S seconds of silence after the first word chunk (``stall-after=K``: after K);
  the pace resumes after it.
- ``ttft=S``: S seconds before the first token instead of ``--ttft-ms`` (the headers go at once).

Usage reports on demand, on the same header: ``cached-tokens=K`` reports K of the prompt's tokens
(at most all of them) as read from a prompt cache (``usage.prompt_tokens_details.cached_tokens``),
``reasoning-tokens=K`` reports K reasoning tokens (``usage.completion_tokens_details.reasoning_tokens``,
also added to ``completion_tokens``, as OpenAI's reasoning models count them; no reasoning text is
streamed, as OpenAI streams none), e.g. ``X-Simulator-Fault: cached-tokens=5, reasoning-tokens=7``.

Answers other than plain text on demand (OpenAI chat completions only), on the same header:
``refusal`` — the model declines: ``wire.REFUSAL_TEXT`` streamed word by word as ``"delta":
{"refusal": ...}`` (its ``completion_tokens`` those words; ``stream: false``: ``message.refusal``
with ``content`` null), no logprobs; also the model name ``sim-refusal``. ``annotations`` — the
reply cites one source: a chunk ``"delta": {"annotations": [{"type": "url_citation", ...}]}``
before the finish chunk (``stream: false``: ``message.annotations``). Every chunk and whole object
carries ``"system_fingerprint": "fp_llm_simulator"``, as OpenAI's do.

K are whole numbers >= 0, S numbers of seconds >= 0; whichever of a drop and a malformed line
comes first ends the stream. A header that does not parse is OpenAI's 400 naming the problem.
The same failures by ``model``, for clients that cannot set headers: ``sim-error-NNN`` is
``status=NNN``, ``sim-fail-midstream`` is ``drop-after=3``, ``sim-malformed-chunk`` is
``malformed-line`` and ``sim-refusal`` is ``refusal``.

With ``api_key`` set, ``/v1`` requests need ``Authorization: Bearer <api_key>``; a wrong key is
echoed back *unmasked* in the 401 message (OpenAI masks it), so tests prove that clients redact it.

Modules: ``replies`` (deterministic reply text and token counts), ``wire`` (OpenAI request
parsing, bodies and SSE frames), ``anthropic_wire`` (the same for Anthropic, and its handler),
``anthropic_output`` (its ``output_config`` checks and the JSON values of a schema),
``azure_wire`` (Azure's auth and URL checks), ``gemini_wire`` (Gemini's requests, bodies and
events), ``gemini_handlers`` (its handlers), ``app`` (the aiohttp handlers, stats and server loop).
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
from .wire import FAULT_HEADER, Fault, parse_fault

__all__ = [
    "FAULT_HEADER",
    "MIDSTREAM_FAILURE_CHUNKS",
    "Fault",
    "SimulatorConfig",
    "SimulatorStats",
    "count_prompt_tokens",
    "create_app",
    "parse_fault",
    "reply_text",
    "run_event_loop",
    "run_simulator",
    "serve",
]
