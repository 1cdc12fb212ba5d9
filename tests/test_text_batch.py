"""The running batch's sampling: each row's repetition penalty over its own prompt and tokens,
while rows join and leave (checked against transformers' own logits processor)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, RepetitionPenaltyLogitsProcessor

from generators.base import Request
from generators.decode_attention import use_decode_attention
from generators.text_batch import Row, RunningBatch


def _row(tokenizer: AutoTokenizer, prompt: str, penalty: float, job_id: int) -> Row:
    request = Request(job_id=job_id, prompt=prompt,
                      params={"temperature": 0.0, "max_new_tokens": 32, "repetition_penalty": penalty})
    return Row.for_request(request, tokenizer(prompt, add_special_tokens=False).input_ids)


def _step_and_check(batch: RunningBatch, keep: list[int] | None = None) -> None:
    """One sampling pass: every row's penalized scores are what transformers computes for its
    prompt and tokens so far, and its choice is their argmax; then the next forward pass, for
    the rows in ``keep`` (all by default)."""
    raw = batch.logits.clone()
    chosen = batch.sample()
    for i, row in enumerate(batch.rows):
        ids = torch.tensor([row.prompt_ids + row.tokens])
        expected = RepetitionPenaltyLogitsProcessor(row.repetition_penalty)(ids, raw[i:i + 1].clone())[0]
        assert torch.equal(batch.logits[i], expected), (i, row.repetition_penalty)
        assert torch.equal(batch.logits[i], raw[i]) == (row.repetition_penalty == 1.0)
        assert chosen[i] == int(expected.argmax())
        row.tokens.append(chosen[i])
    batch.advance(chosen, list(range(len(batch.rows))) if keep is None else keep)


def test_each_row_is_penalized_for_its_own_tokens_as_rows_join_and_leave(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = RunningBatch(model, int(tokenizer.pad_token_id))
    with torch.inference_mode():
        batch.join([_row(tokenizer, "aaaa abab", 1.0, 1), _row(tokenizer, "the cat sat on the mat", 1.5, 2)])
        for _ in range(3):
            _step_and_check(batch)
        # a longer prompt joins: the histories are padded to one width
        batch.join([_row(tokenizer, "a much longer prompt, with punctuation; and more words", 1.8, 3)])
        for _ in range(3):
            _step_and_check(batch)
        _step_and_check(batch, keep=[1, 2])  # the first row leaves
        assert [r.request.job_id for r in batch.rows] == [2, 3]
        for _ in range(2):
            _step_and_check(batch)


@pytest.mark.parametrize("attention", ["sdpa", "aigc-decode"])
def test_each_rows_scores_match_its_own_full_pass_through_joins_leaves_and_cache_growth(
        tiny_model_dir: Path, attention: str) -> None:
    """The cache (its room stored position first, doubled when full, rows selected and
    left-padded on joins) gives every row the scores a plain forward pass over that row's
    prompt and tokens alone gives, with transformers' sdpa and with the engine's attention."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if attention == "aigc-decode":
        assert use_decode_attention(model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = RunningBatch(model, int(tokenizer.pad_token_id))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # sdpa, no cache

    def check() -> None:
        for i, row in enumerate(batch.rows):
            alone = reference(input_ids=torch.tensor([row.prompt_ids + row.tokens])).logits[0, -1]
            torch.testing.assert_close(batch.logits[i], alone, atol=1e-4, rtol=1e-4)

    def step(keep: list[int] | None = None) -> None:
        chosen = batch.sample()
        for row, token in zip(batch.rows, chosen, strict=True):
            row.tokens.append(token)
        batch.advance(chosen, list(range(len(batch.rows))) if keep is None else keep)
        check()

    with torch.inference_mode():
        batch.join([_row(tokenizer, "the cat sat on the mat", 1.0, 1), _row(tokenizer, "a b", 1.0, 2)])
        check()
        for _ in range(40):
            step()
        batch.join([_row(tokenizer, "a much longer prompt, with punctuation; and more words", 1.3, 3)])
        check()
        step(keep=[0, 2])  # the second row leaves
        room = batch.cache.layers[0].room[0].shape[0]
        while batch.cache.layers[0].room[0].shape[0] == room:  # until the room is full and doubled,
            step()
        for _ in range(3):  # its contents kept
            step()
        layer = batch.cache.layers[0]
        assert layer.keys.shape[2] == layer.length > room
        assert [r.request.job_id for r in batch.rows] == [1, 3]
