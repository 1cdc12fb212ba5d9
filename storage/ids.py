"""Discord ids (snowflakes): the one check of a guild, channel, user or message id."""

from __future__ import annotations

import re

_ASCII_ID = re.compile(r"[0-9]{1,20}")
MAX_SNOWFLAKE = 2**64 - 1


def is_snowflake(value: object) -> bool:
    """Whether ``value`` is a Discord id (a snowflake): ASCII digits (or an int) that fit in
    64 bits and are not zero. The one check of a guild, channel, user or message id, wherever
    one comes from: command options, the command line, the settings, stored config."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 < value <= MAX_SNOWFLAKE
    return isinstance(value, str) and _ASCII_ID.fullmatch(value) is not None and 0 < int(value) <= MAX_SNOWFLAKE


def snowflake_problem(value: object, what: str = "the id") -> str | None:
    """Why ``value`` is not a Discord id (one line, naming ``what``), or None."""
    if is_snowflake(value):
        return None
    return f"{what} must be a Discord id: ASCII digits 0-9, not zero, at most 20 digits (64 bits)"
