"""Fine-tuning's base model by device: QLoRA (4-bit NF4 base, paged 8-bit AdamW) where CUDA and
bitsandbytes are, the unchanged fp32 LoRA on the CPU. The CUDA test runs only with a GPU."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from generators.base import GeneratorError
from generators.finetune_text import TRAINING_FILE, TextTuneConfig, finetune_text, load_base
from generators.quantization import QuantizationError, qlora_compute_dtype, qlora_load_kwargs, training_mode

HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
TINY_CONFIG = TextTuneConfig(block_size=32, batch_blocks=4, micro_blocks=2, max_steps=25, lr=5e-3, warmup_steps=2,
                             top_layers=None, max_eval_blocks=4, max_seconds=120)


def _corpus() -> tuple[list[str], list[str]]:
    """A regular little language: a LoRA learns it within a few dozen steps."""
    animals = ["cat", "dog", "fox", "owl", "bee", "elk"]
    places = ["mat", "log", "den", "bog", "hut", "pen"]
    lines = [f"the {a} sat on the {p}." for a in animals for p in places]
    return lines[::2] * 4, lines[1::2][:6]


def test_the_compute_dtype_follows_the_gpu_generation() -> None:
    assert qlora_compute_dtype((7, 5)) == torch.float16  # Turing: no native bf16
    assert qlora_compute_dtype((8, 0)) == torch.bfloat16  # Ampere
    assert qlora_compute_dtype((9, 0)) == torch.bfloat16  # Hopper


def test_the_qlora_base_is_nf4_with_double_quantization_on_gpu_0() -> None:
    kwargs = qlora_load_kwargs((8, 6))
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["device_map"] == {"": 0}


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")
def test_without_cuda_the_base_stays_fp32_on_the_cpu(tiny_model_dir: Path) -> None:
    assert training_mode("auto") == "fp32" and training_mode("cpu") == "fp32"
    model, _tokenizer = load_base(str(tiny_model_dir), device="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(QuantizationError, match="AIGC_DEVICE=cuda but no CUDA device"):
        training_mode("cuda")
    with pytest.raises(GeneratorError, match="AIGC_DEVICE=cuda but no CUDA device"):
        load_base(str(tiny_model_dir), device="cuda")


def test_a_cpu_run_records_its_base_in_the_version(tiny_model_dir: Path, tmp_path: Path) -> None:
    texts, held = _corpus()
    config = replace(TINY_CONFIG, max_steps=2, threads=1)
    result = finetune_text(texts, held, tmp_path / "v1", model=str(tiny_model_dir), config=config, device="cpu")
    recorded = json.loads((result.adapter_dir / TRAINING_FILE).read_text())
    assert recorded["base"] == {"mode": "fp32", "device": "cpu"}


@pytest.mark.skipif(not (HAS_CUDA and HAS_BNB), reason="QLoRA needs a CUDA GPU and bitsandbytes")
def test_qlora_on_cuda_trains_a_4bit_base_and_saves_a_plain_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert training_mode("auto") == "qlora"
    model, tokenizer = load_base(str(tiny_model_dir), device="auto")
    assert model.is_loaded_in_4bit and next(model.parameters()).device.type == "cuda"
    texts, held = _corpus()
    result = finetune_text(texts, held, tmp_path / "v1", base=(model, tokenizer), config=TINY_CONFIG)
    assert result.ppl_candidate < result.ppl_base  # it learned the little language
    recorded = json.loads((result.adapter_dir / TRAINING_FILE).read_text())
    assert recorded["base"]["mode"] == "qlora" and recorded["base"]["device"].startswith("cuda")
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())  # served like a CPU-trained one
