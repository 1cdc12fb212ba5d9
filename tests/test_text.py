"""The text generator on a tiny model from a config, and once on the packaged SmolLM2."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from generators import text
from generators.adapters import AdapterTextGenerator
from generators.base import Feed, GeneratorError, Request
from generators.queue import GenerationQueue, QueueConfig
from generators.registry import ModelRegistry
from generators.text import TextGenerator
from storage.database import open_database
from storage.jobs import NewJob, SqlJobStore
from tests.tiny_text import random_lora_adapter


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> TextGenerator:
    # fp32: these tests compare batched rows with solo runs token for token, which only a mode
    # whose rows share nothing guarantees (int8-smooth quantizes each pass with one input scale).
    generator = TextGenerator(str(tiny_model_dir), quantization_mode="none", max_new_tokens=512,
                              max_prompt_chars=200)
    generator.load()
    return generator


def _request(gen: TextGenerator, prompt: str, job_id: int = 1, **params: object) -> Request:
    return Request(job_id=job_id, prompt=prompt, params=gen.check(prompt, dict(params)))


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", {}, "the prompt is empty"),
        ("x" * 201, {}, "the prompt is 201 characters; the limit is 200"),
        ("hi", {"temperature": 3.0}, "temperature must be between 0 and 2"),
        ("hi", {"top_p": 0.0}, "top_p must be between 0.01 and 1"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens must be a whole number from 1 to 512"),
        ("hi", {"seed": -1}, "seed must be a whole number"),
        ("hi", {"colour": "blue"}, "unknown text option"),
    ],
)
def test_check_rejects_bad_input(tiny: TextGenerator, prompt: str, params: dict, message: str) -> None:
    with pytest.raises(GeneratorError, match=message.replace("(", r"\(")):
        tiny.check(prompt, params)


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GeneratorError, match=r"unknown model .*no such local path"):
        TextGenerator(str(tmp_path / "nowhere")).check("hi", {})
    with pytest.raises(GeneratorError, match=r"no config\.json"):
        TextGenerator(str(tmp_path)).check("hi", {})


def test_prompt_uses_chat_template_system_prompt_and_history(tiny: TextGenerator) -> None:
    request = _request(tiny, "and now?", system_prompt="Be a pirate.",
                       history=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ahoy"}])
    text = tiny.format_prompt(request)
    assert text == ("<|im_start|>system\nBe a pirate.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                    "<|im_start|>assistant\nahoy<|im_end|>\n<|im_start|>user\nand now?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_same_seed_same_text_and_different_seed_differs(tiny: TextGenerator) -> None:
    run = lambda seed: tiny.generate([_request(tiny, "tell me", seed=seed, max_new_tokens=24)])[0].text  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_streaming_partials_grow_to_the_final_text(tiny: TextGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text, "STREAM_EVERY_S", 0.0)  # every token's text, not four a second
    partials: list[str] = []
    request = _request(tiny, "stream", max_new_tokens=20, temperature=0.0)
    request.on_partial = partials.append
    result = tiny.generate([request])[0]
    assert len(partials) >= 5
    assert all(b.startswith(a) for a, b in itertools.pairwise(partials))
    assert partials[-1] == result.text
    assert result.metadata["tokens"] == 20 and result.metadata["stop"] == "length"


def test_batch_gives_each_row_its_own_result(tiny: TextGenerator) -> None:
    prompts = ["first prompt", "b", "a much longer third prompt here"]
    requests = [_request(tiny, p, job_id=i, temperature=0.0, max_new_tokens=8 + 4 * i) for i, p in enumerate(prompts)]
    batched = tiny.generate(requests)
    solo = [tiny.generate([_request(tiny, p, temperature=0.0, max_new_tokens=8 + 4 * i)])[0]
            for i, p in enumerate(prompts)]
    assert [r.text for r in batched] == [r.text for r in solo]
    assert [r.metadata["tokens"] for r in batched] == [8, 12, 16]
    assert {r.metadata["batch_size"] for r in batched} == {3}


def test_cancel_stops_one_row_and_not_the_others(tiny: TextGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text, "STREAM_EVERY_S", 0.0)  # the cancel below is pressed from a partial
    keep = _request(tiny, "keep", job_id=1, max_new_tokens=40)
    stop = _request(tiny, "stop", job_id=2, max_new_tokens=40)
    stop.on_partial = lambda text: stop.cancel_event.set() if len(text) >= 4 else None
    kept, stopped = tiny.generate([keep, stop])
    assert stopped.cancelled and stopped.metadata["tokens"] < 40
    assert not kept.cancelled and kept.metadata["tokens"] == 40


class CountingTextGenerator(AdapterTextGenerator):
    """The real generator (tiny model), recording how many requests each ``serve`` call began with.
    fp32 unless told otherwise, as the ``tiny`` fixture its rows are compared with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("quantization_mode", "none")
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def serve(self, requests: list[Request], feed: Feed) -> None:
        self.calls.append(len(requests))
        super().serve(requests, feed)


@contextlib.asynccontextmanager
async def text_queue(tmp_path: Path, generator: TextGenerator) -> AsyncIterator[GenerationQueue]:
    registry = ModelRegistry({"text": lambda _name: generator}, {"text": "tiny"}, budget_bytes=2**30)
    store = SqlJobStore(open_database(tmp_path / "db.sqlite3"))
    queue = GenerationQueue(store, registry, QueueConfig(artifacts_dir=tmp_path / "a"))
    await queue.start()
    try:
        yield queue
    finally:
        await queue.stop()


def solo(generator: TextGenerator, prompt: str, **params: object) -> str | None:
    checked = generator.check(prompt, dict(params))
    return generator.generate([Request(0, prompt, checked)])[0].text


@pytest.mark.asyncio
async def test_concurrent_jobs_are_batched_through_the_queue(tmp_path: Path, tiny_model_dir: Path) -> None:
    generator = CountingTextGenerator(str(tiny_model_dir), max_new_tokens=64, max_batch_size=8)
    async with text_queue(tmp_path, generator) as queue:
        prompts = [f"user {i} says hi" for i in range(6)]
        records = await asyncio.gather(*[
            queue.submit(NewJob(kind="text", model="", prompt=p, requester=f"u{i}",
                                params={"temperature": 0.0, "max_new_tokens": 12}))
            for i, p in enumerate(prompts)])
        done = [await queue.wait(r.id) for r in records]
    assert all(r.status == "succeeded" for r in done)
    assert len(generator.calls) < len(prompts)
    answers = [solo(generator, p, temperature=0.0, max_new_tokens=12) for p in prompts]
    assert [r.result["text"] for r in done if r.result] == answers


@pytest.mark.asyncio
async def test_a_job_joins_the_running_batch_and_a_short_one_leaves_it_early(tmp_path: Path,
                                                                            tiny_model_dir: Path) -> None:
    """Continuous batching: a job submitted while a long answer is being written starts at
    once in the same batch (no second ``serve``), finishes and is delivered while the long
    one goes on, and both give exactly what they give alone."""
    generator = CountingTextGenerator(str(tiny_model_dir), max_new_tokens=512, ignore_eos=True)
    long_params = {"temperature": 0.0, "max_new_tokens": 400}
    short_params = {"temperature": 0.7, "seed": 5, "max_new_tokens": 6}
    async with text_queue(tmp_path, generator) as queue:
        order: list[str] = []
        long = await queue.submit(NewJob(kind="text", model="", prompt="a long story", requester="u0",
                                         params=long_params))
        async for event in queue.watch(long.id):
            if event.type == "partial":
                break
        short = await queue.submit(NewJob(kind="text", model="", prompt="quick one", requester="u1",
                                          params=short_params))
        for job_id, name in ((short.id, "short"), (long.id, "long")):
            queue.subscribe(job_id, lambda e, name=name: order.append(name) if e.type == "finished" else None)
        long_done, short_done = await queue.wait(long.id), await queue.wait(short.id)
    assert generator.calls == [1]  # one batch: the short job joined it
    assert order == ["short", "long"]
    assert short_done.result and short_done.result["metadata"]["batch_size"] == 2
    assert short_done.result["metadata"]["tokens"] == 6 and long_done.result
    assert long_done.result["metadata"]["tokens"] == 400
    assert short_done.result["text"] == solo(generator, "quick one", **short_params)
    assert long_done.result["text"] == solo(generator, "a long story", **long_params)


@pytest.mark.asyncio
async def test_a_job_that_cannot_join_is_not_overtaken(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A waiting job for another adapter (another batch key) heads the lane: jobs behind it
    that would fit the running batch do not join past it; it runs as soon as the batch ends."""
    adapter = str(random_lora_adapter(tiny_model_dir, tmp_path / "adapter", seed=1))
    generator = CountingTextGenerator(str(tiny_model_dir), max_new_tokens=512, ignore_eos=True)
    async with text_queue(tmp_path, generator) as queue:
        started: list[str] = []
        first = await queue.submit(NewJob(kind="text", model="", prompt="running", requester="u0",
                                          params={"temperature": 0.0, "max_new_tokens": 200}))
        async for event in queue.watch(first.id):
            if event.type == "partial":
                break
        other = await queue.submit(NewJob(kind="text", model="", prompt="with adapter", requester="u1",
                                          params={"adapter": adapter, "max_new_tokens": 4}))
        base = await queue.submit(NewJob(kind="text", model="", prompt="base again", requester="u2",
                                         params={"max_new_tokens": 4}))
        for job_id, name in ((other.id, "adapter"), (base.id, "base")):
            queue.subscribe(job_id, lambda e, name=name: started.append(name) if e.type == "started" else None)
        done = [await queue.wait(r.id) for r in (first, other, base)]
    assert [r.status for r in done] == ["succeeded"] * 3
    assert started == ["adapter", "base"]
    assert generator.calls == [1, 1, 1]
    assert done[1].result and done[1].result["metadata"]["adapter"] == adapter


@pytest.mark.slow
def test_packaged_smollm2_answers(tmp_path: Path) -> None:
    """Real generation with the embedded model (converted once, then cached)."""
    from tests.conftest import MODEL_CACHE

    generator = TextGenerator("smollm2", max_new_tokens=64, cache_dir=MODEL_CACHE)
    prompt = "Who wrote Romeo and Juliet?"
    request = Request(1, prompt, generator.check(prompt, {"temperature": 0.0, "max_new_tokens": 16}))
    result = generator.generate([request])[0]
    assert "shakespeare" in (result.text or "").lower()
    assert result.metadata["tokens"] <= 16


@pytest.mark.asyncio
async def test_jobs_claimed_for_a_batch_the_model_stopped_waiting_for_run_later(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the loop answers a join too late (the model thread gives up waiting), the jobs it
    claimed are put back in the queue when the batch ends and run next: none is lost or failed."""
    from generators import queue as queue_module

    monkeypatch.setattr(queue_module._QueueFeed, "JOIN_TIMEOUT_S", 0.0)
    generator = CountingTextGenerator(str(tiny_model_dir), max_new_tokens=512, ignore_eos=True)
    async with text_queue(tmp_path, generator) as queue:
        first = await queue.submit(NewJob(kind="text", model="", prompt="running", requester="u0",
                                          params={"temperature": 0.0, "max_new_tokens": 300}))
        async for event in queue.watch(first.id):
            if event.type == "partial":
                break
        late = [await queue.submit(NewJob(kind="text", model="", prompt=f"late {i}", requester=f"u{i + 1}",
                                          params={"temperature": 0.0, "max_new_tokens": 5})) for i in range(2)]
        done = [await queue.wait(r.id) for r in (first, *late)]
    assert [r.status for r in done] == ["succeeded"] * 3
    assert generator.calls == [1, 2]  # the late two ran in a batch of their own, after the first
    assert [r.result["text"] for r in done[1:] if r.result] == [
        solo(generator, f"late {i}", temperature=0.0, max_new_tokens=5) for i in range(2)]
