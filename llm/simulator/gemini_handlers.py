"""The simulator's Gemini handlers: ``POST /v1beta/models/{model}:streamGenerateContent`` and ``:generateContent``.

They share the OpenAI handlers' config (pace, reply length, ``api_key``), fault injection
(``X-Simulator-Fault`` or the ``sim-...`` model names) and stats; the wire format is
``gemini_wire``'s. A fault header that does not parse is Google's 400.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from . import gemini_wire as wire

if TYPE_CHECKING:
    from .app import SimulatorConfig, SimulatorStats
    from .wire import Fault

_METHODS = ("streamGenerateContent", "generateContent")


class GeminiApi:
    """Gemini's ``models.generateContent`` and ``models.streamGenerateContent`` on the simulator.

    ``fault_for(request, model)`` returns the request's ``wire.Fault`` or OpenAI's 400 for a bad
    fault header (turned into Google's shape here).
    """

    def __init__(
        self,
        config: SimulatorConfig,
        stats: SimulatorStats,
        fault_for: Callable[[web.Request, str], Fault | web.Response],
    ) -> None:
        self.config = config
        self.stats = stats
        self._fault_for = fault_for
        self._ttft = config.ttft_ms / 1000
        self._delay = config.token_delay_ms / 1000

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """Answer ``POST /v1beta/models/{model}:{method}`` (route ``/v1beta/models/{target}``)."""
        model, _, method = request.match_info["target"].rpartition(":")
        if method not in _METHODS or not model:
            return wire.error_response(404, f"Method not found: {request.path}")
        self.stats.requests_started += 1
        denied = wire.unauthorized(request, self.config.api_key)
        parsed = denied if denied is not None else wire.parse_request(await request.read(), model)
        if isinstance(parsed, web.Response):
            self.stats.requests_failed += 1
            return parsed
        fault = self._fault_for(request, model)
        if isinstance(fault, web.Response):
            self.stats.requests_failed += 1
            message = json.loads(fault.text or "{}").get("error", {}).get("message", "Invalid fault header.")
            return wire.error_response(400, message)
        if fault.status is not None:
            self.stats.requests_failed += 1
            return wire.simulated_error(fault.status, model, retry_after=fault.retry_after)
        reply = wire.plan_reply(parsed, self.config.reply_tokens)
        if method == "streamGenerateContent":
            return await self._stream(request, reply, model, fault)
        return await self._complete(request, reply, model, fault)

    async def _complete(self, request: web.Request, reply: wire.GeminiReply, model: str, fault: Fault) -> web.Response:
        """Return the whole response after the time the stream would have taken (faults as OpenAI's route)."""
        events = len(reply.thoughts) + len(reply.text_pieces()) + (reply.function_call is not None)
        ttft = self._ttft if fault.ttft is None else fault.ttft
        try:
            await asyncio.sleep(ttft + fault.stall + self._delay * max(events - 1, 0))
        except asyncio.CancelledError:
            self.stats.requests_disconnected += 1
            raise
        if fault.cut_after is not None:
            self.stats.requests_failed += 1
            if fault.drops:
                if request.transport is not None:
                    request.transport.close()
                raise asyncio.CancelledError
            return web.Response(body=b'{"candidates": [', content_type="application/json")
        self.stats.requests_completed += 1
        return web.json_response(wire.whole_body(reply, model=model))

    async def _stream(
        self, request: web.Request, reply: wire.GeminiReply, model: str, fault: Fault
    ) -> web.StreamResponse:
        """Stream the reply's events at the configured pace: event ``i`` at ``ttft + i * delay``.

        ``fault``: ``ttft`` replaces the time to the first event, ``stall`` pauses before event
        ``stall_after``, and the stream breaks after ``cut_after`` events with a malformed line
        (then the body ends) or a dropped connection (the chunked body left unterminated).
        """
        events = wire.stream_events(reply, model=model)
        drops = fault.drops
        cut = fault.cut_after
        if cut is not None:
            events = events[:cut]
            if not drops:
                events.append(wire.MALFORMED_EVENT)
        stall_at = fault.stall_after if fault.stall > 0 and fault.stall_after < len(events) else -1
        loop = asyncio.get_running_loop()
        response = web.StreamResponse(headers=wire.SSE_HEADERS)
        self.stats.active_streams += 1
        try:
            await response.prepare(request)
            due = loop.time() + (self._ttft if fault.ttft is None else fault.ttft)
            for position, event in enumerate(events):
                if position == stall_at:
                    await asyncio.sleep(fault.stall)
                    due = loop.time()
                await asyncio.sleep(max(due - loop.time(), 0))
                due += self._delay
                await response.write(event)
            if drops:
                self.stats.requests_failed += 1
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            if cut is not None:
                self.stats.requests_failed += 1
            else:
                self.stats.requests_completed += 1
        except asyncio.CancelledError:
            self.stats.requests_disconnected += 1
            raise
        except ConnectionResetError:
            self.stats.requests_disconnected += 1
        finally:
            self.stats.active_streams -= 1
        return response


__all__ = ["GeminiApi"]
