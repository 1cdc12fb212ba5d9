"""The scrubber measured on a labelled corpus of chat lines (per-type precision and recall),
and the tricky cases one by one. ``pytest -s`` prints the table."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.core.curation import (
    CARD,
    CHANNEL,
    CREDENTIALS,
    EMAIL,
    IBAN,
    IP,
    PHONE,
    ROLE,
    SECRET,
    USER,
    card_valid,
    curate,
    iban_valid,
    scrub,
)

CORPUS = Path(__file__).parent / "data" / "pii_corpus.jsonl"
TYPES = ("card", "iban", "ip", "user", "role", "channel", "email", "phone")
THRESHOLD = 0.95
_KIND = {CARD: "card", IBAN: "iban", IP: "ip", USER: "user", ROLE: "role", CHANNEL: "channel", EMAIL: "email",
         PHONE: "phone", SECRET: "secret", CREDENTIALS: "credentials"}
_PLACEHOLDER = re.compile("(" + "|".join(re.escape(p) for p in _KIND) + ")")

Span = tuple[int, int, str]  # start, end, type


@dataclass(frozen=True)
class Line:
    text: str
    gold: tuple[Span, ...]
    note: str


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None


def load_corpus(path: Path = CORPUS) -> list[Line]:
    lines = []
    for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
        gold, start = [], 0
        for item in row["pii"]:
            begin = row["text"].index(item["value"], start)
            start = begin + len(item["value"])
            gold.append((begin, start, item["type"]))
        lines.append(Line(row["text"], tuple(gold), row["note"]))
    return lines


def replaced_spans(original: str, scrubbed: str) -> list[Span]:
    """Which spans of ``original`` became which placeholder in ``scrubbed``."""
    parts = _PLACEHOLDER.split(scrubbed)
    literals, placeholders = parts[0::2], parts[1::2]
    pattern = "(.+?)".join(re.escape(literal) for literal in literals)
    match = re.fullmatch(pattern, original, re.DOTALL)
    assert match is not None, f"cannot align {scrubbed!r} with {original!r}"
    return [(match.start(i + 1), match.end(i + 1), _KIND[p]) for i, p in enumerate(placeholders)]


def _core(text: str, start: int, end: int) -> tuple[int, int]:
    """A span without the punctuation around it: "(+1 555…)" and "+1 555…" are the same find."""
    while start < end and not text[start].isalnum():
        start += 1
    while end > start and not text[end - 1].isalnum():
        end -= 1
    return start, end


def evaluate(scrub_fn: Callable[[str], tuple[str, bool]], lines: list[Line]) -> tuple[dict[str, Score], list[str]]:
    """Per-type scores, and the lines without personal data that came back changed."""
    scores = {kind: Score() for kind in TYPES}
    changed = []
    for line in lines:
        scrubbed, _ = scrub_fn(line.text)
        if not line.gold and scrubbed != line.text:
            changed.append(f"{line.note}: {line.text!r} -> {scrubbed!r}")
        found = replaced_spans(line.text, scrubbed)
        gold = {(*_core(line.text, s, e), kind) for s, e, kind in line.gold}
        predicted = {(*_core(line.text, s, e), kind) for s, e, kind in found}
        for kind in TYPES:
            g = {span for span in gold if span[2] == kind}
            p = {span for span in predicted if span[2] == kind}
            scores[kind].tp += len(g & p)
            scores[kind].fp += len(p - g)
            scores[kind].fn += len(g - p)
    return scores, changed


def table(scores: dict[str, Score], title: str) -> str:
    def cell(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:6.3f}"

    rows = [title, f"{'type':8} {'gold':>5} {'found':>5} {'prec':>6} {'recall':>6}"]
    for kind, s in scores.items():
        rows.append(f"{kind:8} {s.tp + s.fn:5d} {s.tp + s.fp:5d} {cell(s.precision)} {cell(s.recall)}")
    return "\n".join(rows)


# --- the corpus --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus() -> list[Line]:
    return load_corpus()


def test_corpus_is_large_and_covers_every_type(corpus: list[Line]) -> None:
    assert len(corpus) >= 150
    counts = {kind: sum(1 for line in corpus for span in line.gold if span[2] == kind) for kind in TYPES}
    assert all(counts[kind] >= 5 for kind in ("card", "iban", "ip", "email", "phone", "user")), counts
    assert sum(1 for line in corpus if not line.gold) >= 80  # look-alikes and ordinary chat


def test_scrub_precision_and_recall_per_type(corpus: list[Line]) -> None:
    scores, _ = evaluate(scrub, corpus)
    print("\n" + table(scores, f"scrub on {CORPUS.name} ({len(corpus)} lines)"))
    for kind, score in scores.items():
        assert score.recall is None or score.recall >= THRESHOLD, (kind, score)
        assert score.precision is None or score.precision >= THRESHOLD, (kind, score)
        assert score.tp + score.fn == 0 or score.precision is not None, kind


def test_scrub_leaves_lines_without_personal_data_alone(corpus: list[Line]) -> None:
    _, changed = evaluate(scrub, corpus)
    assert changed == []


def test_alignment_of_placeholders() -> None:
    assert replaced_spans("a 1.2.3.4 b x@y.io", "a <ip> b <email>") == [(2, 9, "ip"), (12, 18, "email")]


# --- tricky cases ------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    # an IP address or a card is never a phone number
    ("host 192.168.1.10 down", f"host {IP} down"),
    ("10.0.0.1:8080 and [2001:db8::1]:443", f"{IP}:8080 and [{IP}]:443"),
    ("card 4111 1111 1111 1111 exp 12/26 cvc 123", f"card {CARD} exp 12/26 cvc 123"),
    ("4111-1111-1111-1111", CARD),
    ("amex 3782 822463 10005", f"amex {CARD}"),
    # IBANs, grouped or not, with what follows them left alone
    ("DE89 3704 0044 0532 0130 00 ok", f"{IBAN} ok"),
    ("GB82WEST12345698765432.", f"{IBAN}."),
    # mentions by type; the address of the end of a sentence stays outside
    ("<@1> <@!2> <@&3> <#4>", f"{USER} {USER} {ROLE} {CHANNEL}"),
    ("see 2001:db8::8a2e:370:7334.", f"see {IP}."),
    # a number with a country code, and one written the national way in each default region
    ("call +44 20 7946 0958 or (646) 321-8890", f"call {PHONE} or {PHONE}"),
    ("ruf 0151 23456789 an", f"ruf {PHONE} an"),
    ("my number is 4155552671", f"my number is {PHONE}"),
    # e-mail before everything else that has digits in it
    ("mail 4155552671@example.com", f"mail {EMAIL}"),
    ("git clone https://bob:pw@10.1.2.3/repo.git", f"git clone https://{CREDENTIALS}@{IP}/repo.git"),
])
def test_tricky_replacements(text: str, expected: str) -> None:
    assert scrub(text) == (expected, True)


@pytest.mark.parametrize("text", [
    "updated 1.2.3.4.5 and v2.0.1, version 1.2.3.4",      # version numbers are not IP addresses
    "999.1.1.1 and 01.02.03.04",                          # invalid octets, leading zeros
    "4111 1111 1111 1112",                                # Luhn fails
    "3714496353984314",                                   # Luhn passes, but no network issues 16-digit 37…
    "1712345678901 ms and id 123456789012345678",         # timestamps and Discord ids
    "DE89 3704 0044 0532 0130 01",                        # mod-97 fails, and the digits are no phone either
    "<:pepe:123456789012345678> <t:1712345678:R>",        # custom emoji and timestamps are not mentions
    "on 2025-03-01 at 10:30, 15/03/2024, 02.03.2024",     # dates
    "$1,299.99, €49,90, 1 299 kr, 50%",                   # prices
    "int max is 2147483647",                              # a bare number with no phone cue
    "std::vector and 10:30:45 and 00:1A:2B:3C:4D:5E",     # colons that are no IPv6 address
])
def test_tricky_look_alikes_stay(text: str) -> None:
    assert scrub(text) == (text, False)


def test_scrub_is_idempotent_and_flags_changes() -> None:
    text = "me: jane@example.com, +1 415 555 2671, 10.0.0.7, <@12>, NL91ABNA0417164300, 4242424242424242"
    once, scrubbed = scrub(text)
    assert scrubbed and once == f"me: {EMAIL}, {PHONE}, {IP}, {USER}, {IBAN}, {CARD}"
    assert scrub(once) == (once, False)
    curated = curate(text)
    assert curated is not None and curated.text == once and curated.scrubbed


def test_validators() -> None:
    assert iban_valid("DE89 3704 0044 0532 0130 00") and iban_valid("no9386011117947")
    assert not iban_valid("DE89 3704 0044 0532 0130 01") and not iban_valid("XX89370400440532013000")
    assert not iban_valid("DE8937040044053201300")  # one character short for Germany
    assert card_valid("4111 1111 1111 1111") and card_valid("378282246310005")
    assert not card_valid("4111 1111 1111 1112") and not card_valid("1234567812345670")  # Luhn ok, no issuer


def test_scrub_is_fast_enough_for_every_message() -> None:
    text = ("hey <@123456789012345678>, the build 1.2.3 at 10:30 costs $19.99; call 415-555-2671 "
            "or mail a@b.example, server 10.0.0.1, card 4111 1111 1111 1111. ") * 12  # ~1.6 kB
    scrub(text)
    start = time.perf_counter()
    for _ in range(10):
        scrub(text)
    assert (time.perf_counter() - start) / 10 < 0.1
