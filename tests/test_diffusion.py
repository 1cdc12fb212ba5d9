"""The diffusers backend, on a tiny Stable Diffusion pipeline built from configs (no Hub)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from generators.base import Cancelled, GeneratorError, Request
from generators.image_post import png_metadata
from tests.tiny_diffusion import build_tiny_sd_pipeline

diffusers = pytest.importorskip("diffusers", reason="the diffusion extra is not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread for these tiny models: on a shared 2-core machine, OpenMP threads
    spinning against another busy process made them 10-20x slower; alone it costs little."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Save a randomly initialised, very small SD pipeline and return its folder."""
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def loaded(tiny_pipeline: str):
    from generators.diffusion import DiffusionGenerator

    generator = DiffusionGenerator(tiny_pipeline, device="cpu", steps=3, guidance=2.0, local_files_only=True)
    generator.load()
    return generator


def test_loads_through_from_pretrained(loaded) -> None:
    assert loaded.loaded
    assert loaded.memory_bytes() > 0
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline"


def test_generates_png_with_progress_and_metadata(loaded) -> None:
    progress: list[tuple[float, str]] = []
    request = Request(1, "a red cat", {"count": 2}, seed=7, on_progress=lambda f, n: progress.append((f, n)))
    (result,) = loaded.generate([request])
    (output,) = result.outputs
    assert output.mime == "image/png"
    image = Image.open(io.BytesIO(output.data))
    assert image.width > image.height  # two tiles side by side
    steps = [note for _, note in progress if note.startswith("denoising") and not note.endswith(" 0/3")]
    assert steps == ["denoising 1/3", "denoising 2/3", "denoising 3/3"]
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert png_metadata(output.data)["seed"] == "7"
    assert result.metadata["steps"] == 3 and result.metadata["seed"] == 7
    # Same seed, same bytes.
    (again,) = loaded.generate([Request(2, "a red cat", {"count": 2}, seed=7)])
    assert again.outputs[0].data == output.data


def test_cancel_stops_between_steps(loaded) -> None:
    cancel = threading.Event()
    seen: list[str] = []

    def progress(fraction: float, note: str) -> None:
        seen.append(note)
        if note == "denoising 1/3":
            cancel.set()  # the user cancels during step 2

    request = Request(3, "a cat", {"steps": 3}, seed=1, cancel_event=cancel, on_progress=progress)
    with pytest.raises(Cancelled):
        loaded.generate([request])
    assert "denoising 2/3" not in seen and "encoding" not in seen


def test_check_rejects_bad_input(loaded) -> None:
    with pytest.raises(GeneratorError, match="empty"):
        loaded.check("  ", {})
    with pytest.raises(GeneratorError, match="count"):
        loaded.check("x", {"count": 9})
    with pytest.raises(GeneratorError, match="multiple of 8"):
        loaded.check("x", {"width": 100})
    with pytest.raises(GeneratorError, match="unknown option"):
        loaded.check("x", {"sampler": "euler"})
    with pytest.raises(GeneratorError, match="seed"):
        loaded.check("x", {"seed": "abc"})
    assert loaded.check("x", {"steps": "4", "seed": 5}) == {"count": 1, "steps": 4, "guidance": 2.0, "seed": 5}


def test_4bit_needs_cuda_and_clear_errors(tiny_pipeline: str) -> None:
    from generators.diffusion import DiffusionGenerator

    with pytest.raises(GeneratorError, match="CUDA"):
        DiffusionGenerator(tiny_pipeline, device="cpu", quantize_4bit=True).load()
    with pytest.raises(GeneratorError, match="cannot load"):
        DiffusionGenerator("/nonexistent/model", local_files_only=True).load()
    with pytest.raises(GeneratorError, match="device"):
        DiffusionGenerator(tiny_pipeline, device="tpu")


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory):
    """Two tiny pipelines with a safety checker: one flags every picture, one none."""
    from generators.diffusion import DiffusionGenerator

    generators = {}
    for flags in (True, False):
        folder = build_tiny_sd_pipeline(tmp_path_factory.mktemp(f"tiny-sd-checker-{flags}"), checker_flags=flags)
        generators[flags] = DiffusionGenerator(folder, device="cpu", steps=2, local_files_only=True)
        generators[flags].load()
    return generators


def test_the_safety_checker_flags_without_blacking_out(checked, loaded) -> None:
    # Loaded apart from the pipeline, which would black out what it flags.
    assert checked[True].pipe.safety_checker is None and checked[True].checker is not None
    assert checked[True].memory_bytes() > checked[True].memory_bytes() - _bytes(checked[True].checker.model) > 0
    pictures = {}
    for flags, generator in checked.items():
        (result,) = generator.generate([Request(1, "a red cat", {"count": 2}, seed=5)])
        assert result.metadata["nsfw"] is flags
        pictures[flags] = Image.open(io.BytesIO(result.outputs[0].data)).convert("L")
    # The flagged grid is the picture itself (same weights and seed as the unflagged one), not black.
    assert pictures[True].getextrema()[1] > 0
    assert pictures[True].tobytes() == pictures[False].tobytes()
    # A model without a checker says nothing either way.
    assert loaded.checker is None
    (plain,) = loaded.generate([Request(2, "a red cat", {}, seed=5)])
    assert "nsfw" not in plain.metadata


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
