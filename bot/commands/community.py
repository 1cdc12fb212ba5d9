"""Learning from the community: opted-in channels, members' privacy, curation, fine-tuned models.

Channel, curation and model commands are for moderators (the catalogue refuses anyone
else); /privacy is for every member, about themselves only. Curation works from /curate
review's Approve / Reject buttons, the "Approve for training" message menu, and (over the
gateway) a moderator's ✅ reaction on a captured message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import TYPE_CHECKING, Any

from bot.core.catalogue import MAX_ID, Command, Component, Group, MessageCommand, Option
from bot.core.flow import follow
from bot.core.invocation import USER_ERRORS, FileOut, Invocation, Responder, clip
from storage.community import CommunityError, Item, Version
from storage.ids import is_snowflake
from storage.jobs import JobNotFound
from storage.privacy import ForgetReport

if TYPE_CHECKING:
    from bot.core.services import Services

REVIEW_LIMIT = 10  # two buttons an item: 20 of a message's 25
FORGET_WAIT_S = 30.0  # how long a forget waits for the member's cancelled jobs to stop
EXPORT_LIMIT = 8 * 2**20
INTENT_WARNING = ("⚠️ The Message Content intent is off (DISCORD_MESSAGE_CONTENT), so Discord sends the bot "
                  "empty message texts: nothing but captionless images can be captured until it is enabled.")


def _channel_id(text: str | None, default: str | None) -> str | None:
    if not text:
        return default
    match = re.fullmatch(r"<#([0-9]+)>|#?([0-9]+)", text.strip())
    channel = (match[1] or match[2]) if match else None
    return channel if is_snowflake(channel) else None


# --- /community channel ----------------------------------------------------------------------
async def channel_add(inv: Invocation, responder: Responder, services: Services,
                      channel: str | None = None) -> None:
    """Let the bot learn from a channel (default: this one)."""
    target = _channel_id(channel, inv.channel_id)
    if not target:
        await responder.error("Give a channel (its id or #mention).")
        return
    added = await services.adb.run(services.community.add_channel, inv.guild_id, target, inv.user_id)
    if added:
        text = (f"The bot now learns from <#{target}> (approved messages only; members can opt out "
                "with /privacy optout).")
    else:
        text = f"<#{target}> was already opted in."
    if not services.settings.discord_message_content:
        text += "\n" + INTENT_WARNING
    await responder.info(text)


async def channel_remove(inv: Invocation, responder: Responder, services: Services,
                         channel: str | None = None) -> None:
    target = _channel_id(channel, inv.channel_id)
    if not target:
        await responder.error("Give a channel (its id or #mention).")
        return
    if await services.adb.run(services.community.remove_channel, inv.guild_id, target):
        await responder.info(f"The bot no longer captures messages in <#{target}>.")
    else:
        await responder.error(f"<#{target}> was not opted in.")


async def channel_list(inv: Invocation, responder: Responder, services: Services) -> None:
    channels = await services.adb.run(services.community.channels, inv.guild_id)
    if not channels:
        await responder.info("No channel is opted in; add one with /community channel add.")
        return
    await responder.info("The bot learns from: " + ", ".join(f"<#{c}>" for c in channels))


# --- /privacy --------------------------------------------------------------------------------
async def privacy_optout(inv: Invocation, responder: Responder, services: Services) -> None:
    """Never capture my messages in this server (what was captured stays until /privacy forget)."""
    changed = await services.adb.run(services.community.opt_out, inv.guild_id, inv.user_id)
    note = "" if changed else " (you had already opted out)"
    await responder.info(f"Your messages here will not be captured{note}, and none captured before will be used "
                         "for training. /privacy forget deletes them.")


async def privacy_optin(inv: Invocation, responder: Responder, services: Services) -> None:
    changed = await services.adb.run(services.community.opt_in, inv.guild_id, inv.user_id)
    await responder.info("Your messages in opted-in channels may be captured again." if changed
                         else "You had not opted out.")


async def privacy_forget(inv: Invocation, responder: Responder, services: Services) -> ForgetReport:
    """Delete everything the bot keeps about me, in every server (see `storage.privacy`)."""
    # A job of mine still running would write its result back after the forget: stop it first.
    for record in await services.queue.active_jobs(inv.user_id):
        with contextlib.suppress(JobNotFound):
            await services.queue.cancel(record.id, inv.user_id)
        with contextlib.suppress(TimeoutError, JobNotFound):
            await asyncio.wait_for(services.queue.wait(record.id), FORGET_WAIT_S)
    services.capture.drop_author(inv.user_id)
    report = await services.adb.run(services.privacy.forget, inv.user_id)
    serving_now = []
    for guild, modality, version in report.withdrawn:
        current = await services.adb.run(services.community.current, guild, modality)
        if modality == "text":
            services.adapters.set(guild, current.path if current else None)  # at once, no restart
        now = f"version v{current.id}" if current else f"the base {modality} model"
        serving_now.append(f"v{version} ({modality}) in server {guild}, which now serves {now}")
    await responder.info(forget_text(report, serving_now))
    return report


def forget_text(report: ForgetReport, serving_now: list[str]) -> str:
    """The answer to /privacy forget: what went, what stopped serving, what will be retrained."""
    if not report.anything:
        return "Nothing of yours was stored."
    parts = [f"{_count(report.jobs, 'job')} (prompts and answers)"] if report.jobs else []
    parts += [_count(number, noun) for number, noun in (
        (report.turns, "conversation turn"), (report.safety_events, "safety-log entry"),
        (report.items, "captured message"), (report.files, "file")) if number]
    lines = ["Forgotten, in every server: " + (", ".join(parts) or "your name on what you did as a moderator") + "."]
    if report.usage_rows:
        lines.append("Your usage counts are kept without your id (they feed the servers' totals).")
    if serving_now:
        lines.append("Fine-tuned versions trained on your messages no longer serve: " + "; ".join(serving_now) + ".")
    if report.retrain:
        guilds = sorted({guild for guild, _ in report.retrain})
        lines.append("The next nightly run retrains without your messages in server(s) " + ", ".join(guilds) + ".")
    lines.append("Opt-outs you had set stay in place (/privacy optin undoes one).")
    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"


async def privacy_export(inv: Invocation, responder: Responder, services: Services) -> None:
    """Everything the bot keeps about me, as a JSON file only I see."""
    data = await services.adb.run(services.privacy.export, inv.user_id)
    body = json.dumps(data, indent=2, ensure_ascii=False).encode()
    note = ""
    if len(body) > EXPORT_LIMIT:  # Discord's smallest attachment limit: drop the bulkiest parts
        for job in data["jobs"]:
            job["result"] = job["params"] = None
        body = json.dumps(data, indent=2, ensure_ascii=False).encode()
        note = " (job results and parameters left out: the whole file would exceed Discord's 8 MB)"
    counts = ", ".join(f"{len(data[k])} {label}" for k, label in (
        ("jobs", "job(s)"), ("conversation_turns", "conversation turn(s)"), ("community_items", "captured item(s)"),
        ("safety_log", "safety-log entry/entries")))
    await responder.info(f"Everything the bot stores about you: {counts}{note}.",
                         files=[FileOut("aigc-bot-my-data.json", body[:EXPORT_LIMIT], "application/json")])


async def privacy_policy(inv: Invocation, responder: Responder, services: Services) -> None:
    days = services.settings.retention_days
    kept = f"{days} days, then deleted each night" if days else "until you ask the bot to forget them"
    await responder.info("\n".join([
        "What this bot keeps about you, and for how long:",
        f"- your commands' prompts and answers, generated files, conversation turns and safety-log excerpts: {kept};",
        "- messages in channels a server opted in to learning from, only once moderators approve them for "
        "training: until you use /privacy forget (or a moderator rejects them); /privacy optout stops capture "
        "in a server;",
        "- how many jobs of each kind you ran per day, for /usage and the server's quotas.",
        "/privacy export sends you all of it as a file. /privacy forget deletes it in every server: fine-tuned "
        "models trained on your messages stop serving at once and are retrained without them."]))


# --- /curate ---------------------------------------------------------------------------------
async def curate_review(inv: Invocation, responder: Responder, services: Services,
                        kind: str | None = None) -> list[Item]:
    """The oldest items waiting for approval, with Approve / Reject buttons."""
    items = await services.adb.run(services.community.pending, inv.guild_id, kind, REVIEW_LIMIT)
    if not items:
        await responder.info("Nothing is waiting for review.")
        return []
    lines = [f"#{item.id} · {item.kind} · <@{item.author}> · "
             + (clip(item.text, 80) if item.text else f"{len(item.files)} image(s)")
             + (" · scrubbed" if item.scrubbed else "") for item in items]
    buttons = [button for item in items for button in (
        CURATE.button(f"✅ #{item.id}", "success", action="approve", item=item.id),
        CURATE.button(f"✖ #{item.id}", action="reject", item=item.id))]
    await responder.info("\n".join(lines), buttons)
    return items


async def curate_button(inv: Invocation, responder: Responder, services: Services, action: str, item: str) -> None:
    """A press of Approve / Reject under /curate review (moderators only)."""
    if not inv.guild_id or not inv.is_moderator:
        await responder.error("Only moderators can use /curate.")
        return
    await curate_decide(inv, responder, services, int(item), action == "approve")


async def curate_decide(inv: Invocation, responder: Responder, services: Services, item_id: int,
                        approve: bool) -> None:
    try:
        item = await services.adb.run(services.community.decide, inv.guild_id, item_id, approve, inv.user_id)
    except CommunityError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Item #{item.id} {'approved' if approve else 'rejected'}.")


async def approve_message(inv: Invocation, responder: Responder, services: Services,
                          message_id: str) -> None:
    """Approve a captured message directly (context menu or reaction)."""
    try:
        item = await services.adb.run(services.community.approve_message, inv.guild_id, message_id, inv.user_id)
    except CommunityError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Approved item #{item.id} for training.")


# --- /model ----------------------------------------------------------------------------------
async def retrain(inv: Invocation, responder: Responder, services: Services, kind: str = "text",
                  max_seconds: float | None = None) -> Any:
    """Fine-tune now (queued in the training lane); refused while one for this server runs."""
    try:
        record = await services.trainer.submit(inv.guild_id, kind, requester=inv.user_id, source=inv.source,
                                               max_seconds=max_seconds)
    except USER_ERRORS as exc:
        await responder.error(str(exc))
        return None
    await responder.accepted(record)
    final = await follow(services, record.id, responder)
    if final.status == "succeeded":
        await responder.result(final)
    return final


def _describe(version: Version, serving: int | None) -> str:
    metrics = version.metrics
    if "ppl_candidate" in metrics:
        score = f"perplexity {metrics.get('ppl_reference') or metrics.get('ppl_base')} → {metrics['ppl_candidate']}"
    elif "candidate" in metrics:
        score = f"{metrics.get('metric')} {metrics.get('reference')} → {metrics['candidate']}"
    else:
        score = "not measured"
    mark = " ◀ serving" if version.id == serving else ""
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(version.created_at))
    items = len(version.data_snapshot.get("item_ids", []))
    return f"v{version.id} · {version.modality} · {version.status} · {when} UTC · {items} items · {score}{mark}"


async def model_versions(inv: Invocation, responder: Responder, services: Services,
                         kind: str | None = None) -> list[Version]:
    store = services.community

    def load() -> tuple[list[Version], dict[str, int | None]]:
        versions = store.versions(inv.guild_id, kind)
        serving = {m: (v.id if (v := store.current(inv.guild_id, m)) else None) for m in ("text", "image")}
        return versions, serving

    versions, serving = await services.adb.run(load)
    if not versions:
        await responder.info("No model has been trained for this server yet.")
        return []
    lines = [_describe(v, serving.get(v.modality)) for v in versions]
    lines += [f"  {v.reason}" for v in versions[:1] if v.reason]
    await responder.info("\n".join(lines))
    return versions


async def model_rollback(inv: Invocation, responder: Responder, services: Services,
                         version: int | None = None, kind: str = "text") -> None:
    """Serve the previous version again (or ``version``; 0 = the base model), without a restart."""
    try:
        now = await services.trainer.rollback(inv.guild_id, kind, version)
    except CommunityError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Now serving {kind} version v{now.id}." if now else f"Now serving the base {kind} model.")


KIND = Option("kind", "Which model (default: text)", choices=("text", "image"))
GROUPS = (
    Group("community", "Channels the bot learns from (moderators)", moderators=True, guild_only=True),
    Group("community channel", "Opt channels in or out of capture"),
    Group("privacy", "What the bot keeps about you: see it, take it, delete it"),
    Group("curate", "Approve what the bot learns from (moderators)", moderators=True, guild_only=True),
    Group("model", "This server's fine-tuned models (moderators)", moderators=True, guild_only=True),
)
_MOD = {"moderators": True, "guild_only": True}
CHANNEL = Option("channel", "Which channel (default: this one)", "channel")
COMMANDS = (
    Command("community channel add", "Let the bot learn from a channel's approved messages", channel_add,
            (CHANNEL,), **_MOD),
    Command("community channel remove", "Stop capturing messages in a channel", channel_remove, (CHANNEL,), **_MOD),
    Command("community channel list", "The channels the bot learns from", channel_list, **_MOD),
    Command("privacy optout", "Never capture my messages in this server", privacy_optout, guild_only=True),
    Command("privacy optin", "Allow my messages in opted-in channels to be captured again", privacy_optin,
            guild_only=True),
    Command("privacy forget", "Delete everything the bot keeps about me, in every server", privacy_forget),
    Command("privacy export", "Send me everything the bot keeps about me, as a file", privacy_export),
    Command("privacy policy", "What the bot keeps about me, and for how long", privacy_policy),
    Command("curate review", "Items waiting for approval, with Approve / Reject buttons", curate_review, (
        Option("kind", "Only texts or only images", choices=("text", "image")),), **_MOD),
    Command("retrain", "Fine-tune this server's model now (moderators)", retrain, (KIND,), **_MOD),
    Command("model versions", "This server's fine-tuned versions and their scores", model_versions, (
        Option("kind", "Only text or only image versions", choices=("text", "image")),), **_MOD),
    Command("model rollback", "Serve the previous version again (0: the base model)", model_rollback, (
        Option("version", "Which version (default: the one before the current one; 0: base model)", "integer",
               low=0, high=MAX_ID), KIND), **_MOD),
)
MENUS = (MessageCommand("Approve for training", approve_message, moderators=True),)
CURATE = Component("curate", "{action}:{item}", curate_button, words={"action": ("approve", "reject")})
COMPONENTS = (CURATE,)
