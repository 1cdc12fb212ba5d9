"""The quantization policy and the fp16-weights CPU mode (packed fp16 weights, fp32 math)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from generators import quantization
from generators.adapters import AdapterTextGenerator
from generators.base import Request
from generators.text import TextGenerator
from tests.tiny_text import random_lora_adapter

pytestmark = pytest.mark.skipif(not quantization.has_fbgemm(), reason="fp16-weights needs fbgemm (x86)")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def test_auto_picks_fp16_weights_on_a_cpu_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "cpu_has_native_bf16", lambda: False)
    assert quantization.choose_mode("auto", "cpu") == "fp16-weights"
    monkeypatch.setattr(quantization, "cpu_has_native_bf16", lambda: True)
    assert quantization.choose_mode("auto", "cpu") == "bf16"
    monkeypatch.setattr(quantization, "has_fbgemm", lambda: False)
    monkeypatch.setattr(quantization, "cpu_has_native_bf16", lambda: False)
    assert quantization.choose_mode("auto", "cpu") == "none"
    with pytest.raises(quantization.QuantizationError, match="x86 CPUs only"):
        quantization.choose_mode("fp16-weights", "cpu")


@pytest.mark.parametrize("mode", ["bnb-4bit", "bnb-8bit"])
def test_bitsandbytes_modes_off_cuda_are_refused_with_the_setting_to_change(mode: str) -> None:
    # Refused for the device before the package is looked for: installing bitsandbytes would not help.
    with pytest.raises(quantization.QuantizationError, match=f"^{mode} needs a CUDA GPU .*AIGC_QUANTIZATION"):
        quantization.choose_mode(mode, "cpu")


def test_fp16_weights_on_cuda_is_refused() -> None:
    with pytest.raises(quantization.QuantizationError, match="x86 CPUs only"):
        quantization.choose_mode("fp16-weights", "cuda")


def test_packing_keeps_the_model_and_its_tied_weights(tiny_model_dir: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them, as SmolLM2 does
    reference.lm_head.weight = reference.model.embed_tokens.weight
    quantization.apply_after_load(model, "fp16-weights", "cpu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, quantization.PackedFp16Linear) for m in linears)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the tied table stays exact
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    ids = torch.randint(0, reference.config.vocab_size, (3, 17))
    expected, got = _logits(reference, ids), _logits(model, ids)
    assert not torch.equal(expected, got)  # the packed kernel really ran (fp16 rounding)
    assert (expected - got).abs().max() < 0.01 * expected.abs().max()  # fp16 weights: ~3 digits
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.95
    assert quantization.packed_bytes(model) == sum(m.weight.numel() * 2 for m in linears)
    assert all(m.weight.dtype == torch.float16 and not m.weight.requires_grad for m in linears)


def test_gradients_flow_through_the_plain_path() -> None:
    layer = quantization.PackedFp16Linear.from_linear(torch.nn.Linear(8, 4))
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()  # e.g. a LoRA adapter trained on top of a packed model
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.inference_mode():
        assert torch.allclose(layer(x.detach()), torch.nn.functional.linear(x.detach(), layer.weight.float(),
                                                                            layer.bias), atol=1e-5)


def test_generator_in_fp16_weights_mode_answers_like_fp32(tiny_model_dir: Path) -> None:
    fp32 = TextGenerator(str(tiny_model_dir), quantization_mode="none", device="cpu", max_new_tokens=8)
    packed = TextGenerator(str(tiny_model_dir), quantization_mode="fp16-weights", device="cpu", max_new_tokens=8)
    params = fp32.check("hello there", {"temperature": 0.0, "max_new_tokens": 8})
    fp32.load()
    packed.load()
    assert packed.mode == "fp16-weights"
    # fp16 weights plus their packed fp16 copies (counted) take no more room than fp32
    assert quantization.packed_bytes(packed.model) > 0
    assert packed.memory_bytes() <= fp32.memory_bytes()
    text = fp32.generate([Request(job_id=1, prompt="hello there", params=params)])[0].text
    assert packed.generate([Request(job_id=2, prompt="hello there", params=params)])[0].text == text


def test_lora_adapters_wrap_packed_layers(tiny_model_dir: Path, tmp_path: Path) -> None:
    random_lora_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    answers = {}
    for mode in ("none", "fp16-weights"):
        generator = AdapterTextGenerator(str(tiny_model_dir), quantization_mode=mode, device="cpu", max_new_tokens=8)
        for adapter in (None, str(tmp_path / "adapter")):
            params = generator.check("hello", {"temperature": 0.0, "max_new_tokens": 8, "adapter": adapter})
            answers[mode, adapter] = generator.generate([Request(job_id=1, prompt="hello", params=params)])[0].text
    adapter = str(tmp_path / "adapter")
    assert answers["none", adapter] != answers["none", None]  # the adapter matters
    assert answers["fp16-weights", adapter] == answers["none", adapter]
    assert answers["fp16-weights", None] == answers["none", None]
