"""A small OpenAI-compatible server on loopback whose failures a test controls.

It speaks the wire protocol the bot's `generators.openai_text` uses (``GET /v1/models``,
streamed ``POST /v1/chat/completions`` as server-sent events, ``POST /v1/load_lora_adapter``)
and records every request. Tests make it refuse the key (401), refuse a request (400),
fail (500), answer slowly, or serve adapters only once they are loaded. The real thing,
vLLM, is used by `tests/test_vllm.py`; this one is for the failures vLLM won't stage.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class FakeOpenAI:
    owned_by: str = "vllm"
    model: str = "base"
    api_key: str | None = None
    fail_status: int | None = None  # answer every completion with this status
    delay_s: float = 0.0  # before the first token
    token_delay_s: float = 0.0
    loadable: bool = True  # whether /load_lora_adapter succeeds
    adapters: set[str] = field(default_factory=set)
    requests: list[dict[str, Any]] = field(default_factory=list)
    open_streams: int = 0
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/v1"))

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    def _refused(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Unauthorized", "type": "auth", "code": 401}},
                                     status=401)
        return None

    async def _models(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": self.owned_by, "max_model_len": 1024}]})

    async def _load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"load": body})
        if not self.loadable:
            return web.json_response({"error": {"message": "cannot read the adapter", "code": 400}}, status=400)
        self.adapters.add(body["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await request.json()
        self.requests.append(body)
        if self.fail_status is not None:
            return web.json_response({"error": {"message": "the engine broke", "code": self.fail_status}},
                                     status=self.fail_status)
        if body.get("max_tokens", 1) > 1000:
            return web.json_response({"error": {"message": "max_tokens is too large for this model",
                                                "type": "BadRequestError", "code": 400}}, status=400)
        if body["model"] != self.model and body["model"] not in self.adapters:
            return web.json_response({"error": {"message": f"The model `{body['model']}` does not exist.",
                                                "type": "NotFoundError", "code": 404}}, status=404)
        await asyncio.sleep(self.delay_s)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.open_streams += 1
        words = [f"{body['model']}:", *body["messages"][-1]["content"].split()][: body.get("max_tokens", 16)]
        try:
            for word in words:
                await asyncio.sleep(self.token_delay_s)
                await response.write(_event({"choices": [{"index": 0, "delta": {"content": word + " "},
                                                          "finish_reason": None}]}))
            await response.write(_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
            await response.write(_event({"choices": [], "usage": {"prompt_tokens": 5,
                                                                  "completion_tokens": len(words),
                                                                  "total_tokens": 5 + len(words)}}))
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client closed the stream: stop "generating"
        finally:
            self.open_streams -= 1
        return response


def _event(data: dict[str, Any]) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m", **data}
    return f"data: {json.dumps(chunk)}\n\n".encode()
