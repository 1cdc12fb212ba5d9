"""Text generation with a transformers causal LM: chat template, batching, streaming, seeds.

Every request in a batch keeps its own sampling settings, seed, token limit, stream and
cancel flag: sampling is done per row by `_RowSampler` (its own `torch.Generator`), and
`_RowMonitor` stops each row on its own (end of text, its token limit, or cancel) and
streams its partial text. So any text jobs for the same model can share forward passes,
and a seeded request gives the same text whatever else it is batched with (up to
floating-point differences of padding).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from generators import quantization
from generators.base import Generator, GeneratorError, Request, Result
from generators.model_source import ModelSource, resolve_text_model
from generators.sampling import DEFAULTS, check_params

log = logging.getLogger(__name__)

FULL_PRECISION: dict[str, Any] = {"dtype": torch.float32}
STREAM_EVERY = 2  # tokens between partial-text callbacks; the bot throttles edits further


class TextGenerator(Generator):
    """A chat model. ``model`` is 'smollm2', a Hugging Face id or a local folder."""

    kind = "text"

    def __init__(
        self,
        model: str = "smollm2",
        *,
        quantization_mode: str = "auto",
        device: str = "auto",
        system_prompt: str = "You are a helpful assistant.",
        max_new_tokens: int = 256,
        max_prompt_chars: int = 4000,
        max_batch_size: int = 8,
        cache_dir: Path | None = None,
    ) -> None:
        self.model_name = model
        self.requested_mode = quantization_mode
        self.requested_device = device
        self.system_prompt = system_prompt
        self.max_new_tokens_limit = max_new_tokens
        self.max_prompt_chars = max_prompt_chars
        self.max_batch_size = max_batch_size
        self.cache_dir = cache_dir
        self.source: ModelSource | None = None
        self.model: Any = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.device = "cpu"
        self.mode = "none"
        self.eos_ids: list[int] = []

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
        model = quantization.apply_after_load(model, self.mode, self.device)
        model.eval()
        tokenizer.padding_side = "left"  # decoder-only: new tokens line up on the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(tokenizer, "chat_template", None) is None:
            log.warning("model %s has no chat template; prompts are sent as plain text", self.model_name)
        self.tokenizer = tokenizer
        self.model = model
        # Once per load: it reads the whole vocabulary (~50k entries, GIL held), too slow per batch.
        self.eos_ids = _eos_ids(tokenizer, model)
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
        if self.model is None or self.tokenizer is None:
            self.load()
        assert self.model is not None and self.tokenizer is not None
        tokenizer = self.tokenizer
        prompts = [self.format_prompt(r) for r in requests]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = encoded.to(self.model.device)
        input_len = encoded["input_ids"].shape[1]
        eos_ids = self.eos_ids
        monitor = _RowMonitor(requests, input_len, tokenizer, eos_ids)
        config = GenerationConfig(
            max_new_tokens=max(r.params.get("max_new_tokens", 64) for r in requests),
            do_sample=False,  # _RowSampler has already picked the token; argmax keeps it
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
        )
        with torch.inference_mode():
            output = self.model.generate(
                **encoded,
                generation_config=config,
                logits_processor=LogitsProcessorList([_RowSampler(requests)]),
                stopping_criteria=StoppingCriteriaList([monitor]),
            )
        results = []
        for row, request in enumerate(requests):
            tokens = output[row, input_len: input_len + monitor.lengths[row]].tolist()
            tokens = [t for t in tokens if t not in eos_ids]
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(Result(
                text=text,
                cancelled=monitor.reasons[row] == "cancelled",
                metadata={"tokens": len(tokens), "stop": monitor.reasons[row] or "length",
                          "model": self.model_name, "mode": self.mode, "seed": request.params.get("seed"),
                          "batch_size": len(requests)},
            ))
        return results


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


@dataclass
class _SamplingRow:
    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    generator: torch.Generator | None


class _RowSampler(LogitsProcessor):
    """Samples each row with its own settings and seed, then returns scores where only the
    chosen token is finite, so generate()'s greedy step keeps exactly that token."""

    def __init__(self, requests: list[Request]) -> None:
        self.rows = []
        for request in requests:
            p = request.params
            seed = p.get("seed")
            generator = None
            if p.get("temperature", DEFAULTS["temperature"]) > 0:
                generator = torch.Generator()
                generator.manual_seed(seed if seed is not None else torch.seed())
            self.rows.append(_SamplingRow(
                greedy=p.get("temperature", DEFAULTS["temperature"]) == 0,
                temperature=p.get("temperature", DEFAULTS["temperature"]),
                top_p=p.get("top_p", DEFAULTS["top_p"]),
                top_k=p.get("top_k", DEFAULTS["top_k"]),
                repetition_penalty=p.get("repetition_penalty", DEFAULTS["repetition_penalty"]),
                generator=generator,
            ))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = torch.empty(scores.shape[0], dtype=torch.long)
        for i, row in enumerate(self.rows):
            logits = scores[i].float()
            if row.repetition_penalty != 1.0:
                seen = input_ids[i].unique()
                values = logits[seen]
                logits[seen] = torch.where(values > 0, values / row.repetition_penalty,
                                           values * row.repetition_penalty)
            if row.greedy:
                chosen[i] = int(torch.argmax(logits))
                continue
            logits = logits / row.temperature
            if 0 < row.top_k < logits.shape[-1]:
                kth = torch.topk(logits, row.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            if row.top_p < 1.0:
                ordered, order = torch.sort(logits, descending=True)
                cumulative = ordered.softmax(-1).cumsum(-1)
                drop = cumulative - ordered.softmax(-1) > row.top_p  # keep the token that crosses
                logits[order[drop]] = -math.inf
            probs = logits.softmax(-1)
            chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        out = torch.full_like(scores, -math.inf)
        out[torch.arange(scores.shape[0]), chosen.to(scores.device)] = 0.0
        return out


class _RowMonitor(StoppingCriteria):
    """Stops each row on its own and streams its partial text through its callback.

    Text is decoded incrementally (a small window of tokens, as vLLM does), so streaming
    costs the same at token 2,000 as at token 2, and a character split across tokens is
    only shown once complete.
    """

    def __init__(self, requests: list[Request], input_len: int, tokenizer: PreTrainedTokenizerBase,
                 eos_ids: list[int]) -> None:
        self.requests = requests
        self.input_len = input_len
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.lengths = [0] * len(requests)
        self.reasons: list[str | None] = [None] * len(requests)
        self.texts = [""] * len(requests)
        self.offsets = [(0, 0)] * len(requests)  # (prefix offset, read offset) per row

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, request in enumerate(self.requests):
            if self.reasons[row] is not None:
                done[row] = True
                continue
            last = int(input_ids[row, -1])
            if last in self.eos_ids:
                self.reasons[row] = "end"
            else:
                self.lengths[row] += 1
                if request.cancelled():
                    self.reasons[row] = "cancelled"
                elif self.lengths[row] >= request.params.get("max_new_tokens", 64):
                    self.reasons[row] = "length"
            if self.reasons[row] is not None or self.lengths[row] % STREAM_EVERY == 0:
                tokens = input_ids[row, self.input_len: self.input_len + self.lengths[row]].tolist()
                if self._advance(row, tokens):
                    request.on_partial(self.texts[row])
            done[row] = self.reasons[row] is not None
        return done

    def _advance(self, row: int, tokens: list[int]) -> bool:
        prefix, read = self.offsets[row]
        decode = self.tokenizer.decode
        before = decode(tokens[prefix:read], skip_special_tokens=True)
        after = decode(tokens[prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        self.texts[row] += after[len(before):]
        self.offsets[row] = (read, len(tokens))
        return True
