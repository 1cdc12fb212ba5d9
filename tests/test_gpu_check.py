"""bench/gpu_check.py: the parts that run without a GPU (the script itself needs one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.gpu_check import Row, format_table, held_out_text, kjv_verses, losses_from_notes, main
from bench.text_throughput import HELD_OUT, batch_tokens_per_s, chat_batch, next_token_quality
from generators.finetune_text import TextTuneConfig, finetune_text

#: What Debian's `bible -f Mat5:1-3` prints.
BIBLE_OUTPUT = """\
Mat5:1 And seeing the multitudes, he went up into a mountain: and when he was set, his disciples came unto him:
Mat5:2 And he opened his mouth, and taught them, saying,
Mat5:3 Blessed are the poor in spirit: for theirs is the kingdom of heaven.
"""


def test_bible_output_becomes_plain_text() -> None:
    text = kjv_verses(BIBLE_OUTPUT)
    assert text.startswith("And seeing the multitudes") and "Mat5" not in text
    assert text.endswith("kingdom of heaven.") and text.count("saying,") == 1


def test_without_the_bible_program_the_prose_is_held_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `bible` here
    assert held_out_text() == (HELD_OUT, "text_throughput prose")


def test_the_quality_helpers_on_a_real_model(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(HELD_OUT[:200], return_tensors="pt").input_ids
    with torch.inference_mode():
        own = model(ids).logits[0, :-1].argmax(-1)
    agreement, perplexity = next_token_quality(model, ids, own)
    assert agreement == 1.0 and perplexity > 1.0
    shifted, _ = next_token_quality(model, ids, (own + 1) % model.config.vocab_size)
    assert shifted == 0.0
    assert batch_tokens_per_s(model, tokenizer, chat_batch(tokenizer), 3) > 0


def test_losses_are_read_from_a_real_runs_progress(tiny_model_dir: Path, tmp_path: Path) -> None:
    notes: list[str] = []
    texts = [f"the cat number {i} sat on the mat." for i in range(40)]
    config = TextTuneConfig(block_size=32, batch_blocks=2, micro_blocks=2, max_steps=3, top_layers=None,
                            max_eval_blocks=2, threads=1)
    finetune_text(texts[4:], texts[:4], tmp_path / "v1", model=str(tiny_model_dir), config=config,
                  on_progress=lambda _f, note: notes.append(note))
    losses = losses_from_notes(notes)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)


def test_the_table_names_the_gpu_and_aligns_its_columns() -> None:
    rows = [Row("text", "SmolLM2-135M bnb-4bit", agree_fp32=0.9312, perplexity=14.2, speed="812 tok/s",
                peak_mib=301.4, seconds=3.21),
            Row("oom", "job larger than the GPU", note="job fails: not enough GPU memory")]
    title, header, _rule, text_row, oom_row = format_table("NVIDIA H100 80GB HBM3", rows).splitlines()
    assert title == "GPU check on NVIDIA H100 80GB HBM3"
    speed = header.index("speed")
    assert text_row[speed:].startswith("812 tok/s") and oom_row[speed] == "-"  # columns line up
    assert "0.931" in text_row and "14.20" in text_row and "301" in text_row
    assert oom_row.endswith("job fails: not enough GPU memory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_cuda_it_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU" in out
