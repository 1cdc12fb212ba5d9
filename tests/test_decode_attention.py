"""The CPU engine's attention gives sdpa's answers for decode steps and masked prefills (left
padding included), and leaves other passes to sdpa."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from generators import decode_attention
from generators.base import Request
from generators.text_batch import Row, RunningBatch


def _decode(model: Any, tokenizer: Any, steps: int = 6) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and logits of a batch of prompts of different lengths (so rows are padded)."""
    batch = RunningBatch(model, int(tokenizer.pad_token_id))
    prompts = ["hi", "a longer prompt here", "mid size"]
    rows = [Row.for_request(Request(job_id=i, prompt=p, params={"temperature": 0.0}),
                            tokenizer(p, add_special_tokens=False).input_ids) for i, p in enumerate(prompts)]
    tokens, logits = [], []
    with torch.inference_mode():
        batch.join(rows)
        for _ in range(steps):
            logits.append(batch.logits.clone())
            chosen = batch.sample()
            tokens.append(chosen)
            batch.advance(chosen, list(range(len(rows))))
    return tokens, logits


def test_decode_steps_and_padded_prefills_match_sdpa_and_unmasked_passes_stay_on_sdpa(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped queries
    expected_tokens, expected_logits = _decode(model, tokenizer)
    ids = tokenizer("one unpadded prompt", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected_unmasked = model(ids).logits

    delegated: list[int] = []
    real = decode_attention.sdpa_attention_forward

    def spy(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        delegated.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(decode_attention, "sdpa_attention_forward", spy)
    assert decode_attention.use_decode_attention(model)
    tokens, logits = _decode(model, tokenizer)
    assert tokens == expected_tokens
    for got, want in zip(logits, expected_logits, strict=True):
        assert torch.isfinite(got).all()  # the padding queries that see no key give zeros, not NaN
        assert torch.allclose(got, want, atol=1e-4)
    assert delegated == []  # the padded prefill and every decode step ran here
    with torch.inference_mode():
        unmasked = model(ids).logits  # causal, no mask: sdpa's own causal path
    assert delegated and all(length == ids.shape[1] for length in delegated)
    assert torch.allclose(unmasked, expected_unmasked, atol=1e-5)
