"""Registering the slash commands with Discord only when they changed.

Every start used to overwrite the application's commands; Discord rate-limits that, and a
bot that restarts often (a crash loop, a deploy) runs into it. The registration payload
(`bot.discord.tree.payload`) and where it goes (dev guilds or global) are hashed, and the
hash of the last successful registration is kept in the database (`storage.app_state`):
an unchanged catalogue is not registered again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import discord
from discord import app_commands

from bot.discord.tree import payload
from storage.app_state import StateStore
from storage.database import AsyncDatabase

log = logging.getLogger(__name__)


def commands_hash(tree: app_commands.CommandTree[Any], guild_ids: Sequence[int]) -> str:
    body = {"commands": payload(tree), "guilds": sorted(guild_ids)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


async def register(tree: app_commands.CommandTree[Any], application_id: int, guild_ids: Sequence[int],
                   state: StateStore, adb: AsyncDatabase, *, force: bool = False) -> bool:
    """Sync the tree's commands (to each dev guild, else globally) unless the same ones were
    registered last time; returns whether it synced."""
    key = f"registered-commands:{application_id}"
    digest = commands_hash(tree, guild_ids)
    if not force and await adb.run(state.get, key) == digest:
        log.info("slash commands unchanged since the last registration; not registering them again")
        return False
    if guild_ids:
        for guild_id in guild_ids:
            guild = discord.Object(guild_id)
            tree.copy_global_to(guild=guild)
            synced = await tree.sync(guild=guild)
            log.info("registered %d commands in guild %s", len(synced), guild_id)
    else:
        synced = await tree.sync()
        log.info("registered %d global commands", len(synced))
    await adb.run(state.set, key, digest)
    return True
