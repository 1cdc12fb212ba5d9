"""A running batch of a transformers causal LM: rows join between decode steps and leave as
soon as they finish (continuous batching), each with its own sampling settings and seed.

The KV cache is a transformers ``DynamicCache`` (per layer: keys and values shaped
[batch, heads, sequence, head_dim]). Rows are left-padded to a common length. A joining group
is prefilled on its own; then both caches are padded on the left to the longer one and
concatenated along the batch. Padding is masked out, and each row's positions count only its
own tokens, so a row attends to the same keys at the same positions whatever it is batched
with: a seeded request gives the same text alone or in a crowd (up to floating-point
differences between batch shapes).

Per step the whole batch is one forward pass of one token per row, then one vectorised
sampling pass (repetition penalty and greedy choice for every row at once; only rows that
sample draw from their own ``torch.Generator``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from generators.base import Request
from generators.sampling import DEFAULTS


@dataclass
class Row:
    """One request in the batch: its sampling settings, tokens so far and streamed text."""

    request: Request
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    generator: torch.Generator | None
    joined_with: int = 0  # rows in the batch right after it joined (itself included)
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None  # why it stopped: "end", "length" or "cancelled"

    @classmethod
    def for_request(cls, request: Request, prompt_ids: list[int]) -> Row:
        p = request.params
        temperature = p.get("temperature", DEFAULTS["temperature"])
        generator = None
        if temperature > 0:
            generator = torch.Generator()
            seed = p.get("seed")
            generator.manual_seed(seed if seed is not None else torch.seed())
        return cls(request, prompt_ids, p.get("max_new_tokens", 64), temperature, p.get("top_p", DEFAULTS["top_p"]),
                   p.get("top_k", DEFAULTS["top_k"]), p.get("repetition_penalty", DEFAULTS["repetition_penalty"]),
                   generator)


class RunningBatch:
    """The rows being generated together, their KV cache and their next-token logits."""

    def __init__(self, model: Any, pad_id: int) -> None:
        self.model = model
        self.pad_id = pad_id
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [rows, cached positions]: 1 = a real token
        self.logits = torch.zeros(0, 0)  # [rows, vocab]: each row's next-token scores
        self.seen = torch.zeros(0, 0, dtype=torch.bool)  # [rows, vocab]: tokens the penalty applies to
        self.penalty = torch.zeros(0, 1)  # [rows, 1]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def joinable(self) -> bool:
        """Whether rows can join mid-run: every cache layer is a plain, growing one (not a
        sliding window or a static buffer, which cannot be padded and concatenated)."""
        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    # --- joining ----------------------------------------------------------------------------
    def join(self, rows: list[Row]) -> None:
        """Prefill ``rows`` (one forward pass over their left-padded prompts) and add them."""
        device = self.model.device
        length = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, length - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[i, length - len(row.prompt_ids):] = 1
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=_positions(mask).to(device), cache=cache, use_cache=True,
                         logits_to_keep=1)  # only the last position's scores: no [rows, prompt, vocab] tensor
        logits = out.logits[:, -1].float().cpu()
        vocab = logits.shape[-1]
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool)
        for i, row in enumerate(rows):
            seen[i, torch.tensor(row.prompt_ids)] = True
        penalty = torch.tensor([[r.repetition_penalty] for r in rows])
        if self.cache is None:
            self.cache, self.mask, self.logits, self.seen, self.penalty = cache, mask, logits, seen, penalty
        else:
            self.cache, self.mask = _concat(self.cache, self.mask, cache, mask)
            self.logits = torch.cat([self.logits, logits])
            self.seen = torch.cat([self.seen, seen])
            self.penalty = torch.cat([self.penalty, penalty])
        self.rows += rows
        for row in rows:
            row.joined_with = len(self.rows)

    # --- one step ---------------------------------------------------------------------------
    def sample(self) -> list[int]:
        """Every row's next token, from the pending logits."""
        logits = self.logits
        if bool((self.penalty != 1.0).any()):
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(self.rows):
            if row.temperature > 0:
                chosen[i] = _draw(logits[i], row)
        return chosen

    def advance(self, tokens: list[int], keep: list[int]) -> None:
        """Record each row's token, drop the rows not in ``keep`` (finished), and run the
        forward pass that gives the kept rows their next logits."""
        chosen = torch.tensor(tokens)
        self.seen[torch.arange(len(tokens)), chosen] = True
        if len(keep) < len(self.rows):
            self._select(keep)
            chosen = chosen[keep]
        if not self.rows:
            return
        assert self.cache is not None
        device = self.model.device
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        out = self.model(input_ids=chosen[:, None].to(device), attention_mask=self.mask.to(device),
                         position_ids=positions.to(device), cache=self.cache, use_cache=True)
        self.logits = out.logits[:, -1].float().cpu()

    def _select(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            return
        assert self.cache is not None
        index = torch.tensor(keep)
        self.cache.batch_select_indices(index.to(self.model.device))
        self.mask, self.logits = self.mask[index], self.logits[index]
        self.seen, self.penalty = self.seen[index], self.penalty[index]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (padding gets 0, masked anyway)."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def _draw(logits: torch.Tensor, row: Row) -> int:
    """Temperature, top-k, top-p, then a draw from the row's own generator."""
    logits = logits / row.temperature
    if 0 < row.top_k < logits.shape[-1]:
        kth = torch.topk(logits, row.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if row.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > row.top_p  # keep the token that crosses top_p
        logits[order[drop]] = -math.inf
    return int(torch.multinomial(logits.softmax(-1), 1, generator=row.generator))


def _concat(a: DynamicCache, a_mask: torch.Tensor, b: DynamicCache, b_mask: torch.Tensor
            ) -> tuple[DynamicCache, torch.Tensor]:
    """Two batches' caches as one: left-padded to the longer, stacked along the batch, with
    the leading positions that are padding in every row cut off."""
    length = max(a_mask.shape[1], b_mask.shape[1])
    mask = torch.cat([_pad_left(a_mask, length, dim=1), _pad_left(b_mask, length, dim=1)])
    start = int(mask.any(dim=0).long().argmax())
    layers = []
    for x, y in zip(a.layers, b.layers, strict=True):
        keys = torch.cat([_pad_left(x.keys, length, dim=2), _pad_left(y.keys, length, dim=2)])
        values = torch.cat([_pad_left(x.values, length, dim=2), _pad_left(y.values, length, dim=2)])
        layers.append((keys[:, :, start:], values[:, :, start:]))
    return DynamicCache(ddp_cache_data=layers), mask[:, start:]


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class StreamDecoder:
    """A row's text, decoded incrementally (a small window of tokens, as vLLM does), so
    streaming costs the same at token 2,000 as at token 2, and a character split across
    tokens is only shown once complete."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix = self.read = 0

    def advance(self, tokens: list[int]) -> bool:
        """Take the row's tokens so far; True when the text grew."""
        decode = self.tokenizer.decode
        before = decode(tokens[self.prefix:self.read], skip_special_tokens=True)
        after = decode(tokens[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(tokens)
        return True
