"""`aigcbot train text|image --guild ID`: fine-tune a server's model now, from the command line.

The run goes through a queue of this process's own with only a training lane, like
``aigcbot generate``: it is recorded as a training job, refused while another run for the
same server and modality is queued or running (in this process or the bot), and gated like
a nightly run: the new version serves only if held-out validation improves. A running bot
picks up a promotion made here at its next start (or rollback); progress goes to stderr.
A server with too few approved items is refused before any job is written.
Every error is one line on stderr and exit status 1 (2 for an argument the parser refuses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bot.cli.args import discord_id, number, visible_text, whole
from bot.core.invocation import USER_ERRORS, local_user
from bot.core.services import Services
from bot.settings import Settings, finetune_settings
from generators.queue import GenerationQueue
from storage.jobs import JobRecord

#: Time for loading the model and the evaluations, on top of the training budget.
OVERHEAD_S = 900.0


def add_train_parser(subparsers: Any) -> None:
    """Register ``train`` on the CLI's top-level subparsers."""
    train = subparsers.add_parser("train", help="fine-tune a server's model on its approved community content now")
    train.add_argument("kind", choices=["text", "image"], help="which model to fine-tune")
    train.add_argument("--guild", type=discord_id,
                       help="server (guild) id: fine-tune its model on its approved content")
    train.add_argument("--model", choices=["dcgan", "vae"], help="image model to train from scratch (without --guild)")
    train.add_argument("--data", type=visible_text, help="fashion-mnist | digits | an image folder (without --guild)")
    train.add_argument("--epochs", type=whole(1, 10_000, "a number of epochs"),
                       help="epochs to train (image training without --guild)")
    train.add_argument("--steps", type=whole(1, 10**9, "a number of steps"),
                       help="total steps instead of epochs (image training without --guild)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--out", type=visible_text,
                       help="checkpoint folder (default: AIGC_DATA_DIR/checkpoints/MODEL-DATA)")
    train.add_argument("--max-seconds", type=number, help="training time budget (default: the configured one)")
    train.add_argument("--json", action="store_true", help="print a JSON object")


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    if args.guild is None:
        if args.kind != "image" or not args.model or not args.data:
            print("error: give --guild ID (community fine-tune), or for images --model dcgan|vae --data DATA",
                  file=sys.stderr)
            return 1
        return _train_image(settings, args)
    return asyncio.run(_train(settings, args))


def _train_image(settings: Settings, args: argparse.Namespace) -> int:
    """Train a DCGAN or VAE from scratch; the run is recorded as a training job with its
    metadata (data, steps, metrics) and its checkpoint and sample grid as artifacts."""
    import hashlib

    from generators.base import GeneratorError
    from generators.image_train import train_image_model
    from storage.jobs import Artifact, NewJob

    if args.epochs is None and args.steps is None:
        args.epochs = 1
    out = Path(args.out or settings.data_dir / "checkpoints" / f"{args.model}-{Path(args.data).name}")

    def progress(fraction: float, note: str) -> None:
        if not args.json:
            print(f"{fraction:5.0%}  {note}", file=sys.stderr, flush=True)

    try:
        meta = train_image_model(args.model, args.data, out, epochs=args.epochs, steps=args.steps,
                                 resume=args.resume, on_progress=progress)
    except (GeneratorError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    services = Services(settings)
    try:
        store = services.store
        record = store.create_job(NewJob(kind="training", model=args.model, prompt=f"train {args.model} on {args.data}",
                                         requester=f"cli:{local_user()}", source="cli",
                                         params={"data": args.data, "epochs": args.epochs, "steps": args.steps}))
        store.claim([record.id], "cli")
        artifacts = []
        for path in sorted(out.iterdir()):
            if path.suffix in (".safetensors", ".png") and path.is_file():
                data = path.read_bytes()
                mime = "image/png" if path.suffix == ".png" else "application/octet-stream"
                artifacts.append(Artifact(str(path), mime, len(data), hashlib.sha256(data).hexdigest()))
        store.finish(record.id, {"text": f"trained {args.model} on {args.data}", "metadata": meta}, artifacts)
        final = store.get(record.id)
    finally:
        asyncio.run(services.close())
    return _print(final, args.json)


async def _train(settings: Settings, args: argparse.Namespace) -> int:
    if args.max_seconds is not None and not 1 <= args.max_seconds <= 86_400:
        print("error: --max-seconds must be from 1 to 86400", file=sys.stderr)
        return 1
    tuning = finetune_settings(settings)
    needed = tuning.min_texts if args.kind == "text" else tuning.min_images
    # Nothing was ever captured: refuse without creating a database.
    if not settings.uses_postgres and not settings.db_file.exists():
        print(f"error: only 0 approved {args.kind} item(s) in server {args.guild}; training needs at least "
              f"{needed} (no database at {settings.db_file} yet)", file=sys.stderr)
        return 1
    budget = args.max_seconds or tuning.text.max_seconds
    services = Services(settings, queue_options={
        "lanes": ("training",), "job_timeout_s": max(settings.job_timeout_s, budget + OVERHEAD_S)})
    try:
        # Refused before any job is written: a run on too little data could only fail.
        snapshot = await services.adb.run(services.community.snapshot, str(args.guild), args.kind)
        if len(snapshot.items) < needed:
            print(f"error: only {len(snapshot.items)} approved {args.kind} item(s) in server {args.guild}; "
                  f"training needs at least {needed} (approve some with /curate review)", file=sys.stderr)
            return 1
        await services.start(recover=False, load_backlog=False)
        try:
            record = await services.trainer.submit(str(args.guild), args.kind, requester=f"cli:{local_user()}",
                                                   source="cli", max_seconds=args.max_seconds)
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        final = await _follow(services.queue, record.id, quiet=args.json)
    finally:
        await services.close()
    return _print(final, args.json)


async def _follow(queue: GenerationQueue, job_id: int, quiet: bool) -> JobRecord:
    final: JobRecord | None = None
    async for event in queue.watch(job_id):
        if event.type == "progress" and not quiet:
            print(f"{event.progress or 0:5.0%}  {event.note}", file=sys.stderr, flush=True)
        elif event.type == "finished":
            final = event.record
    assert final is not None
    return final


def _print(record: JobRecord, as_json: bool) -> int:
    outcome = (record.result or {}).get("metadata") or {}
    if as_json:
        print(json.dumps({"job": record.to_json(), "outcome": outcome or None}, indent=2))
    elif record.status == "succeeded":
        print((record.result or {}).get("text") or "done")
        for key, value in (outcome.get("metrics") or {}).items():
            if key != "gate":
                print(f"  {key}: {value}")
    else:
        print(f"error: training job {record.id} {record.status}: {record.error or 'no reason recorded'}",
              file=sys.stderr)
    return 0 if record.status == "succeeded" else 1
