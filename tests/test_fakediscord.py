"""Proves the fake Discord harness against the real discord.py client (no bot code).

The client logs in over REST, connects to the gateway with zlib-stream compression, syncs
commands, and answers interactions the fake dispatches; every request it makes is checked
against Discord's OpenAPI spec by the ``fake_discord`` fixture at teardown.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib
from typing import Any

import aiohttp
import discord
import pytest
from aiohttp import web
from discord import app_commands
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from tests.fakediscord import (
    FakeDiscord,
    payloads,
    running_client,
    validate_interaction,
    validate_requests,
)


def _png_1x1() -> bytes:
    """A valid 1x1 white PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\xff\xff")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


PNG = _png_1x1()


def make_client(
    fake: FakeDiscord, intents: discord.Intents | None = None
) -> tuple[discord.Client, app_commands.CommandTree[discord.Client], discord.Object]:
    """A plain discord.py client + command tree; READY 50 ms after the last GUILD_CREATE."""
    client = discord.Client(intents=intents or discord.Intents.default(), guild_ready_timeout=0.05)
    return client, app_commands.CommandTree(client), discord.Object(int(fake.guild_id))


@pytest.mark.asyncio
async def test_slash_command_defer_edits_and_file_followup(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, tree, guild = make_client(fake)
    done = asyncio.Event()

    @tree.command(name="imagine", description="Draw a picture", guild=guild)
    async def imagine(interaction: discord.Interaction, prompt: str, steps: int = 20) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content=f"Rendering {prompt}...")
        await interaction.edit_original_response(content=f"Rendered {prompt} in {steps} steps")
        image = discord.File(io.BytesIO(PNG), filename="cat.png")
        await interaction.followup.send("Here it is", file=image)
        done.set()

    async with running_client(client, fake):
        synced = await tree.sync(guild=guild)
        assert [c.name for c in synced] == ["imagine"]
        assert synced[0].id == int(fake.commands(fake.guild_id)[0]["id"])
        [put] = fake.find_requests("PUT", rf"/applications/{fake.app_id}/guilds/{fake.guild_id}/")
        assert put.json[0]["name"] == "imagine"

        payload = fake.slash_command("imagine", {"prompt": "a cat", "steps": 4})
        interaction = await fake.dispatch_interaction(payload)
        await asyncio.wait_for(done.wait(), 5)

        original = fake.original_response(interaction)
        assert original is not None
        [followup] = fake.followups(interaction)
        [attachment] = followup.attachments
        async with aiohttp.ClientSession() as session, session.get(attachment.url) as resp:
            assert await resp.read() == PNG

    assert fake.gateway.compress_modes == ["zlib-stream"]
    [callback] = fake.find_requests("POST", r"/callback$")
    assert callback.query == {"with_response": "1"} and callback.status == 200
    assert callback.response["interaction"]["response_message_id"] == original.id
    assert fake.callbacks(interaction) == [{"type": 5}]
    assert original.content == "Rendered a cat in 4 steps" and not original.loading
    assert [h["content"] for h in original.history] == ["", "Rendering a cat..."]
    assert followup.content == "Here it is"
    assert (attachment.filename, attachment.size, attachment.data) == ("cat.png", len(PNG), PNG)
    assert attachment.content_type == "image/png"
    [upload] = fake.find_requests("POST", rf"^/webhooks/{fake.app_id}/")
    assert [f.field for f in upload.files] == ["files[0]"]
    assert upload.json["attachments"] == [{"id": 0, "filename": "cat.png"}]
    # The same checks, offline, over the records: requests and the fake's own responses.
    assert validate_requests(fake.requests, responses=True) == []


@pytest.mark.asyncio
async def test_rate_limited_edit_is_retried(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, tree, guild = make_client(fake)
    done = asyncio.Event()

    @tree.command(name="ping", description="Pong", guild=guild)
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await interaction.edit_original_response(content="pong")
        done.set()

    rule = fake.rate_limit_next("PATCH", r"/messages/@original$", retry_after=0.3)
    async with running_client(client, fake):
        await tree.sync(guild=guild)  # tells the fake it is a guild command (data.guild_id)
        interaction = await fake.dispatch_interaction(fake.slash_command("ping"))
        await asyncio.wait_for(done.wait(), 5)

    limited, landed = fake.find_requests("PATCH", r"/messages/@original$")
    assert rule.hits == [limited] and rule.count == 0
    assert (limited.status, landed.status) == (429, 200)
    assert limited.response == {
        "message": "You are being rate limited.",
        "retry_after": 0.3,
        "global": False,
        "code": 0,
    }
    assert limited.response_headers["Via"] == "1.1 google"
    assert limited.response_headers["X-RateLimit-Remaining"] == "0"
    assert landed.time - limited.time >= 0.29
    original = fake.original_response(interaction)
    assert original is not None and original.content == "pong" and original.edits == 1


class ApproveView(discord.ui.View):
    """One button; records who clicked it."""

    def __init__(self) -> None:
        super().__init__(timeout=None)  # no timeout task left pending at shutdown
        self.clicked = asyncio.Event()
        self.clicker: int | None = None

    @discord.ui.button(label="Approve", custom_id="approve", style=discord.ButtonStyle.success)
    async def approve(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.clicker = interaction.user.id
        await interaction.response.edit_message(content="Approved", view=None)
        self.clicked.set()


@pytest.mark.asyncio
async def test_button_click_reaches_view(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, tree, guild = make_client(fake)
    view = ApproveView()

    @tree.command(name="review", description="Ask for approval", guild=guild)
    async def review(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("Approve?", view=view)

    async with running_client(client, fake):
        await tree.sync(guild=guild)
        command = await fake.dispatch_interaction(fake.slash_command("review"))
        message = await fake.wait_until(lambda: fake.original_response(command))
        assert message.custom_ids() == ["approve"] and message.content == "Approve?"

        click = fake.component_click("approve", message=message, user=fake.moderator)
        clicked = await fake.dispatch_interaction(click)
        await asyncio.wait_for(view.clicked.wait(), 5)
        await fake.wait_until(lambda: fake.find_requests("POST", rf"/{clicked.id}/.*/callback$"))
    view.stop()

    assert view.clicker == int(fake.moderator["user"]["id"])
    assert fake.callbacks(clicked)[0]["type"] == 7  # UPDATE_MESSAGE
    assert message.content == "Approved" and message.components == [] and message.edits == 1
    assert fake.original_response(clicked) is message
    assert not fake.response_violations()


@pytest.mark.asyncio
async def test_subcommands_member_options_and_autocomplete(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, tree, guild = make_client(fake)
    seen: dict[str, Any] = {}
    config = app_commands.Group(name="config", description="Settings", guild_ids=[guild.id])

    @config.command(name="set", description="Set a value")
    async def config_set(interaction: discord.Interaction, key: str, value: int) -> None:
        seen["config"] = (key, value, interaction.permissions.manage_guild)
        await interaction.response.send_message("saved", ephemeral=True)

    @tree.command(name="warn", description="Warn a member", guild=guild)
    async def warn(interaction: discord.Interaction, member: discord.Member) -> None:
        seen["warn"] = (member.id, [r.name for r in interaction.user.roles])
        await interaction.response.send_message(f"warned {member.mention}")

    @tree.command(name="model", description="Pick a model", guild=guild)
    async def model(interaction: discord.Interaction, name: str) -> None:
        await interaction.response.send_message(name)

    @model.autocomplete("name")
    async def model_names(interaction: discord.Interaction, current: str) -> list[Any]:
        names = ["tinyllama", "tinystories", "qwen"]
        return [app_commands.Choice(name=n, value=n) for n in names if n.startswith(current)]

    tree.add_command(config)
    async with running_client(client, fake):
        await tree.sync(guild=guild)
        cfg = fake.slash_command("config set", {"key": "steps", "value": 30}, user=fake.moderator)
        cfg_interaction = await fake.dispatch_interaction(cfg)
        warn_payload = fake.slash_command("warn", {"member": fake.member}, user=fake.moderator)
        warned = await fake.dispatch_interaction(warn_payload)
        ac = await fake.dispatch_interaction(fake.autocomplete("model", "name", "tiny"))
        choices = await fake.wait_until(lambda: fake.autocomplete_choices(ac))
        await fake.wait_until(lambda: fake.original_response(warned))
        await fake.wait_until(lambda: fake.original_response(cfg_interaction))

    assert cfg["data"]["options"][0]["type"] == payloads.OPTION_SUB_COMMAND
    assert seen["config"] == ("steps", 30, True)
    assert seen["warn"] == (int(fake.member["user"]["id"]), ["@everyone", "Moderator"])
    assert fake.original_response(cfg_interaction).ephemeral
    assert [c["value"] for c in choices] == ["tinyllama", "tinystories"]


class PromptModal(discord.ui.Modal, title="Prompt"):
    """A modal with one text input."""

    prompt = discord.ui.TextInput(label="Prompt", custom_id="prompt")

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"got {self.prompt.value}", ephemeral=True)


@pytest.mark.asyncio
async def test_modal_round_trip(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, tree, guild = make_client(fake)

    @tree.command(name="ask", description="Open a modal", guild=guild)
    async def ask(interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(PromptModal())

    async with running_client(client, fake):
        await tree.sync(guild=guild)
        opened = await fake.dispatch_interaction(fake.slash_command("ask"))
        modal = await fake.wait_until(lambda: fake.modal(opened))
        assert modal["title"] == "Prompt"
        submitted = await fake.dispatch_interaction(
            fake.modal_submit({"prompt": "a red fox"}, modal_token=opened.token)
        )
        reply = await fake.wait_until(lambda: fake.original_response(submitted))

    assert reply.content == "got a red fox" and reply.ephemeral
    assert not fake.response_violations()


@pytest.mark.asyncio
async def test_resume_fragmented_zlib_and_member_chunks(fake_discord_factory: Any) -> None:
    fake: FakeDiscord = await fake_discord_factory(zlib_fragment_size=16)
    intents = discord.Intents.default()
    intents.members = True  # privileged: lets discord.py chunk (op 8)
    client, _tree, guild = make_client(fake, intents)
    messages: list[discord.Message] = []
    client.event(_collector(messages))

    async with running_client(client, fake):
        [session] = fake.gateway.sessions.values()
        assert session.intents == intents.value
        members = await client.get_guild(guild.id).chunk()
        assert len(members) == 4
        assert any(frame.op == 8 for frame in fake.gateway.received)

        await fake.gateway.drop_connections()  # code 4000: discord.py resumes
        await fake.wait_until(lambda: session.resumes == 1 and session.connected)
        await fake.send_user_message("hidden without the message content intent")
        await fake.wait_until(lambda: messages)

    assert len(fake.gateway.connections) == 2
    assert messages[0].content == "" and messages[0].author.id == int(fake.member["user"]["id"])


@pytest.mark.asyncio
async def test_gateway_session_control(fake_discord_factory: Any) -> None:
    fake: FakeDiscord = await fake_discord_factory(allow_privileged_intents=False)
    client, _, _ = make_client(fake)
    async with running_client(client, fake):
        session = await fake.wait_for_session()
        await fake.gateway.reconnect()  # op 7: discord.py closes and RESUMEs
        await fake.wait_until(lambda: session.resumes == 1 and session.connected)
        await fake.gateway.invalidate_sessions()  # op 9 false: discord.py IDENTIFYs again
        fresh = await fake.wait_until(lambda: [s for s in fake.gateway.ready_sessions])
        assert fresh[0].id != session.id
        assert client.is_ready() and client.get_guild(int(fake.guild_id)) is not None

    wrong = discord.Client(intents=discord.Intents.default())
    with pytest.raises(discord.LoginFailure):
        await wrong.login("wrong-token")
    await wrong.close()

    intents = discord.Intents.default()
    intents.message_content = True
    privileged, _, _ = make_client(fake, intents)
    with pytest.raises(discord.PrivilegedIntentsRequired):
        async with running_client(privileged, fake):
            pass
    assert fake.gateway.close_codes[-1] == 4014


@pytest.mark.asyncio
async def test_channel_messages_dm_and_reads(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, _, _ = make_client(fake)
    async with running_client(client, fake):
        channel = client.get_channel(int(fake.channel_id))
        assert isinstance(channel, discord.TextChannel)
        async with channel.typing():
            embed = discord.Embed(title="Daily picture").set_image(url="attachment://cat.png")
            image = discord.File(io.BytesIO(PNG), filename="cat.png")
            sent = await channel.send(f"for <@{fake.member['user']['id']}>", embed=embed, file=image)
        assert sent.embeds[0].image.url == sent.attachments[0].url
        assert [u.name for u in sent.mentions] == ["alice"]
        await sent.edit(content="edited", attachments=[])
        await sent.add_reaction("\N{THUMBS UP SIGN}")
        assert [m.content async for m in channel.history(limit=5)] == ["edited"]
        guild = await client.fetch_guild(int(fake.guild_id))
        member = await guild.fetch_member(int(fake.moderator["user"]["id"]))
        assert [r.name for r in member.roles] == ["@everyone", "Moderator"]
        user = await client.fetch_user(int(fake.member["user"]["id"]))
        dm = await user.send("hello in private")
        with pytest.raises(discord.HTTPException) as too_long:
            await channel.send("x" * 2001)
        await sent.delete()

    [stored] = fake.messages(include_deleted=True)
    assert stored.deleted and stored.content == "edited" and stored.attachments == []
    assert stored.history[0]["attachments"][0]["filename"] == "cat.png"
    assert stored.reactions == {"\N{THUMBS UP SIGN}": {fake.app_id}}
    assert [m.content for m in fake.messages(str(dm.channel.id))] == ["hello in private"]
    assert too_long.value.code == 50035 and "2000 or fewer" in too_long.value.text
    [problem] = fake.take_problems()  # provoked on purpose; the fixture checks the rest
    assert "$.content" in problem


def _collector(sink: list[discord.Message]) -> Any:
    async def on_message(message: discord.Message) -> None:
        sink.append(message)

    return on_message


async def _start_http_bot(fake: FakeDiscord) -> tuple[web.AppRunner, str, list[asyncio.Task[Any]]]:
    """A minimal HTTP-interactions bot: verifies signatures, defers, then edits over REST."""
    verify_key = VerifyKey(bytes.fromhex(fake.public_key))
    tasks: list[asyncio.Task[Any]] = []

    async def finish(app_id: str, token: str) -> None:
        async with aiohttp.ClientSession(base_url=fake.base_url) as http:
            url = f"/api/v10/webhooks/{app_id}/{token}/messages/@original"
            async with http.patch(url, json={"content": "pong over HTTP"}) as resp:
                assert resp.status == 200
            form = aiohttp.FormData(quote_fields=False)
            form.add_field("payload_json", json.dumps({"attachments": [{"id": 0}]}))
            form.add_field("files[0]", PNG, filename="pong.png", content_type="image/png")
            async with http.post(f"/api/v10/webhooks/{app_id}/{token}?wait=true", data=form) as resp:
                assert resp.status == 200

    async def interactions(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            signature = bytes.fromhex(request.headers["X-Signature-Ed25519"])
            verify_key.verify(request.headers["X-Signature-Timestamp"].encode() + body, signature)
        except (KeyError, ValueError, BadSignatureError):
            return web.Response(status=401, text="invalid request signature")
        payload = json.loads(body)
        if payload["type"] == payloads.INTERACTION_PING:
            return web.json_response({"type": 1})
        tasks.append(asyncio.create_task(finish(payload["application_id"], payload["token"])))
        return web.json_response({"type": 5})

    app = web.Application()
    app.router.add_post("/interactions", interactions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/interactions", tasks


@pytest.mark.asyncio
async def test_http_interactions_endpoint(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    runner, url, tasks = await _start_http_bot(fake)
    try:
        pong = await fake.ping(url)
        assert (pong.status, pong.json) == (200, {"type": 1})
        forged = await fake.post_interaction(url, fake.slash_command("ping"), tamper=True)
        assert forged.status == 401

        result = await fake.post_interaction(url, fake.slash_command("ping"))
        assert (result.status, result.json) == (200, {"type": 5})
        await asyncio.gather(*tasks)
    finally:
        await runner.cleanup()

    interaction = result.interaction
    assert fake.callbacks(interaction) == [{"type": 5}]
    original = fake.original_response(interaction)
    assert original is not None and original.content == "pong over HTTP"
    [followup] = fake.followups(interaction)
    assert followup.attachments[0].data == PNG
    replies = [r for r in fake.requests if r.kind == "http-reply"]
    assert [r.json for r in replies] == [{"type": 1}, {"type": 5}]


@pytest.mark.asyncio
async def test_invalid_requests_are_reported() -> None:
    async with FakeDiscord() as fake, aiohttp.ClientSession(base_url=fake.base_url) as http:
        auth = {"Authorization": f"Bot {fake.token}"}
        messages = f"/api/v10/channels/{fake.channel_id}/messages"
        async with http.post(messages, json={"content": 5}, headers=auth) as resp:
            assert resp.status == 400 and (await resp.json())["code"] == 50035
        async with http.post(messages, json={"content": "x" * 2001}, headers=auth) as resp:
            assert resp.status == 400
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("payload_json", json.dumps({"attachments": [{"id": 0}]}))
        form.add_field("files[1]", b"data", filename="a.bin")
        async with http.post(messages, data=form, headers=auth) as resp:
            assert resp.status == 400
        async with http.post(messages, json={"content": "hi"}) as resp:
            assert resp.status == 401
        async with http.get(f"/api/v10/guilds/{fake.guild_id}/bans", headers=auth) as resp:
            assert resp.status == 404  # in the spec, not served by the fake
        async with http.get("/api/v10/no/such/route", headers=auth) as resp:
            assert resp.status == 404

        # Interaction routes: double acknowledgement, follow-up before acknowledgement.
        interaction = fake.register_interaction(fake.slash_command("x"))
        callback = f"/api/v10/interactions/{interaction.id}/{interaction.token}/callback"
        followup = f"/api/v10/webhooks/{fake.app_id}/{interaction.token}"
        async with http.post(followup, json={"content": "too early"}) as resp:
            assert (await resp.json())["code"] == 10015
        async with http.post(callback, json={"type": 4, "data": {"content": "hi"}}) as resp:
            assert resp.status == 204  # no with_response
        async with http.post(callback, json={"type": 4, "data": {"content": "again"}}) as resp:
            assert (await resp.json())["code"] == 40060

    problems = "\n".join(fake.problems())
    assert "$.content: 5 is not of type" in problems
    assert "$.content: 'xxxx" in problems
    assert "files[1] has no attachments[] entry with id 1" in problems
    assert "attachments[] id 0 has no files[0] part" in problems
    assert f"fake has no handler for GET /guilds/{fake.guild_id}/bans" in problems
    assert "GET /no/such/route: no such path" in problems
    assert not fake.internal_errors


@pytest.mark.asyncio
async def test_late_callback_is_unknown_interaction() -> None:
    async with FakeDiscord(interaction_deadline=0.05) as fake:
        interaction = fake.register_interaction(fake.slash_command("slow"))
        await asyncio.sleep(0.1)
        url = f"{fake.api_base}/interactions/{interaction.id}/{interaction.token}/callback"
        async with aiohttp.ClientSession() as http, http.post(url, json={"type": 5}) as resp:
            assert resp.status == 404 and (await resp.json())["code"] == 10062
        assert not fake.problems()


@pytest.mark.asyncio
async def test_arrival_is_when_the_first_bytes_were_read() -> None:
    """``arrived`` is when a request began to arrive, ``time`` when the fake handled it; the
    next request on a kept-alive connection gets its own stamp."""
    async with FakeDiscord() as fake:
        reader, writer = await asyncio.open_connection(fake.host, fake.port)

        def request(path: str, body: bytes = b"") -> bytes:
            return (f"POST /api/v10{path} HTTP/1.1\r\nHost: {fake.host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nAuthorization: Bot {fake.token}\r\n\r\n").encode() + body

        async def answer() -> int:
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            return status

        loop = asyncio.get_running_loop()
        first = request(f"/channels/{fake.channel_id}/messages", json.dumps({"content": "split"}).encode())
        sent = loop.time()
        writer.write(first[:-5])  # the rest follows 0.2 s later
        await asyncio.sleep(0.2)
        writer.write(first[-5:])
        assert await answer() == 200
        await asyncio.sleep(0.1)
        again = loop.time()
        writer.write(request(f"/channels/{fake.channel_id}/typing"))
        assert await answer() == 204
        writer.close()

    one, two = fake.requests
    assert one.arrived is not None and sent <= one.arrived < sent + 0.1 and one.time >= one.arrived + 0.2
    assert two.arrived is not None and again <= two.arrived <= two.time


@pytest.mark.asyncio
async def test_burst_dispatched_at_once(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, tree, guild = make_client(fake)
    deferred: list[int] = []

    @tree.command(name="ping", description="Ping", guild=guild)
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        deferred.append(interaction.id)

    async with running_client(client, fake):
        await tree.sync(guild=guild)
        [session] = fake.gateway.sessions.values()
        seq = session.seq
        burst = await fake.dispatch_interactions([fake.slash_command("ping") for _ in range(5)])
        await fake.wait_until(lambda: len(deferred) == 5)

    assert len({i.created for i in burst}) == 1  # one write: one dispatch time
    assert sorted(deferred) == sorted(int(i.id) for i in burst)
    assert [f["s"] for f in session.backlog if f["t"] == "INTERACTION_CREATE"][-5:] == list(range(seq + 1, seq + 6))
    assert all(fake.callbacks(i) == [{"type": 5}] for i in burst)


def test_builders_match_discord_docs() -> None:
    fake = FakeDiscord()
    attachment = fake.store_attachment("in.png", PNG, "image/png")
    message = {"id": "1", "channel_id": fake.channel_id}
    built = [
        fake.slash_command("imagine", {"prompt": "x", "steps": 3, "cfg": 1.5, "hd": True}),
        fake.slash_command("img2img", {"image": attachment, "target": fake.moderator}),
        fake.slash_command("admin users ban", {"user": fake.member}, user=fake.moderator),
        fake.slash_command("help", dm=True),
        fake.autocomplete("model", "name", "ti", {"size": 3}),
        fake.modal_submit({"prompt": "hi"}, custom_id="prompt-modal"),
    ]
    for payload in built:
        assert validate_interaction(payload) == [], payload
    ban = built[2]["data"]["options"][0]
    assert (ban["type"], ban["options"][0]["type"]) == (2, 1)  # group > sub-command
    assert built[1]["data"]["resolved"]["attachments"][attachment.id]["size"] == len(PNG)
    assert int(built[2]["member"]["permissions"]) & payloads.MANAGE_GUILD
    assert not int(built[0]["member"]["permissions"]) & payloads.MANAGE_GUILD
    click = payloads.interaction(
        3,
        application_id=fake.app_id,
        data=payloads.component_data("approve"),
        guild_id=fake.guild_id,
        channel=fake.channel,
        member=payloads.interaction_member(fake.member, 0),
        message=message,
    )
    assert any("message" in p for p in validate_interaction(click))  # not a full message


@pytest.mark.asyncio
async def test_enforced_nonce_returns_the_earlier_message(fake_discord: FakeDiscord) -> None:
    """Create Message with ``nonce`` + ``enforce_nonce`` (discord.py sends both for ``nonce=``):
    the same author and nonce within the window give the first message back, no second one."""
    fake = fake_discord
    client = discord.Client(intents=discord.Intents.none())
    await client.login(fake.token)
    try:
        channel = client.get_partial_messageable(int(fake.channel_id))
        first = await channel.send("result", nonce="j7")
        again = await channel.send("result, posted again after a crash", nonce="j7")
        other = await channel.send("another job", nonce="j8")
        unenforced = await channel.send("random nonces: always new")
        await channel.send("random nonces: always new")
        assert again.id == first.id and other.id != first.id
        sent = next(r for r in fake.find_requests("POST", r"/channels/\d+/messages$") if r.json.get("nonce") == "j7")
        assert sent.json["enforce_nonce"] is True  # what makes Discord check it
        contents = [m.content for m in fake.messages(fake.channel_id)]
        assert contents.count("result") == 1 and "result, posted again after a crash" not in contents
        assert contents.count("random nonces: always new") == 2 and unenforced.nonce is not None

        fake.nonce_window_s = 0.0  # "a few minutes" later the nonce may be used again
        later = await channel.send("result", nonce="j7")
        assert later.id != first.id
        fake.nonce_window_s = 300.0
        await later.delete()
        with pytest.raises(discord.NotFound):  # as discord.py documents: deleted shortly earlier
            await channel.send("result", nonce="j7")
    finally:
        await client.close()
    assert [m.content for m in fake.messages(fake.channel_id)].count("result") == 1  # the later one is deleted
