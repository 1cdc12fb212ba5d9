"""Learning from the community: opted-in channels, opt-outs, captured items, model versions.

Tables of migration 0004_community and all their SQL. Consent rules live here, in one place:

- Only channels a moderator opted in are captured; a member who opted out is never
  captured, and their earlier items never reach a training snapshot.
- ``forget`` deletes every item of a member in a server, rows and files, and says how many.
- Texts arrive already scrubbed and hashed (``generators.curation`` does that in the bot
  layer: storage knows nothing about models or curation rules).

Files of image items are written under ``files_dir/<guild>/`` as ``<item id>-<n><ext>``: one
file belongs to one item, so deleting an item can delete its files without asking who else
uses them. Model versions: a training run records a ``candidate``; the gate makes it
``promoted`` or ``rejected``. The serving version of a (guild, modality) is the promoted one
promoted last; rolling back marks it ``rolled_back`` and the one before serves again.
Every method is one transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from storage.database import Database, immediate, json_field
from storage.privacy import suppressed_id

KINDS = ("text", "image")
STATUSES = ("pending", "approved", "rejected")
VERSION_STATUSES = ("candidate", "promoted", "rejected", "rolled_back")
_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/webp": ".webp",
               "image/bmp": ".bmp"}


class CommunityError(Exception):
    """A request the community store refuses; the message is for the user."""


class VersionNotFound(CommunityError):
    """No model version with that id in this server."""


@dataclass
class NewFile:
    """An attachment to store with its item (the bytes, already downloaded)."""

    data: bytes
    mime: str


@dataclass
class NewItem:
    """A curated message, ready to capture: text scrubbed, ``sha256`` of its normalised form
    (or of the image bytes for an image item)."""

    guild: str
    channel: str
    author: str
    message_id: str
    text: str
    sha256: str
    kind: str = "text"
    scrubbed: bool = False
    created_at: float | None = None
    files: list[NewFile] = field(default_factory=list)


@dataclass
class CaptureResult:
    """What one ``capture`` batch did."""

    stored: list[int] = field(default_factory=list)  # new item ids
    not_opted_in: int = 0
    opted_out: int = 0
    duplicates: int = 0  # same message id again, or the same content already in the server

    def __add__(self, other: CaptureResult) -> CaptureResult:
        return CaptureResult(self.stored + other.stored, self.not_opted_in + other.not_opted_in,
                             self.opted_out + other.opted_out, self.duplicates + other.duplicates)


@dataclass
class StoredFile:
    path: str
    sha256: str
    mime: str
    size: int


@dataclass
class Item:
    id: int
    guild: str
    channel: str
    author: str
    message_id: str
    kind: str
    text: str
    status: str
    scrubbed: bool
    sha256: str
    created_at: float
    edited_at: float | None
    approved_by: str | None
    files: list[StoredFile] = field(default_factory=list)


@dataclass
class Snapshot:
    """The approved items a training run uses, and a fingerprint of exactly that set."""

    guild: str
    kind: str
    items: list[Item]

    @property
    def ids(self) -> list[int]:
        return [item.id for item in self.items]

    @property
    def sha256(self) -> str:
        lines = "\n".join(f"{item.id}:{item.sha256}" for item in self.items)
        return hashlib.sha256(lines.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"item_ids": self.ids, "sha256": self.sha256, "count": len(self.items)}


@dataclass
class Version:
    id: int
    guild: str
    modality: str
    parent_id: int | None
    status: str
    path: str | None
    data_snapshot: dict[str, Any]
    hyperparams: dict[str, Any]
    metrics: dict[str, Any]
    reason: str | None
    created_at: float
    promoted_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "guild": self.guild, "modality": self.modality, "parent_id": self.parent_id,
            "status": self.status, "path": self.path,
            "items": len(self.data_snapshot.get("item_ids", [])), "data_sha256": self.data_snapshot.get("sha256"),
            "hyperparams": self.hyperparams, "metrics": self.metrics, "reason": self.reason,
            "created_at": _iso(self.created_at), "promoted_at": _iso(self.promoted_at),
        }


class CommunityStore:
    """The community tables in the bot's SQLite database, and the files of image items."""

    def __init__(self, db: Database, files_dir: Path | str,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.files_dir = Path(files_dir)
        self.clock = clock

    # --- channels -------------------------------------------------------------------------
    def add_channel(self, guild: str, channel: str, by: str) -> bool:
        """Opt a channel in; False if it already was."""
        with immediate(self.db):
            cursor = self.db.execute(
                "INSERT INTO community_channels (guild, channel, added_by, at) VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                [guild, channel, by, self.clock()])
        return bool(cursor.rowcount)

    def remove_channel(self, guild: str, channel: str) -> bool:
        """Stop capturing a channel (items already captured stay until rejected or forgotten)."""
        with immediate(self.db):
            cursor = self.db.execute("DELETE FROM community_channels WHERE guild=? AND channel=?", [guild, channel])
        return bool(cursor.rowcount)

    def channels(self, guild: str) -> list[str]:
        rows = self.db.execute("SELECT channel FROM community_channels WHERE guild=? ORDER BY at, channel",
                               [guild]).fetchall()
        return [row[0] for row in rows]

    def guilds(self) -> list[str]:
        """Servers with at least one opted-in channel: the ones that train nightly."""
        return [row[0] for row in self.db.execute(
            "SELECT DISTINCT guild FROM community_channels ORDER BY guild").fetchall()]

    # --- consent --------------------------------------------------------------------------
    def opt_out(self, guild: str, user: str) -> bool:
        """Never capture this member here again; False if already opted out."""
        with immediate(self.db):
            cursor = self.db.execute(
                "INSERT INTO community_optout (guild, \"user\", at) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                [guild, user, self.clock()])
        return bool(cursor.rowcount)

    def opt_in(self, guild: str, user: str) -> bool:
        """Undo an opt-out (also one kept after the member was forgotten); False if the member
        had not opted out."""
        with immediate(self.db):
            cursor = self.db.execute("DELETE FROM community_optout WHERE guild=? AND \"user\" IN (?, ?)",
                                     [guild, user, suppressed_id(self.db, user, create=False)])
        return bool(cursor.rowcount)

    def opted_out(self, guild: str, user: str) -> bool:
        return self.db.execute("SELECT 1 FROM community_optout WHERE guild=? AND \"user\" IN (?, ?)",
                               [guild, user, suppressed_id(self.db, user, create=False)]).fetchone() is not None

    def forget(self, guild: str, user: str) -> int:
        """Delete every item of a member in a server, rows and files; returns how many items."""
        with immediate(self.db):
            ids = [row[0] for row in self.db.execute(
                "SELECT id FROM community_items WHERE guild=? AND author=?", [guild, user]).fetchall()]
            # Files first: if one cannot be deleted, the rows stay and forgetting can be retried.
            _unlink(self._file_paths(ids))
            self._delete_items(ids)
        return len(ids)

    # --- capture --------------------------------------------------------------------------
    def capture(self, items: Sequence[NewItem]) -> CaptureResult:
        """Store a batch in one transaction: only opted-in channels, never opted-out members,
        no message twice, no content twice in a server."""
        result = CaptureResult()
        written: list[Path] = []
        try:
            with immediate(self.db):
                for item in items:
                    if item.kind not in KINDS:
                        raise ValueError(f"kind must be one of {KINDS}, not {item.kind!r}")
                    if not self._channel_opted_in(item.guild, item.channel):
                        result.not_opted_in += 1
                        continue
                    if self.opted_out(item.guild, item.author):
                        result.opted_out += 1
                        continue
                    if self._seen(item):
                        result.duplicates += 1
                        continue
                    cursor = self.db.execute(
                        "INSERT INTO community_items (guild, channel, author, message_id, kind, text, scrubbed,"
                        " sha256, created_at) VALUES (?,?,?,?,?,?,?,?,?) RETURNING id",
                        [item.guild, item.channel, item.author, item.message_id, item.kind, item.text,
                         int(item.scrubbed), item.sha256, item.created_at or self.clock()])
                    item_id = int(cursor.fetchone()[0])
                    for number, new_file in enumerate(item.files):
                        written.append(self._write_file(item.guild, item_id, number, new_file))
                    result.stored.append(item_id)
        except BaseException:
            _unlink(written)  # the rows were rolled back: their files go too
            raise
        return result

    def _channel_opted_in(self, guild: str, channel: str) -> bool:
        return self.db.execute("SELECT 1 FROM community_channels WHERE guild=? AND channel=?",
                               [guild, channel]).fetchone() is not None

    def _seen(self, item: NewItem) -> bool:
        return self.db.execute(
            "SELECT 1 FROM community_items WHERE message_id=? OR (guild=? AND sha256=?) LIMIT 1",
            [item.message_id, item.guild, item.sha256]).fetchone() is not None

    def _write_file(self, guild: str, item_id: int, number: int, new_file: NewFile) -> Path:
        folder = self.files_dir / _safe(guild)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{item_id}-{number}{_EXTENSIONS.get(new_file.mime, '.bin')}"
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(new_file.data)
        partial.replace(path)
        digest = hashlib.sha256(new_file.data).hexdigest()
        self.db.execute("INSERT INTO community_files (item_id, path, sha256, mime, size) VALUES (?,?,?,?,?)",
                        [item_id, str(path), digest, new_file.mime, len(new_file.data)])
        return path

    def edit(self, message_id: str, text: str, sha256: str, scrubbed: bool = False) -> Item | None:
        """A message was edited: keep the new text, and ask for approval again."""
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE community_items SET text=?, sha256=?, scrubbed=?, edited_at=?, status='pending',"
                " approved_by=NULL WHERE message_id=?",
                [text, sha256, int(scrubbed), self.clock(), message_id])
        return self.item_by_message(message_id) if cursor.rowcount else None

    def delete_message(self, message_id: str) -> bool:
        """A message was deleted in Discord: delete its item and files too."""
        with immediate(self.db):
            ids = [row[0] for row in self.db.execute(
                "SELECT id FROM community_items WHERE message_id=?", [message_id]).fetchall()]
            _unlink(self._file_paths(ids))
            self._delete_items(ids)
        return bool(ids)

    # --- curation -------------------------------------------------------------------------
    def decide(self, guild: str, item_id: int, approve: bool, by: str) -> Item:
        """Approve or reject an item of this server."""
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE community_items SET status=?, approved_by=? WHERE id=? AND guild=?",
                ["approved" if approve else "rejected", by if approve else None, item_id, guild])
        if not cursor.rowcount:
            raise CommunityError(f"no captured item {item_id} in this server")
        return self.item(item_id)

    def approve_message(self, guild: str, message_id: str, by: str) -> Item:
        item = self.item_by_message(message_id)
        if item is None or item.guild != guild:
            raise CommunityError("that message was not captured (is its channel opted in, and its author not "
                                 "opted out?)")
        return self.decide(guild, item.id, True, by)

    def pending(self, guild: str, kind: str | None = None, limit: int = 20) -> list[Item]:
        """Items waiting for a moderator, oldest first."""
        sql = "SELECT * FROM community_items WHERE guild=? AND status='pending'"
        args: list[Any] = [guild]
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        return self._items(sql + " ORDER BY id LIMIT ?", [*args, limit])

    def item(self, item_id: int) -> Item:
        items = self._items("SELECT * FROM community_items WHERE id=?", [item_id])
        if not items:
            raise CommunityError(f"no captured item {item_id}")
        return items[0]

    def item_by_message(self, message_id: str) -> Item | None:
        items = self._items("SELECT * FROM community_items WHERE message_id=?", [message_id])
        return items[0] if items else None

    def items(self, guild: str, author: str | None = None) -> list[Item]:
        sql, args = "SELECT * FROM community_items WHERE guild=?", [guild]
        if author is not None:
            sql += " AND author=?"
            args.append(author)
        return self._items(sql + " ORDER BY id", args)

    def counts(self, guild: str) -> dict[str, int]:
        """Items per status in a server."""
        rows = self.db.execute("SELECT status, count(*) FROM community_items WHERE guild=? GROUP BY status",
                               [guild]).fetchall()
        return {status: 0 for status in STATUSES} | {row[0]: row[1] for row in rows}

    def snapshot(self, guild: str, kind: str = "text") -> Snapshot:
        """The approved items of a kind whose authors have not opted out, oldest first."""
        items = self._items(
            "SELECT * FROM community_items i WHERE guild=? AND kind=? AND status='approved'"
            " AND NOT EXISTS (SELECT 1 FROM community_optout o WHERE o.guild=i.guild AND o.\"user\"=i.author)"
            " ORDER BY id", [guild, kind])
        return Snapshot(guild, kind, items)

    def random_approved_text(self, guild: str) -> str | None:
        """One approved text (for the scheduled posts' ``{community_quote}``), or None."""
        row = self.db.execute(
            "SELECT text FROM community_items i WHERE guild=? AND kind='text' AND status='approved'"
            " AND NOT EXISTS (SELECT 1 FROM community_optout o WHERE o.guild=i.guild AND o.\"user\"=i.author)"
            " ORDER BY random() LIMIT 1", [guild]).fetchone()
        return row[0] if row else None

    # --- model versions -------------------------------------------------------------------
    def create_version(self, guild: str, modality: str, parent_id: int | None, snapshot: dict[str, Any],
                       hyperparams: dict[str, Any]) -> Version:
        """Record a training run that is starting (status candidate)."""
        with immediate(self.db):
            cursor = self.db.execute(
                "INSERT INTO model_versions (guild, modality, parent_id, data_snapshot, hyperparams, created_at)"
                " VALUES (?,?,?,?,?,?) RETURNING id",
                [guild, modality, parent_id, json.dumps(snapshot), json.dumps(hyperparams), self.clock()])
            version_id = int(cursor.fetchone()[0])
        return self.version(version_id)

    def finish_version(self, version_id: int, promote: bool, metrics: dict[str, Any], reason: str,
                       path: str | None = None) -> Version:
        """Settle a candidate: promoted (serving from now on) or rejected, with the reason."""
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE model_versions SET status=?, metrics=?, reason=?, path=coalesce(?, path), promoted_at=?"
                " WHERE id=? AND status='candidate'",
                ["promoted" if promote else "rejected", json.dumps(metrics), reason, path,
                 self.clock() if promote else None, version_id])
        if not cursor.rowcount:
            raise CommunityError(f"model version {version_id} is not a candidate any more")
        return self.version(version_id)

    def abandon_candidates(self, guild: str, modality: str, reason: str = "interrupted before it finished") -> int:
        """Reject candidates left by a run that died (call when no other run is in progress)."""
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE model_versions SET status='rejected', reason=? WHERE status='candidate' AND guild=?"
                " AND modality=?", [reason, guild, modality])
        return cursor.rowcount

    def version(self, version_id: int, guild: str | None = None) -> Version:
        versions = self._versions("SELECT * FROM model_versions WHERE id=?", [version_id])
        if not versions or (guild is not None and versions[0].guild != guild):
            raise VersionNotFound(f"no model version {version_id} in this server")
        return versions[0]

    def versions(self, guild: str, modality: str | None = None, limit: int = 20) -> list[Version]:
        """A server's versions, newest first."""
        sql, args = "SELECT * FROM model_versions WHERE guild=?", [guild]
        if modality is not None:
            sql += " AND modality=?"
            args.append(modality)
        return self._versions(sql + " ORDER BY id DESC LIMIT ?", [*args, limit])

    def current(self, guild: str, modality: str) -> Version | None:
        """The serving version: the promoted one promoted last; None = the base model."""
        versions = self._versions(
            "SELECT * FROM model_versions WHERE guild=? AND modality=? AND status='promoted'"
            " ORDER BY promoted_at DESC, id DESC LIMIT 1", [guild, modality])
        return versions[0] if versions else None

    def serving(self, modality: str) -> dict[str, Version]:
        """Every server's serving version of a modality (to load adapters at start)."""
        result: dict[str, Version] = {}
        for version in self._versions(
                "SELECT * FROM model_versions WHERE modality=? AND status='promoted' ORDER BY promoted_at, id",
                [modality]):
            result[version.guild] = version  # later promotions win
        return result

    def rollback(self, guild: str, modality: str, to: int | None = None) -> Version | None:
        """Stop serving the current version. ``to`` None: the one promoted before it serves
        again; ``to`` a version id: that one serves (a rolled-back one is promoted again);
        ``to`` 0: the base model. Returns the version now serving (None = base)."""
        with immediate(self.db):
            current = self.current(guild, modality)
            if to is None:
                if current is None:
                    raise CommunityError(f"nothing to roll back: the base {modality} model is serving")
                self._set_status([current.id], "rolled_back")
            elif to == 0:
                self.db.execute("UPDATE model_versions SET status='rolled_back' WHERE guild=? AND modality=?"
                                " AND status='promoted'", [guild, modality])
            else:
                target = self.version(to, guild)
                if target.modality != modality:
                    raise CommunityError(f"version {to} is a {target.modality} model, not {modality}")
                if target.status in ("candidate", "rejected") or not target.path:
                    raise CommunityError(f"version {to} was never promoted ({target.status}); it cannot serve")
                if target.status == "rolled_back":
                    self.db.execute("UPDATE model_versions SET status='promoted', promoted_at=? WHERE id=?",
                                    [self.clock(), to])
                else:  # an older promoted version: everything promoted after it steps down
                    self.db.execute(
                        "UPDATE model_versions SET status='rolled_back' WHERE guild=? AND modality=?"
                        " AND status='promoted' AND (promoted_at > ? OR (promoted_at = ? AND id > ?))",
                        [guild, modality, target.promoted_at, target.promoted_at, target.id])
            return self.current(guild, modality)

    def training_active(self, guild: str, modality: str) -> bool:
        """Whether a training job for this server and modality is queued or running."""
        return self.db.execute(
            "SELECT 1 FROM jobs WHERE kind='training' AND guild=? AND status IN ('queued','running')"
            f" AND {json_field(self.db, 'params', 'modality')}=? LIMIT 1", [guild, modality]).fetchone() is not None

    def last_training_at(self, guild: str, modality: str) -> float | None:
        """When the latest training job for this server and modality was submitted."""
        row = self.db.execute(
            "SELECT max(created_at) FROM jobs WHERE kind='training' AND guild=?"
            f" AND {json_field(self.db, 'params', 'modality')}=?", [guild, modality]).fetchone()
        return row[0] if row else None

    # --- helpers --------------------------------------------------------------------------
    def _file_paths(self, item_ids: list[int]) -> list[Path]:
        if not item_ids:
            return []
        rows = self.db.execute(f"SELECT path FROM community_files WHERE item_id IN ({_marks(item_ids)})",
                               item_ids).fetchall()
        return [Path(row[0]) for row in rows]

    def _delete_items(self, item_ids: list[int]) -> None:
        if item_ids:
            # Files first, explicitly: ON DELETE CASCADE needs PRAGMA foreign_keys, set per connection.
            self.db.execute(f"DELETE FROM community_files WHERE item_id IN ({_marks(item_ids)})", item_ids)
            self.db.execute(f"DELETE FROM community_items WHERE id IN ({_marks(item_ids)})", item_ids)

    def _set_status(self, version_ids: Iterable[int], status: str) -> None:
        ids = list(version_ids)
        if ids:
            self.db.execute(f"UPDATE model_versions SET status=? WHERE id IN ({_marks(ids)})", [status, *ids])

    def _dicts(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        cursor = self.db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _items(self, sql: str, args: list[Any]) -> list[Item]:
        items = [Item(id=r["id"], guild=r["guild"], channel=r["channel"], author=r["author"],
                      message_id=r["message_id"], kind=r["kind"], text=r["text"], status=r["status"],
                      scrubbed=bool(r["scrubbed"]), sha256=r["sha256"], created_at=r["created_at"],
                      edited_at=r["edited_at"], approved_by=r["approved_by"]) for r in self._dicts(sql, args)]
        by_id = {item.id: item for item in items}
        if by_id:
            ids = list(by_id)
            for r in self._dicts(f"SELECT * FROM community_files WHERE item_id IN ({_marks(ids)}) ORDER BY id", ids):
                by_id[r["item_id"]].files.append(StoredFile(r["path"], r["sha256"], r["mime"], r["size"]))
        return items

    def _versions(self, sql: str, args: list[Any]) -> list[Version]:
        return [Version(id=r["id"], guild=r["guild"], modality=r["modality"], parent_id=r["parent_id"],
                        status=r["status"], path=r["path"], data_snapshot=json.loads(r["data_snapshot"]),
                        hyperparams=json.loads(r["hyperparams"]), metrics=json.loads(r["metrics"]),
                        reason=r["reason"], created_at=r["created_at"], promoted_at=r["promoted_at"])
                for r in self._dicts(sql, args)]


def _marks(values: list[Any]) -> str:
    return ",".join("?" * len(values))


def _safe(name: str) -> str:
    """A guild id as a folder name (ids are digits; anything else is neutralised)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "_"


def _unlink(paths: Iterable[Path]) -> None:
    """Delete files, then their folder once it is empty (forgetting leaves no trace behind)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # fails, harmlessly, while other files remain


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None
