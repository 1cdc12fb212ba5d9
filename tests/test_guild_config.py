"""Per-server settings: validation of every key, channel › server › global, the /config handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import sqlite_utils

from bot import moderation
from bot.commands import Invocation
from bot.settings import Settings
from generators.safety import RuleCache
from storage.conversations import ConversationStore
from storage.database import AsyncDatabase, open_database
from storage.guild_config import KEYS, ConfigError, ConfigStore
from storage.personas import PersonaStore
from storage.safety import SafetyStore

G, OTHER_G = "100000000000000001", "100000000000000002"
C1, C2 = "200000000000000001", "200000000000000002"


@dataclass
class Stores:
    """The slice of bot.services.Services the moderation handlers use."""

    settings: Settings
    adb: AsyncDatabase
    config: ConfigStore
    personas: PersonaStore
    safety: SafetyStore
    conversations: ConversationStore
    rule_cache: RuleCache = field(default_factory=RuleCache)


@dataclass
class Recorder:
    infos: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def progress(self, text: str) -> None: ...
    async def result(self, record: object) -> None: ...

    async def error(self, message: str) -> None:
        self.errors.append(message)

    async def info(self, message: str) -> None:
        self.infos.append(message)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite_utils.Database]:
    database = open_database(tmp_path / "db.sqlite3")
    yield database
    database.close()


@pytest.fixture
def store(db: sqlite_utils.Database) -> ConfigStore:
    return ConfigStore(db, commands=moderation.KNOWN_COMMANDS, clock=lambda: 1000.0)


@pytest_asyncio.fixture
async def stores(db: sqlite_utils.Database, store: ConfigStore) -> AsyncIterator[Stores]:
    adb = AsyncDatabase()
    settings = Settings(_env_file=None, system_prompt="GLOBAL", text_model="smollm2",  # type: ignore[call-arg]
                        max_pending_per_user=5, discord_moderator_role="Moderator")
    yield Stores(settings, adb, store, PersonaStore(db), SafetyStore(db), ConversationStore(db))
    adb.close()


def _rows(db: sqlite_utils.Database) -> list[tuple[object, ...]]:
    return db.execute("SELECT * FROM guild_config ORDER BY guild, channel, key").fetchall()


def test_migration_creates_the_tables(db: sqlite_utils.Database) -> None:
    names = [r[0] for r in db.execute("SELECT name FROM _sqlite_migrations").fetchall()]
    assert "0002_guild_config_personas_safety_conversations" in names
    assert {"guild_config", "personas", "blocklist", "safety_log", "conversation_turns"} <= set(db.table_names())


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
async def test_config_handlers_refuse_non_moderators_and_direct_messages(stores: Stores,
                                                                         db: sqlite_utils.Database) -> None:
    out = Recorder()
    await moderation.config_set(_inv(moderator=False), out, stores, "timezone", "Europe/Paris")
    await moderation.config_reset(_inv(moderator=False), out, stores, "timezone")
    await moderation.config_show(_inv(moderator=False), out, stores)
    await moderation.config_set(_inv(guild=None), out, stores, "timezone", "Europe/Paris")
    assert out.errors == ["Only moderators can use /config."] * 3 + ["/config only works in a server."]
    assert out.infos == [] and _rows(db) == []


@pytest.mark.asyncio
async def test_config_handlers_set_show_and_reset(stores: Stores) -> None:
    out = Recorder()
    await moderation.config_set(_inv(), out, stores, "max_pending_per_user", "3")
    await moderation.config_set(_inv(), out, stores, "age_restricted", "true")  # channel-only: this channel
    await moderation.config_set(_inv(), out, stores, "timezone", "Nowhere/Special")
    assert out.infos == ["Set max_pending_per_user to 3 for this server.",
                         f"Set age_restricted to true for channel <#{C1}>."]
    assert out.errors == ["timezone: expected an IANA time zone such as Europe/Paris"]
    assert await moderation.effective(stores, _inv(), "max_pending_per_user") == 3
    assert await moderation.effective(stores, _inv(channel=C2), "age_restricted") is False
    assert await moderation.effective(stores, _inv(), "age_restricted") is True
    await moderation.config_show(_inv(), out, stores)
    shown = out.infos[-1].splitlines()
    assert "max_pending_per_user = 3 (server)" in shown
    assert "age_restricted = true (channel)" in shown
    assert "default_model.text = smollm2 (default)" in shown
    await moderation.config_reset(_inv(), out, stores, "max_pending_per_user")
    assert out.infos[-1] == "Reset max_pending_per_user for this server; it is now 5 (default)."
    await moderation.config_reset(_inv(), out, stores, "max_pending_per_user")
    assert out.errors[-1] == "max_pending_per_user was not set for this server."


@pytest.mark.asyncio
async def test_enabled_commands_and_moderator_role(stores: Stores) -> None:
    out = Recorder()
    assert await moderation.command_allowed(stores, _inv(), "imagine") is None
    await moderation.config_set(_inv(), out, stores, "enabled_commands", "chat", channel=C1)
    refusal = await moderation.command_allowed(stores, _inv(), "imagine")
    assert refusal == "/imagine is not enabled here. Enabled: /chat."
    assert await moderation.command_allowed(stores, _inv(), "chat") is None
    assert await moderation.command_allowed(stores, _inv(), "config") is None  # never locked out
    assert await moderation.command_allowed(stores, _inv(channel=C2), "imagine") is None
    # The moderator role: the global default, then the server's own.
    assert await moderation.moderator_role(stores, G) == "Moderator"
    await moderation.config_set(_inv(), out, stores, "moderator_role", "<@&300000000000000003>")
    assert await moderation.moderator_role(stores, G) == "300000000000000003"
    assert await moderation.moderator_role(stores, OTHER_G) == "Moderator"
