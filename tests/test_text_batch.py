"""The running batch's sampling: each row's repetition penalty over its own prompt and tokens,
while rows join and leave (checked against transformers' own logits processor)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, RepetitionPenaltyLogitsProcessor

from generators.base import Request
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
