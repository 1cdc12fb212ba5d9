"""/config, /persona, /blocklist and the safety guard, through the real bot and the fake Discord."""

from __future__ import annotations

from typing import Any

import pytest

from tests.discord_bots import (
    PictureGenerator,
    RecordingGenerator,
    chat_answer,
    command,
    make_bot,
    reply_text,
)
from tests.fakediscord import FakeDiscord, running_client

__all__ = ["make_bot"]  # the fixture


@pytest.mark.asyncio
async def test_blocked_prompts_are_refused_ephemerally_never_generated_and_logged(fake_discord: FakeDiscord,
                                                                                 make_bot: Any) -> None:
    fake = fake_discord
    gens = {"text": RecordingGenerator(), "image": PictureGenerator(), "audio": RecordingGenerator(kind="audio")}
    bot, services = await make_bot(gens)
    modlog = fake.add_channel(fake.guild_id, "mod-log")
    async with running_client(bot, fake):
        assert "Set modlog_channel" in await command(
            fake, "config set", {"key": "modlog_channel", "value": modlog["id"]}, user=fake.moderator)
        assert "Blocked word" in await command(fake, "blocklist add", {"pattern": "zorblax"}, user=fake.moderator)
        refusals = {}
        for name, option in (("chat", "prompt"), ("imagine", "prompt"), ("speak", "text")):
            interaction = await fake.dispatch_interaction(fake.slash_command(name, {option: "a big Zorblax"}))
            refusals[name] = await reply_text(fake, interaction)  # checked to be ephemeral
        notes = await fake.wait_until(lambda: len(fake.messages(modlog["id"])) == 3 and fake.messages(modlog["id"]))
        allowed = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "a small cat"}))
        await chat_answer(fake, allowed)
    assert all(r.startswith("🚫 Request refused") and "zorblax" not in r.lower() for r in refusals.values())
    assert gens["text"].calls == [["a small cat"]] and gens["image"].calls == [] and gens["audio"].calls == []
    assert [job.prompt for job in services.store.list_jobs()] == ["a small cat"]
    member = f"<@{fake.member['user']['id']}>"
    assert [n.content.split(" from ")[0] for n in notes] == [
        "🛡️ Blocked a /chat prompt", "🛡️ Blocked a /imagine prompt", "🛡️ Blocked a /speak prompt"]
    assert all(member in n.content and f"<#{fake.channel_id}>" in n.content for n in notes)
    posts = fake.find_requests("POST", rf"/channels/{modlog['id']}/messages$")
    assert [p.json["allowed_mentions"]["parse"] for p in posts] == [[]] * 3  # notes never ping anyone
    log = await services.adb.run(lambda: list(services.db.execute("SELECT kind FROM safety_log ORDER BY id")))
    assert [row[0] for row in log] == ["text", "image", "audio"]


@pytest.mark.asyncio
async def test_non_moderators_cannot_change_settings_personas_or_blocklist(fake_discord: FakeDiscord,
                                                                          make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": RecordingGenerator()})
    helpers = fake.add_role(fake.guild_id, "Helpers")
    helper = fake.add_member(fake.guild_id, fake.add_user("helper"), roles=[helpers["id"]])
    attempts = [
        ("config show", {}), ("config set", {"key": "timezone", "value": "Europe/Paris"}),
        ("config reset", {"key": "timezone"}), ("persona add", {"name": "pirate", "system_prompt": "Arr."}),
        ("persona edit", {"name": "pirate", "system_prompt": "Arr!"}), ("persona remove", {"name": "pirate"}),
        ("persona list", {}), ("blocklist add", {"pattern": "zorblax"}), ("blocklist remove", {"entry": "1"}),
        ("blocklist list", {}),
    ]
    async with running_client(bot, fake):
        commands = {c["name"]: c for c in fake.commands(fake.guild_id)}
        for name in ("config", "persona", "blocklist"):
            assert commands[name]["default_member_permissions"] == str(1 << 5)  # Manage Server, by default
        for user in (fake.member, helper):
            for name, options in attempts:
                assert (await command(fake, name, options, user=user)).startswith("Only moderators"), name
        # The server makes its own role the moderator role: now the helper moderates, still not the member.
        assert "Set moderator_role to Helpers" in await command(
            fake, "config set", {"key": "moderator_role", "value": "Helpers"}, user=fake.moderator)
        assert "Added persona pirate" in await command(
            fake, "persona add", {"name": "pirate", "system_prompt": "Arr."}, user=helper)
        assert (await command(fake, "persona remove", {"name": "pirate"})).startswith("Only moderators")
    personas = await services.adb.run(services.personas.for_guild, fake.guild_id)
    assert [p.name for p in personas] == ["pirate"] and personas[0].created_by == helper["user"]["id"]
    assert await services.adb.run(services.safety.entries, fake.guild_id) == []
    assert await services.adb.run(services.config.get, "timezone", fake.guild_id) is None


@pytest.mark.asyncio
async def test_persona_and_settings_apply_channel_over_server_over_global(fake_discord: FakeDiscord,
                                                                          make_bot: Any) -> None:
    fake = fake_discord
    text = RecordingGenerator()
    bot, services = await make_bot({"text": text, "image": PictureGenerator()})
    lounge = fake.add_channel(fake.guild_id, "lounge")
    mod = fake.moderator

    async def chat(prompt: str, channel: str | None = None, **options: Any) -> dict[str, Any]:
        interaction = await fake.dispatch_interaction(
            fake.slash_command("chat", {"prompt": prompt, **options}, channel_id=channel))
        answer = await chat_answer(fake, interaction)
        [job] = [int(c.rsplit(":", 1)[1]) for c in answer.custom_ids() if c.startswith("aigc:regen:")]
        return {**text.params[-1], "model": (await services.queue.get(job)).model}

    async with running_client(bot, fake):
        assert (await chat("global"))["system_prompt"] == services.settings.system_prompt
        await command(fake, "persona add", {"name": "pirate", "system_prompt": "Talk like a pirate."}, user=mod)
        await command(fake, "persona add", {"name": "butler", "system_prompt": "Be a butler.",
                                            "sampling": "temperature=0.2 top_p=0.5"}, user=mod)
        typed = await fake.dispatch_interaction(fake.autocomplete("chat", "persona", "PI"))
        choices = await fake.wait_until(lambda: fake.autocomplete_choices(typed))
        assert [c["value"] for c in choices] == ["pirate"]
        await command(fake, "config set", {"key": "persona", "value": "pirate"}, user=mod)
        await command(fake, "config set", {"key": "persona", "value": "butler", "channel": lounge["id"]}, user=mod)
        await command(fake, "config set", {"key": "default_model.text", "value": "big-model"}, user=mod)
        server = await chat("in general")
        channel = await chat("in the lounge", lounge["id"])
        explicit = await chat("as butler", persona="butler", temperature=0.9)
        shown = await command(fake, "config show", {"channel": lounge["id"]}, user=mod)
        assert "Reset persona for channel" in await command(
            fake, "config reset", {"key": "persona", "channel": lounge["id"]}, user=mod)
        after_reset = await chat("lounge again", lounge["id"])
        await command(fake, "config set", {"key": "enabled_commands", "value": "chat"}, user=mod)
        disabled = await fake.dispatch_interaction(fake.slash_command("imagine", {"prompt": "a cat"}))
        refusal = await reply_text(fake, disabled)
        bad = await command(fake, "config set", {"key": "timezone", "value": "Mars/Olympus"}, user=mod)
    assert server["system_prompt"] == "Talk like a pirate." and "temperature" not in server
    assert channel["system_prompt"] == "Be a butler." and (channel["temperature"], channel["top_p"]) == (0.2, 0.5)
    assert explicit["system_prompt"] == "Be a butler." and explicit["temperature"] == 0.9  # the user's option wins
    assert after_reset["system_prompt"] == "Talk like a pirate."
    assert server["model"] == "big-model"
    assert "persona = butler (channel)" in shown and "default_model.text = big-model (server)" in shown
    assert "timezone = UTC (default)" in shown
    assert refusal == "/imagine is not enabled here. Enabled: /chat."
    assert bad.startswith("timezone: expected an IANA time zone")
