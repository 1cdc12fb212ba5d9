"""Curating community messages before they are stored: scrubbing, length bounds, duplicates.

Pure functions, no I/O. ``scrub`` replaces what must never end up in a training set with
typed placeholders. It errs on the side of replacing where the data is unambiguous (a
placeholder costs the model little, a leaked key or card costs a lot), but validates what
can be validated, so that ordinary numbers (dates, prices, scores, order numbers, version
numbers, Discord ids) stay as they were. Two stages:

1. Secrets, by pattern: Discord bot tokens, API keys and other well-known token formats,
   assigned secrets (``password=…``, ``?token=…``) → ``<secret>``, and the credentials in
   URLs (``https://user:pass@host``) → ``<credentials>``.
2. Personal data. Each detector claims spans of the text, in this order, and a later one
   never looks at what an earlier one claimed; some spans are only *shielded* (kept as they
   are, so that no later detector mistakes them for something else):

   - Discord mentions: ``<@123>``/``<@!123>`` → ``<user>``, ``<@&123>`` → ``<role>``,
     ``<#123>`` → ``<channel>``; the other markup with ids in it (custom emoji ``<:name:123>``,
     timestamps ``<t:123:R>``, command mentions ``</help:123>``) shielded;
   - e-mail addresses → ``<email>``;
   - version numbers after a cue (``v1.2.3.4``, ``version 1.2.3.4``): shielded;
   - IBANs (ISO 13616: a known country code, that country's length, mod-97 check digits;
     grouped by four or not) → ``<iban>``; an IBAN-shaped string that fails the check is
     shielded, so its digits do not become a card or a phone number;
   - IPv6 and IPv4 addresses, validated by ``ipaddress`` (``1.2.3.4.5``, ``v2.0.1`` and
     ``999.1.1.1`` are not addresses) → ``<ip>``;
   - payment card numbers: 13 to 19 digits, ungrouped or grouped the way cards are printed
     (4-4-4-4…, 4-6-5), a known issuer prefix for that length, and the Luhn check → ``<card>``;
     a card-grouped number failing the check is shielded;
   - dates, times, prices and percentages: shielded;
   - phone numbers, found by ``phonenumbers`` (see `_phones`) → ``<phone>``.

Duplicates are exact duplicates after normalisation (Unicode NFKC, case folded, whitespace
collapsed), found by their sha256.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from phonenumbers import Leniency, PhoneNumberMatcher

EMAIL = "<email>"
PHONE = "<phone>"
SECRET = "<secret>"
CREDENTIALS = "<credentials>"
CARD = "<card>"
IBAN = "<iban>"
IP = "<ip>"
USER = "<user>"
ROLE = "<role>"
CHANNEL = "<channel>"
PLACEHOLDERS = (EMAIL, PHONE, SECRET, CREDENTIALS, CARD, IBAN, IP, USER, ROLE, CHANNEL)

# --- stage 1: secrets ---------------------------------------------------------------------------
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

# --- stage 2: personal data ---------------------------------------------------------------------
_MENTION = re.compile(r"<(@!?|@&|#)\d{1,20}>")
# Other Discord markup with ids in it, shielded: custom emoji, timestamps, command mentions.
_DISCORD_MARKUP = re.compile(r"<a?:\w{1,32}:\d{1,20}>|<t:-?\d{1,20}(?::[tTdDfFR])?>|</[\w -]{1,100}:\d{1,20}>")
_MENTION_PLACEHOLDERS = {"@": USER, "@!": USER, "@&": ROLE, "#": CHANNEL}
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_VERSION = re.compile(
    r"(?<![\w.])(?:v|ver\.?|version|build|release|rev(?:ision)?|firmware|fw)\s?:?\s?\d+(?:\.\d+)+(?:[-+.]\w+)*",
    re.IGNORECASE)
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]{2})\d{2}(?=[ -]?[A-Za-z0-9])")
# ISO 13616 registry: the length of an IBAN for each country that issues them.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
# Candidates only: `ipaddress` decides. IPv6 needs two colons and a digit ("std::vector",
# "10:30" and "a::b" are not addresses); IPv4 must not be part of a longer dotted number.
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.%])[0-9A-Fa-f:][0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9_.-]+)?")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d|-[A-Za-z])")
# Runs of digits with single spaces or dashes between them, not glued to a word, a decimal
# point, a URL path or a '+': the candidates for card numbers, split into groups below.
_DIGIT_RUN = re.compile(r"(?<![\w.,/+-])\d+(?:[ -]\d+)*(?!\w|[.,]\d)")
_CARD_DIGITS = (13, 19)
# Look-alikes no later detector may take for a phone number.
_DATE = re.compile(
    r"(?<![\d.\-/])(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2}))"
    r"(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?(?!\d|[-/.]\d)")
_TIME = re.compile(r"(?<![\d:])\d{1,2}:\d{2}(?::\d{2})?(?![\d:])")
_AMOUNT = r"(?:\d{1,3}(?:[,.' \u202f]\d{3})+(?:[.,]\d{1,2})?|\d+(?:[.,]\d{1,2})?)"
_MONEY = re.compile(
    rf"(?:[$€£¥₹₩₽]|\b(?:USD|EUR|GBP|CHF|JPY|CAD|AUD|INR|Rs\.?)\s?)\s?-?{_AMOUNT}"
    rf"|(?<![\d.,]){_AMOUNT}\s?(?:[$€£¥₹]|(?:USD|EUR|GBP|CHF|JPY|CAD|AUD|kr|SEK|NOK|DKK|zł|PLN|dollars?|euros?"
    r"|bucks|pounds?|yen|quid)\b)", re.IGNORECASE)
_PERCENT = re.compile(r"\d+(?:[.,]\d+)?\s?%")
# Phone numbers: numbers written with a country code ("+44 20 7946 0958") are found whatever
# the region; `phonenumbers` needs a default region only for the national way of writing
# them. We try the US first (NANP: 10 digits with a valid area code, the bot's largest
# audience), then the UK, Germany and France, whose national numbers all start with the
# trunk prefix 0 (so an ordinary number rarely passes for one); these also read the "00"
# international prefix ("0044 20 …"). Leniency: VALID (the number must be in an assigned
# range of its country, not merely the right length) for national numbers; POSSIBLE (the
# right length for the country code) for numbers written with a "+", which is a strong
# enough sign on its own (the fictional "+1 555 …" numbers count).
_PHONE_REGIONS = ("US", "GB", "DE", "FR")
_PHONE_MIN_DIGITS = 7
# An unformatted national number ("4155552671", "2147483647") is a phone number only next to
# a word that says so; otherwise it is more likely an id, a count or a constant.
_PHONE_CUE = re.compile(
    r"\b(?:phone|call|calling|called|tel|telephone|mobile|cell|cellphone|text|texting|sms|whats\s?app|signal"
    r"|telegram|number|num|ring|dial|fax|contact|reach|landline|hotline)\b", re.IGNORECASE)
_PHONE_CUE_BEFORE, _PHONE_CUE_AFTER = 40, 20
# ... unless the words just before it name another kind of number ("case number 02948571").
_ID_CUE = re.compile(
    r"\b(?:order|case|ticket|invoice|tracking|ref|reference|id|account|acct|serial|transaction|confirmation"
    r"|booking|customer|member|membership|policy|seed|build|issue|pr|sku|ean|isbn|pin|otp|code)\b"
    r"(?:\s+(?:no\.?|number|num|nr\.?|id|#))?\s*[:#]?\s*$", re.IGNORECASE)
_ID_CUE_BEFORE = 30
_MASK = "\x00"  # what claimed characters look like to later detectors
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
    claims = _Claims(text)
    for detector in _DETECTORS:
        for start, end, placeholder in detector(claims.masked()):
            claims.claim(start, end, placeholder)
    text = claims.apply()
    return text, text != original


class _Claims:
    """Spans of a text claimed by the detectors, each with its placeholder (None: shielded,
    kept as written). A span can be claimed once; later detectors see it masked."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._taken = bytearray(len(text))
        self._spans: list[tuple[int, int, str | None]] = []
        self._masked: str | None = text

    def claim(self, start: int, end: int, placeholder: str | None) -> bool:
        if end <= start or self._taken.find(1, start, end) != -1:
            return False
        self._taken[start:end] = b"\x01" * (end - start)
        self._spans.append((start, end, placeholder))
        self._masked = None
        return True

    def masked(self) -> str:
        """The text with every claimed character replaced by `_MASK` (same offsets)."""
        if self._masked is None:
            self._masked = "".join(_MASK if taken else c for c, taken in zip(self.text, self._taken, strict=True))
        return self._masked

    def apply(self) -> str:
        out, last = [], 0
        for start, end, placeholder in sorted(self._spans):
            if placeholder is not None:
                out += [self.text[last:start], placeholder]
                last = end
        out.append(self.text[last:])
        return "".join(out)


_Span = tuple[int, int, str | None]


def _mentions(text: str) -> Iterator[_Span]:
    for m in _MENTION.finditer(text):
        yield m.start(), m.end(), _MENTION_PLACEHOLDERS[m[1]]
    for m in _DISCORD_MARKUP.finditer(text):
        yield m.start(), m.end(), None


def _emails(text: str) -> Iterator[_Span]:
    for m in _EMAIL.finditer(text):
        yield m.start(), m.end(), EMAIL


def _shield(*patterns: re.Pattern[str]) -> Callable[[str], Iterator[_Span]]:
    def detector(text: str) -> Iterator[_Span]:
        for pattern in patterns:
            for m in pattern.finditer(text):
                yield m.start(), m.end(), None
    return detector


def _ibans(text: str) -> Iterator[_Span]:
    for m in _IBAN_START.finditer(text):
        length = _IBAN_LENGTHS.get(m[1].upper())
        if length is None:
            continue
        chars, pos, end = list(text[m.start(): m.end()]), m.end(), m.end()
        while len(chars) < length and pos < len(text):
            c = text[pos]
            if c.isascii() and c.isalnum():
                chars.append(c)
                pos = end = pos + 1
            elif c in " -" and pos + 1 < len(text) and text[pos + 1].isascii() and text[pos + 1].isalnum():
                pos += 1  # the print format groups by four, a space between groups (some write dashes)
            else:
                break
        if len(chars) != length or (end < len(text) and text[end].isascii() and text[end].isalnum()):
            continue
        yield m.start(), end, IBAN if iban_valid("".join(chars)) else None


def iban_valid(iban: str) -> bool:
    """ISO 13616 / ISO 7064 mod-97-10: a known country, its length, and the check digits."""
    iban = iban.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit() or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ips(text: str) -> Iterator[_Span]:
    for m in _IPV6_CANDIDATE.finditer(text):
        candidate = m[0]
        while candidate and candidate[-1] in ".:" and not candidate.endswith("::"):
            if _is_ipv6(candidate):
                break
            candidate = candidate[:-1]  # sentence punctuation after the address
        end = m.start() + len(candidate)
        if _is_ipv6(candidate) and not (end < len(text) and (text[end].isalnum() or text[end] == "_")):
            yield m.start(), end, IP
    for m in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m[0])  # no octet over 255, no leading zeros
        except ValueError:
            continue
        yield m.start(), m.end(), IP


def _is_ipv6(candidate: str) -> bool:
    if candidate.count(":") < 2 or not any(c.isdigit() for c in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _cards(text: str) -> Iterator[_Span]:
    for m in _DIGIT_RUN.finditer(text):
        groups = [(m.start() + g.start(), m.start() + g.end()) for g in re.finditer(r"\d+", m[0])]
        i = 0
        while i < len(groups):
            # the longest card-shaped window of whole groups starting at group i
            windows = ((groups[i][0], groups[j - 1][1], j) for j in range(len(groups), i, -1))
            found = next(((start, end, j) for start, end, j in windows if _card_shaped(text[start:end])), None)
            if found is None:
                i += 1
                continue
            start, end, i = found
            number = text[start:end]
            if card_valid(number):
                yield start, end, CARD
            elif not number.isdigit():
                yield start, end, None  # grouped like a card but failing the check: not a phone number either


def _card_shaped(window: str) -> bool:
    digits = re.sub(r"[ -]", "", window)
    if not _CARD_DIGITS[0] <= len(digits) <= _CARD_DIGITS[1]:
        return False
    separators = set(re.findall(r"[ -]", window))
    if not separators:
        return True
    if len(separators) > 1:
        return False
    sizes = [len(g) for g in re.split(r"[ -]", window)]
    return (all(s == 4 for s in sizes[:-1]) and sizes[-1] <= 4) or sizes in ([4, 6, 5], [4, 6, 4])


def card_valid(number: str) -> bool:
    """13 to 19 digits (spaces and dashes ignored), a known issuer for that length, Luhn."""
    digits = re.sub(r"[ -]", "", number)
    if not digits.isdigit() or not _CARD_DIGITS[0] <= len(digits) <= _CARD_DIGITS[1]:
        return False
    return _known_issuer(digits) and _luhn(digits)


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char) * (2 if index % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _known_issuer(digits: str) -> bool:
    """Issuer identification number ranges and lengths of the networks in use; a random digit
    run (an id, a timestamp) passes Luhn one time in ten, but rarely this as well."""
    n, p2, p3, p4 = len(digits), int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # American Express
    if 2200 <= p4 <= 2204:
        return 16 <= n <= 19  # Mir
    if p2 in (36, 38, 39) or 300 <= p3 <= 305:
        return 14 <= n <= 19  # Diners Club
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19  # JCB
    if digits[0] == "6" or p2 == 50 or 56 <= p2 <= 58:
        return 13 <= n <= 19  # Discover, UnionPay, Maestro, RuPay
    return False


def _phones(text: str) -> Iterator[_Span]:
    """Phone numbers (see `_PHONE_REGIONS`): "+" numbers by POSSIBLE leniency, then national
    ones by VALID leniency in each default region."""
    if sum(c.isdigit() for c in text) < _PHONE_MIN_DIGITS:
        return  # most chat lines: no need to ask phonenumbers (the slowest detector by far)
    seen: list[tuple[int, int]] = []
    passes = [(None, Leniency.POSSIBLE)] + [(region, Leniency.VALID) for region in _PHONE_REGIONS]
    for region, leniency in passes:
        for match in PhoneNumberMatcher(text, region, leniency=leniency):
            start, end, raw = match.start, match.end, match.raw_string
            if any(s < end and start < e for s, e in seen):
                continue
            if sum(c.isdigit() for c in raw) < _PHONE_MIN_DIGITS:
                continue
            if raw.isdigit() and not _phone_cue(text, start, end):
                continue
            seen.append((start, end))
            yield start, end, PHONE


def _phone_cue(text: str, start: int, end: int) -> bool:
    if _ID_CUE.search(text, max(0, start - _ID_CUE_BEFORE), start):
        return False
    return bool(_PHONE_CUE.search(text, max(0, start - _PHONE_CUE_BEFORE), start)
                or _PHONE_CUE.search(text, end, end + _PHONE_CUE_AFTER))


_DETECTORS = (
    _mentions,
    _emails,
    _shield(_VERSION),
    _ibans,
    _ips,
    _cards,
    _shield(_DATE, _TIME, _MONEY, _PERCENT),
    _phones,
)


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
