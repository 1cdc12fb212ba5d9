"""The GPU check: what the bot's CUDA paths do on this machine's GPU, in one table (a script, not a test).

    .venv/bin/python bench/gpu_check.py            # about 2-5 minutes on one GPU
    .venv/bin/python bench/gpu_check.py --json out.json

On a machine without CUDA it prints one line and exits 0. Needs the venv with the ``cuda``
extra (bitsandbytes) and the ``diffusion`` extra; a missing piece makes its rows say so.
Nothing is downloaded: the text model is the packaged SmolLM2-135M-Instruct (converted once
into data/models), the diffusion pipeline is a tiny one built from configs.

Checks, each timed and with its peak GPU memory (``max_memory_allocated``):
  text      the packaged SmolLM2 in bf16, bitsandbytes 8-bit and 4-bit (NF4): next-token
            agreement with fp32 (teacher-forced, held-out text) and with bf16, held-out
            perplexity, greedy batch-8 tokens/s. Held-out text: the King James Bible from
            Debian's ``bible-kjv`` (Matthew 5-7) when the ``bible`` program is installed,
            else the public-domain prose of bench/text_throughput.py.
  qlora     50 steps of the bot's fine-tune recipe on the 4-bit base (paged 8-bit AdamW):
            first and last step's loss, held-out perplexity before and after.
  diffusion a tiny Stable Diffusion pipeline through the bot's DiffusionGenerator, fp16/bf16
            and with the UNet in 4-bit: images/s (one 64×64 image a call, 20 steps).
  oom       the registry's recovery: idle ballast fills the GPU, a job then allocates past
            what is left (a real CUDA out-of-memory error), the registry unloads the idle
            ballast and the retry succeeds; a job larger than the GPU fails with the message
            a member would read.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KJV_CHAPTERS = ("Mat5:1-48", "Mat6:1-34", "Mat7:1-29")
HELD_OUT_TOKENS = 512
QLORA_STEPS = 50
COLUMNS = ("check", "variant", "agree fp32", "agree bf16", "perplexity", "speed", "peak MiB", "seconds", "note")


@dataclass
class Row:
    """One line of the table; what a check did not measure stays None."""

    check: str
    variant: str
    agree_fp32: float | None = None
    agree_bf16: float | None = None
    perplexity: float | None = None
    speed: str | None = None  # with its unit: "812 tok/s", "9.1 img/s"
    peak_mib: float | None = None
    seconds: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --- helpers that need no GPU (tested in tests/test_gpu_check.py) -------------------------------
def kjv_verses(output: str) -> str:
    """Plain text from ``bible -f`` output (``Mat5:3 Blessed are the poor…`` a line)."""
    verses = [re.sub(r"^\S+\d+:\d+\s+", "", line.strip()) for line in output.splitlines() if line.strip()]
    return " ".join(verses)


def held_out_text(run: Callable[[list[str]], str] | None = None) -> tuple[str, str]:
    """(text, where it came from): the KJV Sermon on the Mount if Debian's ``bible`` program
    is installed (``apt-get install bible-kjv``), else bench/text_throughput.py's prose."""
    from bench.text_throughput import HELD_OUT

    if run is None and shutil.which("bible") is None:
        return HELD_OUT, "text_throughput prose"
    runner = run or (lambda args: subprocess.run(args, capture_output=True, text=True, timeout=30,
                                                 check=True).stdout)
    try:
        text = kjv_verses(runner(["bible", "-f", *KJV_CHAPTERS]))
    except (OSError, subprocess.SubprocessError) as exc:
        return HELD_OUT, f"text_throughput prose (bible failed: {type(exc).__name__})"
    return (text, "KJV Matthew 5-7") if len(text) > 2000 else (HELD_OUT, "text_throughput prose")


def losses_from_notes(notes: list[str]) -> list[float]:
    """Each step's loss, from the fine-tune's progress notes (``step 3/50 loss 2.913 …``)."""
    return [float(m.group(1)) for note in notes if (m := re.search(r"^step \d+/\d+ loss (\S+)", note))]


def format_table(gpu: str, rows: list[Row]) -> str:
    """The table the script prints: the GPU's name, then one aligned line a row."""

    def cell(value: Any, digits: int = 3) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
        return str(value)

    lines = [[row.check, row.variant, cell(row.agree_fp32), cell(row.agree_bf16), cell(row.perplexity, 2),
              cell(row.speed), cell(row.peak_mib, 0), cell(row.seconds, 1), row.note] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(COLUMNS)]
    out = [f"GPU check on {gpu}", "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join(out)


# --- measuring on the GPU -------------------------------------------------------------------------
@contextmanager
def measured(row: Row) -> Iterator[Row]:
    """Fill the row's seconds and peak GPU memory; an error becomes the row's note."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield row
    except Exception as exc:
        row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:100]
    finally:
        torch.cuda.synchronize()
        row.seconds = time.perf_counter() - start
        row.peak_mib = torch.cuda.max_memory_allocated() / 2**20


def check_text(folder: str, text: str, tokens: int) -> list[Row]:
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.text_throughput import batch_tokens_per_s, chat_batch, next_token_quality
    from generators import quantization

    tokenizer = AutoTokenizer.from_pretrained(folder)
    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :HELD_OUT_TOKENS]
    with torch.inference_mode():
        fp32_next = fp32(ids).logits[0, :-1].argmax(-1)
    bf16 = copy.deepcopy(fp32).to(device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        bf16_next = bf16(ids.cuda()).logits[0, :-1].argmax(-1)
    del bf16
    batch = chat_batch(tokenizer)
    rows = []
    for mode in ("bf16", "bnb-8bit", "bnb-4bit"):
        row = Row("text", f"SmolLM2-135M {mode}")
        with measured(row):
            if mode == "bf16":
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
            else:
                quantization.choose_mode(mode, "cuda")  # a clear error without bitsandbytes
                model = AutoModelForCausalLM.from_pretrained(folder, **quantization.load_kwargs(mode, "cuda")).eval()
            row.agree_fp32, row.perplexity = next_token_quality(model, ids, fp32_next)
            row.agree_bf16, _ = next_token_quality(model, ids, bf16_next)
            row.speed = f"{batch_tokens_per_s(model, tokenizer, batch, tokens):.0f} tok/s"
            row.extra["footprint_mib"] = model.get_memory_footprint() / 2**20
            del model
        rows.append(row)
    return rows


def check_qlora(folder: str, text: str) -> list[Row]:
    from generators.finetune_text import TextTuneConfig, finetune_text, load_base

    row = Row("qlora", f"{QLORA_STEPS} steps, 4-bit base")
    with measured(row):
        model, tokenizer = load_base(folder, device="cuda")
        if not getattr(model, "is_loaded_in_4bit", False):
            row.note = "bitsandbytes missing: trained an fp32 base on the GPU instead"
        sentences = [s.strip() + "." for s in text.split(".") if len(s.strip()) > 20]
        held = sentences[::5]
        train = [s for i, s in enumerate(sentences) if i % 5]
        config = TextTuneConfig(block_size=128, batch_blocks=8, micro_blocks=8, max_steps=QLORA_STEPS,
                                max_epochs=1000, max_seconds=150, top_layers=None, max_eval_blocks=8, lr=1e-3)
        notes: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            result = finetune_text(train, held, Path(tmp) / "v1", base=(model, tokenizer), config=config,
                                   on_progress=lambda _f, note: notes.append(note))
        losses = losses_from_notes(notes)
        row.perplexity = result.ppl_candidate
        row.speed = f"{result.tokens_per_s:.0f} tok/s"
        fell = losses and losses[-1] < losses[0]
        row.note = (row.note or f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({'falls' if fell else 'DOES NOT FALL'}), "
                    f"perplexity {result.ppl_base:.2f} -> {result.ppl_candidate:.2f}, {result.steps} steps")
        row.extra.update(losses=losses, ppl_base=result.ppl_base, stopped_by=result.stopped_by)
        del model
    return [row]


def check_diffusion(images: int) -> list[Row]:
    from generators.base import Request
    from generators.diffusion import DiffusionGenerator
    from tests.tiny_diffusion import build_tiny_sd_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_sd_pipeline(Path(tmp), width=64, sample_size=8)
        for quantize in (False, True):
            row = Row("diffusion", "tiny SD, UNet 4-bit" if quantize else "tiny SD, half precision")
            with measured(row):
                generator = DiffusionGenerator(folder, device="cuda", steps=20, quantize_4bit=quantize,
                                               local_files_only=True)
                generator.load()
                params = generator.check("a red cat", {"width": 64, "height": 64, "steps": 20})
                generator.generate([Request(0, "a red cat", dict(params), seed=1)])  # warm-up
                start = time.perf_counter()
                for index in range(images):
                    generator.generate([Request(index + 1, "a red cat", dict(params), seed=index)])
                row.speed = f"{images / (time.perf_counter() - start):.1f} img/s"
                row.extra["weights_mib"] = generator.memory_bytes() / 2**20
                generator.unload()
            rows.append(row)
    return rows


def check_oom() -> list[Row]:
    import torch

    from generators.base import Generator, GeneratorError, Request, Result
    from generators.registry import ModelRegistry

    class Ballast(Generator):
        """An idle model's weights: ``size`` bytes held on the GPU while loaded."""

        kind = "text"

        def __init__(self, size: int) -> None:
            self.size = size
            self.block: torch.Tensor | None = None

        def load(self) -> None:
            self.block = torch.empty(self.size, dtype=torch.uint8, device="cuda")

        def unload(self) -> None:
            self.block = None

        def memory_bytes(self) -> int:
            return 0 if self.block is None else self.size

        def generate(self, requests: list[Request]) -> list[Result]:
            return [Result(text="ballast") for _ in requests]

    class Hungry(Ballast):
        """A job whose activations need ``size`` bytes while it runs."""

        def load(self) -> None:
            self.block = torch.empty(1, device="cuda")

        def generate(self, requests: list[Request]) -> list[Result]:
            scratch = torch.empty(self.size, dtype=torch.uint8, device="cuda")
            del scratch
            return [Result(text="done") for _ in requests]

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    gib = 2**30
    sizes = {"ballast": max(free - 3 * gib, gib), "hungry": 4 * gib, "huge": total + gib}
    factories = {"text": lambda name: Ballast(sizes[name]) if name == "ballast" else Hungry(sizes[name])}
    # The budget is the whole device: only the real out-of-memory error makes room here.
    registry = ModelRegistry(factories, {"text": "ballast"}, budget_bytes=total, device="cuda",
                             gpu_budget_bytes=total)
    rows = []
    row = Row("oom", "job past free memory")
    with measured(row):
        registry.run("text", "ballast", lambda g: g.generate([Request(1, "x")]))
        before = list(registry.resident())
        (result,) = registry.run("text", "hungry", lambda g: g.generate([Request(2, "x")]))
        after = list(registry.resident())
        recovered = result.text == "done" and "text:ballast" not in after
        row.note = (f"{'recovered' if recovered else 'NOT RECOVERED'}: resident {before} -> {after}")
    rows.append(row)
    row = Row("oom", "job larger than the GPU")
    with measured(row):
        try:
            registry.run("text", "huge", lambda g: g.generate([Request(3, "x")]))
            row.note = "NO ERROR (expected one)"
        except GeneratorError as exc:
            row.note = f"job fails: {exc}"
    rows.append(row)
    registry.unload_all()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens a row for the batch-8 speed")
    parser.add_argument("--images", type=int, default=10, help="images timed a diffusion variant")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing to check (run it where `nvidia-smi` lists one)")
        return 0
    gpu = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}, " \
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, torch {torch.__version__})"
    from bench.text_throughput import load_reference

    started = time.perf_counter()
    reference, _tokenizer = load_reference()  # converts the packaged GGUF once into data/models
    folder = reference.name_or_path
    del reference
    text, source = held_out_text()
    rows: list[Row] = []
    checks: list[tuple[str, Callable[[], list[Row]]]] = [
        ("text", lambda: check_text(folder, text, args.tokens)),
        ("qlora", lambda: check_qlora(folder, text)),
        ("diffusion", lambda: check_diffusion(args.images)),
        ("oom", check_oom),
    ]
    for name, check in checks:
        try:
            rows += check()
        except Exception as exc:  # one broken check must not hide the others
            rows.append(Row(name, "(setup)", note=f"{type(exc).__name__}: {exc}"[:100]))
        print(f"  {name} done after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(format_table(gpu, rows))
    print(f"held-out text: {source}; total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "held_out": source, "rows": [asdict(r) for r in rows]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
