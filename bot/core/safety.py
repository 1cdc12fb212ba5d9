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

Server regexes must be safe to run on any text without a timeout (Python's ``re`` has
none): `validate_rule` refuses long patterns, backreferences, nested or ambiguous
repetition (``(a+)+``, ``(ab|a)*``, ``.*x.*``), so a regex costs at most quadratic time in
its window; and they run over windows of at most `WINDOW` characters, so a huge text
costs linear time overall. A consequence: a server regex only finds matches up to
`OVERLAP` characters long.
"""

from __future__ import annotations

import bisect
import logging
import re
import re._constants as _sre
import re._parser as _sre_parse
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType

log = logging.getLogger(__name__)

MAX_WORD_CHARS = 100
MAX_REGEX_CHARS = 200
WINDOW = 256  # characters a server regex sees at once
OVERLAP = 96  # windows overlap by this much: the longest match a server regex is sure to find

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
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            out.append(pattern[i: j + 1])
            i = j + 1
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
    plain: re.Pattern[str]
    folded: re.Pattern[str]
    windowed: bool

    def search(self, form: Normalised) -> bool:
        if self.windowed:
            return _windowed(self.plain, form.plain) or _windowed(self.folded, form.folded)
        return bool(self.plain.search(form.plain) or self.folded.search(form.folded))


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


_Compiled = tuple[re.Pattern[str], re.Pattern[str], bool]  # plain, folded, windowed


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
        problem = regex_problem(pattern)
        if problem:
            raise SafetyError(f"regex: {problem}")
        compiled = re.compile(pattern, re.IGNORECASE)
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


def _windowed(pattern: re.Pattern[str], text: str) -> bool:
    """Search in overlapping windows cut at spaces, so no search sees more than WINDOW chars."""
    n = len(text)
    start = 0
    while True:
        end = min(n, start + WINDOW)
        if end < n:
            cut = text.rfind(" ", start + OVERLAP + 1, end)
            if cut != -1:
                end = cut  # a cut word would look whole to \b; cutting at a space never does
        if pattern.search(text, start, end):
            return True
        if end >= n:
            return False
        start = end - OVERLAP


# --- regex vetting ---------------------------------------------------------------------------
_ALPHABET = frozenset(range(0x250))  # ASCII and Latin: enough to see whether two parts overlap
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT)


@dataclass(frozen=True)
class _Atom:
    chars: frozenset[int]
    min: int
    variable: bool


def _cased(code: int) -> set[int]:
    char = chr(code)
    return {code} | {ord(c) for c in (char.lower(), char.upper()) if len(c) == 1}


def _category(name: object) -> frozenset[int]:
    tests = {
        _sre.CATEGORY_DIGIT: lambda c: c.isdecimal(),
        _sre.CATEGORY_SPACE: lambda c: c.isspace(),
        _sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    }
    for positive, negative in ((_sre.CATEGORY_DIGIT, _sre.CATEGORY_NOT_DIGIT),
                               (_sre.CATEGORY_SPACE, _sre.CATEGORY_NOT_SPACE),
                               (_sre.CATEGORY_WORD, _sre.CATEGORY_NOT_WORD)):
        if name in (positive, negative):
            chars = frozenset(c for c in _ALPHABET if tests[positive](chr(c)))
            return chars if name == positive else _ALPHABET - chars
    return _ALPHABET  # an unknown category: assume it overlaps everything


def _class_chars(items: list[tuple[object, object]]) -> frozenset[int]:
    chars: set[int] = set()
    negate = False
    for op, av in items:
        if op == _sre.NEGATE:
            negate = True
        elif op == _sre.LITERAL:
            chars |= _cased(av)  # type: ignore[arg-type]
        elif op == _sre.RANGE:
            low, high = av  # type: ignore[misc]
            for code in range(low, min(high, 0x24F) + 1):
                chars |= _cased(code)
        elif op == _sre.CATEGORY:
            chars |= _category(av)
        else:
            chars |= _ALPHABET
    return _ALPHABET - chars if negate else frozenset(chars)


def _atoms(items: Iterable[tuple[object, object]], depth: int) -> list[_Atom]:
    """Linearise a parsed pattern; raise SafetyError for what cannot be bounded."""
    atoms: list[_Atom] = []
    for op, av in items:
        if op == _sre.LITERAL:
            atoms.append(_Atom(frozenset(_cased(av)), 1, False))  # type: ignore[arg-type]
        elif op == _sre.NOT_LITERAL:
            atoms.append(_Atom(_ALPHABET - _cased(av), 1, False))  # type: ignore[arg-type]
        elif op == _sre.ANY:
            atoms.append(_Atom(_ALPHABET, 1, False))
        elif op == _sre.IN:
            atoms.append(_Atom(_class_chars(av), 1, False))  # type: ignore[arg-type]
        elif op == _sre.AT:
            continue
        elif op == _sre.SUBPATTERN:
            atoms += _atoms(av[-1], depth)  # type: ignore[index]
        elif op == _sre.ATOMIC_GROUP:
            atoms += _atoms(av, depth)  # type: ignore[arg-type]
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            _check_sequence(_atoms(av[1], depth))  # type: ignore[index]  # zero-width: vetted on its own
        elif op == _sre.BRANCH:
            branches = [_atoms(alt, depth) for alt in av[1]]  # type: ignore[index]
            for branch in branches:
                _check_sequence(branch)
            atoms.append(_Atom(
                frozenset().union(*(a.chars for b in branches for a in b)),
                min(sum(a.min for a in b) for b in branches),
                any(a.variable for b in branches for a in b),
            ))
        elif op in (*_REPEATS, _sre.POSSESSIVE_REPEAT):
            low, high, body = av  # type: ignore[misc]
            if high > 1 and depth > 0:
                raise SafetyError("nested repetition such as (a+)+ is not allowed")
            inner = _atoms(body, depth + 1 if high > 1 else depth)
            if high > 1 and any(a.variable for a in inner):
                raise SafetyError("nested repetition such as (ab?)+ or (a|bc)+ is not allowed")
            if high > 1 and _contains_branch(body):
                raise SafetyError("a repeated group of alternatives such as (ab|cd)+ is not allowed")
            atoms.append(_Atom(
                frozenset().union(*(a.chars for a in inner)),
                low * sum(a.min for a in inner),
                # a possessive repeat never gives characters back, so it cannot compete
                high != low and op != _sre.POSSESSIVE_REPEAT,
            ))
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            raise SafetyError("backreferences such as \\1 are not allowed")
        else:
            raise SafetyError(f"{str(op).lower()} is not supported in blocklist patterns")
    _check_sequence(atoms)
    return atoms


def _contains_branch(items: Iterable[tuple[object, object]]) -> bool:
    for op, av in items:
        if op == _sre.BRANCH:
            return True
        if op == _sre.SUBPATTERN and _contains_branch(av[-1]):  # type: ignore[index]
            return True
    return False


def _check_sequence(atoms: list[_Atom]) -> None:
    """Refuse two variable parts that can fight over the same characters: what lies between
    them is optional or matchable by the first (``.*x.*``, ``\\w+\\s*\\w+``, ``a?a?``)."""
    for i, first in enumerate(atoms):
        if not first.variable:
            continue
        for later in atoms[i + 1:]:
            if later.variable and first.chars & later.chars:
                raise SafetyError(
                    "two repeated parts that can match the same text (such as .*x.* or \\w+\\s*\\w+) are not "
                    "allowed; make the part between them required, e.g. \\w+\\s+\\w+"
                )
            if later.min > 0 and not later.chars <= first.chars:
                break  # the first part cannot run past this one


def regex_problem(pattern: str) -> str | None:
    """Why a server regex is refused, or None when it is safe to run."""
    try:
        parsed = _sre_parse.parse(pattern, re.IGNORECASE)
    except re.error as exc:
        return f"does not compile: {exc.msg}"
    except (OverflowError, RecursionError):
        return "does not compile: too complex"
    try:
        _atoms(parsed, 0)
    except SafetyError as exc:
        return str(exc)
    return None


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
