"""Personas: validation, scoping per server, resolution order for /chat, the /persona handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import sqlite_utils

from bot.commands import moderation
from bot.core import conversation
from bot.core.invocation import Invocation
from bot.core.services import Services
from storage.database import Database, open_database
from storage.guild_config import ConfigStore
from storage.personas import MAX_SYSTEM_PROMPT, PersonaError, PersonaStore
from tests.databases import store_settings
from tests.handlers import C1, C2, OTHER_G, Recorder, make_services, run

G = "100000000000000001"


@pytest.fixture
def db(db_target: Path | str) -> Iterator[Database]:
    database = open_database(db_target)
    yield database
    database.close()


@pytest.fixture
def personas(db: sqlite_utils.Database) -> PersonaStore:
    return PersonaStore(db, clock=lambda: 50.0)


@pytest_asyncio.fixture
async def services(tmp_path: Path, db_target: Path | str) -> AsyncIterator[Services]:
    services = make_services(tmp_path, **store_settings(db_target), system_prompt="GLOBAL")
    yield services
    await services.close()


def _inv(moderator: bool = True, guild: str | None = G, channel: str | None = C1) -> Invocation:
    return Invocation(user_id="u1", source="test", guild_id=guild, channel_id=channel, is_moderator=moderator)


def test_add_get_edit_remove(personas: PersonaStore) -> None:
    added = personas.add(G, "Pirate", "  Talk like a pirate.  ", {"temperature": 1.2}, by="mod")
    assert (added.name, added.system_prompt, added.sampling, added.created_by) == (
        "pirate", "Talk like a pirate.", {"temperature": 1.2}, "mod")
    assert personas.get(G, "PIRATE") == added
    edited = personas.edit(G, "pirate", sampling={"top_p": 0.5})
    assert edited.system_prompt == "Talk like a pirate." and edited.sampling == {"top_p": 0.5}
    edited = personas.edit(G, "pirate", system_prompt="Arr.")
    assert edited.system_prompt == "Arr." and edited.sampling == {"top_p": 0.5}
    assert personas.remove(G, "pirate") is True
    assert personas.get(G, "pirate") is None
    assert personas.remove(G, "pirate") is False
    with pytest.raises(PersonaError, match="no persona named 'pirate'"):
        personas.edit(G, "pirate", system_prompt="x")


def test_personas_are_scoped_per_server(personas: PersonaStore) -> None:
    personas.add(G, "helper", "Server one's helper.", by="a")
    personas.add(OTHER_G, "helper", "Server two's helper.", by="b")
    personas.add(OTHER_G, "bard", "Rhymes.", by="b")
    assert [p.name for p in personas.for_guild(G)] == ["helper"]
    assert [p.name for p in personas.for_guild(OTHER_G)] == ["bard", "helper"]
    assert personas.get(G, "bard") is None
    personas.remove(OTHER_G, "helper")
    assert personas.get(G, "helper") is not None and personas.get(G, "helper").system_prompt == "Server one's helper."


@pytest.mark.parametrize("name", ["", "x" * 33, "has space", "café", "semi;colon", "../up"])
def test_bad_names_are_refused(personas: PersonaStore, name: str) -> None:
    with pytest.raises(PersonaError, match=r"^persona name: expected 1–32 characters of a-z, 0-9, _ or -"):
        personas.add(G, name, "prompt", by="mod")
    assert personas.for_guild(G) == []


def test_prompt_length_duplicates_and_sampling_shape(personas: PersonaStore) -> None:
    personas.add(G, "a" * 32, "p" * MAX_SYSTEM_PROMPT, by="mod")
    with pytest.raises(PersonaError, match=r"^system prompt: expected 1 to 2000 characters \(got 2001\)"):
        personas.add(G, "long", "p" * (MAX_SYSTEM_PROMPT + 1), by="mod")
    with pytest.raises(PersonaError, match="system prompt"):
        personas.add(G, "empty", "   ", by="mod")
    with pytest.raises(PersonaError, match="already exists"):
        personas.add(G, "A" * 32, "again", by="mod")
    with pytest.raises(PersonaError, match="temperature must be a number"):
        personas.add(G, "odd", "p", {"temperature": "hot"}, by="mod")
    assert [p.name for p in personas.for_guild(G)] == ["a" * 32]


@pytest.mark.parametrize(("sampling", "message"), [
    ({"temperature": 2.5}, "temperature: expected a number from 0 to 2"),
    ({"top_p": 0}, "top_p: expected a number from 0.01 to 1"),
    ({"top_k": 1.5}, "top_k: expected a whole number from 0 to 1000"),
    ({"repetition_penalty": True}, "repetition_penalty: expected a number from 1 to 2"),
    ({"seed": 3}, "sampling: unknown setting 'seed'"),
    ("temperature 0.9", "sampling: expected name=value pairs"),
    ("temperature=warm", "temperature: expected a number from 0 to 2"),
])
def test_sampling_ranges_come_from_the_text_generator(sampling: object, message: str) -> None:
    with pytest.raises(PersonaError) as caught:
        moderation.check_sampling(sampling)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)


def test_sampling_text_and_mapping_forms() -> None:
    assert moderation.check_sampling("temperature=0.9, top_k=40") == {"temperature": 0.9, "top_k": 40}
    assert moderation.check_sampling({"top_p": 0.8, "temperature": None}) == {"top_p": 0.8}
    assert moderation.check_sampling(None) == {}


def test_resolution_order_option_channel_server_global(db: sqlite_utils.Database, personas: PersonaStore) -> None:
    config = ConfigStore(db)

    def resolve(explicit: str | None = None, channel: str | None = C1,
                guild: str | None = G) -> conversation.ResolvedPersona:
        return conversation.resolve_persona_sync(config, personas, guild, channel, explicit, "GLOBAL")

    assert resolve() == conversation.ResolvedPersona(None, "GLOBAL", {}, "global")
    personas.add(G, "server-default", "S", {"temperature": 0.1}, by="mod")
    personas.add(G, "channel-default", "C", by="mod")
    personas.add(G, "chosen", "X", by="mod")
    config.set(G, "persona", "server-default", by="mod")
    assert (resolve().name, resolve().source, resolve().sampling) == ("server-default", "server", {"temperature": 0.1})
    config.set(G, "persona", "channel-default", channel=C1, by="mod")
    assert (resolve().name, resolve().source) == ("channel-default", "channel")
    assert (resolve(channel=C2).name, resolve(channel=C2).source) == ("server-default", "server")
    assert (resolve("Chosen").name, resolve("Chosen").source) == ("chosen", "option")
    assert resolve(guild=OTHER_G).source == "global"
    with pytest.raises(PersonaError, match="no persona named 'ghost' on this server"):
        resolve("ghost")
    with pytest.raises(PersonaError, match="outside a server"):
        resolve("chosen", guild=None)
    # Removing a persona drops the defaults that name it: the next level applies again.
    personas.remove(G, "channel-default")
    assert config.get("persona", G, C1) is None
    assert resolve().name == "server-default"
    personas.remove(G, "server-default")
    assert resolve().source == "global"


def test_job_params_put_user_options_over_persona_defaults() -> None:
    persona = conversation.ResolvedPersona("p", "SYS", {"temperature": 0.2, "top_p": 0.5}, "option")
    context = conversation.ChatContext(persona, [{"role": "user", "content": "hi"}], None)
    assert context.job_params({"temperature": 1.0, "seed": 7}) == {
        "temperature": 1.0, "top_p": 0.5, "seed": 7, "system_prompt": "SYS",
        "history": [{"role": "user", "content": "hi"}]}
    assert "history" not in conversation.ChatContext(persona, [], None).job_params()


@pytest.mark.asyncio
async def test_persona_handlers(services: Services) -> None:
    out = Recorder()
    personas = services.personas
    await run("persona add", _inv(moderator=False), out, services, name="pirate", system_prompt="Arr.")
    await run("persona list", _inv(moderator=False), out, services)
    await run("persona remove", _inv(guild=None), out, services, name="pirate")
    assert out.errors == ["Only moderators can use /persona add.", "Only moderators can use /persona list.",
                          "/persona remove only works in a server."]
    assert personas.for_guild(G) == []

    await moderation.persona_add(_inv(), out, services, "Pirate", "Talk like a pirate.", "temperature=1.1")
    await moderation.persona_add(_inv(), out, services, "robot", "Beep.", {"temperature": 9})
    assert out.infos == ["Added persona pirate: Talk like a pirate. [temperature=1.1]"]
    assert out.errors[-1] == "temperature: expected a number from 0 to 2"
    await moderation.persona_edit(_inv(), out, services, "pirate", sampling={"top_k": 20})
    assert out.infos[-1] == "Updated persona pirate: Talk like a pirate. [top_k=20]"
    await moderation.persona_edit(_inv(), out, services, "pirate")
    assert out.errors[-1] == "Give a new system prompt, new sampling defaults, or both."
    await moderation.persona_list(_inv(), out, services)
    assert out.infos[-1] == "pirate: Talk like a pirate. [top_k=20]"
    await moderation.config_set(_inv(), out, services, "persona", "pirate")
    assert (await conversation.resolve_persona(services, _inv())).name == "pirate"
    await moderation.persona_remove(_inv(), out, services, "pirate")
    assert out.infos[-1].startswith("Removed persona pirate")
    assert (await conversation.resolve_persona(services, _inv())).system_prompt == "GLOBAL"
    await moderation.persona_remove(_inv(), out, services, "pirate")
    assert out.errors[-1] == "There is no persona named 'pirate'."
