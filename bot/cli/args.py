"""The command line's parser and argument types: a bad argument is one line, before anything runs.

`Parser` prints a usage error as exactly one line, ``error: …``, and exits with status 2
(``--help`` still prints the full help). The types check a value where argparse reads it,
with the same rules as everywhere else: ids are Discord snowflakes
(`storage.ids.is_snowflake`), text is valid, visible text
(`generators.base.text_problem`), numbers are ASCII digits within a range.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import NoReturn

from bot.core.catalogue import MAX_ID, MAX_INTEGER
from generators.base import text_problem
from generators.sampling import RANGES
from storage.ids import is_snowflake, snowflake_problem

#: The most rows one listing may ask for.
MAX_LIST = 10_000
_INTEGER = re.compile(r"[+-]?[0-9]{1,1000}")
_NUMBER = re.compile(r"[+-]?([0-9]{1,1000}(\.[0-9]*)?|\.[0-9]{1,1000})([eE][+-]?[0-9]{1,4})?")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``error: PROG: MESSAGE``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(f"{self.prog}: {message}".split())
        self.exit(2, f"error: {text} (see {self.prog} --help)\n")


def argv_problem(argv: Sequence[str]) -> str | None:
    """Why the raw arguments can't be read (bytes that are not UTF-8 arrive as lone surrogates)."""
    for index, arg in enumerate(argv, start=1):
        problem = text_problem(arg, f"argument {index}", visible=False)
        if problem is not None:
            return problem
    return None


def whole(low: int, high: int, what: str = "a whole number") -> Callable[[str], int]:
    """An argparse type: a whole number in ASCII digits from ``low`` to ``high``."""

    def parse(text: str) -> int:
        if not _INTEGER.fullmatch(text.strip()):
            raise argparse.ArgumentTypeError(f"expected {what} (ASCII digits 0-9), got {_shown(text)}")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} from {low} to {high}, got {_shown(text)}")
        return value

    parse.__name__ = what
    return parse


def number(text: str) -> float:
    """An argparse type: a finite decimal number in ASCII digits (range checked by the generator)."""
    if not _NUMBER.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.7 (ASCII digits 0-9), got {_shown(text)}")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.7, got {_shown(text)}")
    return value


def visible_text(value: str) -> str:
    """An argparse type: text that is valid and shows something (a model name, a voice…):
    an empty value is refused, not taken as "the default"."""
    problem = text_problem(value, "the value")
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def discord_id(text: str) -> str:
    """An argparse type: a Discord id (snowflake), e.g. ``--guild 123456789012345678``."""
    if not is_snowflake(text):
        raise argparse.ArgumentTypeError(snowflake_problem(text, f"the id {_shown(text)}") or "")
    return text


def place(local: str) -> Callable[[str], str]:
    """An argparse type for the console's ``--guild``/``--channel``: a Discord id, ``local``
    (the default: a local one), or empty (none)."""

    def parse(value: str) -> str:
        return value if value in ("", local) else discord_id(value)

    parse.__name__ = "id"
    return parse


JOB_ID = whole(1, MAX_ID, "a job id")
SEED = whole(0, MAX_INTEGER, "a seed")
TOKENS = whole(1, 4096, "a number of tokens")
TOP_K = whole(int(RANGES["top_k"][0]), int(RANGES["top_k"][1]), "a top-k")
COUNT = whole(1, 4, "a number of images")
SCHEDULE_ID = whole(1, MAX_ID, "a schedule id")
LIMIT = whole(1, MAX_LIST, "a limit")
PORT = whole(1, 65_535, "a port")


def _shown(text: str) -> str:
    shown = text if len(text) <= 40 else text[:39] + "…"
    return ascii(shown) if any(not c.isprintable() for c in shown) else repr(shown)
