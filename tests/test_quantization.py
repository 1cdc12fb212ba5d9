"""The quantization policy and the fp16-weights CPU mode (packed fp16 weights, fp32 math)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from generators import quantization
from generators.adapters import AdapterTextGenerator
from generators.base import GeneratorError, Request
from generators.text import TextGenerator
from tests.tiny_text import random_lora_adapter

pytestmark = pytest.mark.skipif(not quantization.has_fbgemm(), reason="fp16-weights needs fbgemm (x86)")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def test_auto_on_a_cpu_picks_int8_smooth_with_vnni_else_fp16_weights_unless_amx(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for flags, fbgemm, mode in [({"avx2"}, True, "fp16-weights"), ({"avx512_bf16"}, True, "fp16-weights"),
                                ({"avx512_bf16", "avx512_vnni"}, True, "int8-smooth"),
                                ({"avx2", "avx_vnni"}, True, "int8-smooth"),
                                ({"avx512_bf16", "avx512_vnni", "amx_bf16"}, True, "bf16"), ({"bf16"}, False, "none"),
                                ({"avx512_bf16"}, False, "bf16"), ({"avx512_vnni"}, False, "none")]:
        monkeypatch.setattr(quantization, "cpu_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(quantization, "has_fbgemm", lambda fbgemm=fbgemm: fbgemm)
        assert quantization.choose_mode("auto", "cpu") == mode, flags
    # a torch that no longer packs int8 weights: auto falls back to fp16-weights
    monkeypatch.setattr(quantization, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    monkeypatch.setattr(quantization, "has_fbgemm", lambda: True)
    monkeypatch.setattr(torch, "quantize_per_channel", None)
    quantization.int8_packing_works.cache_clear()
    try:
        assert quantization.choose_mode("auto", "cpu") == "fp16-weights"
        with pytest.raises(quantization.QuantizationError, match="int8-smooth needs a torch"):
            quantization.choose_mode("int8-smooth", "cpu")  # asked for by name: one clear line
    finally:
        quantization.int8_packing_works.cache_clear()
    monkeypatch.setattr(quantization, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(quantization, "has_fbgemm", lambda: False)
    for mode in quantization.FBGEMM_MODES:
        with pytest.raises(quantization.QuantizationError, match=f"{mode} runs on x86 CPUs only"):
            quantization.choose_mode(mode, "cpu")


@pytest.mark.parametrize("mode", quantization.FBGEMM_MODES)
def test_fbgemm_modes_on_cuda_are_refused(mode: str) -> None:
    with pytest.raises(quantization.QuantizationError, match="x86 CPUs only"):
        quantization.choose_mode(mode, "cuda")


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
    rows = quantization.BF16_FROM_ROWS - 1  # fewer tokens in the pass: fbgemm's fp16 kernel
    ids = torch.randint(0, reference.config.vocab_size, (1, rows))
    expected, got = _logits(reference, ids), _logits(model, ids)
    assert not torch.equal(expected, got)  # the packed kernel really ran (fp16 rounding)
    assert (expected - got).abs().max() < 0.01 * expected.abs().max()  # fp16 weights: ~3 digits
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.95
    copies = 2 if quantization.cpu_has_native_bf16() else 1  # fp16, and bf16 where the CPU has it
    assert quantization.packed_bytes(model) == sum(m.weight.numel() * 2 * copies for m in linears)
    assert all(m.weight.dtype == torch.float16 and not m.weight.requires_grad for m in linears)


def test_many_rows_multiply_with_the_bf16_copy_and_few_with_fbgemm() -> None:
    linear = torch.nn.Linear(64, 32)
    hybrid = quantization.PackedFp16Linear.from_linear(linear, bf16=True)
    fp16_only = quantization.PackedFp16Linear.from_linear(linear, bf16=False)
    assert hybrid.bf16 is not None and hybrid.bf16.dtype == torch.bfloat16 and fp16_only.bf16 is None
    few = torch.randn(quantization.BF16_FROM_ROWS - 1, 64)
    many = torch.randn(2, quantization.BF16_FROM_ROWS // 2, 64)  # rows counted over every leading dim
    with torch.inference_mode():
        assert torch.equal(hybrid(few), fp16_only(few))
        got = hybrid(many)
        bf16 = torch.nn.functional.linear(many.bfloat16(), linear.weight.bfloat16()).float() + linear.bias
        assert got.dtype == torch.float32 and torch.equal(got, bf16)  # the bias added in fp32
        assert not torch.equal(got, fp16_only(many))
        exact = linear(many)
        assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    assert hybrid.packed_bytes() == fp16_only.packed_bytes() + 64 * 32 * 2


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
    # fp16 weights plus their packed fp16 copies (counted) take no more room than fp32; the bf16
    # copies for many rows, where the CPU has native bf16, add half as much again
    assert quantization.packed_bytes(packed.model) > 0
    assert packed.memory_bytes() <= (1.5 if quantization.cpu_has_native_bf16() else 1) * fp32.memory_bytes()
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


def test_lora_adapters_on_int8_layers_add_what_they_add_in_fp32(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The smoothing stays inside each int8 layer, so an adapter on it sees the original input."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    random_lora_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("hello there, lighthouse keeper", return_tensors="pt").input_ids
    shifts = {}
    for mode in ("none", "int8-smooth"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        quantization.apply_after_load(model, mode, "cpu", tokenizer)
        wrapped = PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
        if mode == "int8-smooth":
            assert isinstance(wrapped.base_model.model.model.layers[0].self_attn.q_proj.base_layer,
                              quantization.SmoothInt8Linear)
        with wrapped.disable_adapter():
            base = _logits(wrapped, ids)
        shifts[mode] = _logits(wrapped, ids) - base
    exact, int8 = shifts["none"], shifts["int8-smooth"]
    assert exact.abs().mean() > 0.1  # the adapter matters
    assert (int8 - exact).abs().mean() < 0.2 * exact.abs().mean()


# --- int8-smooth: int8 layers smoothed by calibration ----------------------------------------------
def _outlier_inputs(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Inputs like a transformer's: most channels small, three of them 40 times larger."""
    x = torch.randn(rows, 64, generator=generator)
    x[:, [3, 17, 40]] *= 40
    return x


def test_smoothing_keeps_int8_close_where_outlier_channels_ruin_plain_int8() -> None:
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    calibration = _outlier_inputs(256, generator)
    absmax = calibration.abs().amax(0)
    smoothed = quantization.SmoothInt8Linear.from_linear(linear, absmax)
    plain = quantization.SmoothInt8Linear.from_linear(linear, None)
    x = _outlier_inputs(32, generator)  # unseen rows
    with torch.inference_mode():
        exact = linear(x)

        def error(layer: torch.nn.Module) -> float:
            return float((layer(x) - exact).abs().mean() / exact.abs().mean())

        assert error(smoothed) < 0.02
        assert error(smoothed) < error(plain) / 2
        # 7-bit inputs (CPUs without VNNI) lose a little more, and still hold
        assert error(quantization.SmoothInt8Linear.from_linear(linear, absmax, reduce_range=True)) < 0.04
    # the layer holds int8 weights, one scale per output and one factor per input
    assert smoothed.packed_bytes() == 64 * 32 + 32 * 8 + 64 * 4
    x.requires_grad_(True)
    smoothed(x).sum().backward()  # gradients take the plain path on the fp16 weight
    assert x.grad is not None and torch.allclose(x.grad, linear.weight.detach().half().float().sum(0).expand(32, -1))


@pytest.mark.parametrize("bias", [False, True])
def test_a_per_row_int8_layer_keeps_each_rows_precision_next_to_a_huge_row(bias: bool) -> None:
    """With one scale per pass, a row's precision depends on the largest value in any row; per
    row, a row next to a huge outlier row keeps its own precision."""
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(64, 32, bias=bias)
    if bias:  # as large as the products, so a bias scaled with the rows would show
        linear.bias.data = 3 * torch.randn(32, generator=generator)
    calibration = _outlier_inputs(256, generator)
    per_row = quantization.SmoothInt8Linear.from_linear(linear, calibration.abs().amax(0), per_row=True)
    shared = quantization.SmoothInt8Linear.from_linear(linear, calibration.abs().amax(0))
    x = _outlier_inputs(8, generator)
    crowd = torch.cat([x, 500 * torch.randn(1, 64, generator=generator)])  # one row far larger than the rest
    with torch.inference_mode():
        exact = linear(x)

        def error(out: torch.Tensor) -> float:
            return float((out - exact).abs().mean() / exact.abs().mean())

        assert error(shared(x)) < 0.02
        in_crowd = error(per_row(crowd)[:8])
        assert in_crowd < 0.02
        assert error(shared(crowd)[:8]) > 4 * in_crowd  # the shared scale loses those rows' precision


def test_int8_smooth_calibrates_and_quantizes_every_layer_the_mlp_output_per_row_and_keeps_the_answers(
        tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from generators.calibration import calibration_ids

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    calibration = calibration_ids(tokenizer)
    assert 300 < calibration.shape[1] <= 768
    with pytest.raises(quantization.QuantizationError, match="calibration"):
        quantization.apply_after_load(model, "int8-smooth", "cpu")
    quantization.apply_after_load(model, "int8-smooth", "cpu", tokenizer)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert len(layers) == 1 + 7 * 2  # the head, 7 per layer
    for name, layer in layers.items():
        assert isinstance(layer, quantization.SmoothInt8Linear), name
        assert layer.per_row == name.endswith("down_proj"), name
    # the calibration hooks are gone, and every layer was smoothed by what it saw
    assert not any(module._forward_pre_hooks for module in model.modules())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q_proj.inv_smooth, torch.ones_like(q_proj.inv_smooth))
    ids = tokenizer("Write a short story about a lighthouse keeper who finds a message in a bottle.",
                    return_tensors="pt").input_ids
    expected, got = _logits(reference, ids), _logits(model, ids)
    assert not torch.equal(expected, got)  # int8 really ran
    # a random 2-layer model has no outliers to smooth; 7-bit inputs (no VNNI) lose a little more
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.8
    assert (expected - got).abs().mean() < 0.15 * expected.abs().mean()


#: Two-layer models of the families people load from the hub, each named as transformers names it.
FAMILIES = {
    "llama": {}, "qwen2": {}, "mistral": {}, "gemma": {"head_dim": 64},
    "phi3": {},  # fused projections: qkv_proj and gate_up_proj
    "gpt2": {"n_embd": 128, "n_layer": 2, "n_head": 2},  # Conv1D layers, not nn.Linear
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_int8_smooth_converts_each_model_family_and_keeps_its_answers(family: str) -> None:
    from transformers import AutoConfig

    from generators.decode_attention import use_decode_attention

    torch.manual_seed(0)
    sizes = FAMILIES[family] if family == "gpt2" else {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, **FAMILIES[family]}
    config = AutoConfig.for_model(family, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0, **sizes)
    reference = AutoModelForCausalLM.from_config(config).eval()
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(reference.state_dict())
    quantization.quantize_int8_smooth(model, torch.randint(3, 300, (1, 128)))
    assert use_decode_attention(model)
    kinds = {name.rsplit(".", 1)[-1]: (type(module).__name__, getattr(module, "per_row", None))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if family != "gpt2":  # GPT-2's Conv1D layers stay as they are: only its head is an nn.Linear
        assert kinds.pop("down_proj") == ("SmoothInt8Linear", True)  # the MLP output: a scale per row
    assert set(kinds.values()) == {("SmoothInt8Linear", False)}
    assert len(kinds) == {"gpt2": 1, "phi3": 4}.get(family, 7)  # the head included
    ids = torch.randint(3, 300, (2, 24))
    expected, got = _logits(reference, ids), _logits(model, ids)
    assert not torch.equal(expected, got)  # int8 really ran
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.8
    assert (expected - got).abs().mean() < 0.15 * expected.abs().mean()
    with torch.inference_mode():  # and it decodes, through the decode attention
        out = model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)


def test_generator_in_int8_smooth_mode_answers_and_takes_less_memory_than_fp16_weights(
        tiny_model_dir: Path) -> None:
    packed = TextGenerator(str(tiny_model_dir), quantization_mode="fp16-weights", device="cpu", max_new_tokens=8)
    int8 = TextGenerator(str(tiny_model_dir), quantization_mode="int8-smooth", device="cpu", max_new_tokens=8)
    params = int8.check("hello there", {"temperature": 0.7, "seed": 5, "max_new_tokens": 8})
    packed.load()
    int8.load()
    assert int8.mode == "int8-smooth"
    assert 0 < quantization.packed_bytes(int8.model) < quantization.packed_bytes(packed.model)
    answers = [int8.generate([Request(job_id=i, prompt="hello there", params=params)])[0] for i in (1, 2)]
    assert answers[0].metadata["tokens"] == 8
    assert answers[0].text == answers[1].text  # a seed still gives the same text


# --- the policy on CUDA, and what a CPU refuses ---------------------------------------------------
@pytest.mark.parametrize("mode", ["bnb-4bit", "bnb-8bit", "fp16"])
def test_cuda_only_modes_are_refused_on_a_cpu_in_one_line(mode: str) -> None:
    with pytest.raises(quantization.QuantizationError) as caught:
        quantization.choose_mode(mode, "cpu")
    message = str(caught.value)
    assert "\n" not in message and f"AIGC_QUANTIZATION={mode} needs a CUDA GPU" in message
    with pytest.raises(quantization.QuantizationError, match="needs a CUDA GPU"):
        quantization.diffusion_4bit(mode, "cpu")


def test_a_text_model_in_a_bnb_mode_on_a_cpu_fails_to_load_with_that_line(tiny_model_dir: Path) -> None:
    generator = TextGenerator(str(tiny_model_dir), quantization_mode="bnb-4bit", device="cpu")
    with pytest.raises(GeneratorError, match="AIGC_QUANTIZATION=bnb-4bit needs a CUDA GPU"):
        generator.load()
    assert generator.model is None


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="needs bitsandbytes absent")
@pytest.mark.parametrize(("native_bf16", "half"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_without_bitsandbytes_loads_half_precision_and_says_so(
        native_bf16: bool, half: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(quantization, "cuda_has_native_bf16", lambda: native_bf16)
    with caplog.at_level(logging.WARNING, logger="generators.quantization"):
        assert quantization.choose_mode("auto", "cuda") == half
    [record] = caplog.records
    assert "aigc-bot[cuda]" in record.message and half in record.message
    assert ("no native bf16" in record.message) is (not native_bf16)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[half]
    assert quantization.load_kwargs(half, "cuda") == {"dtype": dtype}
    # Diffusion follows the same policy: no 4-bit, no "needs bitsandbytes" failure ...
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="generators.quantization"):
        assert quantization.diffusion_4bit("auto", "cuda") is False
    assert len(caplog.records) == 1
    # ... while asking for bitsandbytes by name still needs it, for text and diffusion alike.
    for ask in (lambda: quantization.choose_mode("bnb-4bit", "cuda"),
                lambda: quantization.diffusion_4bit("bnb-4bit", "cuda")):
        with pytest.raises(quantization.QuantizationError, match=r"aigc-bot\[cuda\]"):
            ask()


@pytest.mark.parametrize(("native_bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_nf4_double_quant_computes_in_the_cards_half_precision(
        native_bf16: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "cuda_has_native_bf16", lambda: native_bf16)
    options = quantization.nf4_options("cuda")
    assert options == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                       "bnb_4bit_compute_dtype": dtype}
    assert quantization.nf4_options("cpu")["bnb_4bit_compute_dtype"] == torch.float32


def test_diffusion_on_a_cpu_stays_full_precision_in_every_cpu_mode() -> None:
    for mode in ("auto", "none", "bf16", "int8-dynamic"):
        assert quantization.diffusion_4bit(mode, "cpu") is False


def test_the_bots_diffusion_factory_refuses_bnb_on_a_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.core.services import make_registry
    from bot.settings import load_settings

    monkeypatch.chdir(tmp_path)
    settings = load_settings(_env_file=None, data_dir=tmp_path, diffusion_model="some/model", device="cpu",
                             quantization="bnb-4bit")
    with pytest.raises(GeneratorError, match="AIGC_QUANTIZATION=bnb-4bit needs a CUDA GPU"):
        make_registry(settings).get("image", "diffusion")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_half_precision_follows_the_cards_compute_capability() -> None:
    major, _ = torch.cuda.get_device_capability()
    assert quantization.cuda_half_dtype() == (torch.bfloat16 if major >= 8 else torch.float16)


# --- the converted-model cache --------------------------------------------------------------------
@pytest.mark.slow
def test_the_packaged_model_is_cached_in_full_precision_whatever_the_first_mode(tmp_path: Path) -> None:
    first = TextGenerator("smollm2", quantization_mode="bf16", device="cpu", cache_dir=tmp_path)
    first.load()
    assert first.model.dtype == torch.bfloat16  # this load's mode ...
    folder = first.converted_folder()
    assert folder is not None and folder.parent == tmp_path
    with safe_open(folder / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
    assert dtypes == {"F32"}  # ... but the cache holds fp32
    first.unload()
    second = TextGenerator("smollm2", quantization_mode="none", device="cpu", cache_dir=tmp_path)
    second.load()
    assert second.model.dtype == torch.float32 and second.converted_folder() == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # read, not converted again
