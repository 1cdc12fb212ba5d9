"""The text generator on a tiny model from a config, and once on the packaged SmolLM2."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from generators.base import GeneratorError, Request
from generators.queue import GenerationQueue, QueueConfig
from generators.registry import ModelRegistry
from generators.text import TextGenerator
from storage.database import open_database
from storage.jobs import NewJob, SqliteJobStore


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> TextGenerator:
    generator = TextGenerator(str(tiny_model_dir), max_new_tokens=512, max_prompt_chars=200)
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


def test_streaming_partials_grow_to_the_final_text(tiny: TextGenerator) -> None:
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


def test_cancel_stops_one_row_and_not_the_others(tiny: TextGenerator) -> None:
    keep = _request(tiny, "keep", job_id=1, max_new_tokens=40)
    stop = _request(tiny, "stop", job_id=2, max_new_tokens=40)
    stop.on_partial = lambda text: stop.cancel_event.set() if len(text) >= 4 else None
    kept, stopped = tiny.generate([keep, stop])
    assert stopped.cancelled and stopped.metadata["tokens"] < 40
    assert not kept.cancelled and kept.metadata["tokens"] == 40


@pytest.mark.asyncio
async def test_concurrent_jobs_are_batched_through_the_queue(tmp_path: Path, tiny_model_dir: Path) -> None:
    generator = TextGenerator(str(tiny_model_dir), max_new_tokens=64, max_batch_size=8)
    calls: list[int] = []
    original = generator.generate

    def counting(requests: list[Request]) -> list:
        calls.append(len(requests))
        return original(requests)

    generator.generate = counting  # type: ignore[method-assign]
    registry = ModelRegistry({"text": lambda _name: generator}, {"text": "tiny"}, budget_bytes=2**30)
    store = SqliteJobStore(open_database(tmp_path / "db.sqlite3"))
    queue = GenerationQueue(store, registry, QueueConfig(artifacts_dir=tmp_path / "a"))
    await queue.start()
    try:
        prompts = [f"user {i} says hi" for i in range(6)]
        records = await asyncio.gather(*[
            queue.submit(NewJob(kind="text", model="", prompt=p, requester=f"u{i}",
                                params={"temperature": 0.0, "max_new_tokens": 12}))
            for i, p in enumerate(prompts)])
        done = [await queue.wait(r.id) for r in records]
    finally:
        await queue.stop()
    assert all(r.status == "succeeded" for r in done)
    assert len(calls) < len(prompts) and sum(calls) == len(prompts)
    def solo(prompt: str) -> str | None:
        params = generator.check(prompt, {"temperature": 0.0, "max_new_tokens": 12})
        return original([Request(0, prompt, params)])[0].text

    assert [r.result["text"] for r in done if r.result] == [solo(p) for p in prompts]


@pytest.mark.slow
def test_packaged_smollm2_answers(tmp_path: Path) -> None:
    """Real generation with the embedded model (converted once, then cached)."""
    from tests.conftest import MODEL_CACHE

    generator = TextGenerator("smollm2", max_new_tokens=64, cache_dir=MODEL_CACHE)
    request = Request(1, "What is the capital of France? Answer in one word.",
                      generator.check("What is the capital of France? Answer in one word.",
                                      {"temperature": 0.0, "max_new_tokens": 16}))
    result = generator.generate([request])[0]
    assert "paris" in (result.text or "").lower()
    assert result.metadata["tokens"] <= 16
