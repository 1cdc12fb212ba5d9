"""Jobs on worker processes, as a black box (issue 18): the bot (``aigcbot run --http``) and two
``aigcbot worker --lanes image`` processes on one PostgreSQL database, each a host of its own
(tests/cluster.py), members submitting /imagine through the fake Discord.

What is asserted is what members see: every accepted job's picture posted exactly once,
whatever process is SIGKILLed on the way, and a Cancel that stops a running job at once. The
fast jobs use the packaged face model; the jobs that must still be running when something
happens to them use a tiny diffusion pipeline of about 3 s, whose every step can be cancelled
(a packaged model draws in one step of a few hundredths of a second).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.cluster import DELIVERY_LEASE_S, STALL_S, Cluster, slow_diffusion_model
from tests.fakediscord import FakeDiscord

#: How long results claimed by a killed bot may wait for their post: its delivery leases must
#: run out, then a scan (every lease / 3) posts them; with room for a busy machine.
DEAD_CLAIMS_S = 3 * DELIVERY_LEASE_S + 10


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return slow_diffusion_model(tmp_path_factory.mktemp("slow-diffusion"))


@pytest_asyncio.fixture
async def cluster(fake_discord: FakeDiscord, postgres_url: str, tmp_path: Path, slow_model: str
                  ) -> AsyncIterator[Cluster]:
    async with Cluster(fake_discord, postgres_url, tmp_path, workers=2,
                       settings={"AIGC_DIFFUSION_MODEL": slow_model}) as started:
        yield started


async def running(cluster: Cluster, prompt: str) -> dict:
    """The job of ``prompt`` once a worker runs it."""

    async def job() -> dict | None:
        found = await cluster.job(prompt)
        return found if found is not None and found["status"] == "running" else None

    return await cluster.wait_for(job, 30, f"{prompt!r} to run")


def worker_of(cluster: Cluster, job: dict):
    """The worker process running ``job`` (its id carries the process id)."""
    (worker,) = [w for w in cluster.workers if w.pid is not None and f":{w.pid}:" in str(job["worker"])]
    return worker


@pytest.mark.asyncio
async def test_members_jobs_on_two_workers_are_each_posted_exactly_once(cluster: Cluster) -> None:
    members = cluster.add_members(4)
    await asyncio.gather(*(cluster.imagine(member, f"portrait {m}-{n}", model="face", count=2)
                           for n in range(3) for m, member in enumerate(members)))
    await cluster.wait_accepted()
    assert all(s.accepted for s in cluster.submitted), [s.refusal for s in cluster.submitted]
    jobs = await cluster.settle(60)
    assert len(jobs) == 12
    cluster.assert_exactly_once(jobs)
    ran_on = {str(j["worker"]).split(":")[1] for j in jobs}
    assert ran_on <= {str(w.pid) for w in cluster.workers}, ran_on  # the workers ran them, not the bot


@pytest.mark.asyncio
async def test_a_worker_killed_mid_job_leaves_it_to_the_other_posted_once(cluster: Cluster) -> None:
    (member,) = cluster.add_members(1)
    await cluster.imagine(member, "a lighthouse", model="diffusion")
    job = await running(cluster, "a lighthouse")
    first = worker_of(cluster, job)
    await asyncio.sleep(0.5)
    await first.kill()
    (done,) = await cluster.settle(STALL_S + 30)
    cluster.assert_exactly_once([done])
    assert done["attempts"] == 2 and f":{first.pid}:" not in str(done["worker"]), done


@pytest.mark.asyncio
async def test_the_bot_killed_mid_job_and_restarted_loses_nothing_and_posts_nothing_twice(cluster: Cluster) -> None:
    members = cluster.add_members(3)
    for n in range(2):
        for m, member in enumerate(members):
            await cluster.imagine(member, f"a harbour {m}-{n}", model="diffusion")
    await cluster.wait_accepted()  # every job written before the bot dies
    await running(cluster, "a harbour 0-0")
    await cluster.bot.kill()

    async def some_ended() -> bool:
        return any(j["status"] == "succeeded" for j in await cluster.jobs())

    # Some jobs end while no bot runs, the others once it is back.
    await cluster.wait_for(some_ended, 30, "a job to end while the bot is down")
    await cluster.bot.start()
    assert any(j["status"] in ("queued", "running") for j in await cluster.jobs())
    # The dead bot's delivery claims must run out (their leases) before another process posts.
    jobs = await cluster.settle(60, post_timeout=DEAD_CLAIMS_S)
    assert len(jobs) == 6
    cluster.assert_exactly_once(jobs)


@pytest.mark.asyncio
async def test_cancel_from_discord_stops_a_running_job_on_its_worker_within_a_second(cluster: Cluster) -> None:
    (member,) = cluster.add_members(1)
    submitted = await cluster.imagine(member, "a windmill", model="diffusion")
    job = await running(cluster, "a windmill")
    # Once the model is loaded (not interruptible) and denoising, the member's message shows
    # the progress and the Cancel button.
    await cluster.wait_for(lambda: (m := cluster.original(submitted)) is not None and "denoising" in m.content
                           and f"aigc:cancel:{job['id']}" in m.custom_ids(), 20, "the job's progress")
    clicked = time.time()
    await cluster.cancel(submitted, job["id"])

    async def ended() -> dict | None:
        found = await cluster.job("a windmill")
        return found if found is not None and found["finished_at"] is not None else None

    done = await cluster.wait_for(ended, 10, "the cancelled job to end")
    assert done["status"] == "cancelled", done
    assert done["finished_at"] - clicked < 1.0, (done["finished_at"] - clicked, cluster.logs())
    await asyncio.sleep(1.0)
    assert cluster.deliveries()["a windmill"] == 0
    assert worker_of(cluster, done).alive  # the worker stopped the job, not itself
