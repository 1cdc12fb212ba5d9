"""/imagine on a CPU: the prompt picks the embedded model that knows its subject
(`generators.image_routing`), the pictures show that subject (judged by classifiers trained
on the models' data sets, `tests.image_judge`), and the model option offers only what runs here."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.commands import CATALOGUE
from bot.commands.generation import image_models
from bot.core.catalogue import Catalogue, Value
from bot.core.services import make_registry
from bot.settings import Settings, load_settings
from generators.base import GeneratorError, Request
from generators.diffusion import DiffusionGenerator
from generators.image_data import FASHION_MNIST_DIR
from generators.image_generator import ImageGenerator
from generators.image_routing import Route, cannot_draw, route
from tests.image_judge import digits_judge, fashion_judge

face_installed = importlib.util.find_spec("gan_face_generate") is not None
fashion_data = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs dataset-fashion-mnist")


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a sneaker", Route("fashion", 7, "Sneaker")),
    ("Ankle boots!", Route("fashion", 9, "Ankle boot")),
    ("some blue jeans", Route("fashion", 1, "Trouser")),
    ("a leather handbag", Route("fashion", 8, "Bag")),
    ("a warm sweater", Route("fashion", 2, "Pullover")),
    ("a tank top", Route("fashion", 0, "T-shirt/top")),
    ("two sneakers", Route("fashion", 7, "Sneaker")),  # a number before a subject counts it
    ("one dress", Route("fashion", 3, "Dress")),
    ("the number seven", Route("digits", 7, "7")),
    ("7", Route("digits", 7, "7")),
    ("draw me a 3", Route("digits", 3, "3")),
    ("digit 0", Route("digits", 0, "0")),
    ("a handwritten nine", Route("digits", 9, "9")),
    ("sevens", Route("digits", 7, "7")),
    ("a portrait", Route("face", None, "a face")),
    ("a selfie of a woman", Route("face", None, "a face")),
    ("a man in a jacket", Route("face", None, "a face")),  # the first subject named wins
    ("a jacket for a man", Route("fashion", 4, "Coat")),
])
def test_the_prompt_picks_the_model_and_class(prompt: str, expected: Route) -> None:
    assert route(prompt) == expected


@pytest.mark.parametrize("prompt", ["a castle at sunset", "a castle on top of a hill", "one castle", "a snowman",
                                    "a red square", "42"])
def test_nothing_routes_a_subject_no_model_knows(prompt: str) -> None:
    assert route(prompt) is None


def test_a_prompt_no_model_draws_is_refused_with_what_they_draw() -> None:
    generator = ImageGenerator("auto")
    with pytest.raises(GeneratorError) as caught:
        generator.check("a castle at sunset", {})
    message = str(caught.value)
    assert message == cannot_draw()
    assert "\n" not in message
    for words in ("portrait", "sneaker", "ankle boot", "the number seven", "diffusion model draws anything"):
        assert words in message
    # An explicit model still wins: the face model takes any prompt.
    assert generator.check("a castle at sunset", {"model": "face"})["model"] == "face"


def _draw(generator: ImageGenerator, prompt: str, seed: int, count: int = 4) -> tuple[bytes, dict]:
    params = generator.check(prompt, {"count": count})
    [result] = generator.generate([Request(1, prompt, params, seed=seed)])
    return result.outputs[0].data, result.metadata


@fashion_data
@pytest.mark.parametrize("prompt", ["a sneaker", "an ankle boot", "a bag"])
def test_clothes_prompts_draw_that_garment(prompt: str) -> None:
    wanted = route(prompt)
    assert wanted is not None
    png, metadata = _draw(ImageGenerator("auto"), prompt, seed=1)
    assert (metadata["model"], metadata["classes"]) == ("fashion", [wanted.subject])
    seen = fashion_judge().labels(png, 4)
    assert seen.count(wanted.label) >= 3, seen


@pytest.mark.parametrize(("prompt", "digit"), [("the number seven", 7), ("3", 3), ("the number one", 1)])
def test_digit_prompts_draw_that_digit(prompt: str, digit: int) -> None:
    png, metadata = _draw(ImageGenerator("auto"), prompt, seed=1)
    assert (metadata["model"], metadata["classes"]) == ("digits", [str(digit)])
    seen = digits_judge().labels(png, 4)
    assert seen.count(digit) >= 3, seen


@pytest.mark.skipif(not face_installed, reason="needs gan-face-generate")
def test_a_portrait_is_drawn_by_the_face_model() -> None:
    png, metadata = _draw(ImageGenerator("auto"), "a portrait of a woman", seed=1, count=1)
    assert metadata["model"] == "face" and metadata["architecture"] == "dcgan"
    picture = Image.open(io.BytesIO(png))
    assert picture.mode == "RGB" and picture.size == (256, 256)  # the clothes and digit models draw grey


# --- what the bot offers, from its settings ---------------------------------------------------------
def _settings(tmp_path: Path, **values: Any) -> Settings:
    return load_settings(_env_file=None, data_dir=tmp_path, **values)


def _model_choices(catalogue: Catalogue) -> tuple[Value, ...]:
    command = catalogue.command(["imagine"])
    option = command.option("model") if command else None
    assert option is not None
    return option.choices


def test_the_model_option_offers_only_models_that_run_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    face = ("face",) if face_installed else ()
    plain = _settings(tmp_path)
    assert image_models(plain) == (*face, "digits", "digits-vae", "fashion", "fashion-vae")
    assert _model_choices(CATALOGUE.for_settings(plain)) == image_models(plain)
    with_diffusion = _settings(tmp_path, diffusion_model="stabilityai/sd-turbo")
    assert _model_choices(CATALOGUE.for_settings(with_diffusion)) == (*image_models(plain), "diffusion")
    assert _model_choices(CATALOGUE) == ()  # the declaration itself names none: they depend on the bot


def test_auto_is_the_diffusion_model_once_configured_else_the_prompt(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cpu = make_registry(_settings(tmp_path, device="cpu"))
    assert cpu.model_name("image", None) == "auto"
    generator = cpu.get("image")
    assert isinstance(generator, ImageGenerator) and generator.routes_prompts
    assert generator.check("a sneaker", {})["model"] == "fashion"
    configured = make_registry(_settings(tmp_path, device="cpu", diffusion_model="stabilityai/sd-turbo"))
    assert configured.model_name("image", None) == "diffusion"
    assert isinstance(configured.get("image"), DiffusionGenerator)
    pinned = make_registry(_settings(tmp_path, device="cpu", image_model="face",
                                     diffusion_model="stabilityai/sd-turbo"))
    assert pinned.model_name("image", None) == "face"  # a model named in the settings stays the default
