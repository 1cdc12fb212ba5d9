"""Which embedded image model draws a prompt, when none was asked for.

Without a diffusion model (a CPU bot) no model draws anything; each small model knows one
subject. `route` reads the prompt and picks the one that knows what it names:

* clothes (Fashion-MNIST's ten classes and their synonyms: "a sneaker", "jeans") → ``fashion``;
* a digit ("the number seven", "7", "a handwritten 3") → ``digits``;
* a face ("a portrait", "a woman", "a selfie") → ``face``.

The first subject named wins ("a man in a jacket" is a face, "a jacket for a man" a coat).
A number is a digit only when it is what the prompt is about: next to "number", "digit",
"handwritten"..., or alone ("7", "a seven"); otherwise it counts ("two sneakers"). The words
are those the class-conditional models read (`generators.image_data`), so the class routed
to is the class drawn; "top" alone routes nowhere ("a castle on top of a hill").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from generators.image_data import DIGIT_CLASSES, DIGIT_WORDS, FASHION_CLASSES, FASHION_WORDS, ClassVocabulary
from generators.image_models import FACE

FASHION = "fashion"
DIGITS = "digits"

FACE_WORDS = ("face", "portrait", "self portrait", "headshot", "selfie", "person", "people", "human",
              "woman", "women", "man", "men", "girl", "boy", "lady", "ladies", "guy", "child", "children",
              "kid", "someone")
#: Words that make a number the subject ("the number 7"), not a count ("7 bags").
DIGIT_CUES = frozenset({"number", "digit", "numeral", "handwritten", "written", "figure"})
#: Words that leave a lone number the subject: "draw me a 7", "the seven, please".
FILLER = frozenset({"a", "an", "the", "of", "me", "us", "draw", "drawing", "show", "make", "generate", "create",
                    "sketch", "picture", "image", "photo", "please", "single", "big", "small", "large"})
#: Fashion words too common to route on alone (the fashion model still reads them).
NOT_ROUTED = frozenset({"top"})


@dataclass(frozen=True)
class Route:
    """The model that draws a prompt, and the class it draws (None: not class-conditional)."""

    model: str
    label: int | None
    subject: str  # for people: "Sneaker", "7", "a face"


def _table() -> tuple[ClassVocabulary, list[Route]]:
    """One vocabulary over every subject, so the first one named is found in one pass."""
    fashion = [tuple(w for w in words if w not in NOT_ROUTED) for words in FASHION_WORDS]
    words = [*fashion, *DIGIT_WORDS, FACE_WORDS]
    routes = [Route(FASHION, i, name) for i, name in enumerate(FASHION_CLASSES)]
    routes += [Route(DIGITS, i, name) for i, name in enumerate(DIGIT_CLASSES)]
    routes.append(Route(FACE, None, "a face"))
    return ClassVocabulary([r.subject for r in routes], words), routes


_VOCABULARY, _ROUTES = _table()
_DIGITS_ONLY = ClassVocabulary(DIGIT_CLASSES, DIGIT_WORDS)


def route(prompt: str) -> Route | None:
    """The embedded model (and class) that draws what ``prompt`` names first; None: none can."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    number_is_subject = bool(DIGIT_CUES.intersection(words)) or all(
        w in FILLER or _DIGITS_ONLY.match(w) for w in words)
    for label in _VOCABULARY.match(prompt):
        found = _ROUTES[label]
        if found.model != DIGITS or number_is_subject:
            return found
    return None


def what_they_draw() -> str:
    """One line for a member: what the embedded models draw, with example words."""
    clothes = ", ".join(words[0] for words in FASHION_WORDS)
    return (f"a face (portrait, person, woman, man, selfie), clothes ({clothes}, and synonyms such as "
            "shoe, jeans, jacket, sweater, handbag) or a digit 0-9 (“the number seven”, “7”)")


def cannot_draw() -> str:
    """Why a prompt no embedded model knows is refused, and what would draw it (a sentence a
    member reads as is)."""
    return ("🎨 Sorry, none of this bot's image models can draw that. Without a GPU it has small models that "
            f"each draw one subject: {what_they_draw()}. A GPU with a diffusion model draws anything.")
