"""Capturing community messages to learn from.

``CaptureBuffer`` takes message records from the front end (``add`` is cheap and never
waits), curates them at once (scrubbed, length-checked, hashed: `bot.core.curation`), and
writes them in batches every ``max_items`` messages or ``max_seconds`` seconds through
the store on the SQLite thread, so the event loop never waits on disk. The store decides
consent (opted-in channels, opted-out members) inside each batch's transaction. The
gateway front end feeds it (`bot.discord.gateway`); the HTTP endpoint sees no messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass, field

from bot.core.curation import CurationConfig, curate, scrub
from storage.community import CaptureResult, CommunityStore, NewFile, NewItem
from storage.database import AsyncDatabase

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

    def drop_author(self, author: str) -> int:
        """Drop a member's messages that are still buffered (they asked to be forgotten)."""
        before = len(self._pending)
        self._pending = [item for item in self._pending if item.author != author]
        return before - len(self._pending)

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


