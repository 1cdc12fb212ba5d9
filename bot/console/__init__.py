"""The local console front end."""

from bot.console.console import Console

__all__ = ["Console"]
