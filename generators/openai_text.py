"""Text from a model server the operator already runs: any OpenAI-compatible API (vLLM,
llama.cpp's server, Ollama, or OpenAI itself), through the official ``openai`` client's
async API (``openai.AsyncOpenAI``), on the bot's event loop.

Each job is one streamed chat completion; the server batches concurrent requests itself,
so the queue's text lane awaits up to ``concurrency`` jobs at once (`Generator.concurrency`;
no thread per job: `generators.base.RemoteGenerator`) and keeps its own order, fairness,
quotas and priorities. The streamed text goes to the
member as it comes; a cancel or the job's timeout closes the stream, and the server stops
generating. Sampling options map to the names the server knows; one it does not know is
dropped, with a log line once, never an error for the member.

A server's promoted LoRA adapter (``params["adapter"]``, a version folder) is served on vLLM
as a model named from numbers only (`generators.lora.served_name`). The first request for
a name the server does not know loads it (``POST /v1/load_lora_adapter``, which needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` on the server and the folder visible to it at the
same path); if that fails the base model answers and the job's metadata says why. Other
servers have no adapters: the base model answers, and the metadata says so.

Errors a member understands: server down, timeout or 5xx → "the text server is unavailable"
(the URL only in the log); 401 → logged as a bad API key; 400 → the server's reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import openai

from generators.base import GeneratorError, RemoteGenerator, Request, Result
from generators.lora import check_adapter, served_name
from generators.sampling import check_params

log = logging.getLogger(__name__)

UNAVAILABLE = "the text server is unavailable; try again in a moment"
#: Which optional sampling options each kind of server takes, and under which name.
FLAVOURS: dict[str, dict[str, str]] = {
    "vllm": {"top_k": "top_k", "repetition_penalty": "repetition_penalty"},
    "llama.cpp": {"top_k": "top_k", "repetition_penalty": "repeat_penalty"},
    "ollama": {},
    "openai": {},
}
#: What ``GET /v1/models`` says a model is ``owned_by`` on each kind of server.
OWNERS = {"vllm": "vllm", "llamacpp": "llama.cpp", "library": "ollama", "ollama": "ollama"}
STREAM_EVERY_S = 0.25  # partial text at most this often: the bot throttles its edits further


class OpenAITextGenerator(RemoteGenerator):
    """See the module docstring. ``model`` None: the first model the server lists."""

    kind = "text"
    max_batch_size = 1

    def __init__(self, base_url: str, api_key: str | None, model: str | None = None, *,
                 system_prompt: str = "You are a helpful assistant.", max_new_tokens: int = 256,
                 max_prompt_chars: int = 4000, concurrency: int = 32, timeout_s: float = 60.0,
                 flavour: str = "auto", extra_body: dict[str, Any] | None = None) -> None:
        """``extra_body``: fields of the server's own sent with every request (benchmarks send
        vLLM's ``ignore_eos``, so every answer is exactly ``max_tokens`` long)."""
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or "none"  # vLLM and llama.cpp take any key when none is configured
        self.model_name = model
        self.system_prompt = system_prompt
        self.max_new_tokens_limit = max_new_tokens
        self.max_prompt_chars = max_prompt_chars
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.flavour = flavour
        self.extra_body = dict(extra_body or {})
        self.client: openai.AsyncOpenAI | None = None
        #: The model's context length when the server says (vLLM's ``max_model_len``).
        self.context_tokens: int | None = None
        self._connecting = asyncio.Lock()
        self._dropped: set[str] = set()  # options already logged as unsupported

    # --- lifecycle ------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect, and learn the model, its context length and the kind of server."""
        async with self._connecting:
            if self.client is not None:
                return
            client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s,
                                        max_retries=1)
            try:
                models = (await client.models.list()).data
            except openai.AuthenticationError:
                await client.close()
                log.error("the text server at %s refused the API key (AIGC_OPENAI_API_KEY)", self.base_url)
                raise GeneratorError("the text server refused the bot's API key; the operator must fix it") from None
            except (openai.APIConnectionError, openai.APIStatusError) as exc:
                await client.close()
                log.error("the text server at %s cannot be reached: %s", self.base_url, exc)
                raise GeneratorError(UNAVAILABLE) from None
            listed = next((m for m in models if m.id == self.model_name), models[0] if models else None)
            if listed is None:
                await client.close()
                raise GeneratorError("the text server serves no model")
            if self.model_name is None:
                self.model_name = listed.id
            if self.flavour == "auto":
                self.flavour = OWNERS.get(str(getattr(listed, "owned_by", "")), "openai")
            length = getattr(listed, "max_model_len", None)
            self.context_tokens = length if isinstance(length, int) and length > 0 else None
            log.info("text server %s: model %s (%s)", self.base_url, self.model_name, self.flavour)
            self.client = client

    async def close(self) -> None:
        async with self._connecting:
            if self.client is not None:
                await self.client.close()
            self.client = None

    # --- requests -------------------------------------------------------------------------
    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        adapter = params.get("adapter")
        checked = check_params(prompt, {k: v for k, v in params.items() if k != "adapter"},
                               max_prompt_chars=self.max_prompt_chars, max_new_tokens=self.max_new_tokens_limit)
        if adapter:
            checked["adapter"] = check_adapter(str(adapter))
        return checked

    async def agenerate(self, request: Request) -> Result:
        await self.connect()
        params = request.params
        messages = [{"role": "system", "content": params.get("system_prompt") or self.system_prompt},
                    *params.get("history", []), {"role": "user", "content": request.prompt}]
        metadata: dict[str, Any] = {"backend": "openai", "server": self.flavour}
        model = self._model_for(params.get("adapter"), metadata)
        arguments = self._sampling(params)
        try:
            try:
                return await self._stream(request, model, messages, arguments, metadata)
            except openai.NotFoundError:
                if model == self.model_name:
                    raise
                # The adapter is not loaded on the server (a restart, another replica): load it once.
                if not await self._load_adapter(model, str(params["adapter"]), metadata):
                    model = str(self.model_name)
                return await self._stream(request, model, messages, arguments, metadata)
        except openai.AuthenticationError:
            log.error("the text server at %s refused the API key (AIGC_OPENAI_API_KEY)", self.base_url)
            raise GeneratorError("the text server refused the bot's API key; the operator must fix it") from None
        except openai.BadRequestError as exc:
            raise GeneratorError(f"the text server refused the request: {_reason(exc)}") from None
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
                openai.APIStatusError) as exc:
            log.warning("text server %s: %s", self.base_url, exc)
            raise GeneratorError(UNAVAILABLE) from None

    async def _stream(self, request: Request, model: str, messages: list[dict[str, Any]],
                      arguments: dict[str, Any], metadata: dict[str, Any]) -> Result:
        """One streamed completion. A cancel (or the job's timeout) stops it at once, even while
        the server has sent nothing yet (a long prompt): the task reading the stream is
        cancelled, which closes the connection, and that is how the server hears it."""
        assert self.client is not None
        client = self.client
        answer = _Answer()

        async def read() -> None:
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
                **arguments)
            shown_at = 0.0
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        answer.tokens = chunk.usage.completion_tokens or answer.tokens
                    for choice in chunk.choices:
                        answer.text += choice.delta.content or ""
                        answer.finish = choice.finish_reason or answer.finish
                    now = time.monotonic()
                    if now - shown_at >= STREAM_EVERY_S and answer.text:
                        shown_at = now
                        request.on_partial(answer.text)

        if not request.cancelled():  # cancelled while connecting: never ask the server
            reading = asyncio.create_task(read())
            loop = asyncio.get_running_loop()
            forget = request.when_cancelled(lambda: loop.call_soon_threadsafe(reading.cancel))
            try:
                await reading  # the server's error, if any, is raised here
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the job's own task is stopping (the bot shutting down): pass it on
            finally:
                forget()
        used = {**metadata, "tokens": answer.tokens}
        if request.cancelled():
            return Result(text=answer.text, metadata=used, cancelled=True)
        return Result(text=answer.text, metadata={**used, "model": model, "finish_reason": answer.finish})

    def _sampling(self, params: dict[str, Any]) -> dict[str, Any]:
        """The job's sampling options under the server's names; the rest dropped (logged once)."""
        arguments: dict[str, Any] = {"max_tokens": params["max_new_tokens"], "temperature": params["temperature"],
                                     "top_p": params["top_p"]}
        if params.get("seed") is not None:
            arguments["seed"] = params["seed"]
        known = FLAVOURS.get(self.flavour, {})
        extra = dict(self.extra_body)
        for option in ("top_k", "repetition_penalty"):
            if option in known:
                extra[known[option]] = params[option]
            elif option not in self._dropped:
                self._dropped.add(option)
                log.info("the %s text server takes no %s: it is left out of its requests", self.flavour, option)
        if extra:
            arguments["extra_body"] = extra
        return arguments

    # --- adapters -------------------------------------------------------------------------
    def _model_for(self, adapter: str | None, metadata: dict[str, Any]) -> str:
        """The served name of a server's adapter, or the base model (and why, in metadata)."""
        if not adapter:
            return str(self.model_name)
        name = served_name(adapter)
        if self.flavour != "vllm" or name is None:
            metadata["adapter"] = f"not served by this {self.flavour} server: the base model answered"
            return str(self.model_name)
        metadata["adapter"] = name
        return name

    async def _load_adapter(self, name: str, folder: str, metadata: dict[str, Any]) -> bool:
        """Ask vLLM to load an adapter folder under ``name``; False (and why) if it cannot."""
        assert self.client is not None
        try:
            await self.client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": folder},
                                   cast_to=str)
        except openai.APIStatusError as exc:
            log.warning("text server %s cannot load adapter %s from %s: %s", self.base_url, name, folder, exc)
            metadata["adapter"] = f"{name} could not be loaded on the text server: the base model answered"
            return False
        log.info("text server %s: loaded adapter %s", self.base_url, name)
        return True


@dataclass
class _Answer:
    """A streamed answer so far."""

    text: str = ""
    tokens: int = 0
    finish: str | None = None


def _reason(exc: openai.APIStatusError) -> str:
    """The server's own words for a refused request (its ``message``), shortened."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or exc.message)[:300]
