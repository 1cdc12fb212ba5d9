"""/chat context: persona resolution, reply-chain history trimmed by tokens, hidden reasoning.

The steps of one /chat:

1. `prepare_chat`: resolve the persona (explicit option › channel default › server default ›
   the bot's global system prompt), rebuild the conversation from the message the user
   replied to (SQLite, not Discord), and trim it to the model's context window by tokens,
   dropping the oldest turns first; the system prompt and the new prompt always stay.
2. Queue a text job with `ChatContext.job_params(...)` (system_prompt, history, sampling).
3. Deliver the answer without its ``<think>`` reasoning (`prepare_reply`), then
   `record_exchange` the prompt's and the answer's message ids so a reply continues it.

`bot.core.flow` runs these steps; nothing here knows a front end.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bot.core.invocation import Invocation
from generators.base import Generator
from storage.conversations import NewTurn, Turn
from storage.guild_config import ConfigStore
from storage.personas import PersonaError, PersonaStore

if TYPE_CHECKING:
    from bot.core.services import Services

PER_TURN_TOKENS = 4  # what a chat template adds around each message (role markers, separators)
DEFAULT_CONTEXT = 2048

_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)


# --- reasoning -------------------------------------------------------------------------------
def strip_reasoning(text: str) -> tuple[str, str]:
    """Split a reasoning model's output into (visible answer, reasoning).

    Removes ``<think>…</think>`` blocks; text before a lone ``</think>`` (the chat template
    opened the block); and everything after an unclosed ``<think>`` (output cut off, or
    still streaming, mid-thought).
    """
    parts: list[str] = []

    def drop(match: re.Match[str]) -> str:
        parts.append(match.group(1).strip())
        return ""

    visible = _THINK_BLOCK.sub(drop, text)
    close = _THINK_CLOSE.search(visible)
    if close:
        parts.insert(0, visible[: close.start()].strip())
        visible = _THINK_CLOSE.sub("", visible[close.end():])
    opened = _THINK_OPEN.search(visible)
    if opened:
        parts.append(visible[opened.end():].strip())
        visible = visible[: opened.start()]
    return visible.strip(), "\n\n".join(p for p in parts if p)


@dataclass(frozen=True)
class Reply:
    """An answer ready to deliver; ``attachment`` is (filename, bytes) when reasoning is attached."""

    text: str
    reasoning: str
    attachment: tuple[str, bytes] | None = None


def prepare_reply(raw: str, *, attach_reasoning: bool) -> Reply:
    visible, reasoning = strip_reasoning(raw)
    if not visible and reasoning:
        visible = "(The model only reasoned and gave no answer; try again or allow more tokens.)"
    attachment = ("reasoning.txt", reasoning.encode("utf-8")) if attach_reasoning and reasoning else None
    return Reply(visible, reasoning, attachment)


# --- personas --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedPersona:
    name: str | None
    system_prompt: str
    sampling: dict[str, float]
    source: str  # option | channel | server | global


def resolve_persona_sync(config: ConfigStore, personas: PersonaStore, guild: str | None, channel: str | None,
                         explicit: str | None, global_prompt: str) -> ResolvedPersona:
    """Explicit option › channel default › server default › the bot's global system prompt.
    An explicit name that does not exist is an error (PersonaError); a stale default is skipped."""
    if explicit:
        persona = personas.get(guild, explicit) if guild else None
        if persona is None:
            where = "on this server" if guild else "outside a server"
            raise PersonaError(f"there is no persona named {explicit.strip().lower()!r} {where}")
        return ResolvedPersona(persona.name, persona.system_prompt, persona.sampling, "option")
    if guild:
        for scope, source in ((channel, "channel"), (None, "server")):
            if source == "channel" and not channel:
                continue
            name = config.get("persona", guild, scope)
            persona = personas.get(guild, name) if name else None
            if persona is not None:
                return ResolvedPersona(persona.name, persona.system_prompt, persona.sampling, source)
    return ResolvedPersona(None, global_prompt, {}, "global")


async def resolve_persona(services: Services, inv: Invocation, explicit: str | None = None
                          ) -> ResolvedPersona:
    return await services.adb.run(resolve_persona_sync, services.config, services.personas, inv.guild_id,
                                  inv.channel_id, explicit, services.settings.system_prompt)


# --- history ---------------------------------------------------------------------------------
def estimate_tokens(text: str) -> int:
    """A deliberately high guess (English BPE averages about 4 bytes a token), for when the
    model's tokenizer is not at hand: over-counting only trims a little more."""
    return len(text.encode("utf-8")) // 3 + 1


def token_counter(generator: Generator) -> Callable[[str], int]:
    """The text generator's own `count_tokens` while its tokenizer is loaded, else an estimate."""

    def count(text: str) -> int:
        counter = getattr(generator, "count_tokens", None)
        if counter is not None and getattr(generator, "tokenizer", None) is not None:
            try:
                return int(counter(text))
            # Unloaded meanwhile (AssertionError), or the fast tokenizer busy on the lane's
            # thread ("Already borrowed"): an estimate is better than failing the chat.
            except (AssertionError, RuntimeError):
                pass
        return estimate_tokens(text)

    return count


def context_window(generator: Generator, default: int = DEFAULT_CONTEXT) -> int:
    """The model's context length in tokens, when the loaded model (or its server) says;
    else ``default``."""
    served = getattr(generator, "context_tokens", None)
    if isinstance(served, int) and served > 0:
        return served
    config = getattr(getattr(generator, "model", None), "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        return positions
    limit = getattr(getattr(generator, "tokenizer", None), "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:  # tokenizers without a limit report ~1e30
        return limit
    return default


def turn_overhead(generator: Generator, default: int = PER_TURN_TOKENS) -> int:
    """Tokens the loaded model's chat template adds around one message (the most over the
    roles), measured by rendering a one-character message; ``default`` if it cannot be."""
    tokenizer = getattr(generator, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return default
    sizes = []
    for role in ("system", "user", "assistant"):
        try:
            text = tokenizer.apply_chat_template([{"role": role, "content": "x"}], tokenize=False)
            sizes.append(len(tokenizer(str(text), add_special_tokens=False).input_ids) - 1)
        # Templates may refuse a lone message of some role (strict alternation): skip that role.
        except Exception:
            continue
    return max(sizes) if sizes else default


def build_history(turns: Sequence[Turn], *, system_prompt: str, prompt: str, count_tokens: Callable[[str], int],
                  context_tokens: int, reserve_tokens: int = 0,
                  per_turn_tokens: int = PER_TURN_TOKENS) -> list[dict[str, str]]:
    """The newest turns that fit, oldest first, as ``history`` for a text job.

    The budget is the context window less the answer's room (``reserve_tokens``), the
    system prompt and the new prompt, which are never dropped. Turns are taken newest first
    until one does not fit; a history never starts with an answer whose question was cut.
    """
    budget = context_tokens - reserve_tokens
    # the system message, the new prompt and the answer's opening header each cost a turn's overhead
    budget -= count_tokens(system_prompt) + count_tokens(prompt) + 3 * per_turn_tokens
    kept: list[Turn] = []
    for turn in reversed(turns):
        cost = count_tokens(turn.content) + per_turn_tokens
        if cost > budget:
            break
        budget -= cost
        kept.append(turn)
    kept.reverse()
    while kept and kept[0].role == "assistant":
        kept.pop(0)
    return [{"role": turn.role, "content": turn.content} for turn in kept]


@dataclass(frozen=True)
class ChatContext:
    persona: ResolvedPersona
    history: list[dict[str, str]]
    #: The recorded message this prompt continues (None: a new conversation).
    parent_message_id: str | None

    def job_params(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Text job params: the persona's sampling defaults under the user's own options."""
        params: dict[str, Any] = {**self.persona.sampling, **(options or {})}
        params["system_prompt"] = self.persona.system_prompt
        if self.history:
            params["history"] = self.history
        return params


async def prepare_chat(services: Services, inv: Invocation, prompt: str, *,
                       reply_to: str | None = None, persona: str | None = None,
                       count_tokens: Callable[[str], int] = estimate_tokens,
                       context_tokens: int = DEFAULT_CONTEXT, reserve_tokens: int = 256,
                       per_turn_tokens: int = PER_TURN_TOKENS) -> ChatContext:
    """Persona and trimmed history for a /chat prompt; ``reply_to`` is the message id the user
    replied to. Raises PersonaError for an explicit persona that does not exist."""
    resolved = await resolve_persona(services, inv, persona)
    chain: list[Turn] = []
    if reply_to:
        chain = await services.adb.run(services.conversations.chain, reply_to, inv.guild_id)
    history = await asyncio.to_thread(
        build_history, chain, system_prompt=resolved.system_prompt, prompt=prompt, count_tokens=count_tokens,
        context_tokens=context_tokens, reserve_tokens=reserve_tokens, per_turn_tokens=per_turn_tokens)
    return ChatContext(resolved, history, chain[-1].message_id if chain else None)


async def record_exchange(services: Services, inv: Invocation, context: ChatContext, *,
                          prompt_message_id: str, prompt: str, answer_message_id: str, answer: str,
                          job_id: int | None = None, answer_tokens: int | None = None,
                          bot_id: str = "bot") -> list[Turn]:
    """Record the prompt (the user's message, or the interaction for a slash command) and the
    delivered answer (visible text only: reasoning is never fed back)."""
    turns = [
        NewTurn(prompt_message_id, "user", inv.user_id, prompt, context.parent_message_id, job_id),
        NewTurn(answer_message_id, "assistant", bot_id, answer, prompt_message_id, job_id, answer_tokens),
    ]
    return await services.adb.run(services.conversations.add_turns, inv.guild_id, inv.channel_id, turns)
