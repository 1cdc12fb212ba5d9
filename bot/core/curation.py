"""Curating community messages before they are stored: scrubbing, length bounds, duplicates.

Pure functions, no I/O. ``scrub`` replaces what must never end up in a training set with
placeholders: e-mail addresses, phone numbers, Discord bot tokens, API keys and secrets
(``password=…``), and the credentials in URLs (``https://user:pass@host``). It errs on the
side of replacing: a placeholder costs the model little, a leaked key costs a lot.
Duplicates are exact duplicates after normalisation (Unicode NFKC, case folded, whitespace
collapsed), found by their sha256.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

EMAIL = "<email>"
PHONE = "<phone>"
SECRET = "<secret>"
CREDENTIALS = "<credentials>"

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# scheme://user:password@host (also scheme://token@host): keep the scheme and host.
_URL_CREDENTIALS = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^\s/@:]+(?::[^\s/@]*)?@", re.IGNORECASE)
# Secrets in URL query strings: ?token=…&key=…
_URL_SECRET_PARAM = re.compile(
    r"([?&](?:access_token|api_key|apikey|auth|key|password|secret|sig|signature|token)=)[^&\s#]+", re.IGNORECASE)
_SECRET_PATTERNS = (
    re.compile(r"\b[MNO][A-Za-z\d_-]{23,27}\.[A-Za-z\d_-]{6}\.[A-Za-z\d_-]{27,40}\b"),  # Discord bot token
    re.compile(r"\bmfa\.[A-Za-z\d_-]{84}\b"),  # Discord user MFA token
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z\d_-]{20,}\b"),  # OpenAI / Anthropic style keys
    re.compile(r"\bgh[pousr]_[A-Za-z\d]{36,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z\d_]{22,}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z\d-]{10,}\b"),  # Slack
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API key
    re.compile(r"\bhf_[A-Za-z\d]{30,}\b"),  # Hugging Face
    re.compile(r"\beyJ[A-Za-z\d_-]{10,}\.[A-Za-z\d_-]{10,}\.[A-Za-z\d_-]{10,}\b"),  # JWT
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL),
)
# "password: hunter2", "api_key=abc", "token = xyz": keep the name, drop the value.
_ASSIGNED_SECRET = re.compile(
    r"\b((?:api[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|password|passwd|pwd|secret|token)"
    r"\s*[:=]\s*)(?!<secret>)([\"']?)[^\s\"'&]{4,}\2", re.IGNORECASE)
# Runs of digits, spaces, dots, dashes and brackets that may be a phone number; counted below.
_PHONE_CANDIDATE = re.compile(r"(?<![\w+])(?:\+|00)?\(?\d[\d\s().-]{6,}\d(?![\w])")
_PHONE_DIGITS = (9, 15)  # E.164 allows up to 15; fewer than 9 is more likely a date, price or count
_DATE_LIKE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class CurationConfig:
    """Length bounds, in characters, for a message to be worth learning from."""

    min_chars: int = 8
    max_chars: int = 2000


@dataclass(frozen=True)
class Curated:
    """A message after curation: the scrubbed text, whether anything was replaced, its hash."""

    text: str
    scrubbed: bool
    sha256: str


def scrub(text: str) -> tuple[str, bool]:
    """Replace personal data and secrets with placeholders; (new text, whether any was found)."""
    original = text
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(SECRET, text)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m[1]}{CREDENTIALS}@", text)
    text = _URL_SECRET_PARAM.sub(lambda m: f"{m[1]}{SECRET}", text)
    text = _ASSIGNED_SECRET.sub(lambda m: f"{m[1]}{SECRET}", text)
    text = _EMAIL.sub(EMAIL, text)
    text = _PHONE_CANDIDATE.sub(_phone, text)
    return text, text != original


def _phone(match: re.Match[str]) -> str:
    candidate = match[0]
    digits = sum(c.isdigit() for c in candidate)
    if not _PHONE_DIGITS[0] <= digits <= _PHONE_DIGITS[1] or _DATE_LIKE.match(candidate.strip()):
        return candidate
    if candidate.isdigit() and not candidate.startswith(("0", "+")) and digits > 12:
        return candidate  # a long bare number is more likely an id than a phone number
    return PHONE


def normalise(text: str) -> str:
    """The form duplicates are compared in: NFKC, case folded, whitespace collapsed."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def content_hash(text: str) -> str:
    """sha256 (hex) of the normalised text: equal for messages that differ only in case or spacing."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def bytes_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def within_bounds(text: str, config: CurationConfig = CurationConfig()) -> bool:
    """Whether a (scrubbed) text is long enough to teach anything and short enough to keep."""
    length = len(text.strip())
    return config.min_chars <= length <= config.max_chars


def curate(text: str, config: CurationConfig = CurationConfig()) -> Curated | None:
    """Scrub a message and hash it; None when it falls outside the length bounds."""
    cleaned, scrubbed = scrub(text.strip())
    if not within_bounds(cleaned, config):
        return None
    return Curated(cleaned, scrubbed, content_hash(cleaned))


def duplicates(texts: Iterable[str]) -> list[int]:
    """Indexes of the texts that repeat an earlier one (after normalisation)."""
    seen: set[str] = set()
    repeated = []
    for index, text in enumerate(texts):
        digest = content_hash(text)
        if digest in seen:
            repeated.append(index)
        seen.add(digest)
    return repeated


def unique(texts: Iterable[str]) -> list[str]:
    """The texts without exact duplicates, first occurrence kept, order kept."""
    listed = list(texts)
    dropped = set(duplicates(listed))
    return [text for index, text in enumerate(listed) if index not in dropped]
