"""Discord rendering, in one place: how a job's progress and result become messages.

Used by both Discord front ends (`bot.discord.delivery`), so the two look the same.
Everything here is plain data: no client, no I/O beyond reading artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bot.core.invocation import FileOut
from storage.jobs import JobRecord

MESSAGE_LIMIT = 2000
#: Longer answers than this many messages' worth go out as a text file with a preview.
MAX_CHUNKS = 3
DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024  # Discord's limit for unboosted servers


@dataclass
class Rendered:
    """A result as Discord messages: the edited original, then follow-ups."""

    content: str
    files: list[FileOut] = field(default_factory=list)
    followups: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def split_text(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split at paragraph, then line, then word boundaries; hard-cut only inside a word."""
    chunks: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = max(rest.rfind("\n\n", 0, limit), rest.rfind("\n", 0, limit))
        if cut < limit // 2:
            cut = rest.rfind(" ", 0, limit)
        if cut < limit // 2:
            cut = limit
        chunks.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        chunks.append(rest)
    return chunks or [""]


def progress_text(text: str) -> str:
    """A progress or streaming update, clipped to one message."""
    if len(text) <= MESSAGE_LIMIT:
        return text
    return "…" + text[-(MESSAGE_LIMIT - 1):]


def render_result(record: JobRecord, attachment_limit: int = DEFAULT_ATTACHMENT_LIMIT) -> Rendered:
    """The final message(s) for a succeeded job."""
    text = ((record.result or {}).get("text") or "").strip()
    rendered = Rendered(content="")
    if record.kind == "text":
        chunks = split_text(text) if text else ["(the model returned no text)"]
        if len(chunks) > MAX_CHUNKS:
            preview = split_text(text, MESSAGE_LIMIT - 60)[0]
            rendered.content = preview + "\n\n*(full answer attached as answer.txt)*"
            rendered.files.append(FileOut("answer.txt", text.encode(), "text/plain"))
        else:
            rendered.content, rendered.followups = chunks[0], chunks[1:]
    elif text:
        rendered.content = split_text(text)[0]
    budget = attachment_limit
    reasoning = str((record.result or {}).get("reasoning") or "")
    if reasoning:  # set by bot.core.flow.OutputGuard where the server attaches reasoning
        data = reasoning.encode("utf-8")
        if len(data) <= budget:
            budget -= len(data)
            rendered.files.append(FileOut("reasoning.txt", data, "text/plain"))
        else:
            rendered.notes.append("the reasoning is too large to attach here")
    for artifact in record.artifacts:
        path = Path(artifact.path)
        if artifact.size > budget or not path.exists():
            rendered.notes.append(f"{path.name} ({artifact.size / 2**20:.1f} MB) is too large to attach here")
            continue
        budget -= artifact.size
        rendered.files.append(FileOut(path.name, path.read_bytes(), artifact.mime))
    if rendered.notes:
        rendered.content = (rendered.content + "\n" + "\n".join(f"-# {n}" for n in rendered.notes)).strip()
    if not rendered.content and not rendered.files:
        rendered.content = "(nothing was produced)"
    return rendered
