"""Per-server settings: validation of every key, channel › server › global, the /config handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import sqlite_utils

from bot.commands import CATALOGUE
from bot.commands.moderation import config_reset, config_set, config_show
from bot.core.invocation import Invocation
from bot.core.services import Services
from storage.database import Database, applied_migrations, open_database
from storage.guild_config import KEYS, ConfigError, ConfigStore
from storage.personas import PersonaStore
from tests.databases import store_settings, table_names
from tests.handlers import C1, C2, OTHER_G, G, Recorder, make_services, run


@pytest.fixture
def db(db_target: Path | str) -> Iterator[Database]:
    database = open_database(db_target)
    yield database
    database.close()


@pytest.fixture
def store(db: sqlite_utils.Database) -> ConfigStore:
    return ConfigStore(db, commands=CATALOGUE.switchable(), clock=lambda: 1000.0)


@pytest_asyncio.fixture
async def services(tmp_path: Path, db_target: Path | str) -> AsyncIterator[Services]:
    services = make_services(tmp_path, **store_settings(db_target), system_prompt="GLOBAL", text_model="smollm2",
                             max_pending_per_user=5, discord_moderator_role="Moderator")
    yield services
    await services.close()


def _rows(db: sqlite_utils.Database) -> list[tuple[object, ...]]:
    return db.execute("SELECT * FROM guild_config ORDER BY guild, channel, key").fetchall()


def test_migration_creates_the_tables(db: Database) -> None:
    assert "0002_guild_config_personas_safety_conversations" in applied_migrations(db)
    assert {"guild_config", "personas", "blocklist", "safety_log", "conversation_turns"} <= set(table_names(db))


def test_channel_overrides_server_overrides_global(store: ConfigStore) -> None:
    defaults = {"timezone": "UTC"}
    assert store.effective("timezone", G, C1, defaults) == "UTC"
    store.set(G, "timezone", "Europe/Paris", by="mod")
    assert store.effective("timezone", G, C1, defaults) == "Europe/Paris"
    store.set(G, "timezone", "Asia/Tokyo", channel=C1, by="mod")
    assert store.effective("timezone", G, C1, defaults) == "Asia/Tokyo"
    assert store.effective("timezone", G, C2, defaults) == "Europe/Paris"  # another channel: the server's
    assert store.effective("timezone", OTHER_G, C1, defaults) == "UTC"  # another server: the global one
    assert store.effective("timezone", None, None, defaults) == "UTC"  # direct messages
    assert store.explain("timezone", G, C1, defaults).source == "channel"
    assert store.reset(G, "timezone") is True
    assert store.effective("timezone", G, C2, defaults) == "UTC"
    assert store.effective("timezone", G, C1, defaults) == "Asia/Tokyo"
    assert store.reset(G, "timezone", C1) is True
    assert store.reset(G, "timezone", C1) is False
    assert store.effective("timezone", G, C1, defaults) == "UTC"
    assert store.effective("persona", G, C1, {}) is None  # no global default at all


#: A valid and an invalid value for every key; the test below refuses to run if a key is missing.
GOOD = {
    "enabled_commands": ("/Chat, imagine chat", ["chat", "imagine"]),
    "default_model.text": ("smollm2", "smollm2"),
    "default_model.image": ("tiny-diffusion", "tiny-diffusion"),
    "default_model.audio": ("hibari", "hibari"),
    "max_pending_per_user": (" 7 ", 7),
    "cooldown.text": ("30", 30),
    "cooldown.image": ("5m", 300),
    "cooldown.audio": (" 2H ", 7200),
    "daily_quota.text": ("20", 20),
    "daily_quota.image": ("0", 0),
    "daily_quota.audio": ("100000", 100000),
    "timezone": ("America/New_York", "America/New_York"),
    "moderator_role": ("<@&300000000000000003>", "300000000000000003"),
    "modlog_channel": ("<#200000000000000009>", "200000000000000009"),
    "persona": ("Pirate", "pirate"),
    "age_restricted": ("yes", True),
    "attach_reasoning": ("off", False),
}
BAD = [
    ("enabled_commands", "chat, launch_missiles", "unknown command 'launch_missiles'"),
    ("enabled_commands", "chat; imagine", "expected command names"),
    ("enabled_commands", " , ", "expected command names"),
    ("default_model.text", "two words", "expected a model name"),
    ("default_model.image", "", "expected a model name"),
    ("default_model.audio", "x" * 201, "expected a model name"),
    ("max_pending_per_user", "0", "expected a whole number from 1 to 100"),
    ("max_pending_per_user", "101", "expected a whole number from 1 to 100"),
    ("max_pending_per_user", "five", "expected a whole number from 1 to 100"),
    ("max_pending_per_user", "2.5", "expected a whole number from 1 to 100"),
    ("cooldown.text", "86401", "expected seconds from 0 to 86400 (0 = none), such as 30, 30s, 5m or 2h"),
    ("cooldown.text", "25h", "expected seconds from 0 to 86400"),
    ("cooldown.image", "1.5m", "expected seconds from 0 to 86400"),
    ("cooldown.image", "-30", "expected seconds from 0 to 86400"),
    ("cooldown.audio", "5d", "expected seconds from 0 to 86400"),
    ("cooldown.audio", "", "expected seconds from 0 to 86400"),
    ("daily_quota.text", "100001", "expected a whole number from 0 to 100000 (0 = unlimited), such as 20"),
    ("daily_quota.image", "-1", "expected a whole number from 0 to 100000"),
    ("daily_quota.audio", "twenty", "expected a whole number from 0 to 100000"),
    ("daily_quota.audio", "2.5", "expected a whole number from 0 to 100000"),
    ("timezone", "Mars/Olympus_Mons", "expected an IANA time zone such as Europe/Paris"),
    ("timezone", "../../etc/passwd", "expected an IANA time zone such as Europe/Paris"),
    ("timezone", "", "expected an IANA time zone such as Europe/Paris"),
    ("moderator_role", "   ", "expected a role name or id"),
    ("moderator_role", "r" * 101, "expected a role name or id"),
    ("modlog_channel", "general", "expected a channel id or mention"),
    ("modlog_channel", "<#12>", "expected a channel id or mention"),
    ("persona", "ghost", "expected the name of a persona of this server"),
    ("age_restricted", "maybe", "expected true or false"),
    ("attach_reasoning", "sometimes", "expected true or false"),
]


def test_every_key_has_good_and_bad_examples() -> None:
    assert set(GOOD) == set(KEYS)
    assert {key for key, _, _ in BAD} == set(KEYS)


def _set_good(store: ConfigStore, db: sqlite_utils.Database) -> None:
    PersonaStore(db).add(G, "pirate", "Talk like a pirate.", by="mod")
    for key, (text, _) in GOOD.items():
        store.set(G, key, text, channel=C1 if KEYS[key].channel_only else None, by="mod")


def test_good_values_are_parsed_and_stored_as_typed(store: ConfigStore, db: sqlite_utils.Database) -> None:
    _set_good(store, db)
    for key, (_, value) in GOOD.items():
        channel = C1 if KEYS[key].channel_only else None
        assert store.get(key, G, channel) == value, key
        assert store.effective(key, G, C1, {}) == value, key


@pytest.mark.parametrize(("key", "text", "expected"), BAD, ids=[f"{k}={t[:12]!r}" for k, t, _ in BAD])
def test_bad_value_is_one_clear_line_and_changes_nothing(store: ConfigStore, db: sqlite_utils.Database,
                                                          key: str, text: str, expected: str) -> None:
    _set_good(store, db)
    before = _rows(db)
    with pytest.raises(ConfigError) as caught:
        store.set(G, key, text, channel=C1 if KEYS[key].channel_only else None, by="intruder")
    message = str(caught.value)
    assert message.startswith(f"{key}: ") and expected in message
    assert "\n" not in message
    assert _rows(db) == before


@pytest.mark.parametrize(("text", "seconds"), [("0", 0), ("45", 45), ("30s", 30), ("5 m", 300), ("2h", 7200),
                                               ("24h", 86400), ("86400s", 86400)])
def test_cooldown_accepts_seconds_minutes_and_hours(store: ConfigStore, text: str, seconds: int) -> None:
    assert store.set(G, "cooldown.image", text, by="mod") == seconds
    assert store.effective("cooldown.image", G, C1, {"cooldown.image": 0}) == seconds


def test_channel_only_key_and_unknown_key_are_refused(store: ConfigStore, db: sqlite_utils.Database) -> None:
    with pytest.raises(ConfigError, match=r"^age_restricted: can only be set for a channel"):
        store.set(G, "age_restricted", "true", by="mod")
    with pytest.raises(ConfigError, match=r"unknown setting 'colour'"):
        store.set(G, "colour", "blue", by="mod")
    with pytest.raises(ConfigError, match=r"unknown setting"):
        store.effective("colour", G, C1, {})
    assert _rows(db) == []


def test_show_lists_server_then_channel_values(store: ConfigStore) -> None:
    store.set(G, "timezone", "Europe/Paris", by="mod")
    store.set(G, "age_restricted", "true", channel=C1, by="mod2")
    store.set(G, "age_restricted", "false", channel=C2, by="mod2")
    shown = store.show(G, C1)
    assert [(e.channel, e.key, e.value, e.updated_by) for e in shown] == [
        (None, "timezone", "Europe/Paris", "mod"), (C1, "age_restricted", True, "mod2")]
    assert [e.key for e in store.show(G)] == ["timezone"]
    assert store.show(OTHER_G, C1) == []


# --- handlers --------------------------------------------------------------------------------
def _inv(moderator: bool = True, guild: str | None = G, channel: str | None = C1) -> Invocation:
    return Invocation(user_id="u1", source="test", guild_id=guild, channel_id=channel, is_moderator=moderator)


@pytest.mark.asyncio
async def test_config_handlers_refuse_non_moderators_and_direct_messages(services: Services) -> None:
    out = Recorder()
    await run("config set", _inv(moderator=False), out, services, key="timezone", value="Europe/Paris")
    await run("config reset", _inv(moderator=False), out, services, key="timezone")
    await run("config show", _inv(moderator=False), out, services)
    await run("config set", _inv(guild=None), out, services, key="timezone", value="Europe/Paris")
    assert out.errors == ["Only moderators can use /config set.", "Only moderators can use /config reset.",
                          "Only moderators can use /config show.", "/config set only works in a server."]
    assert out.infos == [] and _rows(services.db) == []


@pytest.mark.asyncio
async def test_config_handlers_set_show_and_reset(services: Services) -> None:
    out = Recorder()
    await config_set(_inv(), out, services, "max_pending_per_user", "3")
    await config_set(_inv(), out, services, "age_restricted", "true")  # channel-only: this channel
    await config_set(_inv(), out, services, "timezone", "Nowhere/Special")
    assert out.infos == ["Set max_pending_per_user to 3 for this server.",
                         f"Set age_restricted to true for channel <#{C1}>."]
    assert out.errors == ["timezone: expected an IANA time zone such as Europe/Paris"]
    moderation = services.moderation
    assert await moderation.effective(_inv(), "max_pending_per_user") == 3
    assert await moderation.effective(_inv(channel=C2), "age_restricted") is False
    assert await moderation.effective(_inv(), "age_restricted") is True
    await config_show(_inv(), out, services)
    shown = out.infos[-1].splitlines()
    assert "max_pending_per_user = 3 (server)" in shown
    assert "age_restricted = true (channel)" in shown
    assert "default_model.text = smollm2 (default)" in shown
    await config_reset(_inv(), out, services, "max_pending_per_user")
    assert out.infos[-1] == "Reset max_pending_per_user for this server; it is now 5 (default)."
    await config_reset(_inv(), out, services, "max_pending_per_user")
    assert out.errors[-1] == "max_pending_per_user was not set for this server."


@pytest.mark.asyncio
async def test_enabled_commands_and_moderator_role(services: Services) -> None:
    out = Recorder()
    moderation = services.moderation
    assert await moderation.command_allowed(_inv(), "imagine") is None
    await config_set(_inv(), out, services, "enabled_commands", "chat", channel=C1)
    refusal = await moderation.command_allowed(_inv(), "imagine")
    assert refusal == "/imagine is not enabled here. Enabled: /chat."
    assert await moderation.command_allowed(_inv(), "chat") is None
    # The catalogue applies enabled_commands to the commands a server may switch off, never to /config.
    await run("help", _inv(), out, services)
    assert out.errors == ["/help is not enabled here. Enabled: /chat."]
    await run("config show", _inv(), out, services)  # never locked out
    assert out.errors == ["/help is not enabled here. Enabled: /chat."] and out.infos[-1].startswith("Settings for")
    assert await moderation.command_allowed(_inv(channel=C2), "imagine") is None
    # The moderator role: the global default, then the server's own.
    assert await moderation.moderator_role(G) == "Moderator"
    await config_set(_inv(), out, services, "moderator_role", "<@&300000000000000003>")
    assert await moderation.moderator_role(G) == "300000000000000003"
    assert await moderation.moderator_role(OTHER_G) == "Moderator"
