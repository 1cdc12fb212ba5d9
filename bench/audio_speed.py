"""Real-time factor of the embedded voice (hibari) on this machine.

    .venv/bin/python bench/audio_speed.py [--repeats 3] [--no-queue]

Columns (RTF = compute seconds per second of audio; lower is better, 0.05 = 20x realtime):

- direct synth: ``SpeechGenerator.synthesize`` (G2P + ONNX + DSP + joining), called directly.
- direct full: ``SpeechGenerator.generate`` (adds loudness normalisation and Ogg/Opus encoding).
- queue 1 / queue 4: the same text through ``generators.queue.GenerationQueue`` with 1 and 4
  jobs submitted at once (after a warm-up job loads the model): aggregate RTF (wall time of the
  burst / audio seconds produced) and per-job latency, created -> finished, so queue waiting
  counts. The audio lane runs one job at a time, so 4 jobs take ~4x as long as one and the
  last waits for the other three. See ``queue_columns``.

A script, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generators import audio_post
from generators.base import Request
from generators.speech import SAMPLE_RATE, SpeechGenerator

SHORT = "Hello there, your image is ready."
MEDIUM = (
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
    "On the 3rd of March 2024, 1,250 people paid $9.99 each to hear it read at 7:30 pm."
)
LONG = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker named Elias. Every morning he opened his shop at seven, wound the hundred clocks "
    "on his walls, and listened as they ticked in almost perfect agreement. Almost, because one "
    "clock, a tall walnut case with a brass face, always ran a little behind. The villagers "
    "laughed about it. Why keep a clock that cannot tell the time? they asked. Elias only smiled. "
    "That clock, he said, was made by my father, and it keeps his time, not ours. Years later, "
    "when Elias himself grew too old to climb the ladder, his granddaughter took over the shop. "
    "She repaired the walnut clock in an afternoon. It has kept perfect time ever since, and she "
    "has never once been glad of it."
)
TEXTS = {"short": SHORT, "medium": MEDIUM, "long": LONG}


def median_time(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs, and its last return value."""
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def direct_columns(generator: SpeechGenerator, repeats: int) -> dict[str, dict[str, float]]:
    """Per text: audio seconds, synth-only and full (normalise + Opus) RTF, called directly."""
    rows: dict[str, dict[str, float]] = {}
    for name, text in TEXTS.items():
        synth_s, audio = median_time(lambda text=text: generator.synthesize(text, seed=0), repeats)
        audio_s = len(audio) / SAMPLE_RATE
        params = generator.check(text, {})
        full_s, _ = median_time(
            lambda text=text, params=params: generator.generate(
                [Request(job_id=0, prompt=text, params=params, seed=0)]
            ),
            repeats,
        )
        normalised = audio_post.normalize_loudness(audio, SAMPLE_RATE)
        encode_s, _ = median_time(lambda a=normalised: audio_post.encode_ogg(a, SAMPLE_RATE), repeats)
        rows[name] = {
            "chars": len(text),
            "audio_s": audio_s,
            "synth_rtf": synth_s / audio_s,
            "full_rtf": full_s / audio_s,
            "full_ms": full_s * 1000,
            "opus_ms": encode_s * 1000,
        }
    return rows


# ==== QUEUE COLUMNS (lead: "1 and 4 concurrent requests through the queue") ==================
# Uses generators.queue.GenerationQueue with a SQLite store in a temp folder and a registry whose
# "audio" lane serves this SpeechGenerator. If the queue's API changes, adjust only this section;
# returning {} (e.g. with --no-queue or on an error) leaves the columns as "-".


async def _queue_burst(text: str, concurrency: int, workdir: Path) -> dict[str, float]:
    from generators.queue import GenerationQueue, QueueConfig
    from generators.registry import ModelRegistry
    from storage.database import open_database
    from storage.jobs import NewJob, SqlJobStore

    db_path = workdir / f"bench-{concurrency}-{time.monotonic_ns()}.sqlite"
    store = SqlJobStore(open_database(db_path))
    registry = ModelRegistry({"audio": lambda name: SpeechGenerator()}, {"audio": "hibari"}, 1 << 30)
    queue = GenerationQueue(
        store,
        registry,
        QueueConfig(artifacts_dir=workdir / "artifacts", lanes=("audio",), max_pending_per_user=100),
    )
    await queue.start(recover=False, load_backlog=False)
    try:
        # Warm-up job: loads the model so the burst measures steady state.
        warm = await queue.submit(NewJob(kind="audio", model="hibari", prompt="Warm up.", requester="b"))
        await queue.wait(warm.id)
        start = time.perf_counter()
        records = [
            await queue.submit(NewJob(kind="audio", model="hibari", prompt=text, requester=f"u{i}"))
            for i in range(concurrency)
        ]
        latencies, audio_s = [], 0.0
        for finished in await asyncio.gather(*(queue.wait(r.id) for r in records)):
            if finished.status != "succeeded":
                raise RuntimeError(f"job {finished.id} {finished.status}: {finished.error}")
            latencies.append((finished.finished_at or 0) - finished.created_at)
            audio_s += float((finished.result or {}).get("metadata", {}).get("duration_s", 0))
        wall = time.perf_counter() - start
        return {
            "wall_s": wall,
            "audio_s": audio_s,
            "agg_rtf": wall / audio_s if audio_s else 0,
            "p50_latency_s": statistics.median(latencies),
            "max_latency_s": max(latencies),
        }
    finally:
        await queue.stop()


def queue_columns(concurrency_levels: tuple[int, ...] = (1, 4)) -> dict[str, dict[int, dict[str, float]]]:
    """Per text and concurrency: aggregate RTF and median job run time through the queue."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in TEXTS.items():
            out[name] = {}
            for level in concurrency_levels:
                out[name][level] = asyncio.run(_queue_burst(text, level, Path(tmp)))
    return out


# ==== END QUEUE COLUMNS =======================================================================


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-queue", action="store_true", help="skip the queue columns")
    args = parser.parse_args()

    generator = SpeechGenerator()
    start = time.perf_counter()
    generator.load()
    load_s = time.perf_counter() - start
    generator.synthesize("Warm up the arena.")  # first ONNX run allocates its memory arena

    rows = direct_columns(generator, args.repeats)
    queue: dict[str, dict[int, dict[str, float]]] = {}
    if not args.no_queue:
        try:
            queue = queue_columns()
        except Exception as exc:  # the queue is optional here; the direct numbers still count
            print(f"(queue columns skipped: {type(exc).__name__}: {exc})", file=sys.stderr)

    print(f"hibari voice 'heart', load {load_s:.2f} s; RTF = compute s / audio s (lower is better)")
    header = (
        f"{'text':<7} {'chars':>5} {'audio s':>7} {'synth RTF':>9} {'full RTF':>8} {'full ms':>8} "
        f"{'opus ms':>7} {'q1 RTF':>7} {'q1 lat s':>8} {'q4 RTF':>7} {'q4 p50 s':>8} {'q4 max s':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        q = queue.get(name, {})

        def cell(level: int, key: str, width: int, q=q) -> str:
            value = q.get(level, {}).get(key)
            return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"

        print(
            f"{name:<7} {row['chars']:>5} {row['audio_s']:>7.2f} {row['synth_rtf']:>9.4f} "
            f"{row['full_rtf']:>8.4f} {row['full_ms']:>8.1f} {row['opus_ms']:>7.1f} "
            f"{cell(1, 'agg_rtf', 7)} {cell(1, 'p50_latency_s', 8)} "
            f"{cell(4, 'agg_rtf', 7)} {cell(4, 'p50_latency_s', 8)} {cell(4, 'max_latency_s', 8)}"
        )


if __name__ == "__main__":
    main()
