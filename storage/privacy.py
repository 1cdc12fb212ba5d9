"""A member's data across every table: forget it, export it, and prune what is old.

Everything the bot keeps about a member, in every server: their jobs (prompts, results,
parameters, generated files), the conversation turns they wrote and the answers to them,
the conversation history other jobs carried of those turns, safety-log rows, captured
community items and their files, and their id in the audit columns of what they did as a
moderator. `PrivacyStore.forget` removes all of it in one transaction; aggregate usage
counters survive without the member's id (moved to ``FORGOTTEN``), and the opt-outs they
had set survive as a keyed hash (a suppression list: forgetting must not restart capture).

Fine-tuned versions trained on the member's items are withdrawn: their folders (weights and
training records) are deleted and they stop serving, so each server serves its newest
version trained without them, or the base model; the next nightly run retrains without
them (the approved set changed). The database runs with ``secure_delete`` and the WAL is
checkpointed afterwards, so deleted text is gone from the file too.

`export` gathers the same data for the member as JSON; `prune` removes prompts, results,
generated files, conversation turns and safety-log excerpts older than the retention.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.database import Database, immediate
from storage.postgres import PostgresDatabase

log = logging.getLogger(__name__)

FORGOTTEN = "forgotten"  # stands in for a forgotten member in aggregates and audit columns
_SALT_KEY = "privacy-suppression-key"
#: (table, column) holding who did something a moderator does: kept, without the member.
_AUDIT_COLUMNS = (("guild_config", "updated_by"), ("personas", "created_by"), ("blocklist", "added_by"),
                  ("schedules", "created_by"), ("community_channels", "added_by"),
                  ("community_items", "approved_by"))


@dataclass
class ForgetReport:
    """What `forget` removed, and which fine-tuned versions it withdrew."""

    jobs: int = 0
    files: int = 0
    turns: int = 0
    histories: int = 0
    safety_events: int = 0
    items: int = 0
    usage_rows: int = 0
    audit_fields: int = 0
    withdrawn: list[tuple[str, str, int]] = field(default_factory=list)  # (guild, modality, version id)
    #: (guild, modality) whose approved set lost the member's items: the next nightly run retrains.
    retrain: list[tuple[str, str]] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return any((self.jobs, self.turns, self.safety_events, self.items, self.usage_rows, self.audit_fields,
                    self.withdrawn))


@dataclass
class PruneReport:
    jobs: int = 0
    files: int = 0
    turns: int = 0
    safety_events: int = 0


class PrivacyStore:
    """See the module docstring. ``data_dir`` bounds the files it may delete."""

    def __init__(self, db: Database, data_dir: Path | str,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.data_dir = Path(data_dir).resolve()
        self.clock = clock

    # --- forget ------------------------------------------------------------------------------
    def forget(self, user: str) -> ForgetReport:
        """Remove everything of ``user``, in every server (see the module docstring)."""
        report = ForgetReport()
        with immediate(self.db):
            job_ids = self._ids("SELECT id FROM jobs WHERE requester=?", [user])
            job_files = self._paths(f"SELECT path FROM artifacts WHERE job_id IN ({_marks(job_ids)})", job_ids)
            item_ids = self._ids("SELECT id FROM community_items WHERE author=?", [user])
            report.retrain = [(g, k) for g, k in self.db.execute(
                "SELECT DISTINCT guild, kind FROM community_items WHERE author=? AND status='approved'"
                " ORDER BY guild, kind", [user]).fetchall()]
            item_files = self._paths(f"SELECT path FROM community_files WHERE item_id IN ({_marks(item_ids)})",
                                     item_ids)
            report.withdrawn, version_dirs = self._withdraw_versions(set(item_ids))
            report.turns, report.histories = self._forget_turns(user)
            report.jobs = self._delete(f"DELETE FROM jobs WHERE id IN ({_marks(job_ids)})", job_ids)
            report.safety_events = self._delete("DELETE FROM safety_log WHERE \"user\"=?", [user])
            report.items = self._delete(f"DELETE FROM community_items WHERE id IN ({_marks(item_ids)})", item_ids)
            report.usage_rows = self._anonymise_usage(user)
            report.audit_fields = sum(self._delete(f"UPDATE {table} SET {column}=? WHERE {column}=?",
                                                   [FORGOTTEN, user]) for table, column in _AUDIT_COLUMNS)
            self._suppress_optouts(user)
        # Files after the commit: a row never points at a file already gone; a file that can't
        # be deleted now is logged (its row, and so the member's link to it, is gone).
        report.files = _unlink(self._inside([*job_files, *item_files]))
        for folder in self._inside(version_dirs):
            shutil.rmtree(folder, ignore_errors=True)
        self.compact()
        return report

    def _forget_turns(self, user: str) -> tuple[int, int]:
        """The member's turns, the answers to them, and the history other jobs carried of them."""
        mine = self.db.execute("SELECT message_id, conversation_id FROM conversation_turns WHERE author=?",
                               [user]).fetchall()
        messages = [m for m, _ in mine]
        conversations = sorted({c for _, c in mine})
        answers = self._ids(f"SELECT id FROM conversation_turns WHERE role='assistant'"
                            f" AND parent_message_id IN ({_marks(messages)})", messages)
        # Jobs in those conversations carried the member's words in their history parameter.
        others = self._ids(f"SELECT DISTINCT job_id FROM conversation_turns WHERE job_id IS NOT NULL"
                           f" AND conversation_id IN ({_marks(conversations)})", conversations)
        histories = 0
        for job_id, params in self.db.execute(f"SELECT id, params FROM jobs WHERE id IN ({_marks(others)})",
                                              others).fetchall():
            decoded = json.loads(params)
            if decoded.pop("history", None) is not None:
                self.db.execute("UPDATE jobs SET params=? WHERE id=?", [json.dumps(decoded), job_id])
                histories += 1
        removed = self._delete(f"DELETE FROM conversation_turns WHERE id IN ({_marks(answers)})", answers)
        removed += self._delete("DELETE FROM conversation_turns WHERE author=?", [user])
        return removed, histories

    def _withdraw_versions(self, item_ids: set[int]) -> tuple[list[tuple[str, str, int]], list[Path]]:
        """Versions trained on any of these items stop serving and lose their folders."""
        if not item_ids:
            return [], []
        withdrawn: list[tuple[str, str, int]] = []
        folders: list[Path] = []
        rows = self.db.execute("SELECT id, guild, modality, status, path, data_snapshot FROM model_versions"
                               " WHERE status <> 'rejected' OR path IS NOT NULL").fetchall()
        for version_id, guild, modality, status, path, snapshot in rows:
            data = json.loads(snapshot or "{}")
            used = {*data.get("item_ids", []), *data.get("held_out_ids", [])}
            if not used & item_ids:
                continue
            data["item_ids"] = [i for i in data.get("item_ids", []) if i not in item_ids]
            data["held_out_ids"] = [i for i in data.get("held_out_ids", []) if i not in item_ids]
            data["withdrawn"] = True  # its set is not what it was trained on any more
            self.db.execute("UPDATE model_versions SET status=?, path=NULL, data_snapshot=?, reason=? WHERE id=?",
                            ["rejected" if status in ("candidate", "rejected") else "rolled_back", json.dumps(data),
                             "withdrawn: trained on content a member asked the bot to forget", version_id])
            if path:
                folders.append(Path(path))
            if status == "promoted":
                withdrawn.append((guild, modality, version_id))
        return withdrawn, folders

    def _anonymise_usage(self, user: str) -> int:
        """Fold the member's usage counters into the anonymous ones of the same day and kind."""
        moved = self.db.execute("SELECT count(*) FROM usage WHERE requester=?", [user]).fetchone()[0]
        self.db.execute(
            "INSERT INTO usage (requester, guild, day, kind, jobs, tokens, seconds)"
            " SELECT ?, guild, day, kind, jobs, tokens, seconds FROM usage WHERE requester=?"
            " ON CONFLICT (requester, guild, day, kind) DO UPDATE SET jobs=usage.jobs+excluded.jobs,"
            " tokens=usage.tokens+excluded.tokens, seconds=usage.seconds+excluded.seconds", [FORGOTTEN, user])
        self.db.execute("DELETE FROM usage WHERE requester=?", [user])
        return int(moved)

    # --- opt-outs that outlive a forget ------------------------------------------------------------
    def _suppress_optouts(self, user: str) -> None:
        self.db.execute("UPDATE community_optout SET \"user\"=? WHERE \"user\"=?", [suppressed_id(self.db, user), user])

    # --- export --------------------------------------------------------------------------------
    def export(self, user: str) -> dict[str, Any]:
        """Everything the bot stores about ``user``, as JSON-ready data."""
        jobs = self._dicts("SELECT id, kind, model, source, guild, channel, prompt, params, status, created_at,"
                           " finished_at, error, result FROM jobs WHERE requester=? ORDER BY id", [user])
        for job in jobs:
            job["params"] = json.loads(job["params"])
            job["result"] = json.loads(job["result"]) if job["result"] else None
            job["files"] = [Path(p).name for p in self._paths("SELECT path FROM artifacts WHERE job_id=?",
                                                                [job["id"]])]
        items = self._dicts("SELECT id, guild, channel, message_id, kind, text, status, created_at, edited_at"
                            " FROM community_items WHERE author=? ORDER BY id", [user])
        for item in items:
            item["files"] = [Path(p).name for p in self._paths("SELECT path FROM community_files WHERE item_id=?",
                                                                 [item["id"]])]
        item_ids = {item["id"] for item in items}
        trained_on = [{"guild": g, "modality": m, "version": v, "status": s}
                      for v, g, m, s, snapshot in self.db.execute(
                          "SELECT id, guild, modality, status, data_snapshot FROM model_versions ORDER BY id")
                      if item_ids & set(json.loads(snapshot or "{}").get("item_ids", []))]
        return {
            "user": user,
            "exported_at": self.clock(),
            "jobs": jobs,
            "conversation_turns": self._dicts(
                "SELECT guild, channel, message_id, parent_message_id, role, content, job_id, created_at"
                " FROM conversation_turns WHERE author=? ORDER BY id", [user]),
            "usage": self._dicts("SELECT guild, day, kind, jobs, tokens, seconds FROM usage WHERE requester=?"
                                 " ORDER BY day, guild, kind", [user]),
            "safety_log": self._dicts("SELECT guild, channel, kind, excerpt, category, at FROM safety_log"
                                      " WHERE \"user\"=? ORDER BY id", [user]),
            "community_items": items,
            "opted_out_in": [row[0] for row in self.db.execute(
                "SELECT guild FROM community_optout WHERE \"user\"=? ORDER BY guild", [user])],
            "fine_tuned_versions_trained_on_your_items": trained_on,
        }

    # --- retention -----------------------------------------------------------------------------
    def prune(self, older_than_days: float) -> PruneReport:
        """Remove finished jobs (prompts, results, files), conversation turns and safety-log
        rows older than the retention; aggregate usage counters stay."""
        cutoff = self.clock() - older_than_days * 86400
        report = PruneReport()
        with immediate(self.db):
            job_ids = self._ids("SELECT id FROM jobs WHERE coalesce(finished_at, created_at) < ?"
                                " AND status NOT IN ('queued','running')", [cutoff])
            files = self._paths(f"SELECT path FROM artifacts WHERE job_id IN ({_marks(job_ids)})", job_ids)
            report.jobs = self._delete(f"DELETE FROM jobs WHERE id IN ({_marks(job_ids)})", job_ids)
            report.turns = self._delete("DELETE FROM conversation_turns WHERE created_at < ?", [cutoff])
            report.safety_events = self._delete("DELETE FROM safety_log WHERE at < ?", [cutoff])
        report.files = _unlink(self._inside(files))
        if report.jobs or report.turns or report.safety_events:
            self.compact()
        return report

    def compact(self) -> None:
        """Move the WAL's pages into the database file and truncate it: with ``secure_delete``
        on, deleted rows are then gone from both files. PostgreSQL reuses dead rows' space
        itself (autovacuum); its operators own its WAL and backups."""
        if not isinstance(self.db, PostgresDatabase):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- helpers -----------------------------------------------------------------------------
    def _ids(self, sql: str, args: Iterable[Any]) -> list[int]:
        return [int(row[0]) for row in self.db.execute(sql, list(args)).fetchall()]

    def _paths(self, sql: str, args: Iterable[Any]) -> list[Path]:
        return [Path(row[0]) for row in self.db.execute(sql, list(args)).fetchall()]

    def _delete(self, sql: str, args: list[Any]) -> int:
        return int(self.db.execute(sql, args).rowcount or 0)

    def _dicts(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        cursor = self.db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _inside(self, paths: Iterable[Path]) -> list[Path]:
        """Only paths under the data folder: a row must never make the bot delete elsewhere."""
        inside = []
        for path in paths:
            resolved = path.resolve()
            if resolved.is_relative_to(self.data_dir):
                inside.append(resolved)
            else:
                log.warning("not deleting %s: it is outside the data folder", path)
        return inside


def suppressed_id(db: Database, user: str, *, create: bool = True) -> str | None:
    """The stand-in under which a forgotten member's opt-outs are kept: an HMAC of their id
    under a random key kept in the database (the table holds no id, yet their messages stay
    refused). None when no key exists yet and ``create`` is false (so nothing is suppressed)."""
    row = db.execute("SELECT value FROM app_state WHERE key=?", [_SALT_KEY]).fetchone()
    if row is None:
        if not create:
            return None
        key = secrets.token_bytes(32)
        db.execute("INSERT INTO app_state (key, value, updated_at) VALUES (?,?,?)", [_SALT_KEY, key.hex(), time.time()])
    else:
        key = bytes.fromhex(row[0])
    return "hmac:" + hmac.new(key, user.encode(), hashlib.sha256).hexdigest()


def _marks(values: list[Any]) -> str:
    return ",".join("?" * len(values)) or "NULL"


def _unlink(paths: Iterable[Path]) -> int:
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete %s: %s", path, exc)
    return removed


