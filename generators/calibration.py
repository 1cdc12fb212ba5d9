"""The text a CPU int8 model is calibrated on (`quantization.SmoothInt8Linear`).

Calibration only measures how large each input channel of each layer gets, so the text
needs variety more than volume: chat turns in the model's own template (what the bot
serves), prose, lists, numbers and a little code. It is our own writing, unrelated to the
held-out text the quality bench scores on.
"""

from __future__ import annotations

from typing import Any

import torch

CHATS: tuple[tuple[str, str], ...] = (
    ("What should I pack for a weekend of hiking in the mountains?",
     "Bring layers you can add or remove: a warm fleece, a rain jacket and a hat. Pack two litres of water, "
     "snacks with salt and sugar, a map, a head torch, a small first-aid kit and blister plasters."),
    ("Can you explain what a neural network is, simply?",
     "A neural network is a stack of simple functions. Each layer multiplies its input by a table of numbers, "
     "adds an offset and bends the result a little. Training nudges those numbers until the output matches "
     "the examples: pictures of cats labelled 'cat', sentences followed by their next word."),
    ("Write a short poem about autumn rain.",
     "Grey roofs hum a patient tune,\nleaves let go one by one;\nthe gutter keeps the afternoon\n"
     "and gives it back as sun."),
    ("How many minutes are there in 3.5 hours? Show the steps.",
     "One hour has 60 minutes. 3 hours are 3 x 60 = 180 minutes and half an hour is 30 minutes, "
     "so 3.5 hours are 180 + 30 = 210 minutes."),
    ("Fix this Python: for i in range(10) print(i)",
     "The loop header needs a colon and the body an indent:\n\n```python\nfor i in range(10):\n"
     "    print(i)\n```"),
    ("Quelle est la capitale de l'Australie ?",
     "La capitale de l'Australie est Canberra, et non Sydney ni Melbourne."),
)

PROSE = (
    "The harbour was quiet before dawn. Fishing boats rocked against the pier, their ropes creaking, "
    "while gulls argued over the nets. By seven the market had opened: crates of mackerel on ice, "
    "lemons at 40 cents each, and a radio playing the weather for the islands (wind north-west, 4 to 5, "
    "visibility good). Mrs. Okafor counted change into a tin and told everyone the same joke twice.\n\n"
    "Meeting notes, 12 March: 1) budget approved at $18,500; 2) the website launch moves to April; "
    "3) Sam will email the printers. Action items are due Friday. Questions? Ask in #general.\n\n"
    "def mean(values: list[float]) -> float:\n    return sum(values) / len(values) if values else 0.0\n"
)


SYSTEM_PROMPT = "You are a helpful assistant."


def calibration_ids(tokenizer: Any, limit: int = 768) -> torch.Tensor:
    """The calibration text as token ids, shape [1, at most ``limit``]: the chats in the
    tokenizer's chat template (plain text where it has none), then the prose."""
    parts = []
    for question, answer in CHATS:
        turns = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question},
                 {"role": "assistant", "content": answer}]
        if getattr(tokenizer, "chat_template", None):
            parts.append(tokenizer.apply_chat_template(turns, tokenize=False))
        else:
            parts.append(f"{question}\n{answer}\n")
    ids = tokenizer("".join(parts) + PROSE, add_special_tokens=False, return_tensors="pt").input_ids
    return ids[:, :limit]
