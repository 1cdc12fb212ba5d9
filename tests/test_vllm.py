"""The OpenAI-compatible text backend against a real vLLM CPU server (`tests.vllm_server`):
streaming into the queue, reproducible seeds, concurrent jobs, cancel that stops the
server, a server's promoted LoRA adapter served by name, rollback, a missing adapter, bad
parameters and a bad key — and a /chat through the fake Discord answered by vLLM.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.core.services import Services
from tests.discord_bots import chat_answer, make_bot
from tests.fakediscord import FakeDiscord, running_client
from tests.handlers import G, Recorder, run
from tests.openai_services import MEMBER, openai_services
from tests.openai_services import chat as openai_chat
from tests.vllm_server import API_KEY, SERVED, VllmServer

__all__ = ["make_bot"]  # the fixture

@pytest_asyncio.fixture
async def make_services(vllm: VllmServer, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    async with openai_services(tmp_path) as make:
        yield lambda **settings: make(vllm.url, **{"openai_api_key": API_KEY, "max_pending_per_user": 20,
                                                   **settings})


async def chat(services: Services, prompt: str = "hello", **options: Any) -> Recorder:
    return await openai_chat(services, prompt, **options)


def text_of(out: Recorder) -> str:
    [record] = out.results
    return str(record.result["text"])


def promote(services: Services, adapter: Path) -> Path:
    """A promoted text version of this server whose folder holds ``adapter`` (as training leaves it)."""
    store = services.community
    version = store.create_version(G, "text", None, {"item_ids": []}, {})
    folder = services.settings.versions_dir / G / "text" / f"v{version.id}"
    shutil.copytree(adapter, folder)
    store.finish_version(version.id, True, {}, "promoted", str(folder))
    services.adapters.set(G, str(folder))  # what the trainer's on_serving_changed does
    return folder


@pytest.mark.asyncio
async def test_streams_with_reproducible_seeds(make_services: Any) -> None:
    services = await make_services()
    first = await chat(services, "tell me something", temperature=0.9, seed=11, max_tokens=48)
    again = await chat(services, "tell me something", temperature=0.9, seed=11, max_tokens=48)
    other = await chat(services, "tell me something", temperature=0.9, seed=12, max_tokens=48)
    assert text_of(first) == text_of(again) != text_of(other)
    assert first.partials and text_of(first).startswith(first.partials[0])  # it streamed
    [record] = first.results
    assert record.result["metadata"]["model"] == SERVED and record.result["metadata"]["tokens"] == 48
    assert record.model == "server"  # AIGC_OPENAI_MODEL unset: whichever model the server serves


@pytest.mark.asyncio
async def test_eight_jobs_run_on_the_server_at_once(make_services: Any) -> None:
    services = await make_services()
    outs = await asyncio.gather(*(chat(services, f"prompt {i}", max_tokens=200, temperature=0.0) for i in range(8)))
    records = [o.results[0] for o in outs]
    assert len(records) == 8
    # All eight started before the first one finished: the server batched them, not the bot.
    assert max(r.started_at or 0 for r in records) < min(r.finished_at or 0 for r in records)


@pytest.mark.asyncio
async def test_cancel_stops_generation_on_the_server_within_a_second(vllm: VllmServer, make_services: Any) -> None:
    # 3,000 tokens: seconds even for this tiny model on a quiet machine (it generates into the
    # socket faster than the bot reads), so the answer cannot be over before the cancel lands.
    services = await make_services(max_new_tokens=4000)
    before = await asyncio.to_thread(vllm.generated_tokens)
    out = Recorder()
    streaming = asyncio.Event()  # the first streamed text: the server is generating
    services.queue.subscribe(1, lambda event: streaming.set() if event.type == "partial" else None)
    job = asyncio.create_task(run("chat", MEMBER, out, services, prompt="a long story", max_tokens=3000,
                                  temperature=0.8))
    await asyncio.wait_for(streaming.wait(), 30)
    await services.queue.cancel(1)
    await asyncio.sleep(1.0)
    after_a_second = await asyncio.to_thread(vllm.generated_tokens)
    await asyncio.sleep(1.0)
    # Had the server gone on, the count would still grow.
    assert await asyncio.to_thread(vllm.generated_tokens) == after_a_second
    assert 0 < after_a_second - before < 3000  # it had started, and stopped before the end
    await job
    assert out.errors == ["Job 1 was cancelled."]


@pytest.mark.asyncio
async def test_a_promoted_adapter_is_served_by_name_rolled_back_or_missing(vllm: VllmServer,
                                                                           make_services: Any) -> None:
    services = await make_services()
    options = {"temperature": 0.0, "max_tokens": 24}
    base = text_of(await chat(services, "same words", **options))
    folder = promote(services, vllm.adapters[0])
    tuned = await chat(services, "same words", **options)
    name = f"aigc-{G}-{folder.name}"
    assert tuned.results[0].result["metadata"]["adapter"] == name and text_of(tuned) != base

    services.adapters.set(G, None)  # rolled back to the base model: the same answer as before
    assert text_of(await chat(services, "same words", **options)) == base

    broken = promote(services, vllm.adapters[1])
    (broken / "adapter_model.safetensors").write_bytes(b"not weights")  # vLLM can't load it
    fallback = await chat(services, "same words", **options)
    assert text_of(fallback) == base
    assert fallback.results[0].result["metadata"]["adapter"].endswith("the base model answered")


@pytest.mark.asyncio
async def test_bad_parameters_and_a_bad_key_are_clear(make_services: Any) -> None:
    services = await make_services(max_new_tokens=4096)
    too_long = await chat(services, "hi", max_tokens=4000)  # more than the server's 3,072 of context
    [error] = too_long.errors
    assert error.startswith("Job 1 failed: the text server refused the request: ") and "3072" in error
    wrong = await make_services(openai_api_key="not-the-key")
    assert (await chat(wrong)).errors == ["Job 1 failed: the text server refused the bot's API key; the operator "
                                          "must fix it"]


@pytest.mark.asyncio
async def test_chat_over_discord_is_answered_by_vllm_with_the_servers_adapter(
        vllm: VllmServer, fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot(None, text_backend="openai", openai_base_url=vllm.url, openai_api_key=API_KEY)
    G_ = fake.guild_id
    version = services.community.create_version(G_, "text", None, {"item_ids": []}, {})
    folder = services.settings.versions_dir / G_ / "text" / f"v{version.id}"
    shutil.copytree(vllm.adapters[0], folder)
    services.community.finish_version(version.id, True, {}, "promoted", str(folder))
    services.adapters.set(G_, str(folder))
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(
            fake.slash_command("chat", {"prompt": "hello there", "temperature": 0.0, "max_tokens": 16}))
        answer = await chat_answer(fake, interaction, timeout=60)
    record = await services.queue.get(1)
    assert record.result["metadata"]["adapter"] == f"aigc-{G_}-v{version.id}"
    assert answer.content == record.result["text"].strip() and not answer.ephemeral
