"""Fine-tuning: the gate, real LoRA training on the embedded SmolLM2, runs that die or are
cancelled, training in the queue's training lane, serving adapters and rolling back, and
continuing a server's image model. The tiny model stands in wherever SmolLM2 isn't the point."""

from __future__ import annotations

import asyncio
import io
import math
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from bot.core.curation import content_hash
from generators.adapters import AdapterTextGenerator
from generators.base import Request
from generators.finetune_gate import GateConfig, decide
from generators.finetune_image import ImageTuneConfig
from generators.finetune_text import (
    TextTuneConfig,
    TextTuneResult,
    finetune_text,
    held_out_split,
    load_base,
    pack,
    tune,
)
from generators.image_train import model_header
from generators.lora import GuildAdapters
from generators.queue import GenerationQueue, QueueConfig
from generators.registry import ModelRegistry
from jobs.finetune import (
    TRAINING_MODEL,
    FinetuneRunner,
    FinetuneSettings,
    LoopDb,
    NightlyTrainer,
    TrainingGenerator,
    adapter_updater,
    serving_paths,
)
from storage.community import CommunityStore, NewFile, NewItem
from storage.database import AsyncDatabase, open_database
from storage.jobs import SqlJobStore
from tests.conftest import MODEL_CACHE
from tests.tiny_text import random_lora_adapter

GUILD = "1000"
CHANNEL = "2000"


def community_corpus(count: int, seed: int = 0) -> list[str]:
    """Chat-like messages of a gaming server: what a curated community set looks like."""
    rng = random.Random(seed)
    games = ["chess", "Minecraft", "Terraria", "board games", "Among Us", "Mario Kart", "Valheim", "trivia"]
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    times = ["6pm", "7pm", "8pm", "9pm"]
    templates = ["Reminder: {g} night is on {d} at {t} in the voice channel, bring snacks!",
                 "Who is up for {g} on {d}? I can host at {t}.",
                 "GG everyone, {g} on {d} was great. Same time next week at {t}?"]
    texts: list[str] = []
    while len(texts) < count:
        text = rng.choice(templates).format(g=rng.choice(games), d=rng.choice(days), t=rng.choice(times))
        if text not in texts:
            texts.append(text)
    return texts


# --- the gate --------------------------------------------------------------------------------
def test_gate_promotes_only_a_clear_improvement_and_says_why() -> None:
    config = GateConfig(min_improvement=0.05)
    assert decide(90.0, 100.0, config).promote
    small = decide(97.0, 100.0, config)
    assert not small.promote and "less than the required 5.0%" in small.reason
    worse = decide(105.0, 100.0, config, reference_name="version 3")
    assert not worse.promote and "no better" in worse.reason and "version 3" in worse.reason
    assert not decide(math.nan, 100.0).promote
    assert not decide(math.inf, 100.0).promote
    assert decide(90.0, 100.0).to_json()["improvement"] == pytest.approx(0.1)


def test_packing_puts_eos_between_messages_and_cuts_fixed_blocks(tiny_model_dir: Path) -> None:
    _, tokenizer = load_base(str(tiny_model_dir))
    blocks = pack(tokenizer, ["abc", "de"], 4)
    eos = tokenizer.eos_token_id
    assert blocks.shape == (1, 4) and blocks[0, 3].item() == eos  # a b c EOS | d e EOS (ragged end dropped)
    assert pack(tokenizer, ["ab"], 64).shape == (1, 3)  # shorter than a block: one short block
    keys = [content_hash(t) for t in community_corpus(200)]
    train, held = held_out_split(keys, 0.2)
    assert 20 <= len(held) <= 60 and sorted(train + held) == list(range(200))
    _, held_more = held_out_split(keys + [content_hash(f"new {n}") for n in range(50)], 0.2)
    assert set(held) <= set(held_more)  # an item never changes sides when others come (or go)
    assert len(held_out_split(keys[:3], 0.2, minimum=2)[1]) == 2


# --- real training on the embedded SmolLM2 ---------------------------------------------------
# One torch thread: on a shared 2-core machine, two threads waiting on each other's descheduled
# half made this 5-8× slower (measured: 30 s with one thread, 4 minutes with two under load).
SMOLLM2_CONFIG = TextTuneConfig(block_size=64, batch_blocks=4, micro_blocks=2, max_steps=6, lr=3e-3, warmup_steps=1,
                                top_layers=8, max_eval_blocks=4, threads=1)


@dataclass
class Tuned:
    result: TextTuneResult
    held_out: list[str]
    checksum_before: float


def _checksum(model: Any) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    return load_base("smollm2", MODEL_CACHE)


@pytest.fixture(scope="module")
def tuned(smollm2: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    texts = community_corpus(240)
    train, held = held_out_split([content_hash(t) for t in texts], 0.15)
    before = _checksum(smollm2[0])
    result = finetune_text([texts[i] for i in train], [texts[i] for i in held],
                           tmp_path_factory.mktemp("versions") / "v1", base=smollm2, config=SMOLLM2_CONFIG)
    return Tuned(result, [texts[i] for i in held], before)


@pytest.mark.slow
def test_lora_on_smollm2_lowers_held_out_perplexity(tuned: Tuned, smollm2: tuple[Any, Any]) -> None:
    result = tuned.result
    assert result.steps == 6 and result.tokens == 6 * 4 * 64
    assert result.ppl_candidate < 0.8 * result.ppl_base, result.metrics()
    assert decide(result.ppl_candidate, result.reference).promote
    folder = result.adapter_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.parent.glob(".*partial*"))
    model = smollm2[0]
    assert not any("lora" in name for name, _ in model.named_modules())  # the base is given back as it came
    assert _checksum(model) == pytest.approx(tuned.checksum_before, rel=0, abs=1e-6)


@pytest.mark.slow
def test_gate_rejects_a_version_trained_on_noise(tuned: Tuned, smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = smollm2
    eval_blocks = pack(tokenizer, tuned.held_out, SMOLLM2_CONFIG.block_size)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, len(tokenizer), (24, SMOLLM2_CONFIG.block_size), generator=generator)
    config = replace(SMOLLM2_CONFIG, max_steps=4)
    result = tune(model, noise, eval_blocks, tmp_path / "v2", config=config,
                  reference_adapter=tuned.result.adapter_dir)
    # The serving adapter is measured on the same held-out set as before.
    assert result.ppl_reference == pytest.approx(tuned.result.ppl_candidate, rel=1e-3)
    decision = decide(result.ppl_candidate, result.reference, reference_name="version 1")
    assert not decision.promote and "no better" in decision.reason, decision.reason


# --- runs through the runner and the queue (tiny model) --------------------------------------
TINY_CONFIG = TextTuneConfig(block_size=32, batch_blocks=2, micro_blocks=2, max_steps=8, lr=3e-2, warmup_steps=0,
                             max_eval_blocks=4, threads=1)


@pytest.fixture
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_base(str(tiny_model_dir))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CommunityStore]:
    db = open_database(tmp_path / "bot.sqlite3")
    yield CommunityStore(db, tmp_path / "files")
    db.close()


def _approve(store: CommunityStore, texts: list[str], prefix: str = "m") -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    items = [NewItem(GUILD, CHANNEL, f"u{i % 5}", f"{prefix}{i}", text, content_hash(text))
             for i, text in enumerate(texts)]
    for item_id in store.capture(items).stored:
        store.decide(GUILD, item_id, True, "mod")


def _runner(store: CommunityStore, tmp_path: Path, tiny: tuple[Any, Any], adapters: GuildAdapters,
            **kwargs: Any) -> FinetuneRunner:
    settings = FinetuneSettings(versions_dir=tmp_path / "versions", text=TINY_CONFIG, min_texts=10,
                                image=ImageTuneConfig(steps=3, batch_size=8, image_size=28, channels=1))
    return FinetuneRunner(store, settings, on_serving_changed=adapter_updater(adapters),
                          load_text_base=lambda: tiny, **kwargs)


def test_runner_promotes_an_improvement_and_serves_it(store: CommunityStore, tmp_path: Path,
                                                      tiny: tuple[Any, Any]) -> None:
    _approve(store, community_corpus(60))
    adapters = GuildAdapters()
    outcome = _runner(store, tmp_path, tiny, adapters).run(GUILD, "text")
    assert outcome.promoted and outcome.reason.startswith("promoted"), outcome.reason
    version = store.current(GUILD, "text")
    assert version is not None and version.id == outcome.version_id and version.parent_id is None
    assert version.path == outcome.path and Path(version.path, "adapter_config.json").is_file()
    assert version.metrics["ppl_candidate"] < version.metrics["ppl_base"]
    held = held_out_split([item.sha256 for item in store.snapshot(GUILD, "text").items], 0.1)[1]
    assert len(version.data_snapshot["item_ids"]) == 60 and len(version.data_snapshot["held_out_ids"]) == len(held)
    assert version.hyperparams["lora_r"] == 16 and version.hyperparams["base"] == "smollm2"
    assert adapters.params_for(GUILD) == {"adapter": version.path}
    assert serving_paths(store) == {GUILD: version.path}


def test_a_run_killed_mid_way_leaves_no_promoted_version(store: CommunityStore, tmp_path: Path,
                                                         tiny: tuple[Any, Any]) -> None:
    _approve(store, community_corpus(60))
    adapters = GuildAdapters()
    runner = _runner(store, tmp_path, tiny, adapters)
    first = runner.run(GUILD, "text")
    assert first.promoted

    def crash(fraction: float, note: str) -> None:
        if note.startswith("step 2/"):
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        runner.run(GUILD, "text", on_progress=crash)
    killed = store.versions(GUILD, "text")[0]
    assert killed.id != first.version_id and killed.status == "rejected" and "power cut" in (killed.reason or "")
    assert killed.path is None and killed.promoted_at is None
    root = tmp_path / "versions" / GUILD / "text"
    assert sorted(p.name for p in root.iterdir()) == [f"v{first.version_id}"]  # no half-written folder
    assert store.current(GUILD, "text").id == first.version_id  # type: ignore[union-attr]
    assert adapters.path_for(GUILD) == first.path  # what served before still serves


@pytest_asyncio.fixture
async def lane(tmp_path: Path, tiny: tuple[Any, Any]) -> AsyncIterator[dict[str, Any]]:
    """A queue with a training lane whose TrainingGenerator runs the tiny model."""
    adb = AsyncDatabase()
    db = await adb.run(open_database, tmp_path / "bot.sqlite3")
    store = CommunityStore(db, tmp_path / "files")
    adapters = GuildAdapters()
    runner = _runner(store, tmp_path, tiny, adapters, db=LoopDb(adb, asyncio.get_running_loop()))
    registry = ModelRegistry({"training": lambda name: TrainingGenerator(runner)}, {"training": TRAINING_MODEL}, 2**30)
    queue = GenerationQueue(SqlJobStore(db), registry, QueueConfig(artifacts_dir=tmp_path / "artifacts"), db=adb)
    await queue.start()
    trainer = NightlyTrainer(store, queue, db=adb, on_serving_changed=adapter_updater(adapters))
    yield {"adb": adb, "store": store, "queue": queue, "trainer": trainer, "adapters": adapters, "runner": runner}
    await queue.stop()
    await adb.run(db.close)
    adb.close()


@pytest.mark.asyncio
async def test_training_waits_its_turn_in_the_training_lane_and_reports(lane: dict[str, Any]) -> None:
    adb, store, queue, trainer = lane["adb"], lane["store"], lane["queue"], lane["trainer"]
    await adb.run(_approve, store, community_corpus(60))
    record = await trainer.submit(GUILD, "text", requester="mod", source="test")
    notes: list[str] = []
    queue.subscribe(record.id, lambda event: notes.append(event.note) if event.type == "progress" else None)
    final = await queue.wait(record.id)
    assert final.status == "succeeded", final.error
    assert final.kind == "training" and final.priority < 0
    outcome = final.result["metadata"]  # type: ignore[index]
    assert outcome["promoted"] and outcome["metrics"]["ppl_candidate"] < outcome["metrics"]["ppl_base"]
    assert any(note.startswith("step 8/8") for note in notes)
    assert lane["adapters"].path_for(GUILD) == outcome["path"]


@pytest.mark.asyncio
async def test_cancelling_a_training_job_stops_it_and_nothing_goes_live(lane: dict[str, Any]) -> None:
    adb, store, queue, trainer = lane["adb"], lane["store"], lane["queue"], lane["trainer"]
    await adb.run(_approve, store, community_corpus(60))
    settings = lane["runner"].settings  # train until cancelled (a minute at most)
    settings.text = replace(settings.text, max_steps=10**6, max_epochs=10**6, max_seconds=60)
    record = await trainer.submit(GUILD, "text", requester="mod", source="test")
    started = asyncio.Event()
    queue.subscribe(record.id, lambda event: started.set() if event.type == "progress" else None)
    await asyncio.wait_for(started.wait(), 60)
    await queue.cancel(record.id)
    final = await queue.wait(record.id)
    assert final.status == "cancelled"
    version = (await adb.run(store.versions, GUILD, "text"))[0]
    assert version.status == "rejected" and version.reason == "cancelled"
    assert await adb.run(store.current, GUILD, "text") is None
    assert lane["adapters"].path_for(GUILD) is None


# --- serving adapters and rolling back -------------------------------------------------------
@pytest.mark.asyncio
async def test_rollback_restores_the_previous_adapter_without_a_restart(tiny_model_dir: Path, tmp_path: Path,
                                                                        store: CommunityStore) -> None:
    paths = [random_lora_adapter(tiny_model_dir, tmp_path / f"v{n}", n) for n in (1, 2)]
    ticks = iter(range(1_000_000))
    store.clock = lambda: float(next(ticks))  # every promotion strictly later than the one before
    ids = []
    for path in paths:
        parent = store.current(GUILD, "text")
        version = store.create_version(GUILD, "text", parent.id if parent else None, {}, {})
        ids.append(store.finish_version(version.id, True, {"ppl_candidate": 1.0}, "promoted", str(path)).id)
    adapters = GuildAdapters(serving_paths(store))
    adb = AsyncDatabase()
    trainer = NightlyTrainer(store, None, db=adb, on_serving_changed=adapter_updater(adapters))
    generator = AdapterTextGenerator(str(tiny_model_dir), quantization_mode="none", device="cpu", max_new_tokens=12)

    def ask(adapter_params: dict[str, Any]) -> str:
        params = generator.check("hello there", {"temperature": 0.0, "max_new_tokens": 12, **adapter_params})
        return generator.generate([Request(job_id=1, prompt="hello there", params=params)])[0].text or ""

    try:
        base = ask({})
        v2 = ask(adapters.params_for(GUILD))
        assert adapters.path_for(GUILD) == str(paths[1]) and v2 != base
        assert (await trainer.rollback(GUILD, "text")).id == ids[0]  # type: ignore[union-attr]
        v1 = ask(adapters.params_for(GUILD))
        assert v1 not in (v2, base)
        fresh = AdapterTextGenerator(str(tiny_model_dir), quantization_mode="none", device="cpu", max_new_tokens=12)
        check = fresh.check("hello there", {"temperature": 0.0, "max_new_tokens": 12, "adapter": str(paths[0])})
        assert fresh.generate([Request(job_id=2, prompt="hello there", params=check)])[0].text == v1
        assert await trainer.rollback(GUILD, "text", 0) is None
        assert adapters.params_for(GUILD) == {} and ask({}) == base  # the base model, unchanged
        await trainer.rollback(GUILD, "text", ids[1])
        assert ask(adapters.params_for(GUILD)) == v2
        keys = {generator.batch_key(Request(job_id=i, prompt="x", params=p)) for i, p in
                enumerate([{}, {"adapter": str(paths[0])}, {"adapter": str(paths[1])}])}
        assert len(keys) == 3  # only requests for the same adapter share a batch
    finally:
        adb.close()


# --- images ----------------------------------------------------------------------------------
def _png(seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("L", (32, 32), 0)
    left, top = rng.randrange(4, 14), rng.randrange(4, 14)
    image.paste(255, (left, top, left + 12, top + 12))  # a bright square somewhere
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _approve_images(store: CommunityStore, start: int, count: int) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    items = [NewItem(GUILD, CHANNEL, "u1", f"img{n}", "", content_hash(f"img{n}"), kind="image",
                     files=[NewFile(_png(n), "image/png")]) for n in range(start, start + count)]
    for item_id in store.capture(items).stored:
        store.decide(GUILD, item_id, True, "mod")


def test_image_model_continues_from_the_serving_version(store: CommunityStore, tmp_path: Path,
                                                        tiny: tuple[Any, Any]) -> None:
    runner = _runner(store, tmp_path, tiny, GuildAdapters())
    _approve_images(store, 0, 24)
    first = runner.run(GUILD, "image")
    assert first.promoted and "first image model" in first.reason
    assert first.metrics["metric"] == "neg_elbo" and first.metrics["reference"] is None
    _approve_images(store, 24, 8)
    second = runner.run(GUILD, "image")
    assert second.metrics["reference"] is not None  # the serving version, measured on the same images
    version = store.version(second.version_id)
    assert version.parent_id == first.version_id
    assert (version.status, (version.reason or "").split(" ")[0]) in (("promoted", "promoted:"),
                                                                     ("rejected", "rejected"))
    if second.promoted:  # continued, not restarted: the step count goes on from the first version
        assert model_header(Path(second.path or "", "model.safetensors"))["step"] == 6


# --- the command line ------------------------------------------------------------------------
def test_cli_trains_a_server_now_and_prints_the_outcome(bot_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from bot.cli.train import add_train_parser, cmd_train
    from bot.settings import load_settings

    settings = load_settings()
    db = open_database(settings.db_file)
    _approve(CommunityStore(db, settings.community_dir), community_corpus(60))
    db.close()
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "text", "--guild", GUILD, "--json", "--max-seconds", "20"])
    assert cmd_train(settings, args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["job"]["kind"] == "training" and printed["job"]["status"] == "succeeded"
    assert printed["outcome"]["promoted"], printed["outcome"]["reason"]
    assert Path(printed["outcome"]["path"], "adapter_model.safetensors").is_file()
    assert printed["outcome"]["path"].startswith(str(bot_env / "finetune"))

    busy = parser.parse_args(["train", "text", "--guild", "42"])  # nothing approved there
    assert cmd_train(settings, busy) == 1
    assert "approved text item" in capsys.readouterr().err
