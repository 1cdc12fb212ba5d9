"""The database schema, as numbered migrations applied in order at start.

Add a new function at the end for every change; never edit one that has shipped.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

MIGRATIONS = Migrations("aigcbot")


@MIGRATIONS(name="0001_jobs_artifacts_usage")
def _jobs_artifacts_usage(db: Database) -> None:
    db.execute(
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
        """
    )
    db.execute("CREATE INDEX jobs_status_kind ON jobs (status, kind)")
    db.execute("CREATE INDEX jobs_requester_status ON jobs (requester, status)")
    db.execute(
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
        """
    )
    db.execute("CREATE INDEX artifacts_job ON artifacts (job_id)")
    db.execute(
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
        """
    )


@MIGRATIONS(name="0002_guild_config_personas_safety_conversations")
def _guild_config_personas_safety_conversations(db: Database) -> None:
    db.execute(
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
        """
    )
    db.execute(
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
        """
    )
    db.execute(
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
        """
    )
    db.execute(
        """
        CREATE TABLE safety_log (
            id INTEGER PRIMARY KEY,
            guild TEXT,
            channel TEXT,
            user TEXT NOT NULL,
            kind TEXT NOT NULL,                  -- text | image | audio | text-output | ...
            excerpt TEXT NOT NULL,               -- the start of the prompt, never all of it
            rule TEXT NOT NULL,
            category TEXT NOT NULL,
            at REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX safety_log_guild_at ON safety_log (guild, at)")
    db.execute(
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
        """
    )
    db.execute("CREATE UNIQUE INDEX conversation_turns_message ON conversation_turns (message_id)")
    db.execute("CREATE INDEX conversation_turns_conversation ON conversation_turns (conversation_id, id)")


@MIGRATIONS(name="0003_schedules")
def _schedules(db: Database) -> None:
    db.execute(
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
        """
    )
    db.execute("CREATE INDEX schedules_guild ON schedules (guild)")
    db.execute("CREATE INDEX schedules_due ON schedules (paused, next_run_at)")


@MIGRATIONS(name="0004_community")
def _community(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE community_channels (    -- channels whose messages may be learned from (opt-in)
            guild TEXT NOT NULL,
            channel TEXT NOT NULL,
            added_by TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (guild, channel)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE community_optout (      -- members whose messages are never captured
            guild TEXT NOT NULL,
            user TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (guild, user)
        )
        """
    )
    db.execute(
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
        """
    )
    db.execute("CREATE INDEX community_items_guild_status ON community_items (guild, status, kind)")
    db.execute("CREATE INDEX community_items_author ON community_items (guild, author)")
    db.execute("CREATE INDEX community_items_sha ON community_items (guild, sha256)")
    db.execute(
        """
        CREATE TABLE community_files (
            id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL REFERENCES community_items(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            mime TEXT NOT NULL,
            size INTEGER NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX community_files_item ON community_files (item_id)")
    db.execute(
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
        """
    )
    db.execute("CREATE INDEX model_versions_guild ON model_versions (guild, modality, status)")


@MIGRATIONS(name="0005_jobs_requester_kind_created")
def _jobs_requester_kind_created(db: Database) -> None:
    # Cooldown and daily-quota checks run on every job a member asks for: a member's jobs of
    # one kind, newest first or since midnight, without scanning their whole history.
    db.execute("CREATE INDEX jobs_requester_kind_created ON jobs (requester, kind, created_at)")


@MIGRATIONS(name="0006_app_state")
def _app_state(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE app_state (             -- the bot's own small facts, e.g. the hash of the
            key TEXT PRIMARY KEY,            -- slash commands last registered with Discord
            value TEXT NOT NULL,
            updated_at REAL NOT NULL
        )
        """
    )
