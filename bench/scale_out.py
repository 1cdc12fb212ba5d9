"""Image jobs on worker processes: does a second worker double the rate, and does a SIGKILL lose
or duplicate anything? (a script, not a test)

    .venv/bin/python bench/scale_out.py                  # full run (about 15 minutes)
    .venv/bin/python bench/scale_out.py --quick          # 1 repeat, 2 kill runs of each kind

Everything is real and local (tests/cluster.py): a throwaway PostgreSQL (tests/postgres_server.py),
the fake Discord, the bot as ``aigcbot run --http`` and each worker as ``aigcbot worker --lanes
image`` with one torch thread and a data folder of its own (files travel through the database),
members sending /imagine through the fake Discord. A fresh database and fresh processes per run.

Sections:
  throughput  --jobs image jobs from 4 members, all sent at once, on 1 and on 2 workers,
              alternated (1, 2, 1, 2 …), best of --repeat: jobs/s (first accepted to last
              finished) and p50/p95 of the wait from accepted to started and to finished.
              The model (--model): ``diffusion-large`` (the default: a small random diffusers
              pipeline, ``tests/tiny_diffusion.py`` with a 64-wide UNet on 32×32 latents, 30
              steps, about 3 s a job on one thread: the kind of job one adds workers for),
              ``diffusion`` (the same, 32 wide on 16×16 latents, about 0.4 s a job) or ``face``
              (the packaged DCGAN, 4 faces per job, about 0.1 s): the shorter the job, the larger
              the share of the per-job work (Discord, the bot, PostgreSQL) that shares these cores.
  kills       --kills runs of each: a worker SIGKILLed mid-job (the other one finishes it); the
              bot SIGKILLed mid-job, at least one job finishing while it is down, then started
              again. Jobs here use the slow pipeline (about 3 s, tests/cluster.py), so the kill
              lands mid-job. Counted: accepted jobs never posted (lost) and posted twice or more
              (duplicated), read from the fake Discord's uploads.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402  (after the path is set)
from tests import postgres_server as pg  # noqa: E402
from tests.cluster import Cluster, slow_diffusion_model  # noqa: E402
from tests.fakediscord import FakeDiscord  # noqa: E402

MEMBERS = 4
#: The killed bot's delivery claims (30 s leases) run out before another process posts them.
DEAD_CLAIMS_S = 50.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else float("nan")


class Bench:
    """The server, the models and the fake Discord shared by every run; a cluster per run."""

    def __init__(self, server: pg.PostgresServer, models: Path, args: argparse.Namespace) -> None:
        self.server = server
        self.args = args
        self.slow = slow_diffusion_model(models / "slow")
        from tests.tiny_diffusion import build_tiny_sd_pipeline

        self.quick_diffusion = build_tiny_sd_pipeline(models / "quick", width=32, sample_size=16)
        self.runs = 0

    def settings(self, model: str) -> dict[str, str]:
        return {"AIGC_DIFFUSION_MODEL": model}

    async def cluster(self, fake: FakeDiscord, workers: int, model: str) -> tuple[Cluster, str, Path]:
        self.runs += 1
        name = f"aigc_scale_{os.getpid()}_{self.runs}"
        url = self.server.new_database(name)
        root = Path(tempfile.mkdtemp(prefix="aigc-scale-"))
        cluster = Cluster(fake, url, root, workers=workers, settings=self.settings(model))
        await cluster.start()
        return cluster, name, root

    async def finish(self, cluster: Cluster, name: str, root: Path) -> None:
        await cluster.close()
        self.server.drop_database(name)
        shutil.rmtree(root, ignore_errors=True)

    # --- throughput -------------------------------------------------------------------------
    async def throughput(self, workers: int) -> dict[str, Any]:
        async with FakeDiscord() as fake:
            model = self.quick_diffusion if self.args.model == "diffusion" else self.slow
            kind = "face" if self.args.model == "face" else "diffusion"
            cluster, name, root = await self.cluster(fake, workers, model)
            try:
                members = cluster.add_members(MEMBERS)
                options = {"model": kind, **({"count": 4} if self.args.model == "face" else {})}
                # Warm-up: every worker loads the model once (not timed).
                await asyncio.gather(*(cluster.imagine(members[0], f"warm-up {n}", **options)
                                       for n in range(2 * workers)))
                await cluster.settle(120)
                first = len(await cluster.jobs())
                await asyncio.gather(*(cluster.imagine(members[n % MEMBERS], f"a face {n}", **options)
                                       for n in range(self.args.jobs)))
                jobs = (await cluster.settle(300))[first:]
                lost, duplicated = count_outcomes(cluster, jobs)
                created = min(j["created_at"] for j in jobs)
                elapsed = max(j["finished_at"] for j in jobs) - created
                started = [j["started_at"] - j["created_at"] for j in jobs if j["started_at"] is not None]
                finished = [j["finished_at"] - j["created_at"] for j in jobs]
                return {"workers": workers, "jobs": len(jobs), "jobs_s": len(jobs) / elapsed,
                        "start_p50": percentile(started, 0.5), "start_p95": percentile(started, 0.95),
                        "finish_p50": percentile(finished, 0.5), "finish_p95": percentile(finished, 0.95),
                        "lost": lost, "duplicated": duplicated}
            finally:
                await self.finish(cluster, name, root)

    # --- kills ------------------------------------------------------------------------------
    async def kill_worker(self) -> tuple[int, int, int]:
        """(jobs, lost, duplicated) when a worker is SIGKILLed mid-job."""
        async with FakeDiscord() as fake:
            cluster, name, root = await self.cluster(fake, 2, self.slow)
            try:
                members = cluster.add_members(2)
                for n in range(4):
                    await cluster.imagine(members[n % 2], f"a lighthouse {n}", model="diffusion")
                job = await running(cluster)
                (victim,) = [w for w in cluster.workers if f":{w.pid}:" in str(job["worker"])]
                await asyncio.sleep(1.0)
                await victim.kill()
                jobs = await cluster.settle(120)
                return (len(jobs), *count_outcomes(cluster, jobs))
            finally:
                await self.finish(cluster, name, root)

    async def kill_bot(self) -> tuple[int, int, int]:
        """(jobs, lost, duplicated) when the bot is SIGKILLed mid-job and started again."""
        async with FakeDiscord() as fake:
            cluster, name, root = await self.cluster(fake, 2, self.slow)
            try:
                members = cluster.add_members(2)
                for n in range(6):
                    await cluster.imagine(members[n % 2], f"a harbour {n}", model="diffusion")
                await cluster.wait_accepted()  # every job written before the bot dies
                await running(cluster)
                await cluster.bot.kill()

                async def some_ended() -> bool:
                    return any(j["status"] == "succeeded" for j in await cluster.jobs())

                await cluster.wait_for(some_ended, 60, "a job to end while the bot is down")
                await cluster.bot.start()
                jobs = await cluster.settle(120, post_timeout=DEAD_CLAIMS_S)
                return (len(jobs), *count_outcomes(cluster, jobs))
            finally:
                await self.finish(cluster, name, root)


async def running(cluster: Cluster) -> dict[str, Any]:
    async def one() -> dict[str, Any] | None:
        return next((j for j in await cluster.jobs() if j["status"] == "running"), None)

    found: dict[str, Any] = await cluster.wait_for(one, 60, "a job to run")
    return found


def count_outcomes(cluster: Cluster, jobs: list[dict[str, Any]]) -> tuple[int, int]:
    """(lost, duplicated) among the accepted /imagine of ``jobs``."""
    posted = cluster.deliveries()
    by_prompt = {j["prompt"]: j for j in jobs}
    lost = duplicated = 0
    for submitted in cluster.submitted:
        if not submitted.accepted or submitted.prompt.startswith("warm-up"):
            continue
        job = by_prompt.get(submitted.prompt)
        if job is None or job["status"] != "succeeded" or posted[submitted.prompt] == 0:
            lost += 1
        elif posted[submitted.prompt] > 1:
            duplicated += 1
    return lost, duplicated


async def run(args: argparse.Namespace) -> None:
    server = pg.open_server()
    models = Path(tempfile.mkdtemp(prefix="aigc-scale-models-"))
    try:
        bench = Bench(server, models, args)
        what = {"face": "the packaged face model, 4 faces per job",
                "diffusion": "a tiny diffusers pipeline, 16×16 latents, 30 steps",
                "diffusion-large": "a small diffusers pipeline, 32×32 latents, 30 steps"}[args.model]
        print(f"{cpu_name()}, {os.cpu_count()} CPU threads. {args.jobs} image jobs ({what}) from {MEMBERS} members "
              f"sent at once; bot and workers as processes, one torch thread each, PostgreSQL "
              f"{server.admin_url.split('@')[-1].split('/')[0]}; best of {args.repeat}, 1 and 2 workers alternated\n")
        best: dict[int, dict[str, Any]] = {}
        every: dict[int, list[float]] = {1: [], 2: []}
        wrong: dict[int, list[int]] = {1: [0, 0], 2: [0, 0]}  # lost, duplicated over every run
        for _ in range(args.repeat):
            for workers in (1, 2):
                row = await bench.throughput(workers)
                every[workers].append(row["jobs_s"])
                wrong[workers][0] += row["lost"]
                wrong[workers][1] += row["duplicated"]
                if workers not in best or row["jobs_s"] > best[workers]["jobs_s"]:
                    best[workers] = row
        if best:
            print("| workers | jobs | jobs/s (best; every run) | wait to start p50 / p95 s "
                  "| wait to finish p50 / p95 s | lost, duplicated (every run) |")
            print("|---|---|---|---|---|---|")
        for workers, r in sorted(best.items()):
            runs = " · ".join(f"{v:.2f}" for v in every[workers])
            print(f"| {workers} | {r['jobs']} | {r['jobs_s']:.2f} ({runs}) | {r['start_p50']:.2f} / "
                  f"{r['start_p95']:.2f} | {r['finish_p50']:.2f} / {r['finish_p95']:.2f} | {wrong[workers][0]}, "
                  f"{wrong[workers][1]} |")
        kills = {"a worker SIGKILLed mid-job": bench.kill_worker,
                 "the bot SIGKILLed mid-job, restarted": bench.kill_bot}
        totals: dict[str, tuple[int, int, int]] = {}
        for name, kill in kills.items() if args.kills else ():
            jobs = lost = duplicated = 0
            for _ in range(args.kills):
                n, lo, du = await kill()
                jobs, lost, duplicated = jobs + n, lost + lo, duplicated + du
            totals[name] = (jobs, lost, duplicated)
        if totals:
            print("\n| SIGKILL run | runs | jobs | lost | duplicated |")
            print("|---|---|---|---|---|")
        for name, (jobs, lost, duplicated) in totals.items():
            print(f"| {name} | {args.kills} | {jobs} | {lost} | {duplicated} |")
        verdicts = []
        if best:
            verdicts.append(f"2 workers vs 1: {best[2]['jobs_s'] / best[1]['jobs_s']:.2f}× jobs/s (goal ≥ 1.7×)")
        verdicts += [f"{name}: {lost} lost, {duplicated} duplicated of {jobs} (goal: both 0)"
                     for name, (jobs, lost, duplicated) in totals.items()]
        print("\n" + "\n".join(f"- {v}" for v in verdicts))
    finally:
        server.stop()
        shutil.rmtree(models, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24, help="image jobs per throughput run (default 24)")
    parser.add_argument("--model", choices=("diffusion-large", "diffusion", "face"),
                        default="diffusion-large")
    parser.add_argument("--repeat", type=int, default=3,
                        help="throughput runs of each worker count, best kept (0: no throughput runs)")
    parser.add_argument("--kills", type=int, default=5, help="runs of each SIGKILL scenario (0: none)")
    parser.add_argument("--quick", action="store_true", help="--repeat 1 --kills 2")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.kills = 1, 2
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
