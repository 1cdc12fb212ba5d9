"""Text generation with a transformers causal LM: chat template, continuous batching,
streaming, seeds.

The decode loop (`TextGenerator.serve`) is ours rather than ``model.generate``: requests join
the running batch between steps and leave it the moment they stop (end of text, their token
limit, or cancel), so a short answer is not held back by a long one and a new request does
not wait for a whole batch to finish. Every row keeps its own sampling settings, seed, token
limit, stream and cancel flag (`generators.text_batch`), so a seeded request gives the same
text whatever else it is batched with (up to floating-point differences of batch shapes, and
in ``int8-smooth`` the input scale the rows of a pass share).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from generators import quantization
from generators.base import Feed, Generator, GeneratorError, ListFeed, Request, Result
from generators.decode_attention import use_decode_attention
from generators.model_source import ModelSource, resolve_text_model
from generators.sampling import check_params
from generators.text_batch import Row, RunningBatch, StreamDecoder

log = logging.getLogger(__name__)

FULL_PRECISION: dict[str, Any] = {"dtype": torch.float32}
STREAM_EVERY_S = 0.25  # partial text at most this often per row: the bot throttles its edits further


class TextGenerator(Generator):
    """A chat model. ``model`` is 'smollm2', a Hugging Face id or a local folder."""

    kind = "text"
    continuous = True

    def __init__(
        self,
        model: str = "smollm2",
        *,
        quantization_mode: str = "auto",
        device: str = "auto",
        system_prompt: str = "You are a helpful assistant.",
        max_new_tokens: int = 256,
        max_prompt_chars: int = 4000,
        max_batch_size: int = 32,
        cache_dir: Path | None = None,
        ignore_eos: bool = False,
    ) -> None:
        """``max_batch_size``: rows decoded together (32: on a 2-core CPU a step of 32 rows
        costs about 2× a step of 8, so throughput keeps growing; bench/text_throughput.py).
        ``ignore_eos``: every request runs to its token limit (benchmarks compare equal work)."""
        self.model_name = model
        self.requested_mode = quantization_mode
        self.requested_device = device
        self.system_prompt = system_prompt
        self.max_new_tokens_limit = max_new_tokens
        self.max_prompt_chars = max_prompt_chars
        self.max_batch_size = max_batch_size
        self.cache_dir = cache_dir
        self.ignore_eos = ignore_eos
        self.source: ModelSource | None = None
        self.model: Any = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.device = "cpu"
        self.mode = "none"
        self.eos_ids: frozenset[int] = frozenset()

    # --- validation -----------------------------------------------------------------------
    def resolve(self) -> ModelSource:
        """Find the weights (cheap; raises GeneratorError for an unknown model)."""
        if self.source is None:
            self.source = resolve_text_model(self.model_name)
        return self.source

    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        checked = check_params(prompt, params, max_prompt_chars=self.max_prompt_chars,
                               max_new_tokens=self.max_new_tokens_limit)
        self.resolve()
        return checked

    def batch_key(self, request: Request) -> Hashable:
        # Sampling, seeds and limits are per row, so every request for this model fits.
        return self.model_name

    # --- lifecycle ------------------------------------------------------------------------
    def load(self) -> None:
        if self.model is not None:
            return
        source = self.resolve()
        try:
            self.device = quantization.resolve_device(self.requested_device)
            self.mode = quantization.choose_mode(self.requested_mode, self.device)
        except quantization.QuantizationError as exc:
            raise GeneratorError(str(exc)) from None
        location, gguf = self._converted(source)
        kwargs = quantization.load_kwargs(self.mode, self.device)
        loaded = None
        if gguf and source.packaged and self.cache_dir is not None:
            # The conversion is cached in full precision whatever this load's mode: later
            # loads in any mode, vLLM and the fine-tuner read it.
            loaded = self._read(location, gguf, FULL_PRECISION)
            if self._save_converted(source, *loaded):
                location, gguf = self._converted(source)
            if kwargs != FULL_PRECISION:
                loaded = None  # freed before loading again in this mode
        tokenizer, model = loaded or self._read(location, gguf, kwargs)
        model = quantization.apply_after_load(model, self.mode, self.device, tokenizer)
        use_decode_attention(model)
        model.eval()
        tokenizer.padding_side = "left"  # decoder-only: new tokens line up on the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(tokenizer, "chat_template", None) is None:
            log.warning("model %s has no chat template; prompts are sent as plain text", self.model_name)
        self.tokenizer = tokenizer
        self.model = model
        # Once per load: it reads the whole vocabulary (~50k entries, GIL held), too slow per batch.
        self.eos_ids = frozenset(_eos_ids(tokenizer, model))
        log.info("loaded text model %s on %s in mode %s (%.0f MB)", self.model_name, self.device,
                 self.mode, self.memory_bytes() / 2**20)

    def _read(self, location: str, gguf: str | None, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """(tokenizer, model) from a folder, or from a GGUF file in it (de-quantized)."""
        try:
            if gguf:
                tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf)
                model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf, **kwargs)
                _drop_gguf_marker(model)
            else:
                tokenizer = AutoTokenizer.from_pretrained(location)
                model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except (OSError, ValueError) as exc:
            raise GeneratorError(f"cannot load model {self.model_name!r}: {exc}") from None
        return tokenizer, model

    def converted_folder(self) -> Path | None:
        """The folder of safetensors the packaged GGUF was converted into (after a first load),
        which other engines (vLLM) load as is; None before that, or for a non-GGUF model."""
        folder = self._cache_folder(self.resolve())
        return folder if folder is not None and (folder / "model.safetensors").exists() else None

    def _converted(self, source: ModelSource) -> tuple[str, str | None]:
        """A GGUF is de-quantized on every load (slow); the packaged one is converted once
        into the cache folder and loaded from safetensors afterwards."""
        cached = self._cache_folder(source)
        if cached is not None and (cached / "model.safetensors").exists():
            return str(cached), None
        return source.location, source.gguf_file

    def _cache_folder(self, source: ModelSource) -> Path | None:
        if self.cache_dir is None or not source.gguf_file:
            return None
        stat = (Path(source.location) / source.gguf_file).stat()
        # "fp32": earlier versions cached whatever precision the first load used; not reused.
        return self.cache_dir / f"{Path(source.gguf_file).stem}-{stat.st_size}-{int(stat.st_mtime)}-fp32"

    def _save_converted(self, source: ModelSource, tokenizer: Any, model: Any) -> bool:
        """Write the converted model into the cache folder; whether it is there now."""
        folder = self._cache_folder(source)
        if folder is None:
            return False
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(folder)  # only a complete conversion is ever used
        except OSError as exc:
            log.warning("could not cache the converted model in %s: %s", folder, exc)
            return False
        return True

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None

    def memory_bytes(self) -> int:
        if self.model is None:
            return 0
        return int(self.model.get_memory_footprint()) + quantization.packed_bytes(self.model)

    # --- generation -----------------------------------------------------------------------
    def format_prompt(self, request: Request) -> str:
        """The exact text the model sees: system prompt, earlier turns, then this prompt."""
        assert self.tokenizer is not None
        messages = [{"role": "system", "content": request.params.get("system_prompt") or self.system_prompt}]
        messages += request.params.get("history", [])
        messages.append({"role": "user", "content": request.prompt})
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def count_tokens(self, text: str) -> int:
        assert self.tokenizer is not None
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def generate(self, requests: list[Request]) -> list[Result]:
        feed = ListFeed()
        self.serve(requests, feed)
        return [feed.results[id(r)] for r in requests]

    def serve(self, requests: list[Request], feed: Feed) -> None:
        """The decode loop. Each turn: let waiting requests join (prefill), pick every row's
        next token, finish the rows that stopped, and run one forward pass for the rest."""
        if self.model is None or self.tokenizer is None:
            self.load()
        assert self.model is not None and self.tokenizer is not None
        batch = RunningBatch(self.model, int(self.tokenizer.pad_token_id))
        streams: dict[int, StreamDecoder] = {}
        joining = list(requests)
        with torch.inference_mode():
            while True:
                free = self.max_batch_size - len(batch) - len(joining)
                if free > 0 and batch.joinable:
                    joining += feed.take(free)
                if joining:
                    rows = [Row.for_request(r, self._prompt_ids(r)) for r in joining]
                    batch.join(rows)
                    streams.update((id(row), StreamDecoder(self.tokenizer)) for row in rows)
                    joining = []
                if not batch.rows:
                    return
                tokens = batch.sample()
                keep = []
                for index, (row, token) in enumerate(zip(batch.rows, tokens, strict=True)):
                    self._append(row, token, streams[id(row)])
                    if row.reason is None:
                        keep.append(index)
                    else:
                        feed.finish(row.request, self._result(row, streams.pop(id(row))))
                batch.advance(tokens, keep)

    def _prompt_ids(self, request: Request) -> list[int]:
        assert self.tokenizer is not None
        return list(self.tokenizer(self.format_prompt(request), add_special_tokens=False).input_ids)

    def _append(self, row: Row, token: int, stream: StreamDecoder) -> None:
        """Add a row's new token; decide whether it stops; stream its text (at most every STREAM_EVERY_S)."""
        if token in self.eos_ids and not self.ignore_eos:
            row.reason = "end"
        else:
            row.tokens.append(token)
            if row.request.cancelled():
                row.reason = "cancelled"
            elif len(row.tokens) >= row.max_new_tokens:
                row.reason = "length"
        now = time.monotonic()
        if (row.reason is not None or now - stream.shown_at >= STREAM_EVERY_S) and stream.advance(row.tokens):
            stream.shown_at = now
            row.request.on_partial(stream.text)

    def _result(self, row: Row, stream: StreamDecoder) -> Result:
        assert self.tokenizer is not None
        tokens = [t for t in row.tokens if t not in self.eos_ids]
        return Result(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            cancelled=row.reason == "cancelled",
            metadata={"tokens": len(row.tokens), "stop": row.reason, "model": self.model_name, "mode": self.mode,
                      "seed": row.request.params.get("seed"), "batch_size": row.joined_with},
        )


def _drop_gguf_marker(model: Any) -> None:
    """transformers de-quantizes GGUF weights into plain tensors but still flags the model as
    quantized, which forbids saving it and casting it (.float(), .to(bf16)): drop the flag."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _eos_ids(tokenizer: PreTrainedTokenizerBase, model: Any) -> list[int]:
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(ids)
