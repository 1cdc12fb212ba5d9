"""Shared pytest fixtures."""

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests import postgres_server as pg
from tests import vllm_server
from tests.databases import db_target  # noqa: F401  (the contract: SQLite and PostgreSQL)
from tests.fakediscord import FakeDiscord
from tests.fakediscord.fixtures import *  # noqa: F403  (fake_discord, fake_discord_factory)
from tests.frontends import FRONTENDS, open_frontend
from tests.tiny_text import build_tiny_chat_model

VLLM = pytest.StashKey[vllm_server.VllmServer]()

#: Where the packaged SmolLM2 is converted once and cached, shared with `aigcbot run`.
MODEL_CACHE = Path(__file__).resolve().parent.parent / "data" / "models"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model folder (char tokenizer + 2-layer Llama), built once per run."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture
def bot_env(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Environment for a bot on a fresh data folder and the tiny model; returns the data dir."""
    data = tmp_path / "data"
    for name in list(__import__("os").environ):
        if name.startswith(("AIGC_", "DISCORD_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AIGC_DATA_DIR", str(data))
    monkeypatch.setenv("AIGC_TEXT_MODEL", str(tiny_model_dir))
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's checkout
    return data


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start vLLM as soon as a test that needs it is collected: it boots (a minute or more)
    while the other tests run."""
    if any("vllm" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.stash[VLLM] = vllm_server.start(Path(tempfile.mkdtemp(prefix="aigc-vllm-")))


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(VLLM, None)
    if server is not None:
        server.stop()
        shutil.rmtree(server.model.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def vllm(pytestconfig: pytest.Config) -> vllm_server.VllmServer:
    """The real vLLM server of this run, once it answers."""
    server = pytestconfig.stash[VLLM]
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pg.PostgresServer]:
    """This run's PostgreSQL: a throwaway cluster started when a test first asks, or the server
    AIGC_TEST_DATABASE_URL names. Without either: skipped, or failed under CI=true."""
    server = pg.open_or_skip()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: pg.PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database of this test's own on it, dropped afterwards."""
    with postgres_server.database() as url:
        yield url


# --- one bot, run through each front end (gateway, HTTP endpoint, console) -----------------------
@pytest.fixture(params=FRONTENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def open_bot(kind: str, fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    """``async with open_bot(generators, **settings) as bot`` → a started front end of this test's
    kind (``generators`` None: the bot's own models)."""
    monkeypatch.chdir(tmp_path)  # no stray .env

    def make(generators: dict[str, Any] | None, **overrides: Any) -> Any:
        return open_frontend(kind, fake_discord, tmp_path / "data", tiny_model_dir, generators, **overrides)

    yield make
