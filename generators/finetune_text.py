"""Fine-tuning the text model on a community's approved messages: LoRA on the CPU, QLoRA on CUDA.

The recipe, in the order the code runs it:

1. The base weights: the packaged SmolLM2 as ``TextGenerator`` converts it once into the
   model cache (safetensors), loaded in fp32. Training gets its own copy: the serving
   model in the text lane is never touched. With CUDA and bitsandbytes (see
   `generators.quantization.training_mode`) the base is loaded in 4-bit NF4 on the GPU
   instead (QLoRA: computing in bf16 on Ampere and later, fp16 before), prepared with
   peft's ``prepare_model_for_kbit_training`` (frozen, norms and embeddings in fp32), and
   the optimiser is bitsandbytes' paged 8-bit AdamW. Everything else below is the same,
   and so is the adapter it saves (fp32 LoRA weights, served on the CPU or the GPU alike).
2. Packing: every message is tokenised, followed by EOS, and the stream is cut into
   fixed-length blocks (``block_size`` tokens), so no compute is spent on padding.
3. Held-out perplexity of the base model (and of the serving adapter, when there is one).
4. LoRA (rank ``lora_r``) on the attention projections, optionally only in the top
   ``top_layers`` layers (the frozen layers below then need no backward pass at all: on
   a CPU that is most of the cost). Gradient checkpointing on the trained layers only, set
   per layer: ``gradient_checkpointing_enable`` would also make the embeddings' output
   require grad (for reentrant checkpointing), and the backward pass would then run
   through every frozen layer for nothing (2-3× slower here). Micro-batches with gradient
   accumulation, so a step of ``batch_blocks`` blocks never holds more than
   ``micro_blocks`` blocks of activations. AdamW; linear warm-up then cosine decay over
   the run's progress, which is whichever is further along: steps or the time budget.
5. Stops at ``max_steps``, ``max_epochs`` or before a step that would end past
   ``max_seconds`` (the first step always runs); ``should_stop()`` is polled
   before every micro-batch and cancels the run (``Cancelled``: nothing is saved).
6. Held-out perplexity of the candidate, then the adapter is saved with
   ``save_pretrained`` into a temporary folder beside ``out_dir`` and renamed to it: the
   folder is complete or absent. A run that dies mid-way leaves no folder behind.

Whether the candidate goes live is not decided here (see ``generators.finetune_gate``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from generators.base import Cancelled, GeneratorError

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class TextTuneConfig:
    """Hyperparameters of a LoRA run; all recorded with the version."""

    # Defaults: what bench/finetune.py measured best under a few minutes of CPU (more, smaller
    # steps at a higher rate than the usual 8 × 256 blocks at 3e-4, which get ~12 steps there).
    block_size: int = 256
    batch_blocks: int = 2  # blocks per optimiser step
    micro_blocks: int = 2  # blocks per forward/backward pass (gradient accumulation)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION
    top_layers: int | None = 10  # LoRA only in the last N decoder layers; None = all
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 3
    min_lr_ratio: float = 0.1
    max_steps: int = 200
    max_epochs: float = 3.0
    max_seconds: float = 240.0
    max_eval_blocks: int = 16
    gradient_checkpointing: bool = True
    threads: int | None = None  # torch threads while training (process-wide!); None: leave as is
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 8 or self.micro_blocks < 1 or self.batch_blocks < self.micro_blocks:
            raise ValueError("need block_size >= 8 and batch_blocks >= micro_blocks >= 1")
        if self.batch_blocks % self.micro_blocks:
            raise ValueError("batch_blocks must be a multiple of micro_blocks")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": list(self.target_modules)}


@dataclass
class TextTuneResult:
    """What a run did and how the candidate scored; ``adapter_dir`` holds the saved adapter."""

    adapter_dir: Path
    steps: int
    tokens: int  # training tokens processed
    seconds: float  # the training loop only
    tokens_per_s: float
    train_loss: float  # mean of the last step
    ppl_base: float
    ppl_candidate: float
    ppl_reference: float | None  # the serving adapter's, when there was one
    eval_tokens: int
    stopped_by: str  # steps | epochs | time
    config: TextTuneConfig = field(default_factory=TextTuneConfig)

    @property
    def reference(self) -> float:
        """What the candidate must beat: the serving adapter, else the base model."""
        return self.ppl_reference if self.ppl_reference is not None else self.ppl_base

    def metrics(self) -> dict[str, Any]:
        return {
            "ppl_base": _round(self.ppl_base), "ppl_reference": _round(self.ppl_reference),
            "ppl_candidate": _round(self.ppl_candidate), "steps": self.steps, "tokens": self.tokens,
            "seconds": round(self.seconds, 2), "tokens_per_s": round(self.tokens_per_s, 1),
            "train_loss": _round(self.train_loss), "eval_tokens": self.eval_tokens, "stopped_by": self.stopped_by,
        }


# --- the base model -------------------------------------------------------------------------
def load_base(model: str = "smollm2", cache_dir: Path | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer): in 4-bit on the GPU where `training_mode` says 'qlora', else in
    fp32 on ``device``. A local folder is loaded directly, otherwise through ``TextGenerator``,
    which converts the packaged GGUF once into ``cache_dir``."""
    from generators.quantization import QuantizationError, resolve_device, training_mode

    try:
        mode, target = training_mode(device), resolve_device(device)
    except QuantizationError as exc:
        raise GeneratorError(str(exc)) from None
    if mode == "qlora":
        return _load_qlora_base(model, cache_dir)
    loaded, tokenizer = _load_fp32_base(model, cache_dir)
    return (loaded.to(target) if target != "cpu" else loaded), tokenizer


def _load_fp32_base(model: str, cache_dir: Path | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generators.text import TextGenerator

    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        generator = TextGenerator(model, quantization_mode="none", device="cpu", cache_dir=cache_dir)
        generator.load()
        loaded, tokenizer = generator.model, generator.tokenizer
        generator.unload()  # the generator lets go; we keep the only reference
    loaded.float().eval()
    return loaded, tokenizer


def _load_qlora_base(model: str, cache_dir: Path | None) -> tuple[Any, Any]:
    """The base in 4-bit NF4 on GPU 0 (bitsandbytes quantizes it while loading safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generators.quantization import qlora_load_kwargs

    location = _weights_location(model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(location)
    loaded = AutoModelForCausalLM.from_pretrained(location, **qlora_load_kwargs(torch.cuda.get_device_capability()))
    loaded.eval()
    return loaded, tokenizer


def _weights_location(model: str, cache_dir: Path | None) -> str:
    """A folder or hub id that ``from_pretrained`` quantizes on load: bitsandbytes cannot
    quantize a GGUF as it is read, so the packaged model's cached safetensors conversion."""
    from generators.text import TextGenerator

    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / "config.json").exists():
        return str(folder)
    generator = TextGenerator(model, quantization_mode="none", device="cpu", cache_dir=cache_dir)
    source = generator.resolve()
    if not source.gguf_file:
        return source.location
    converted = generator.converted_folder()
    if converted is None:
        generator.load()  # converts the GGUF once into the cache (packaged model, cache_dir set)
        generator.unload()
        converted = generator.converted_folder()
    if converted is None:
        raise GeneratorError(f"cannot fine-tune {model!r} in 4-bit: it is a GGUF file and there is no model "
                             "cache (AIGC_MODEL_CACHE) to convert it into")
    return str(converted)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _quantized(model: Any) -> bool:
    """A base loaded by bitsandbytes (QLoRA)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# --- data -----------------------------------------------------------------------------------
def pack(tokenizer: Any, texts: Sequence[str], block_size: int) -> torch.Tensor:
    """Tokenise every text, EOS after each, and cut the stream into (n, block_size) blocks.

    The ragged end is dropped; a stream shorter than one block becomes one shorter block.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GeneratorError("the tokenizer has no end-of-sequence token to separate messages")
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False).input_ids:
        stream.extend(ids)
        stream.append(eos)
    if len(stream) < 2:
        raise GeneratorError("no text to train on")
    if len(stream) < block_size:
        return torch.tensor([stream], dtype=torch.long)
    usable = len(stream) // block_size * block_size
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, block_size)


def held_out_split(keys: Sequence[str], fraction: float = 0.1, minimum: int = 2) -> tuple[list[int], list[int]]:
    """Indexes (train, held out). A key (e.g. an item's sha256) is held out when its hash falls
    below ``fraction``, so an item stays on the same side on every night's run, whatever is
    added or forgotten: a serving version was never trained on today's held-out items. Only
    when that gives fewer than ``minimum`` are the lowest hashes added to reach it."""
    import hashlib

    score = [int.from_bytes(hashlib.sha256(f"held-out:{key}".encode()).digest()[:8], "big") / 2**64
             for key in keys]
    held = {i for i, value in enumerate(score) if value < fraction}
    if len(held) < minimum:
        held |= set(sorted(range(len(keys)), key=score.__getitem__)[:minimum])
    return [i for i in range(len(keys)) if i not in held], sorted(held)


# --- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model: Any, blocks: torch.Tensor, micro_blocks: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of the blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = _device(model)
    try:
        for start in range(0, blocks.shape[0], micro_blocks):
            batch = blocks[start:start + micro_blocks].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            count += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total / max(count, 1))


# --- training -------------------------------------------------------------------------------
def tune(model: Any, train_blocks: torch.Tensor, eval_blocks: torch.Tensor, out_dir: Path | str, *,
         config: TextTuneConfig = TextTuneConfig(), reference_adapter: Path | str | None = None,
         on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
         extra: dict[str, Any] | None = None, clock: Callable[[], float] = time.monotonic) -> TextTuneResult:
    """Train a LoRA adapter on ``train_blocks`` and save it to ``out_dir`` (atomically).

    ``model`` is a plain causal LM; it is returned to the caller as it came (the LoRA
    layers are removed again, whatever happens). ``extra`` is written into the adapter
    folder's ``training.json`` along with the hyperparameters and metrics.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise GeneratorError(f"{out_dir} already exists; a version folder is written once")
    report = on_progress or (lambda fraction, note: None)
    stop = should_stop or (lambda: False)
    eval_blocks = eval_blocks[: config.max_eval_blocks]
    if train_blocks.shape[0] == 0 or eval_blocks.shape[0] == 0:
        raise GeneratorError("not enough text to train and evaluate on")

    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        report(0.0, "measuring the base model")
        ppl_base = perplexity(model, eval_blocks, config.micro_blocks)
        _check_stop(stop)
        return _tune(model, train_blocks, eval_blocks, out_dir, ppl_base, config, reference_adapter, report, stop,
                     extra, clock)
    finally:
        torch.set_num_threads(threads)


def _tune(model: Any, train_blocks: torch.Tensor, eval_blocks: torch.Tensor, out_dir: Path, ppl_base: float,
          config: TextTuneConfig, reference_adapter: Path | str | None, report: ProgressFn, stop: StopFn,
          extra: dict[str, Any] | None, clock: Callable[[], float]) -> TextTuneResult:
    from peft import LoraConfig, get_peft_model

    layers = _decoder_layers(model)
    top = min(config.top_layers or len(layers), len(layers))
    trained = list(range(len(layers) - top, len(layers))) if top < len(layers) else None
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules), task_type="CAUSAL_LM", layers_to_transform=trained,
    )
    torch.manual_seed(config.seed)
    use_cache = getattr(model.config, "use_cache", None)
    quantized = _quantized(model)
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Freezes the base and keeps norms and embeddings in fp32. Checkpointing stays ours
        # (below, trained layers only): peft's would run backward through every frozen layer.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, lora)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    try:
        if config.gradient_checkpointing:
            model.config.use_cache = False
            _checkpoint_layers([layers[i] for i in (trained or range(len(layers)))], True)
        stats = _train(peft_model, train_blocks, config, report, stop, clock, paged_8bit=quantized)
        report(0.92, "measuring the candidate")
        ppl_candidate = perplexity(peft_model, eval_blocks, config.micro_blocks)
        ppl_reference = None
        if reference_adapter is not None:
            report(0.96, "measuring the serving adapter")
            peft_model.load_adapter(str(reference_adapter), adapter_name="reference")
            peft_model.set_adapter("reference")
            ppl_reference = perplexity(peft_model, eval_blocks, config.micro_blocks)
            peft_model.set_adapter("default")
            peft_model.delete_adapter("reference")
        _check_stop(stop)
        result = TextTuneResult(
            adapter_dir=out_dir, steps=stats["steps"], tokens=stats["tokens"], seconds=stats["seconds"],
            tokens_per_s=stats["tokens"] / max(stats["seconds"], 1e-9), train_loss=stats["loss"],
            ppl_base=ppl_base, ppl_candidate=ppl_candidate, ppl_reference=ppl_reference,
            eval_tokens=int(eval_blocks.numel()), stopped_by=stats["stopped_by"], config=config,
        )
        shutil.rmtree(partial, ignore_errors=True)
        peft_model.save_pretrained(str(partial))
        (partial / TRAINING_FILE).write_text(json.dumps(
            {"hyperparams": config.to_json(), "metrics": result.metrics(),
             "base": {"mode": "qlora" if quantized else "fp32", "device": str(_device(model))}, **(extra or {})},
            indent=2))
        partial.rename(out_dir)  # the version folder is complete, or absent
        report(1.0, f"perplexity {ppl_base:.1f} → {ppl_candidate:.1f}")
        return result
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if config.gradient_checkpointing:
            _checkpoint_layers(list(layers), False)
        if use_cache is not None:
            model.config.use_cache = use_cache
        peft_model.unload()  # take the LoRA layers out: the caller gets its model back unchanged
        model.eval()


def _train(model: Any, blocks: torch.Tensor, config: TextTuneConfig, report: ProgressFn, stop: StopFn,
           clock: Callable[[], float], *, paged_8bit: bool = False) -> dict[str, Any]:
    """The loop. Returns steps, tokens, seconds, the last step's loss and why it stopped.
    ``paged_8bit``: bitsandbytes' paged 8-bit AdamW (QLoRA), whose state can spill to host memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    if paged_8bit:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    device = _device(model)
    n = blocks.shape[0]
    batch = min(config.batch_blocks, n)
    micro = min(config.micro_blocks, batch)
    steps_per_epoch = max(1, n // batch)
    planned = max(1, min(config.max_steps, math.ceil(config.max_epochs * steps_per_epoch)))
    shuffle = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=shuffle)
    cursor, step, tokens, loss_value = 0, 0, 0, math.nan
    started = clock()
    stopped_by = "steps"
    model.train()
    while True:
        elapsed = clock() - started
        progress = max(step / planned, elapsed / config.max_seconds)
        if step >= planned:
            stopped_by = "steps" if planned == config.max_steps else "epochs"
            break
        if step and elapsed + elapsed / step > config.max_seconds:  # the next step would overrun
            stopped_by = "time"
            break
        lr = config.lr * _schedule(step, progress, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + batch > n:  # next epoch: a new order of the blocks
            order, cursor = torch.randperm(n, generator=shuffle), 0
        indexes = order[cursor:cursor + batch]
        cursor += batch
        step_loss = 0.0
        for start in range(0, batch, micro):
            _check_stop(stop)
            x = blocks[indexes[start:start + micro]].to(device)
            loss = model(input_ids=x, labels=x).loss * (x.shape[0] / batch)
            loss.backward()
            step_loss += float(loss.detach())
            tokens += x.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = step_loss
        seconds = clock() - started
        done = max(step / planned, seconds / config.max_seconds)
        report(0.05 + 0.85 * min(done, 1.0),
               f"step {step}/{planned} loss {loss_value:.3f} lr {lr:.2e} {tokens / max(seconds, 1e-9):.0f} tok/s")
    return {"steps": step, "tokens": tokens, "seconds": clock() - started, "loss": loss_value,
            "stopped_by": stopped_by}


def _schedule(step: int, progress: float, config: TextTuneConfig) -> float:
    """Multiplier of the learning rate: linear warm-up, then cosine down to ``min_lr_ratio``."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def _decoder_layers(model: Any) -> Sequence[Any]:
    """The model's repeated decoder blocks (``model.model.layers`` in Llama-style models)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) != getattr(model.config, "num_hidden_layers", -1):
        raise GeneratorError("cannot find the model's decoder layers (a Llama-style model is expected)")
    return layers


def _checkpoint_layers(layers: Sequence[Any], enable: bool) -> None:
    """Switch transformers' per-layer activation checkpointing (``GradientCheckpointingLayer``:
    a ``gradient_checkpointing`` flag and a ``_gradient_checkpointing_func``)."""
    for layer in layers:
        if not hasattr(layer, "gradient_checkpointing"):
            raise GeneratorError("this model's layers do not support gradient checkpointing")
        layer.gradient_checkpointing = enable
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)


def _check_stop(stop: StopFn) -> None:
    if stop():
        raise Cancelled("training was cancelled")


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 4)


# --- the whole thing ------------------------------------------------------------------------
def finetune_text(texts: Sequence[str], held_out: Sequence[str], out_dir: Path | str, *,
                  base: tuple[Any, Any] | None = None, model: str = "smollm2", cache_dir: Path | None = None,
                  config: TextTuneConfig = TextTuneConfig(), reference_adapter: Path | str | None = None,
                  on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                  extra: dict[str, Any] | None = None, device: str = "cpu") -> TextTuneResult:
    """Pack the texts, train, evaluate, save: see the module docstring. ``base`` is a loaded
    (model, tokenizer) to reuse; otherwise ``model`` is loaded with ``load_base`` (on
    ``device``: 'auto' trains QLoRA where CUDA and bitsandbytes are)."""
    if not texts or not held_out:
        raise GeneratorError("need texts to train on and held-out texts to evaluate on")
    lm, tokenizer = base if base is not None else load_base(model, cache_dir, device)
    train_blocks = pack(tokenizer, texts, config.block_size)
    eval_blocks = pack(tokenizer, held_out, config.block_size)
    log.info("fine-tuning on %d blocks of %d tokens, evaluating on %d", train_blocks.shape[0],
             train_blocks.shape[1], min(eval_blocks.shape[0], config.max_eval_blocks))
    return tune(lm, train_blocks, eval_blocks, out_dir, config=config, reference_adapter=reference_adapter,
                on_progress=on_progress, should_stop=should_stop, extra=extra)
