"""Content safety: a short built-in list for the worst categories plus each server's blocklist.

Pure logic (no SQL, no Discord). `check_text` normalises the text twice:

- *plain*: Unicode compatibility forms (fullwidth, math letters), accents, zero-width and
  other invisible characters, common Cyrillic/Greek look-alikes and case are folded away;
- *folded*: plain, plus leetspeak inside words (``s3xy``, ``h@te``) and letters spread out
  with separators (``k.i.l.l``) joined again.

Every built-in rule and blocklist word is matched on both: as written on *plain*, and on
*folded* with each letter run allowed to repeat (``kill`` also matches ``kiiilll``). Word
boundaries keep ``Scunthorpe`` and ``I killed it at the gym`` out.

Built-in categories: sexual content involving minors and explicit self-harm instructions
apply everywhere, always; credible violent threats apply outside age-restricted channels
(where mature fiction is expected, the server's own rules decide). The lists are short and
conservative on purpose: they catch the unambiguous cases, not everything.

Server regexes run on the third-party ``regex`` engine, whose searches take a ``timeout``
(Python's ``re`` has none), so no pattern can stall a check, whatever its shape:

- at ``/blocklist add`` (`validate_rule`), a pattern must compile, be at most
  `MAX_REGEX_CHARS` long, have no counted repeat over `MAX_REPEAT` (the engine expands
  those when compiling, which has no timeout), not match an empty text (it would block
  every message), and pass a trial: searches over adversarial texts of one window each
  (long runs of the pattern's own characters and of common ones, ending in a character
  that forces backtracking), each within `TRIAL_LIMIT` of CPU time. A pattern like
  ``(a+)+$`` needs far longer and is refused with one line saying so. Stored entries are
  vetted the same way when compiled; one that no longer passes is skipped and logged
  (`ServerRules.compile`);
- when checking, a server regex searches windows of at most `WINDOW` characters, so its
  cost grows linearly with the text (a consequence: it only finds matches up to `OVERLAP`
  characters long; a match that touches a window's edge is confirmed on the whole text, so
  ``$`` and ``\\b`` keep their meaning), under one deadline of `REGEX_TIMEOUT` (wall clock)
  per rule and text;
- a search that runs out of time counts as **a match**: the text is refused under that
  rule, and the rule is logged once as too slow. This is the safe choice for a safety
  filter: the alternative (skip the rule) would let anyone slip a blocked word past the
  filter by padding the message with text that makes the rule slow, while failing closed
  costs at most a refusal of a text built to be slow (members can rephrase; moderators see
  the log line and can fix the rule). The trial at add time makes this rare in practice.
  (The engine checks its clock coarsely: a search may overrun its timeout by a few tens of
  milliseconds.)
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType

import regex

log = logging.getLogger(__name__)

MAX_WORD_CHARS = 100
MAX_REGEX_CHARS = 200
WINDOW = 256  # characters a server regex sees at once
OVERLAP = 96  # windows overlap by this much: the longest match a server regex is sure to find
REGEX_TIMEOUT = 0.1  # seconds one server regex may spend on one text (all its windows); then it counts as a match
TRIAL_LIMIT = 0.02  # seconds one trial search (one window of adversarial text) may take at /blocklist add
MAX_REPEAT = 1000  # the largest counted repeat, {n} or {m,n}, multiplied through nested groups

CATEGORY_LABELS = MappingProxyType({
    "minors": "sexual content involving minors",
    "self_harm": "self-harm instructions",
    "threat": "a threat of violence",
    "blocklist": "a word or pattern this server has blocked",
})


class SafetyError(Exception):
    """A blocklist pattern that cannot be used; the message is one line for the moderator."""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str | None = None
    category: str | None = None


ALLOWED = Verdict(True)


# --- normalisation ---------------------------------------------------------------------------
_LOOKALIKES = MappingProxyType(str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s",
    "ԁ": "d", "ɡ": "g", "ı": "i", "к": "k", "м": "m", "т": "t", "н": "h", "в": "b", "ԛ": "q",
    "ѡ": "w", "α": "a", "ο": "o", "ι": "i", "κ": "k", "ν": "v", "ρ": "p", "τ": "t", "υ": "u",
}))
_LEET = MappingProxyType(str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b",
                                        "9": "g", "@": "a", "$": "s", "|": "l", "+": "t", "€": "e"}))
_APOSTROPHES = re.compile(r"['’‘ʼ`´]")
_SPACES = re.compile(r"\s+")
_TOKEN = re.compile(r"[a-z0-9@$|+!€]+")
_BANG_IN_WORD = re.compile(r"!(?=[a-z])")
_AGE_DIGITS = re.compile(r"\d+(?=y)")  # "13yo": an age, not leetspeak
_SPREAD = re.compile(r"(?<![a-z0-9])[a-z](?:[\s.\-_*,]+[a-z](?![a-z0-9])){2,}")
_NOT_LETTER = re.compile(r"[^a-z]")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Normalised:
    plain: str
    folded: str


def plain_form(text: str) -> str:
    """Case, accents, compatibility forms, invisible characters and look-alikes folded away."""
    text = unicodedata.normalize("NFKD", text)
    # Mn/Me: accents left by NFKD; Cf: zero-width spaces/joiners, soft hyphens, direction marks.
    text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
    text = text.casefold().translate(_LOOKALIKES)
    text = _APOSTROPHES.sub("", text)  # "i'll" -> "ill", so patterns need one spelling
    return _SPACES.sub(" ", text).strip()


def _deleet(match: re.Match[str]) -> str:
    token = match.group()
    if not any("a" <= c <= "z" for c in token):
        return token  # a number on its own stays a number ("12 year old")
    age = _AGE_DIGITS.match(token)
    keep = age.group() if age else ""
    return keep + _BANG_IN_WORD.sub("i", token[len(keep):]).translate(_LEET)


def fold_form(plain: str) -> str:
    """Leetspeak inside words undone and spread-out letters joined (k.i.l.l -> kill)."""
    text = _TOKEN.sub(_deleet, plain)
    return _SPREAD.sub(lambda m: _NOT_LETTER.sub("", m.group()), text)


def normalise(text: str) -> Normalised:
    plain = plain_form(text)
    return Normalised(plain, fold_form(plain))


def class_end(pattern: str, start: int) -> int:
    """Where the character class opening at ``start`` (``[``) ends: the index after its ``]``
    (a ``]`` right after ``[`` or ``[^`` is a member, and escapes are skipped)."""
    j, n = start + 1, len(pattern)
    if j < n and pattern[j] == "^":
        j += 1
    if j < n and pattern[j] == "]":
        j += 1
    while j < n and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def expand_runs(pattern: str) -> str:
    """Let each literal letter run of a regex also match longer runs: ``kill`` -> ``k+i+l{2,}``.

    Handles the subset of regex syntax the rules here use: escapes, classes, ``(?:``,
    lookarounds and quantifiers; letters in those are copied as they are.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i: i + 2])
            i += 2
        elif c == "[":
            end = class_end(pattern, i)
            out.append(pattern[i: end])
            i = end
        elif c == "(" and pattern.startswith("(?", i):
            kind = pattern[i + 2: i + 4]
            if kind[:1] in (":", "=", "!"):
                width = 3
            elif kind in ("<=", "<!"):
                width = 4
            else:
                raise ValueError(f"expand_runs: unsupported group syntax in {pattern!r}")
            out.append(pattern[i: i + width])
            i += width
        elif c == "{":
            j = pattern.index("}", i)
            out.append(pattern[i: j + 1])
            i = j + 1
        elif "a" <= c <= "z":
            j = i
            while j < n and pattern[j] == c:
                j += 1
            run = j - i
            quantified = j < n and pattern[j] in "?*+{"
            if quantified:
                run -= 1  # the last letter keeps its own quantifier
            if run == 1:
                out.append(c + "+")
            elif run > 1:
                out.append(f"{c}{{{run},}}")
            if quantified:
                out.append(c)
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


# --- built-in rules --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pattern:
    """One regex, compiled for the plain form and (letter runs expanded) for the folded one."""

    plain: re.Pattern[str]
    folded: re.Pattern[str]

    @classmethod
    def of(cls, source: str) -> _Pattern:
        return cls(re.compile(source), re.compile(expand_runs(source)))

    def search(self, form: Normalised) -> bool:
        return bool(self.plain.search(form.plain) or self.folded.search(form.folded))


@dataclass(frozen=True)
class _Near:
    """Two kinds of term within ``window`` words of each other, in either order."""

    first: _Pattern
    second: _Pattern
    window: int

    def search(self, form: Normalised) -> bool:
        return any(self._near(text, a, b) for text, a, b in (
            (form.plain, self.first.plain, self.second.plain),
            (form.folded, self.first.folded, self.second.folded),
        ))

    def _near(self, text: str, first: re.Pattern[str], second: re.Pattern[str]) -> bool:
        a = [m.start() for m in first.finditer(text)]
        if not a:
            return False
        b = [m.start() for m in second.finditer(text)]
        if not b:
            return False
        starts = [m.start() for m in _WORD.finditer(text)]

        def index(pos: int) -> int:
            return bisect.bisect_right(starts, pos) - 1

        second_words = sorted(index(p) for p in b)
        for pos in a:
            i = index(pos)
            k = bisect.bisect_left(second_words, i - self.window)
            if k < len(second_words) and second_words[k] <= i + self.window:
                return True
        return False


@dataclass(frozen=True)
class _Rule:
    name: str
    category: str
    always: bool
    matcher: _Pattern | _Near


_MINOR = (
    r"\b(?:child(?:ren)?|kids?|kiddies|minors|a\s+minor|under-?aged?|pre-?teens?|pre-?pubescent|toddlers?"
    r"|infants?|babies|(?:little|young)\s+(?:girls?|boys?)|school\s*(?:girls?|boys?)|lolis?|shotas?|jailbait"
    r"|(?:[1-9]|1[0-7])\s*-?\s*(?:yo|y/o|yrs?\s*-?\s*old|years?\s*-?\s*old)"
    r"|(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen"
    r"|seventeen)[\s-]*years?[\s-]*old)\b"
)
_SEXUAL = (
    r"\b(?:porn\w*|nudes?(?!\s+(?:colou?rs?|lipsticks?|heels?|shades?|tones?|palettes?|makeup))"
    r"|naked(?!\s+(?:eyes?|mole|truth|flames?|apes?|singularity))|nsfw|hentai|erotic\w*|lewd|xxx|sexy|sexting|sex\s+with"
    r"|sex\s+(?:scene|act|video|tape|doll|slave|toy)s?|(?:have|having|had)\s+sex"
    r"|sexual(?:ly)?\s+(?:explicit|acts?|roleplay|role-play|fantas(?:y|ies)|content|images?|pictures?|photos?|poses?)"
    r"|orgasm\w*|masturbat\w*|blow-?jobs?|fetish\w*|seduc\w+|topless|lingerie)\b"
)
_CSAM_TERMS = (
    r"\b(?:csam|lolicon|shotacon|child\s*porn\w*|kidd(?:ie|y)\s*porn\w*|pedo\s*porn\w*"
    r"|pre-?teen\s*(?:porn\w*|nudes?|sex\w*)|jailbait)\b"
)
_SELF = (
    r"(?:kill(?:ing)?\s+(?:my|your|him|her|them|one)\s*(?:self|selves)|commit(?:ting)?\s+suicide"
    r"|end(?:ing)?\s+(?:my|your|ones|their)\s+(?:own\s+)?lifes?|take\s+(?:my|your)\s+own\s+life"
    r"|hang(?:ing)?\s+(?:my|your|one)\s*self|slit(?:ting)?\s+(?:my|your)\s+(?:wrists?|throat)"
    r"|cut(?:ting)?\s+(?:my|your)\s*self|self[\s-]*harm(?:ing)?|overdos(?:e|ing))\b"
    r"(?!\s+(?:recovery|prevention|awareness|support|hotlines?|helplines?|survivors?))"
)
_ASK = (
    r"\b(?:how\s+(?:do\s+i|can\s+i|should\s+i|could\s+i|would\s+i|to|do\s+you|does\s+one|can\s+someone|can\s+you)"
    r"|(?:best|easiest|quickest|fastest|surest|simplest|least\s+painful|most\s+painless|painless|effective"
    r"|reliable|good)\s+(?:way|ways|method|methods)\s+(?:to|of|for)"
    r"|(?:ways|methods|instructions|steps|guide|tutorial|tips)\s+(?:to|for|on)(?:\s+how\s+to)?)"
    # one free word ("how to quickly end my life"), but not the help-seeking ones
    r"(?:\s+(?!stop|prevent|avoid|help|quit|overcome|recover|resist|cope|deal|survive|treat|talk|support)\w+)?\s+"
)
_DOSE = (
    r"\bhow\s+(?:many|much)\s+(?:\w+\s+){0,2}?(?:pills|tablets|capsules|mg|milligrams|grams|doses)\s+"
    r"(?:\w+\s+){0,3}?(?:to|would|will|does\s+it\s+take\s+to|do\s+i\s+need\s+to)\s+(?:\w+\s+)?"
    r"(?:die|kill|overdose|od)\b"
)
_ENCOURAGE = r"\b(?:you\s+should|go|just|why\s+dont\s+you|please)\s+(?:\w+\s+)?(?:kill|hang)\s+your\s*self\b|\bkys\b"
_SUBJECT = (
    r"(?:\bi\s+(?:will|shall|am\s+going\s+to|am\s+gonna|gonna|want\s+to|wanna|am\s+about\s+to|plan\s+to)"
    r"|\b(?:ill|imma|ima)|\bim\s+(?:going\s+to|gonna|about\s+to|planning\s+to)"
    r"|\bwe\s+(?:will|shall|are\s+going\s+to|are\s+gonna|gonna)|\bwere\s+(?:going\s+to|gonna))"
    r"(?:\s+(?!not\b|never\b|dont\b)\w+)?"  # "I will fucking kill you", but not "I will never kill you"
)
_PEOPLE = (
    r"(?:you|u|him|her|them|yall|you\s+all|all\s+of\s+you|every(?:one|body)"
    r"|(?:your|my|his|her)\s+(?:whole\s+)?(?:family|kids?|children|wife|husband|mom|mother|dad|father|parents"
    r"|son|daughter|sister|brother|boss|teacher|coworkers?|classmates?|neighbou?rs?))\b"
)
_THREAT = _SUBJECT + r"\s+(?:kill|murder|stab|strangle|behead|slaughter|massacre)\s+" + _PEOPLE
_SHOOT = (
    _SUBJECT + r"\s+shoot\s+" + _PEOPLE
    + r"\s+(?:dead|in\s+the\s+(?:head|face|chest|back|gut)|with\s+(?:a|my)\s+(?:gun|rifle|pistol|shotgun))"
)
_MASS = (
    _SUBJECT + r"\s+(?:shoot\s+up|bomb|blow\s+up|burn\s+down)\s+(?:the|my|our|your|this|that|a)\s+(?:\w+\s+)?"
    r"(?:school|church|mosque|synagogue|temple|mall|office|workplace|class(?:room)?|campus|concert|stadium"
    r"|hospital|airport)\b"
)

BUILTIN_RULES: tuple[_Rule, ...] = (
    _Rule("builtin:minors-terms", "minors", True, _Pattern.of(_CSAM_TERMS)),
    _Rule("builtin:minors-sexual", "minors", True, _Near(_Pattern.of(_MINOR), _Pattern.of(_SEXUAL), 5)),
    _Rule("builtin:self-harm-method", "self_harm", True, _Pattern.of(_ASK + _SELF)),
    _Rule("builtin:self-harm-dose", "self_harm", True, _Pattern.of(_DOSE)),
    _Rule("builtin:self-harm-encouragement", "self_harm", True, _Pattern.of(_ENCOURAGE)),
    _Rule("builtin:threat-person", "threat", False, _Pattern.of(_THREAT)),
    _Rule("builtin:threat-shooting", "threat", False, _Pattern.of(_SHOOT)),
    _Rule("builtin:threat-mass-violence", "threat", False, _Pattern.of(_MASS)),
)


# --- server rules ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerRule:
    """One blocklist entry as stored; ``label`` is how the safety log names it."""

    pattern: str
    is_regex: bool = False
    label: str = ""


@dataclass(frozen=True)
class _CompiledServerRule:
    label: str
    plain: _Searcher
    folded: _Searcher
    windowed: bool  # a server regex (on the ``regex`` engine, under a deadline); else a word

    def search(self, form: Normalised) -> bool:
        if not self.windowed:
            return bool(self.plain.search(form.plain) or self.folded.search(form.folded))
        deadline = time.monotonic() + REGEX_TIMEOUT
        try:
            return (_windowed(self.plain, form.plain, deadline)  # type: ignore[arg-type]
                    or _windowed(self.folded, form.folded, deadline))  # type: ignore[arg-type]
        except TimeoutError:
            _log_timeout_once(self.label, len(form.plain))
            return True  # fail closed: see the module docstring


@dataclass(frozen=True)
class ServerRules:
    """A server's blocklist, compiled for checking (cheaply, through a `RuleCache`)."""

    rules: tuple[_CompiledServerRule, ...] = ()
    skipped: tuple[str, ...] = field(default=())

    @classmethod
    def compile(cls, entries: Iterable[ServerRule], cache: RuleCache | None = None) -> ServerRules:
        """Compile entries (through ``cache`` when given); one that no longer validates is
        skipped (and logged), not fatal."""
        rules, skipped = [], []
        for entry in entries:
            label = entry.label or f"blocklist:{'regex' if entry.is_regex else 'word'}:{entry.pattern}"
            try:
                plain, folded, windowed = (cache.get(entry.pattern, entry.is_regex) if cache is not None
                                           else _compile_patterns(entry.pattern, entry.is_regex))
                rules.append(_CompiledServerRule(label, plain, folded, windowed))
            except SafetyError as exc:
                log.warning("skipping blocklist entry %s: %s", label, exc)
                skipped.append(label)
        return cls(tuple(rules), tuple(skipped))


def validate_rule(pattern: str, is_regex: bool) -> str:
    """The pattern to store (trimmed), or SafetyError saying why it cannot be used."""
    cleaned = pattern.strip()
    _compile_patterns(cleaned, is_regex)
    return cleaned


_Searcher = re.Pattern[str] | regex.Pattern  # words on ``re``, server regexes on ``regex``
_Compiled = tuple[_Searcher, _Searcher, bool]  # plain, folded, windowed (a server regex)


class RuleCache:
    """Compiled blocklist entries by (pattern, is_regex), so a check does not recompile a
    whole blocklist (about 0.5 ms a word); the least recently used go beyond ``size``.
    One per bot, shared by every guild; safe to use from several threads."""

    def __init__(self, size: int = 5000) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, bool], _Compiled | SafetyError] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pattern: str, is_regex: bool) -> _Compiled:
        key = (pattern, is_regex)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
        if found is None:
            try:
                found = _compile_patterns(pattern, is_regex)
            except SafetyError as exc:
                found = exc
            with self._lock:
                self._entries[key] = found
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        if isinstance(found, SafetyError):
            raise found
        return found

    def __len__(self) -> int:
        return len(self._entries)


def _compile_patterns(pattern: str, is_regex: bool) -> _Compiled:
    if is_regex:
        if not pattern:
            raise SafetyError("regex: the pattern is empty")
        if len(pattern) > MAX_REGEX_CHARS:
            raise SafetyError(f"regex: at most {MAX_REGEX_CHARS} characters (got {len(pattern)})")
        compiled, problem = _vet(pattern)
        if compiled is None:
            raise SafetyError(f"regex: {problem}")
        return compiled, compiled, True
    if not pattern or len(pattern) > MAX_WORD_CHARS:
        raise SafetyError(f"word: expected 1 to {MAX_WORD_CHARS} characters")
    prefix, suffix = pattern.startswith("*"), pattern.endswith("*")
    words = _WORD.findall(plain_form(pattern.strip("*")).replace("_", " "))
    if not words:
        raise SafetyError("word: expected letters or digits, such as badword (a trailing * matches any ending)")
    plain = _word_regex(words, prefix, suffix)
    folded = _word_regex(fold_form(" ".join(words)).split(), prefix, suffix, expand=True)
    return re.compile(plain), re.compile(folded), False


def _word_regex(words: list[str], prefix: bool, suffix: bool, expand: bool = False) -> str:
    parts = [expand_runs(re.escape(w)) if expand else re.escape(w) for w in words]
    body = r"[\W_]+".join(parts)
    return ("" if prefix else r"(?<![^\W_])") + body + ("" if suffix else r"(?![^\W_])")


def _windowed(pattern: regex.Pattern, text: str, deadline: float) -> bool:
    """Search in overlapping windows cut at spaces, so no search sees more than WINDOW chars;
    TimeoutError once ``deadline`` (``time.monotonic``) has passed."""
    n = len(text)
    start = 0
    while True:
        end = min(n, start + WINDOW)
        if end < n:
            cut = text.rfind(" ", start + OVERLAP + 1, end)
            if cut != -1:
                end = cut  # a cut word would look whole to \b; cutting at a space never does
        if _search_window(pattern, text, start, end, deadline):
            return True
        if end >= n:
            return False
        start = end - OVERLAP


def _search_window(pattern: regex.Pattern, text: str, start: int, end: int, deadline: float) -> bool:
    """Whether ``pattern`` matches in text[start:end]. A match that ends at the edge of a window
    short of the text's end may owe itself to that edge (``$``, ``\\b`` or a lookahead see the
    window's end as the text's): it counts only if it also matches at its start in the whole text."""
    pos = start
    while pos <= end:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("server regex out of time")
        found = pattern.search(text, pos, end, timeout=left)
        if found is None:
            return False
        if found.end() < end or end == len(text):
            return True
        if pattern.match(text, found.start(), timeout=max(deadline - time.monotonic(), 1e-6)):
            return True
        pos = found.start() + 1
    return False


_timed_out: set[str] = set()
_timed_out_lock = threading.Lock()


def _log_timeout_once(label: str, length: int) -> None:
    with _timed_out_lock:
        if label in _timed_out:
            return
        if len(_timed_out) >= 10_000:
            _timed_out.clear()
        _timed_out.add(label)
    log.warning("blocklist entry %s ran out of time (%.2f s) on a %d-character text; the text was refused "
                "under it (logged once per entry; simplify the pattern)", label, REGEX_TIMEOUT, length)


# --- regex vetting ---------------------------------------------------------------------------
_TRIAL_CHARS = "a0 x_.-!/"  # what \w, \d, \s, . and common classes match, besides the pattern's own
_TRIAL_SEEDS = 16  # distinct characters the trial texts are built from
_TRIAL_WALL_LIMIT = 5 * TRIAL_LIMIT
_TRIAL_END = "\x00"  # ends most trial texts: no pattern expects it, so a greedy repeat must give back


def _trial_texts(pattern: str) -> Iterable[str]:
    """Texts of one window each that make backtracking patterns slow: long runs of one
    character, or of two alternating ones, built from the pattern's own characters first."""
    own = [c for c in pattern.casefold() if c.isalnum() or c in " -_.,!?@#:/'&"]
    seeds = list(dict.fromkeys(own + list(_TRIAL_CHARS)))[:_TRIAL_SEEDS]
    for c in seeds:
        yield c * (WINDOW - 1) + _TRIAL_END
        yield c * WINDOW
    for a, b in itertools.pairwise(seeds):
        yield (a + b) * (WINDOW // 2 - 1) + _TRIAL_END
        yield (a + " ") * (WINDOW // 2 - 1) + _TRIAL_END


_COUNTED = re.compile(r"\{(\d*)(?:,(\d*))?\}")
_BRACED_ESCAPES = frozenset("pPNxug")  # \p{L}, \N{name}, \x{41}, \g<name>… : their braces are no repeat


def _largest_repeat(pattern: str) -> int:
    """The largest counted repeat of a pattern, nested counts multiplied: ``((a{10}){20})`` is 200.
    The ``regex`` engine expands counted repeats when it compiles them, without a timeout, so
    ``a{4294967294}`` would stall the compile."""
    largest = 0
    stack = [0]  # per open group: the largest repeat inside it so far
    last = 1  # the repeat count of the atom just before a quantifier
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 2 < n and pattern[i + 1] in _BRACED_ESCAPES and pattern[i + 2] in "{<":
                close = pattern.find("}" if pattern[i + 2] == "{" else ">", i + 2)
                i = n if close == -1 else close + 1
            else:
                i += 2
            last = 1
            continue
        if c == "[":
            i, last = class_end(pattern, i), 1
            continue
        if c == "(":
            stack.append(0)
            i += 1
            continue
        if c == ")" and len(stack) > 1:
            last = max(stack.pop(), 1)
            stack[-1] = max(stack[-1], last)
            i += 1
            continue
        counted = _COUNTED.match(pattern, i) if c == "{" else None
        if counted and (counted[1] or counted[2]):
            count = max(int(counted[1] or 0), int(counted[2] or 0))
            total = count * last
            largest = max(largest, total)
            stack[-1] = max(stack[-1], total)
            i = counted.end()
            continue
        last = 1
        i += 1
    return largest


def _vet(pattern: str) -> tuple[regex.Pattern | None, str | None]:
    """The compiled pattern, or None and why it is refused."""
    if _largest_repeat(pattern) > MAX_REPEAT:
        return None, f"repeat counts such as {{n}} may be at most {MAX_REPEAT} (nested ones multiplied)"
    try:
        compiled = regex.compile(pattern, regex.IGNORECASE | regex.V0)
    except regex.error as exc:
        return None, f"does not compile: {getattr(exc, 'msg', exc)}"
    except (OverflowError, RecursionError, ValueError):
        return None, "does not compile: too complex"
    try:
        if compiled.search("", timeout=TRIAL_LIMIT) is not None:
            return None, "it matches an empty text, so it would block every message"
        for text in _trial_texts(pattern):
            # CPU time decides (a busy machine must not get a good pattern refused); the
            # timeout, on the wall clock, only stops a search that would run for minutes.
            started = time.thread_time()
            compiled.search(text, timeout=_TRIAL_WALL_LIMIT)
            if time.thread_time() - started > TRIAL_LIMIT:
                raise TimeoutError
    except TimeoutError:
        return None, (f"too slow on some texts (over {TRIAL_LIMIT * 1000:.0f} ms on a test text of {WINDOW} "
                      "characters); avoid nested or overlapping repeats such as (a+)+ or (a|aa)+")
    return compiled, None


def regex_problem(pattern: str) -> str | None:
    """Why a server regex is refused, or None when it is safe to run."""
    return _vet(pattern)[1]


# --- checking --------------------------------------------------------------------------------
def check_text(text: str, server_rules: ServerRules | None = None, age_restricted: bool = False) -> Verdict:
    """Whether a prompt or output may pass. Built-in rules come first; in an age-restricted
    channel only those marked ``always`` (minors, self-harm) apply, then the server's."""
    form = normalise(text)
    for rule in BUILTIN_RULES:
        if (rule.always or not age_restricted) and rule.matcher.search(form):
            return Verdict(False, rule.name, rule.category)
    for server_rule in (server_rules.rules if server_rules else ()):
        if server_rule.search(form):
            return Verdict(False, server_rule.label, "blocklist")
    return ALLOWED
