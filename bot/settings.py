"""Every setting of the bot, declared once, read from the environment and `.env`.

`load_settings()` validates everything at start; a bad value raises `SettingsError` whose
message names the setting, and the CLI prints it as one line and exits nonzero.
Secrets are `SecretStr`, so they never show up in a repr, a log line or an error.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from generators.base import text_problem
from storage.ids import is_snowflake
from storage.postgres import describe, is_postgres_url

SERVER_MODEL = "server"  # a job's text model when an OpenAI-compatible server picks it

if TYPE_CHECKING:
    from generators.queue import QueueConfig
    from jobs.finetune import FinetuneSettings


class SettingsError(Exception):
    """A setting has a bad value; the message names it."""


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    """The bot's configuration. Field aliases are the environment variable names."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True,
        env_ignore_empty=True,
    )

    # --- storage -----------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("data"), validation_alias=_env("AIGC_DATA_DIR"),
        description="Folder for generated files, converted models and the database.",
    )
    database_path: Path | None = Field(
        None, validation_alias=_env("AIGC_DATABASE"),
        description="SQLite database file (default: AIGC_DATA_DIR/aigcbot.sqlite3).",
    )
    database_url: SecretStr | None = Field(
        None, validation_alias=_env("AIGC_DATABASE_URL"),
        description="PostgreSQL instead of the SQLite file, e.g. postgresql://aigcbot:PASSWORD@db.internal/aigcbot:"
                    " for several bot processes and for workers on other hosts (`aigcbot worker`).",
    )

    # --- past one process (with AIGC_DATABASE_URL) ---------------------------------------------
    local_lanes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("AIGC_LOCAL_LANES"),
        description="With AIGC_DATABASE_URL, the lanes this bot process runs itself (e.g. text); the others"
                    " run on workers (`aigcbot worker --lanes image,audio`). Default: none.",
    )
    shared_artifacts_dir: Path | None = Field(
        None, validation_alias=_env("AIGC_SHARED_ARTIFACTS_DIR"),
        description="A folder every bot and worker host mounts at this same path: results are written there."
                    " Unset: results travel in the database (up to AIGC_ARTIFACT_MAX_MB).",
    )
    artifact_max_mb: float = Field(
        25.0, gt=0, validation_alias=_env("AIGC_ARTIFACT_MAX_MB"),
        description="The largest result file kept in the database when no folder is shared (MB).",
    )
    delivery_lease_s: float = Field(
        30.0, ge=1, le=3600, validation_alias=_env("AIGC_DELIVERY_LEASE_S"),
        description="A result a bot process claimed to post and died with is posted by another after this long (s).",
    )
    worker_stall_s: float = Field(
        30.0, ge=1, validation_alias=_env("AIGC_WORKER_STALL_S"),
        description="A worker silent this long (seconds) is presumed dead: its jobs run again elsewhere.",
    )

    model_cache: Path | None = Field(
        None, validation_alias=_env("AIGC_MODEL_CACHE"),
        description="Folder for converted models (default: AIGC_DATA_DIR/models).",
    )

    # --- text model --------------------------------------------------------------------------
    text_model: str = Field(
        "smollm2", validation_alias=_env("AIGC_TEXT_MODEL"),
        description="'smollm2' (packaged SmolLM2-135M-Instruct), a Hugging Face model id, "
        "or a local folder.",
    )
    quantization: Literal["auto", "none", "bf16", "fp16", "fp16-weights", "int8-smooth", "int8-dynamic",
                          "bnb-4bit", "bnb-8bit"] = Field(
        "auto", validation_alias=_env("AIGC_QUANTIZATION"),
        description="auto: bitsandbytes 4-bit NF4 on CUDA (bf16 or fp16 without bitsandbytes), the measured "
        "best mode on CPU. bnb-4bit, bnb-8bit and fp16 need CUDA.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", validation_alias=_env("AIGC_DEVICE"))
    system_prompt: str = Field(
        "You are a friendly, concise assistant in a Discord server.",
        validation_alias=_env("AIGC_SYSTEM_PROMPT"),
    )
    text_backend: Literal["embedded", "openai"] = Field(
        "embedded", validation_alias=_env("AIGC_TEXT_BACKEND"),
        description="embedded: the text model runs in the bot (AIGC_TEXT_MODEL); openai: an OpenAI-compatible "
        "server answers (vLLM, llama.cpp's server, Ollama): set AIGC_OPENAI_BASE_URL.",
    )
    openai_base_url: str | None = Field(
        None, validation_alias=_env("AIGC_OPENAI_BASE_URL"),
        description="The server's API base, such as http://10.0.0.5:8000/v1 (AIGC_TEXT_BACKEND=openai).",
    )
    openai_api_key: SecretStr | None = Field(None, validation_alias=_env("AIGC_OPENAI_API_KEY"))
    openai_model: str | None = Field(
        None, validation_alias=_env("AIGC_OPENAI_MODEL"),
        description="The model to ask for (default: the first one the server lists).",
    )
    openai_concurrency: int = Field(
        32, ge=1, le=512, validation_alias=_env("AIGC_OPENAI_CONCURRENCY"),
        description="Text jobs sent to the server at once (it batches them).",
    )
    openai_timeout_s: float = Field(
        60.0, gt=0, le=3600, validation_alias=_env("AIGC_OPENAI_TIMEOUT_S"),
        description="Seconds to wait for the server to connect or send the next part of an answer.",
    )
    max_prompt_chars: int = Field(4000, ge=1, le=100_000, validation_alias=_env("AIGC_MAX_PROMPT_CHARS"))
    max_new_tokens: int = Field(256, ge=1, le=4096, validation_alias=_env("AIGC_MAX_NEW_TOKENS"))
    text_max_batch: int = Field(
        32, ge=1, le=256, validation_alias=_env("AIGC_TEXT_MAX_BATCH"),
        description="Text jobs decoded together by the embedded model (they join and leave between steps).",
    )
    model_memory_budget_mb: int = Field(
        8192, ge=64, validation_alias=_env("AIGC_MODEL_MEMORY_MB"),
        description="Resident models are evicted (least recently used first) above this.",
    )
    gpu_memory_budget_mb: int | None = Field(
        None, ge=64, validation_alias=_env("AIGC_GPU_MEMORY_BUDGET_MB"),
        description="With models on a CUDA GPU: the GPU memory every loaded model of every kind shares; idle "
        "models are unloaded (least recently used first) before a load that would not fit. "
        "Unset: the GPU's memory less 10 % (at least 1 GiB) for activations.",
    )

    # --- images and audio ----------------------------------------------------------------------
    image_model: str = Field(
        "auto", validation_alias=_env("AIGC_IMAGE_MODEL"),
        description="Default /imagine model: auto (the diffusion model when configured, else the embedded "
        "model that knows what the prompt names) | face | fashion | digits | diffusion.",
    )
    diffusion_model: str | None = Field(
        None, validation_alias=_env("AIGC_DIFFUSION_MODEL"),
        description="diffusers text-to-image model id or folder (needs the 'diffusion' extra); unset = off.",
    )
    speech_model: str | None = Field(
        None, validation_alias=_env("AIGC_SPEECH_MODEL"),
        description="transformers text-to-speech model id or folder; unset = the embedded hibari voice.",
    )
    music_model: str | None = Field(
        None, validation_alias=_env("AIGC_MUSIC_MODEL"),
        description="transformers text-to-music model (e.g. MusicGen) for /music; unset = off.",
    )

    # --- scheduled posts -------------------------------------------------------------------------
    schedule_channels: Annotated[list[int], NoDecode] = Field(
        default_factory=list, validation_alias=_env("AIGC_SCHEDULE_CHANNELS"),
        description="Channel ids the CLI may schedule posts to; empty = any numeric id.",
    )
    schedule_min_interval_s: int = Field(
        600, ge=60, le=86_400 * 7, validation_alias=_env("AIGC_SCHEDULE_MIN_INTERVAL_S")
    )
    schedule_grace_s: int = Field(3600, ge=0, le=86_400, validation_alias=_env("AIGC_SCHEDULE_GRACE_S"))
    schedule_quote_fallback: str | None = Field(None, validation_alias=_env("AIGC_SCHEDULE_QUOTE_FALLBACK"))

    # --- queue -------------------------------------------------------------------------------
    max_pending_per_user: int = Field(5, ge=1, le=1000, validation_alias=_env("AIGC_MAX_PENDING_PER_USER"))
    job_timeout_s: float = Field(300.0, gt=0, le=86_400, validation_alias=_env("AIGC_JOB_TIMEOUT_S"))
    max_attempts: int = Field(3, ge=1, le=20, validation_alias=_env("AIGC_MAX_ATTEMPTS"))
    cooldown_s: int = Field(
        0, ge=0, le=86_400, validation_alias=_env("AIGC_COOLDOWN_S"),
        description="Seconds a member waits between two generations of one kind (0: none); "
        "servers refine it per kind with /config set cooldown.text|image|audio.",
    )
    daily_quota: int = Field(
        0, ge=0, le=100_000, validation_alias=_env("AIGC_DAILY_QUOTA"),
        description="Generations of one kind a member may start per day in a server (0: no limit); "
        "servers refine it per kind with /config set daily_quota.text|image|audio.",
    )

    # --- privacy -----------------------------------------------------------------------------
    retention_days: int = Field(
        30, ge=0, le=3650, validation_alias=_env("AIGC_RETENTION_DAYS"),
        description="Prompts, results, generated files, conversation turns and safety-log excerpts older "
        "than this many days are deleted each night (0: kept until a member asks to forget them).",
    )

    # --- discord -----------------------------------------------------------------------------
    discord_token: SecretStr | None = Field(None, validation_alias=_env("DISCORD_TOKEN"))
    discord_application_id: int | None = Field(None, validation_alias=_env("DISCORD_APPLICATION_ID"))
    discord_public_key: str | None = Field(None, validation_alias=_env("DISCORD_PUBLIC_KEY"))
    discord_dev_guild_ids: Annotated[list[int], NoDecode] = Field(
        default_factory=list, validation_alias=_env("DISCORD_DEV_GUILD_IDS"),
        description="Comma-separated guild ids to sync commands to; empty: sync globally.",
    )
    discord_moderator_role: str = Field("Moderator", validation_alias=_env("DISCORD_MODERATOR_ROLE"))
    discord_message_content: bool = Field(
        False, validation_alias=_env("DISCORD_MESSAGE_CONTENT"),
        description="Request the privileged Message Content intent (enable it in the Developer Portal "
        "first), so replies to the bot continue a conversation even without the reply @mention.",
    )
    discord_shards: int | Literal["auto"] | None = Field(
        None, validation_alias=_env("AIGC_DISCORD_SHARDS"),
        description="Gateway shards in this process: auto (the count Discord recommends) or a number (1 or "
        "more), served by discord.py's AutoShardedBot; unset: one plain connection.",
    )
    discord_api_base: str = Field(
        "https://discord.com/api/v10", validation_alias=_env("DISCORD_API_BASE")
    )
    discord_gateway_url: str = Field(
        "wss://gateway.discord.gg/", validation_alias=_env("DISCORD_GATEWAY_URL")
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias=_env("AIGC_LOG_LEVEL")
    )
    log_format: Literal["text", "json"] = Field(
        "text", validation_alias=_env("AIGC_LOG_FORMAT"),
        description="text: dated lines; json: one JSON object a line (time, level, logger, message, process, "
        "pid, and job_id and lane on job lines).",
    )

    # --- monitoring --------------------------------------------------------------------------
    metrics_port: int | None = Field(
        None, ge=1, le=65_535, validation_alias=_env("AIGC_METRICS_PORT"),
        description="Port for Prometheus /metrics and /healthz in every mode (gateway, HTTP, console); "
        "unset: off.",
    )
    metrics_host: str = Field(
        "127.0.0.1", validation_alias=_env("AIGC_METRICS_HOST"),
        description="Address the metrics port listens on (0.0.0.0: every interface, for a scraper on another "
        "host).",
    )

    @field_validator("*")
    @classmethod
    def _plain_text(cls, value: object) -> object:
        """No setting may hold a NUL or another control character, or bytes that are not UTF-8."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str | Path):
            problem = text_problem(str(text), "the value", visible=False)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("discord_dev_guild_ids", "schedule_channels", mode="before")
    @classmethod
    def _split_ids(cls, value: object) -> object:
        if isinstance(value, str | int) and not isinstance(value, bool):
            parts = [part for part in str(value).replace(" ", "").split(",") if part]
            if not all(is_snowflake(part) for part in parts):
                raise ValueError("expected comma-separated Discord ids (ASCII digits, not zero, at most 64 bits), "
                                 "e.g. 1234567890,9876543210")
            return [int(part) for part in parts]
        if isinstance(value, list) and not all(is_snowflake(part) for part in value):
            raise ValueError("expected Discord ids (ASCII digits, not zero, at most 64 bits)")
        return value

    @field_validator("discord_application_id")
    @classmethod
    def _application_id(cls, value: int | None) -> int | None:
        if value is not None and not is_snowflake(value):
            raise ValueError("expected the application's Discord id (ASCII digits, not zero, at most 64 bits)")
        return value

    @field_validator("discord_public_key")
    @classmethod
    def _hex_key(cls, value: str | None) -> str | None:
        if value and (len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value)):
            raise ValueError("expected 64 hexadecimal characters (32-byte Ed25519 key)")
        return value or None

    @field_validator("discord_shards", mode="before")
    @classmethod
    def _shards(cls, value: object) -> object:
        if value is None or value == "auto":
            return value
        text = str(value).strip().lower() if not isinstance(value, bool) else ""
        if text == "auto":
            return "auto"
        if text.isascii() and text.isdigit() and int(text) >= 1:
            return int(text)
        raise ValueError("expected auto or a number of shards (1 or more)")

    @field_validator("discord_api_base", "discord_gateway_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("expected a URL such as https://discord.com/api/v10")
        return value

    @field_validator("local_lanes", mode="before")
    @classmethod
    def _split_lanes(cls, value: object) -> object:
        if isinstance(value, str):
            from generators.tasks import parse_lanes  # procrastinate: only when the setting is used

            return list(parse_lanes(value))
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        # The URL may hold a password: the message names its scheme only.
        if value is not None and not is_postgres_url(value.get_secret_value()):
            scheme = value.get_secret_value().partition("://")[0] if "://" in value.get_secret_value() else "no scheme"
            raise ValueError(f"must be a postgresql://user:password@host:port/database URL ({scheme}:// given)")
        return value

    @field_validator("openai_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("expected an http(s) URL of the server's API, such as http://10.0.0.5:8000/v1")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _backend_configured(self) -> Settings:
        if self.text_backend == "openai" and not self.openai_base_url:
            raise ValueError("setting AIGC_OPENAI_BASE_URL: needed when AIGC_TEXT_BACKEND=openai (the server's API "
                             "base, such as http://10.0.0.5:8000/v1)")
        return self

    @property
    def default_text_model(self) -> str:
        """The text model a job asks for when nobody chose one: the embedded model, or with an
        OpenAI-compatible server its configured model (``server``: whichever it serves first)."""
        if self.text_backend == "openai":
            return self.openai_model or SERVER_MODEL
        return self.text_model

    @property
    def db_file(self) -> Path:
        return self.database_path or self.data_dir / "aigcbot.sqlite3"

    @property
    def uses_postgres(self) -> bool:
        return self.database_url is not None

    @property
    def store_target(self) -> Path | str:
        """What `storage.database.open_database` opens: the PostgreSQL URL, else the SQLite file."""
        return self.database_url.get_secret_value() if self.database_url is not None else self.db_file

    @property
    def store_name(self) -> str:
        """The store for messages and logs, never with a password."""
        return f"PostgreSQL {describe(self.store_target)}" if self.database_url is not None else str(self.db_file)

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def models_dir(self) -> Path:
        return self.model_cache or self.data_dir / "models"

    @property
    def community_dir(self) -> Path:
        """Captured community images."""
        return self.data_dir / "community"

    @property
    def versions_dir(self) -> Path:
        """Fine-tuned versions (LoRA adapters, image checkpoints)."""
        return self.data_dir / "finetune"


# --- settings as component options (one place translates them) ------------------------------
def global_defaults(settings: Settings) -> dict[str, Any]:
    """The bot-wide value of every per-server config key: what applies where no server or
    channel set one (`storage.guild_config.KEYS` declares the keys)."""
    defaults: dict[str, Any] = {
        "enabled_commands": None,  # None: every command
        "default_model.text": settings.default_text_model,
        "default_model.image": None,
        "default_model.audio": None,
        "max_pending_per_user": settings.max_pending_per_user,
        "timezone": "UTC",
        "moderator_role": settings.discord_moderator_role,
        "modlog_channel": None,
        "persona": None,
        "age_restricted": False,
        "attach_reasoning": False,
    }
    for kind in ("text", "image", "audio"):
        defaults[f"cooldown.{kind}"] = settings.cooldown_s
        defaults[f"daily_quota.{kind}"] = settings.daily_quota
    return defaults


def queue_config(settings: Settings, **overrides: Any) -> QueueConfig:
    from generators.queue import QueueConfig

    options: dict[str, Any] = {
        "max_pending_per_user": settings.max_pending_per_user,
        "job_timeout_s": settings.job_timeout_s,
        "max_attempts": settings.max_attempts,
        "artifacts_dir": settings.artifacts_dir,
    }
    if settings.uses_postgres:
        # Workers on other hosts: results go to the shared folder, or into the database.
        options["artifacts_dir"] = settings.shared_artifacts_dir or settings.artifacts_dir
        options["artifacts_in_database"] = settings.shared_artifacts_dir is None
        options["artifact_max_bytes"] = int(settings.artifact_max_mb * 2**20)
    return QueueConfig(**{**options, **overrides})


def poster_options(settings: Settings) -> dict[str, Any]:
    """`jobs.scheduled_posts.ScheduledPoster` options."""
    return {
        "min_interval": timedelta(seconds=settings.schedule_min_interval_s),
        "grace_s": float(settings.schedule_grace_s),
        "quote_fallback": settings.schedule_quote_fallback,
    }


def finetune_settings(settings: Settings) -> FinetuneSettings:
    """Where versions go and which base text model is tuned."""
    from jobs.finetune import FinetuneSettings  # imports torch: only when training is wanted

    return FinetuneSettings(versions_dir=settings.versions_dir, text_model=settings.text_model,
                            cache_dir=settings.models_dir, device=settings.device)


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; raise SettingsError naming the first bad one."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SourceError as exc:
        raise SettingsError(f"setting {_source_field(str(exc))}: cannot parse the value") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across settings: its message names them
            raise SettingsError(message) from None
        raise SettingsError(f"setting {_env_name(str(error['loc'][0]))}: {message}") from None
    except UnicodeDecodeError as exc:  # the .env file
        raise SettingsError(f"setting {_undecodable(exc)}: not valid UTF-8 text in the settings file "
                            f"(byte 0x{exc.object[exc.start]:02x})") from None


def _undecodable(exc: UnicodeDecodeError) -> str:
    """The name on the line of a .env file where ``exc`` found bytes that are not UTF-8."""
    data = bytes(exc.object)
    start = data.rfind(b"\n", 0, exc.start) + 1
    name = data[start:exc.start].partition(b"=")[0].removeprefix(b"export ").strip()
    return name.decode("ascii", "replace") if name and b"=" in data[start:exc.start] else "?"


def _source_field(message: str) -> str:
    for name in Settings.model_fields:
        if f'"{name}"' in message:
            return _env_name(name)
    return "?"


def _env_name(field_name: str) -> str:
    field = Settings.model_fields.get(field_name)
    alias = getattr(field, "validation_alias", None) if field else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return field_name
