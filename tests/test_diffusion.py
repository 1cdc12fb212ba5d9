"""The diffusers backend, on a tiny Stable Diffusion pipeline built from configs (no Hub)."""

from __future__ import annotations

import io
import json
import string
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from generators.base import Cancelled, GeneratorError, Request
from generators.image_post import png_metadata

diffusers = pytest.importorskip("diffusers", reason="the diffusion extra is not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread for these tiny models: on a shared 2-core machine, OpenMP threads
    spinning against another busy process made them 10-20x slower; alone it costs little."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single characters: buildable offline, good enough here."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", "!"]:
        vocab[token] = len(vocab)
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    return tokenizer, len(vocab)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Save a randomly initialised, very small SD pipeline and return its folder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny-sd")
    tokenizer, vocab_size = _tiny_tokenizer(root / "tok-src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = root / "pipeline"
    pipe.save_pretrained(folder)
    return str(folder)


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
