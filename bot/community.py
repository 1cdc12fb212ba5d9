"""Learning from the community, the bot side: capturing messages, and the command handlers.

- ``CaptureBuffer`` takes message records from the front end (``add`` is cheap and never
  waits), curates them at once (scrubbed, length-checked, hashed: ``generators.curation``),
  and writes them in batches every ``max_items`` messages or ``max_seconds`` seconds through
  the store on the SQLite thread, so the event loop never waits on disk. The store decides
  consent (opted-in channels, opted-out members) inside each batch's transaction.
- Handlers are plain async functions of (invocation, responder, services, options), like
  ``bot.commands`` and ``bot.moderation``. Channel, curation and model commands need a
  moderator; the privacy commands are for every member, about themselves only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from generators.curation import CurationConfig, curate, scrub
from jobs.finetune import FinetuneSettings, NightlyTrainer
from storage.community import CaptureResult, CommunityError, CommunityStore, Item, NewFile, NewItem, Version
from storage.database import AsyncDatabase

if TYPE_CHECKING:  # bot.commands imports bot.services, which may import this module
    from bot.commands import Invocation, Responder
    from bot.settings import Settings
    from generators.queue import GenerationQueue

log = logging.getLogger(__name__)

IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp")
MAX_IMAGE_BYTES = 8 * 2**20


@dataclass
class Attachment:
    """A downloaded attachment of a message."""

    data: bytes
    mime: str


@dataclass
class IncomingMessage:
    """What the front end passes for every message it sees in a server."""

    guild: str
    channel: str
    author: str
    message_id: str
    text: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    author_is_bot: bool = False
    created_at: float | None = None


def community_files_dir(settings: Settings) -> Path:
    return settings.data_dir / "community"


def versions_dir(settings: Settings) -> Path:
    return settings.data_dir / "finetune"


def finetune_settings(settings: Settings) -> FinetuneSettings:
    """Where versions go and which base text model is tuned, from the bot's settings."""
    return FinetuneSettings(versions_dir=versions_dir(settings), text_model=settings.text_model,
                            cache_dir=settings.models_dir)


def curate_message(message: IncomingMessage, config: CurationConfig | None = None,
                   max_image_bytes: int = MAX_IMAGE_BYTES) -> NewItem | None:
    """The item to capture for a message, or None (a bot, too short or long, nothing usable)."""
    config = config or CurationConfig()
    if message.author_is_bot:
        return None
    images = [a for a in message.attachments if a.mime in IMAGE_MIMES and 0 < len(a.data) <= max_image_bytes]
    base = {"guild": message.guild, "channel": message.channel, "author": message.author,
            "message_id": message.message_id, "created_at": message.created_at}
    if images:
        caption, scrubbed = scrub(message.text.strip())
        digest = hashlib.sha256("".join(hashlib.sha256(a.data).hexdigest() for a in images).encode()).hexdigest()
        return NewItem(**base, kind="image", text=caption, sha256=digest, scrubbed=scrubbed,
                       files=[NewFile(a.data, a.mime) for a in images])
    curated = curate(message.text, config)
    if curated is None:
        return None
    return NewItem(**base, kind="text", text=curated.text, sha256=curated.sha256, scrubbed=curated.scrubbed)


class CaptureBuffer:
    """Batches captured messages and writes them on the SQLite thread."""

    def __init__(self, store: CommunityStore, db: AsyncDatabase, *, max_items: int = 50, max_seconds: float = 10.0,
                 curation: CurationConfig | None = None, max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.store = store
        self.db = db
        self.max_items = max_items
        self.max_seconds = max_seconds
        self.curation = curation or CurationConfig()
        self.max_image_bytes = max_image_bytes
        self.totals = CaptureResult()
        self.dropped = 0  # messages curation turned away (bots, length bounds)
        self._pending: list[NewItem] = []
        self._full = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, message: IncomingMessage) -> bool:
        """Curate and buffer one message (cheap, never waits); False if curation dropped it."""
        item = curate_message(message, self.curation, self.max_image_bytes)
        if item is None:
            self.dropped += 1
            return False
        self._pending.append(item)
        if len(self._pending) >= self.max_items:
            self._full.set()
        return True

    async def edited(self, message_id: str, text: str) -> None:
        """A message was edited: update it in the buffer, or in the store (asks for approval again)."""
        curated = curate(text, self.curation)
        for index, item in enumerate(self._pending):
            if item.message_id == message_id:
                if item.kind == "text" and curated is None:
                    del self._pending[index]
                elif item.kind == "text" and curated is not None:
                    item.text, item.sha256, item.scrubbed = curated.text, curated.sha256, curated.scrubbed
                else:
                    item.text, item.scrubbed = scrub(text.strip())
                return
        stored = await self.db.run(self.store.item_by_message, message_id)
        if stored is None:
            return
        if stored.kind == "image":
            caption, scrubbed = scrub(text.strip())
            await self.db.run(self.store.edit, message_id, caption, stored.sha256, scrubbed)
        elif curated is None:  # now too short or too long to learn from
            await self.db.run(self.store.delete_message, message_id)
        else:
            await self.db.run(self.store.edit, message_id, curated.text, curated.sha256, curated.scrubbed)

    async def deleted(self, message_id: str) -> None:
        """A message was deleted: drop it from the buffer, or delete its item and files."""
        before = len(self._pending)
        self._pending = [item for item in self._pending if item.message_id != message_id]
        if len(self._pending) == before:
            await self.db.run(self.store.delete_message, message_id)

    async def flush(self) -> CaptureResult:
        """Write what is buffered now, as one batch (one transaction)."""
        async with self._flush_lock:
            batch, self._pending = self._pending, []
            self._full.clear()
            if not batch:
                return CaptureResult()
            try:
                result = await self.db.run(self.store.capture, batch)
            except Exception:
                log.exception("could not store %d captured message(s); they are dropped", len(batch))
                return CaptureResult()
            self.totals = self.totals + result
            return result

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="community-capture")

    async def stop(self) -> None:
        """Stop the timer and write what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), timeout=self.max_seconds)
            await self.flush()


# --- handlers --------------------------------------------------------------------------------
class CommunityServices(Protocol):
    """What these handlers need from `bot.services.Services`."""

    adb: AsyncDatabase
    community: CommunityStore
    trainer: NightlyTrainer
    queue: GenerationQueue


async def _in_guild(inv: Invocation, responder: Responder, command: str) -> bool:
    if not inv.guild_id:
        await responder.error(f"/{command} only works in a server.")
        return False
    return True


async def _moderator(inv: Invocation, responder: Responder, command: str) -> bool:
    if not await _in_guild(inv, responder, command):
        return False
    if not inv.is_moderator:
        await responder.error(f"Only moderators can use /{command}.")
        return False
    return True


def _channel_id(text: str | None, default: str | None) -> str | None:
    if not text:
        return default
    match = re.fullmatch(r"<#(\d+)>|#?(\d+)", text.strip())
    return (match[1] or match[2]) if match else None


def _clip(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- /community channel ----------------------------------------------------------------------
async def channel_add(inv: Invocation, responder: Responder, services: CommunityServices,
                      channel: str | None = None) -> None:
    """Let the bot learn from a channel (default: this one)."""
    if not await _moderator(inv, responder, "community channel add"):
        return
    target = _channel_id(channel, inv.channel_id)
    if not target:
        await responder.error("Give a channel (its id or #mention).")
        return
    added = await services.adb.run(services.community.add_channel, inv.guild_id, target, inv.user_id)
    if added:
        await responder.info(f"The bot now learns from <#{target}> (approved messages only; members can opt out "
                             "with /privacy optout).")
    else:
        await responder.info(f"<#{target}> was already opted in.")


async def channel_remove(inv: Invocation, responder: Responder, services: CommunityServices,
                         channel: str | None = None) -> None:
    if not await _moderator(inv, responder, "community channel remove"):
        return
    target = _channel_id(channel, inv.channel_id)
    if not target:
        await responder.error("Give a channel (its id or #mention).")
        return
    if await services.adb.run(services.community.remove_channel, inv.guild_id, target):
        await responder.info(f"The bot no longer captures messages in <#{target}>.")
    else:
        await responder.error(f"<#{target}> was not opted in.")


async def channel_list(inv: Invocation, responder: Responder, services: CommunityServices) -> None:
    if not await _moderator(inv, responder, "community channel list"):
        return
    channels = await services.adb.run(services.community.channels, inv.guild_id)
    if not channels:
        await responder.info("No channel is opted in; add one with /community channel add.")
        return
    await responder.info("The bot learns from: " + ", ".join(f"<#{c}>" for c in channels))


# --- /privacy --------------------------------------------------------------------------------
async def privacy_optout(inv: Invocation, responder: Responder, services: CommunityServices) -> None:
    """Never capture my messages in this server (what was captured stays until /privacy forget)."""
    if not await _in_guild(inv, responder, "privacy optout"):
        return
    changed = await services.adb.run(services.community.opt_out, inv.guild_id, inv.user_id)
    note = "" if changed else " (you had already opted out)"
    await responder.info(f"Your messages here will not be captured{note}, and none captured before will be used "
                         "for training. /privacy forget deletes them.")


async def privacy_optin(inv: Invocation, responder: Responder, services: CommunityServices) -> None:
    if not await _in_guild(inv, responder, "privacy optin"):
        return
    changed = await services.adb.run(services.community.opt_in, inv.guild_id, inv.user_id)
    await responder.info("Your messages in opted-in channels may be captured again." if changed
                         else "You had not opted out.")


async def privacy_forget(inv: Invocation, responder: Responder, services: CommunityServices) -> int:
    """Delete every item captured from me in this server; returns how many."""
    if not await _in_guild(inv, responder, "privacy forget"):
        return 0
    count = await services.adb.run(services.community.forget, inv.guild_id, inv.user_id)
    if count == 0:
        await responder.info("Nothing of yours was stored here.")
    else:
        await responder.info(f"Deleted {count} item(s) of yours (texts and images). No future training run uses "
                             "them; to stop capture from now on, use /privacy optout.")
    return count


# --- /curate ---------------------------------------------------------------------------------
async def curate_review(inv: Invocation, responder: Responder, services: CommunityServices,
                        kind: str | None = None, limit: int = 10) -> list[Item]:
    """The oldest items waiting for approval (the front end may add approve/reject buttons)."""
    if not await _moderator(inv, responder, "curate review"):
        return []
    items = await services.adb.run(services.community.pending, inv.guild_id, kind, max(1, min(limit, 25)))
    if not items:
        await responder.info("Nothing is waiting for review.")
        return []
    lines = [f"#{item.id} · {item.kind} · <@{item.author}> · "
             + (_clip(item.text) if item.text else f"{len(item.files)} image(s)")
             + (" · scrubbed" if item.scrubbed else "") for item in items]
    await responder.info("\n".join(lines))
    return items


async def curate_decide(inv: Invocation, responder: Responder, services: CommunityServices, item_id: int,
                        approve: bool) -> None:
    if not await _moderator(inv, responder, "curate"):
        return
    try:
        item = await services.adb.run(services.community.decide, inv.guild_id, item_id, approve, inv.user_id)
    except CommunityError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Item #{item.id} {'approved' if approve else 'rejected'}.")


async def approve_message(inv: Invocation, responder: Responder, services: CommunityServices,
                          message_id: str) -> None:
    """Approve a captured message directly (context menu or reaction)."""
    if not await _moderator(inv, responder, "approve"):
        return
    try:
        item = await services.adb.run(services.community.approve_message, inv.guild_id, message_id, inv.user_id)
    except CommunityError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Approved item #{item.id} for training.")


# --- /model ----------------------------------------------------------------------------------
async def retrain(inv: Invocation, responder: Responder, services: CommunityServices, kind: str = "text",
                  max_seconds: float | None = None) -> Any:
    """Fine-tune now (queued in the training lane); refused while one for this server runs."""
    from bot.commands import follow, user_error

    if not await _moderator(inv, responder, "retrain"):
        return None
    try:
        record = await services.trainer.submit(inv.guild_id, kind, requester=inv.user_id, source=inv.source,
                                               max_seconds=max_seconds)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        await responder.error(message)
        return None
    await responder.accepted(record)
    return await follow(services, record.id, responder)  # type: ignore[arg-type]


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


async def model_versions(inv: Invocation, responder: Responder, services: CommunityServices,
                         kind: str | None = None) -> list[Version]:
    if not await _moderator(inv, responder, "model versions"):
        return []
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


async def model_rollback(inv: Invocation, responder: Responder, services: CommunityServices,
                         version: int | None = None, kind: str = "text") -> None:
    """Serve the previous version again (or ``version``; 0 = the base model), without a restart."""
    if not await _moderator(inv, responder, "model rollback"):
        return
    try:
        now = await services.trainer.rollback(inv.guild_id, kind, version)
    except CommunityError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Now serving {kind} version v{now.id}." if now else f"Now serving the base {kind} model.")

