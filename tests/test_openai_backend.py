"""The OpenAI-compatible text backend against a server whose failures the test controls
(`tests.fake_openai`), through the real services, queue and generation flow.

The same backend against a real vLLM server is `tests/test_vllm.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.settings import SettingsError, load_settings
from tests.fake_openai import FakeOpenAI
from tests.handlers import G
from tests.openai_services import chat, openai_services


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI().start()
    yield fake
    await fake.close()


@pytest_asyncio.fixture
async def make_services(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    async with openai_services(tmp_path) as make:
        yield make


@pytest.mark.asyncio
async def test_answers_stream_and_options_map_to_the_servers_names(server: FakeOpenAI, make_services: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    services = await make_services(server.url)
    out = await chat(services, "tell me a story", temperature=0.3, seed=7, max_tokens=16)
    [record] = out.results
    assert record.result["text"] == "base: tell me a story" and record.result["metadata"]["tokens"] == 5
    [request] = server.requests
    assert request["model"] == "base" and request["stream"] is True and request["seed"] == 7
    assert request["temperature"] == 0.3 and request["max_tokens"] == 16
    assert (request["top_k"], request["repetition_penalty"]) == (50, 1.1)  # vLLM takes both
    assert request["messages"][0] == {"role": "system", "content": services.settings.system_prompt}
    assert request["messages"][-1] == {"role": "user", "content": "tell me a story"}

    server.owned_by = "llamacpp"  # llama.cpp calls repetition_penalty repeat_penalty
    llama = await make_services(server.url)
    await chat(llama)
    assert server.requests[-1]["repeat_penalty"] == 1.1 and "repetition_penalty" not in server.requests[-1]

    server.owned_by = "library"  # Ollama: neither, dropped with one log line each, never an error
    ollama = await make_services(server.url)
    with caplog.at_level(logging.INFO, logger="generators.openai_text"):
        assert (await chat(ollama)).results and (await chat(ollama)).results
    assert "top_k" not in server.requests[-1] and "repeat_penalty" not in server.requests[-1]
    assert sum("takes no top_k" in r.message for r in caplog.records) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [500, 503])
async def test_a_failing_server_is_unavailable_to_the_member(server: FakeOpenAI, make_services: Any,
                                                             status: int) -> None:
    server.fail_status = status
    services = await make_services(server.url)
    out = await chat(services)
    assert out.errors == ["Job 1 failed: the text server is unavailable; try again in a moment"]
    assert server.url not in out.errors[0]


@pytest.mark.asyncio
async def test_a_server_that_is_down_or_refuses_the_key_or_the_request(server: FakeOpenAI, make_services: Any,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    down = await make_services(closed, openai_timeout_s=2)
    with caplog.at_level(logging.ERROR, logger="generators.openai_text"):
        assert (await chat(down)).errors == ["Job 1 failed: the text server is unavailable; try again in a moment"]
    assert any(closed in r.getMessage() for r in caplog.records)  # the URL is in the log only

    server.api_key = "right-key"
    wrong = await make_services(server.url, openai_api_key="wrong-key")
    with caplog.at_level(logging.ERROR, logger="generators.openai_text"):
        refused = await chat(wrong)
    assert refused.errors == ["Job 1 failed: the text server refused the bot's API key; the operator must fix it"]
    assert any("refused the API key (AIGC_OPENAI_API_KEY)" in r.getMessage() for r in caplog.records)
    assert all("wrong-key" not in r.getMessage() for r in caplog.records)

    right = await make_services(server.url, openai_api_key="right-key", max_new_tokens=4096)
    too_long = await chat(right, max_tokens=2000)
    assert too_long.errors == ["Job 1 failed: the text server refused the request: max_tokens is too large for "
                               "this model"]


async def long_answer(server: FakeOpenAI, services: Any) -> asyncio.Task[Any]:
    """A member's /chat whose answer streams slowly (about 3 s), once its stream is open."""
    server.token_delay_s = 0.2
    job = asyncio.create_task(chat(services, " ".join(["word"] * 14), max_tokens=16))
    for _ in range(100):
        if server.open_streams:
            break
        await asyncio.sleep(0.02)
    assert server.open_streams == 1
    return job


async def until_closed(server: FakeOpenAI) -> float:
    """Seconds until the server has no stream open (at most about 2)."""
    start = asyncio.get_running_loop().time()
    for _ in range(100):
        if not server.open_streams:
            break
        await asyncio.sleep(0.02)
    return asyncio.get_running_loop().time() - start


@pytest.mark.asyncio
async def test_cancel_closes_the_stream_and_the_server_stops(server: FakeOpenAI, make_services: Any) -> None:
    services = await make_services(server.url)
    job = await long_answer(server, services)
    await services.queue.cancel(1)
    assert await until_closed(server) < 1.0 and server.open_streams == 0
    out = await job
    assert out.errors == ["Job 1 was cancelled."] and (await services.queue.get(1)).status == "cancelled"


@pytest.mark.asyncio
async def test_stopping_the_bot_mid_answer_closes_the_stream_and_queues_the_job_again(
        server: FakeOpenAI, make_services: Any) -> None:
    services = await make_services(server.url)
    job = await long_answer(server, services)
    [generator] = services.registry.remote()
    stopped_at = asyncio.get_running_loop().time()
    await services.queue.stop()
    assert asyncio.get_running_loop().time() - stopped_at < 1.0
    assert await until_closed(server) < 1.0 and server.open_streams == 0
    assert generator.client is None  # the client is closed too
    assert (await services.queue.get(1)).status == "queued"  # for the next start, not lost
    job.cancel()  # the member's command, still waiting for its answer
    with contextlib.suppress(asyncio.CancelledError):
        await job


@pytest.mark.asyncio
async def test_the_server_batches_the_lane_sends_jobs_at_once(server: FakeOpenAI, make_services: Any) -> None:
    server.token_delay_s = 0.05
    services = await make_services(server.url, max_pending_per_user=20)
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, server.open_streams)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    outs = await asyncio.gather(*(chat(services, f"prompt {i}") for i in range(8)))
    watcher.cancel()
    assert all(o.results for o in outs) and most == 8


def adapter_folder(root: Path, guild: str, version: int) -> Path:
    folder = root / "finetune" / guild / "text" / f"v{version}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


@pytest.mark.asyncio
async def test_a_servers_adapter_is_loaded_once_then_served_by_name(server: FakeOpenAI, make_services: Any) -> None:
    services = await make_services(server.url)
    services.adapters.set(G, str(adapter_folder(services.settings.data_dir, G, 3)))
    first, second = await chat(services), await chat(services)
    name = f"aigc-{G}-v3"
    assert [r.result["metadata"]["adapter"] for r in (*first.results, *second.results)] == [name, name]
    assert first.results[0].result["text"].startswith(f"{name}:")
    loads = [r["load"] for r in server.requests if "load" in r]
    assert loads == [{"lora_name": name, "lora_path": str(services.adapters.path_for(G))}]  # once

    services.adapters.set(G, None)  # rolled back to the base model
    assert (await chat(services)).results[0].result["text"].startswith("base:")

    server.loadable = False  # the server can't read the folder: the base model answers, and says so
    services.adapters.set(G, str(adapter_folder(services.settings.data_dir, G, 4)))
    [fallback] = (await chat(services)).results
    assert fallback.result["text"].startswith("base:")
    assert fallback.result["metadata"]["adapter"].endswith("could not be loaded on the text server: the base "
                                                          "model answered")


@pytest.mark.asyncio
async def test_servers_without_adapters_answer_with_the_base_model(server: FakeOpenAI, make_services: Any) -> None:
    server.owned_by = "llamacpp"
    services = await make_services(server.url)
    services.adapters.set(G, str(adapter_folder(services.settings.data_dir, G, 3)))
    [record] = (await chat(services)).results
    assert record.result["text"].startswith("base:") and not [r for r in server.requests if "load" in r]
    assert record.result["metadata"]["adapter"] == "not served by this llama.cpp server: the base model answered"


@pytest.mark.parametrize(("settings", "message"), [
    ({"text_backend": "openai"}, "setting AIGC_OPENAI_BASE_URL: needed when AIGC_TEXT_BACKEND=openai"),
    ({"text_backend": "openai", "openai_base_url": "localhost:8000"}, "setting AIGC_OPENAI_BASE_URL: expected an"),
    ({"text_backend": "tgi"}, "setting AIGC_TEXT_BACKEND: Input should be 'embedded' or 'openai'"),
])
def test_a_bad_backend_setting_stops_the_bot_with_one_line(settings: dict[str, str], message: str,
                                                           tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None, data_dir=tmp_path, **settings)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
