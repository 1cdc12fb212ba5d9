"""The database schema, as numbered migrations applied in order at start, on SQLite and PostgreSQL.

Every migration is a list of SQL statements in the dialect both databases share; the few type
names that differ (SQLite's INTEGER PRIMARY KEY, REAL, BLOB) are rewritten for PostgreSQL by
`storage.postgres`. Add a new migration at the end for every change; never edit one that has
shipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations


@dataclass(frozen=True)
class Migration:
    name: str
    statements: tuple[str, ...]


SCHEMA: tuple[Migration, ...] = (
    Migration("0001_jobs_artifacts_usage", (
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,              -- text | image | audio | training
            model TEXT NOT NULL,
            source TEXT NOT NULL,            -- cli | console | discord | http | schedule | ...
            requester TEXT NOT NULL,         -- user id (as text: Discord ids exceed 2^53 in JS)
            guild TEXT,
            channel TEXT,
            prompt TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',       -- JSON
            delivery TEXT NOT NULL DEFAULT '{}',     -- JSON: where the result goes
            status TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued','running','succeeded','failed','cancelled','expired')),
            priority INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            heartbeat_at REAL,
            finished_at REAL,
            error TEXT,
            result TEXT                      -- JSON
        )
        """,
        "CREATE INDEX jobs_status_kind ON jobs (status, kind)",
        "CREATE INDEX jobs_requester_status ON jobs (requester, status)",
        """
        CREATE TABLE artifacts (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            mime TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            created_at REAL NOT NULL
        )
        """,
        "CREATE INDEX artifacts_job ON artifacts (job_id)",
        """
        CREATE TABLE usage (
            requester TEXT NOT NULL,
            guild TEXT NOT NULL DEFAULT '',
            day TEXT NOT NULL,               -- YYYY-MM-DD, UTC
            kind TEXT NOT NULL,
            jobs INTEGER NOT NULL DEFAULT 0,
            tokens INTEGER NOT NULL DEFAULT 0,
            seconds REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (requester, guild, day, kind)
        )
        """,
    )),
    Migration("0002_guild_config_personas_safety_conversations", (
        """
        CREATE TABLE guild_config (
            guild TEXT NOT NULL,
            channel TEXT NOT NULL DEFAULT '',    -- '' = the whole server
            key TEXT NOT NULL,
            value TEXT NOT NULL,                 -- JSON
            updated_by TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (guild, channel, key)
        )
        """,
        """
        CREATE TABLE personas (
            id INTEGER PRIMARY KEY,
            guild TEXT NOT NULL,
            name TEXT NOT NULL,
            system_prompt TEXT NOT NULL,
            sampling TEXT NOT NULL DEFAULT '{}',  -- JSON: default temperature, top_p, ...
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (guild, name)
        )
        """,
        """
        CREATE TABLE blocklist (
            id INTEGER PRIMARY KEY,
            guild TEXT NOT NULL,
            pattern TEXT NOT NULL,
            is_regex INTEGER NOT NULL DEFAULT 0,
            added_by TEXT NOT NULL,
            added_at REAL NOT NULL,
            UNIQUE (guild, pattern, is_regex)
        )
        """,
        """
        CREATE TABLE safety_log (
            id INTEGER PRIMARY KEY,
            guild TEXT,
            channel TEXT,
            "user" TEXT NOT NULL,
            kind TEXT NOT NULL,                  -- text | image | audio | text-output | ...
            excerpt TEXT NOT NULL,               -- the start of the prompt, never all of it
            rule TEXT NOT NULL,
            category TEXT NOT NULL,
            at REAL NOT NULL
        )
        """,
        "CREATE INDEX safety_log_guild_at ON safety_log (guild, at)",
        """
        CREATE TABLE conversation_turns (
            id INTEGER PRIMARY KEY,
            guild TEXT,
            channel TEXT,
            conversation_id TEXT NOT NULL,
            message_id TEXT NOT NULL,            -- the Discord message (or interaction) of this turn
            parent_message_id TEXT,              -- the turn it answers or replies to
            role TEXT NOT NULL CHECK (role IN ('user','assistant')),
            author TEXT NOT NULL,
            content TEXT NOT NULL,
            job_id INTEGER REFERENCES jobs(id) ON DELETE SET NULL,
            tokens INTEGER,
            created_at REAL NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX conversation_turns_message ON conversation_turns (message_id)",
        "CREATE INDEX conversation_turns_conversation ON conversation_turns (conversation_id, id)",
    )),
    Migration("0003_schedules", (
        """
        CREATE TABLE schedules (
            id INTEGER PRIMARY KEY,
            guild TEXT,                      -- Discord guild id as text; NULL when added from the CLI
            channel TEXT NOT NULL,           -- where the post goes (channel id as text)
            kind TEXT NOT NULL CHECK (kind IN ('text','image','audio')),
            model TEXT,                      -- NULL: the kind's default model when it fires
            prompt TEXT NOT NULL,            -- template: {date} {weekday} {server} {channel} {community_quote}
            spec TEXT NOT NULL,              -- what the moderator typed: a preset or a cron expression
            cron TEXT NOT NULL,              -- the standard 5-field crontab it stands for
            timezone TEXT NOT NULL DEFAULT 'UTC',
            paused INTEGER NOT NULL DEFAULT 0,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_run_at REAL,
            next_run_at REAL,                -- NULL while paused
            failures INTEGER NOT NULL DEFAULT 0,   -- consecutive failed firings
            last_error TEXT,
            note TEXT                        -- why it was paused or skipped, for moderators
        )
        """,
        "CREATE INDEX schedules_guild ON schedules (guild)",
        "CREATE INDEX schedules_due ON schedules (paused, next_run_at)",
    )),
    Migration("0004_community", (
        """
        CREATE TABLE community_channels (    -- channels whose messages may be learned from (opt-in)
            guild TEXT NOT NULL,
            channel TEXT NOT NULL,
            added_by TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (guild, channel)
        )
        """,
        """
        CREATE TABLE community_optout (      -- members whose messages are never captured
            guild TEXT NOT NULL,
            "user" TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (guild, "user")
        )
        """,
        """
        CREATE TABLE community_items (
            id INTEGER PRIMARY KEY,
            guild TEXT NOT NULL,
            channel TEXT NOT NULL,
            author TEXT NOT NULL,
            message_id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL CHECK (kind IN ('text','image')),
            text TEXT NOT NULL DEFAULT '',   -- scrubbed message text (an image's caption)
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','approved','rejected')),
            scrubbed INTEGER NOT NULL DEFAULT 0,   -- 1: personal data was replaced by placeholders
            sha256 TEXT NOT NULL,            -- normalised text, or the image bytes: finds duplicates
            created_at REAL NOT NULL,
            edited_at REAL,
            approved_by TEXT
        )
        """,
        "CREATE INDEX community_items_guild_status ON community_items (guild, status, kind)",
        "CREATE INDEX community_items_author ON community_items (guild, author)",
        "CREATE INDEX community_items_sha ON community_items (guild, sha256)",
        """
        CREATE TABLE community_files (
            id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL REFERENCES community_items(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            mime TEXT NOT NULL,
            size INTEGER NOT NULL
        )
        """,
        "CREATE INDEX community_files_item ON community_files (item_id)",
        """
        CREATE TABLE model_versions (
            id INTEGER PRIMARY KEY,
            guild TEXT NOT NULL,
            modality TEXT NOT NULL CHECK (modality IN ('text','image')),
            parent_id INTEGER REFERENCES model_versions(id) ON DELETE SET NULL,  -- what served when it was trained
            status TEXT NOT NULL DEFAULT 'candidate'
                CHECK (status IN ('candidate','promoted','rejected','rolled_back')),
            path TEXT,                       -- the version's folder (adapter or image checkpoint)
            data_snapshot TEXT NOT NULL DEFAULT '{}',  -- JSON: item ids and the sha256 of the set
            hyperparams TEXT NOT NULL DEFAULT '{}',    -- JSON
            metrics TEXT NOT NULL DEFAULT '{}',        -- JSON: before / after, tokens, seconds …
            reason TEXT,                     -- why it was (not) promoted
            created_at REAL NOT NULL,
            promoted_at REAL                 -- the serving version is the promoted one promoted last
        )
        """,
        "CREATE INDEX model_versions_guild ON model_versions (guild, modality, status)",
    )),
    # Cooldown and daily-quota checks run on every job a member asks for: a member's jobs of
    # one kind, newest first or since midnight, without scanning their whole history.
    Migration("0005_jobs_requester_kind_created", (
        "CREATE INDEX jobs_requester_kind_created ON jobs (requester, kind, created_at)",
    )),
    Migration("0006_app_state", (
        """
        CREATE TABLE app_state (             -- the bot's own small facts, e.g. the hash of the
            key TEXT PRIMARY KEY,            -- slash commands last registered with Discord
            value TEXT NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
    )),
    # Past one process (AIGC_DATABASE_URL): jobs run on workers of other hosts and any bot process
    # may follow or deliver them.
    Migration("0007_distributed_jobs", (
        # Delivered to Discord once: the process that posts the result claims it first.
        "ALTER TABLE jobs ADD COLUMN delivered_at REAL",
        "ALTER TABLE jobs ADD COLUMN delivered_by TEXT",
        # The job's place in its lane: its priority, then its member's round (fairness across
        # processes, where no lane lives in one process's memory).
        "ALTER TABLE jobs ADD COLUMN lane_rank INTEGER NOT NULL DEFAULT 0",
        # The procrastinate job that runs it on a worker.
        "ALTER TABLE jobs ADD COLUMN task_id INTEGER",
        "CREATE INDEX jobs_undelivered ON jobs (delivered_at, status)",
        """
        CREATE TABLE artifact_data (         -- an artifact's bytes, when no folder is shared between hosts
            artifact_id INTEGER NOT NULL PRIMARY KEY REFERENCES artifacts(id) ON DELETE CASCADE,
            data BLOB NOT NULL
        )
        """,
        """
        CREATE TABLE slot_claims (           -- a scheduled firing (post, nightly training) claimed by
            key TEXT PRIMARY KEY,            -- one process: "schedule:12:2025-03-01T09:00"
            claimed_by TEXT NOT NULL,
            at REAL NOT NULL
        )
        """,
    )),
    # Delivered once even when the process that claimed a delivery dies: a claim is a lease its
    # process renews (bot.discord.claims); one left to go stale may be taken over.
    Migration("0008_delivery_lease", (
        "ALTER TABLE jobs ADD COLUMN delivery_claimed_at REAL",
        "ALTER TABLE jobs ADD COLUMN delivered_message TEXT",  # the Discord message that shows it
        # Jobs finished before deliveries were recorded were delivered (or lost) then: the first
        # start-up scan must not post them again.
        "UPDATE jobs SET delivered_at = finished_at WHERE finished_at IS NOT NULL AND delivered_at IS NULL",
        # The delivery scan: a source's finished, undelivered jobs by age; equalities first, so
        # results delivered long ago and CLI jobs (never delivered to Discord) are not read.
        "CREATE INDEX jobs_delivery_scan ON jobs (source, status, delivered_at, finished_at)",
    )),
    # The workers that run jobs (`aigcbot worker`), as each reports itself: which lanes have one.
    Migration("0009_workers", (
        """
        CREATE TABLE workers (
            id TEXT PRIMARY KEY,             -- host:pid:token
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            lanes TEXT NOT NULL,             -- comma-separated: text,image
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        )
        """,
    )),
    # At most one queued or running job per key (a server's training run of one modality),
    # checked in the insert's transaction, so two bot processes cannot both submit one.
    Migration("0010_exclusive_jobs", (
        "ALTER TABLE jobs ADD COLUMN exclusive TEXT",
        "CREATE INDEX jobs_exclusive ON jobs (exclusive, status)",
    )),
)


def sqlite_migrations() -> Migrations:
    """The schema as sqlite-utils migrations (it records which ones a file has had)."""
    migrations = Migrations("aigcbot")
    for migration in SCHEMA:
        migrations(name=migration.name)(_applier(migration))
    return migrations


def _applier(migration: Migration) -> Callable[[Database], None]:
    def apply(db: Database) -> None:
        for statement in migration.statements:
            db.execute(statement)
    return apply
