"""The declaration of what the bot offers: commands, options, menus, buttons and forms.

Everything a member can do is declared once, as data, in `bot.commands` (one `Catalogue`).
The front ends derive what they need from it: the discord.py command tree and Discord's
registration payload, the HTTP endpoint's dispatcher, the console's parser, and /help.

`run_command` and `run_component` are the one way a declared entry is run: they apply what
the declaration says (server only, moderators only, switchable with `enabled_commands`,
option types and ranges) and then call the handler, a plain async function of
``(invocation, responder, services, **options)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from bot.core.invocation import Button, ButtonStyle, Invocation, Responder
from generators.base import text_problem
from storage.ids import is_snowflake

if TYPE_CHECKING:
    from bot.core.services import Services
    from bot.settings import Settings

OptionKind = Literal["string", "integer", "number", "boolean", "channel"]
Value = str | int | float | bool
#: How the first answer to an interaction is shown: "public" defers at once with a public
#: "thinking" message (a generation command: it takes seconds); "ephemeral" answers privately
#: with the handler's first reply (a deferral comes first only if the handler is slow); "job"
#: answers a refusal privately but defers publicly once a job is accepted (a button that
#: starts a generation: a stranger's press shows nothing in the channel).
Ack = Literal["public", "ephemeral", "job"]
Handler = Callable[..., Awaitable[Any]]
MAX_ID = 2**53 - 1  # ids beyond this lose precision in Discord's JavaScript clients
MAX_INTEGER = 2**63 - 1  # what SQLite stores; an integer option without bounds stays within it
CUSTOM_ID_PREFIX = "aigc"


@dataclass(frozen=True)
class Choice:
    name: str
    value: Value


#: (invocation, services, what was typed, the other options so far) → up to 25 choices.
Autocomplete = Callable[[Invocation, "Services", str], Awaitable[list[Choice]]]
#: The choices of an option that depend on how the bot is set up (which models it has).
ChoicesFor = Callable[["Settings"], tuple[Value, ...]]


@dataclass(frozen=True)
class Option:
    """One option of a command. ``low``/``high`` bound a number's value or a text's length."""

    name: str
    description: str
    kind: OptionKind = "string"
    required: bool = False
    low: float | None = None
    high: float | None = None
    choices: tuple[Value, ...] = ()
    autocomplete: Autocomplete | None = None
    #: Choices computed from the settings at start (`Catalogue.for_settings`); until then none.
    choices_for: ChoicesFor | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not fit this option (one line for the member), or None."""
        name = self.name
        if self.kind in ("string", "channel"):
            if not isinstance(value, str):
                return f"`{name}` must be text."
            if self.kind == "channel" and not is_snowflake(value):
                return f"`{name}` must be a channel: its #mention or id (ASCII digits, not zero, at most 64 bits)."
            if self.high is not None and len(value) > self.high:
                return f"`{name}` is too long: {len(value)} characters, at most {self.high:g}."
            if self.low is not None and len(value) < self.low:
                return f"`{name}` is too short: at least {self.low:g} characters."
            # Text that must not be empty must show something; no text may hide control characters.
            problem = text_problem(value, f"`{name}`", visible=bool(self.low))
            if problem is not None:
                return problem + "."
        elif self.kind in ("integer", "number"):
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if (not is_number or (self.kind == "integer" and not isinstance(value, int))
                    or (isinstance(value, float) and not math.isfinite(value))):  # isfinite(huge int) overflows
                return f"`{name}` must be {'a whole number' if self.kind == 'integer' else 'a number'}."
            shown = float if self.kind == "number" else int
            low = self.low if self.low is not None else (-MAX_INTEGER if self.kind == "integer" else None)
            high = self.high if self.high is not None else (MAX_INTEGER if self.kind == "integer" else None)
            if low is not None and value < low:
                return f"`{name}` must be at least {shown(low)}."
            if high is not None and value > high:
                return f"`{name}` must be at most {shown(high)}."
        elif self.kind == "boolean" and not isinstance(value, bool):
            return f"`{name}` must be true or false."
        if self.choices and value not in self.choices:
            return f"`{name}` must be one of: {', '.join(str(c) for c in self.choices)}."
        return None

    def parse(self, text: str) -> Value:
        """A typed value from text (the console); raises ValueError with the member's message."""
        text = text.strip()
        if self.kind == "integer":
            # Any length of ASCII digits: `problem` then says which range a huge one is out of.
            if not re.fullmatch(r"[+-]?[0-9]{1,1000}", text.lstrip("#")):
                raise ValueError(f"`{self.name}` must be a whole number (ASCII digits 0-9).")
            return int(text.lstrip("#"))
        if self.kind == "number":
            if not re.fullmatch(r"[+-]?([0-9]{1,1000}(\.[0-9]*)?|\.[0-9]{1,1000})([eE][+-]?[0-9]{1,4})?", text):
                raise ValueError(f"`{self.name}` must be a number (ASCII digits 0-9, such as 0.7).")
            return float(text)
        if self.kind == "boolean":
            lowered = text.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise ValueError(f"`{self.name}` must be true or false.")
        if self.kind == "channel":
            match = re.fullmatch(r"<#([0-9]+)>|#?([0-9]+)", text)
            if match is None or not is_snowflake(match[1] or match[2]):
                raise ValueError(f"`{self.name}` must be a channel: its #mention or id "
                                 "(ASCII digits, not zero, at most 64 bits).")
            return match[1] or match[2]
        return text


@dataclass(frozen=True)
class Group:
    """A command group ("config", or "community channel" for a nested one)."""

    name: str
    description: str
    moderators: bool = False
    guild_only: bool = False


@dataclass(frozen=True)
class Command:
    """A slash command (``name`` is its path: "chat", "config set", "community channel add")."""

    name: str
    description: str
    handler: Handler
    options: tuple[Option, ...] = ()
    #: Hidden from members by default (Manage Server); the bot refuses non-moderators itself.
    moderators: bool = False
    guild_only: bool = False
    ack: Ack = "ephemeral"
    #: A server may switch it off with `/config set enabled_commands` (moderation never is).
    switchable: bool = False

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split())

    @property
    def root(self) -> str:
        return self.path[0]

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def check(self, values: Mapping[str, Any]) -> str | None:
        """Why these option values do not fit the declaration, or None."""
        for name, value in values.items():
            option = self.option(name)
            if option is None:
                return f"/{self.name} has no option `{name}`; the command may have changed — try again."
            if (problem := option.problem(value)) is not None:
                return problem
        missing = [o.name for o in self.options if o.required and o.name not in values]
        return f"Missing `{missing[0]}`." if missing else None


@dataclass(frozen=True)
class MessageCommand:
    """A context-menu command on a message; its handler gets ``message_id``."""

    name: str
    handler: Handler
    moderators: bool = False
    guild_only: bool = True


@dataclass(frozen=True)
class Component:
    """A family of buttons (or of form submissions) whose custom id carries its arguments.

    The custom id is ``aigc:<name>:<template filled>``, e.g. ``aigc:cancel:12``, so a press
    works after a restart. Template fields are whole numbers unless ``words`` lists the
    values a field may take. The handler gets the fields as text, plus a form's fields.
    """

    name: str
    template: str
    handler: Handler
    ack: Ack = "ephemeral"
    words: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: The button's label (for forms: the form's title).
    label: str = ""
    style: ButtonStyle = "secondary"

    def __post_init__(self) -> None:
        parts = re.split(r"\{(\w+)\}", self.template)
        pattern = ""
        for index, part in enumerate(parts):
            if index % 2 == 0:
                pattern += re.escape(part)
            else:
                choices = self.words.get(part)
                value = "|".join(map(re.escape, choices)) if choices else "[0-9]{1,16}"
                pattern += f"(?P<{part}>{value})"
        object.__setattr__(self, "_pattern", re.compile(f"{CUSTOM_ID_PREFIX}:{re.escape(self.name)}:{pattern}"))

    def custom_id(self, **values: object) -> str:
        return f"{CUSTOM_ID_PREFIX}:{self.name}:{self.template.format(**values)}"

    def button(self, label: str | None = None, style: ButtonStyle | None = None, **values: object) -> Button:
        return Button(label or self.label, self.custom_id(**values), style or self.style)

    def match(self, custom_id: str) -> dict[str, str] | None:
        found = self._pattern.fullmatch(custom_id)  # type: ignore[attr-defined]
        if found is None:
            return None
        values = found.groupdict()
        # A number field is an id: 1 to MAX_ID (a press can't name a job SQLite can't hold).
        if any(name not in self.words and not 0 < int(value) <= MAX_ID for name, value in values.items()):
            return None
        return values


@dataclass(frozen=True)
class Catalogue:
    groups: tuple[Group, ...]
    commands: tuple[Command, ...]
    menus: tuple[MessageCommand, ...]
    components: tuple[Component, ...]

    def __post_init__(self) -> None:
        paths = [c.path for c in self.commands]
        if len(set(paths)) != len(paths):
            raise ValueError("two commands share a name")
        for command in self.commands:
            for prefix_length in range(1, len(command.path)):
                if self.group(command.path[:prefix_length]) is None:
                    raise ValueError(f"/{command.name} needs a group {' '.join(command.path[:prefix_length])!r}")
            if any(not o.name.isidentifier() for o in command.options):
                raise ValueError(f"/{command.name}: option names must be identifiers")

    def command(self, path: Iterable[str]) -> Command | None:
        wanted = tuple(path)
        return next((c for c in self.commands if c.path == wanted), None)

    def group(self, path: Iterable[str]) -> Group | None:
        wanted = " ".join(path)
        return next((g for g in self.groups if g.name == wanted), None)

    def menu(self, name: str) -> MessageCommand | None:
        return next((m for m in self.menus if m.name == name), None)

    def component(self, custom_id: str) -> tuple[Component, dict[str, str]] | None:
        for component in self.components:
            if (values := component.match(custom_id)) is not None:
                return component, values
        return None

    def for_settings(self, settings: Settings) -> Catalogue:
        """This catalogue with the choices that depend on the settings filled in: what a front
        end registers and checks (e.g. /imagine offers only the models this bot can run)."""
        def resolved(command: Command) -> Command:
            if not any(o.choices_for for o in command.options):
                return command
            options = tuple(dataclasses.replace(o, choices=o.choices_for(settings)) if o.choices_for else o
                            for o in command.options)
            return dataclasses.replace(command, options=options)

        return dataclasses.replace(self, commands=tuple(resolved(c) for c in self.commands))

    def switchable(self) -> frozenset[str]:
        """Names `enabled_commands` may list."""
        return frozenset(c.root for c in self.commands if c.switchable)

    def top_level(self) -> list[str]:
        """Top-level names in declaration order (a group once)."""
        names: list[str] = []
        for command in self.commands:
            if command.root not in names:
                names.append(command.root)
        return names


# --- running a declared entry ----------------------------------------------------------------
async def refusal(command: Command | MessageCommand, inv: Invocation, services: Services) -> str | None:
    """Why this member may not run ``command`` here, or None."""
    label = command.name if isinstance(command, MessageCommand) else f"/{command.name}"
    if command.guild_only and not inv.guild_id:
        return f"{label} only works in a server."
    if command.moderators and not inv.is_moderator:
        return f"Only moderators can use {label}."
    if isinstance(command, Command) and command.switchable:
        return await services.moderation.command_allowed(inv, command.root)
    return None


async def run_command(command: Command, inv: Invocation, responder: Responder, services: Services,
                      values: Mapping[str, Any]) -> Any:
    """Check the declaration's rules and the option values, then run the handler."""
    problem = command.check(values) or await refusal(command, inv, services)
    if problem is not None:
        await responder.error(problem)
        return None
    return await command.handler(inv, responder, services, **values)


async def run_menu(menu: MessageCommand, inv: Invocation, responder: Responder, services: Services,
                   message_id: str) -> Any:
    problem = await refusal(menu, inv, services)
    if problem is not None:
        await responder.error(problem)
        return None
    return await menu.handler(inv, responder, services, message_id=message_id)


async def run_component(component: Component, values: Mapping[str, str], inv: Invocation, responder: Responder,
                        services: Services, fields: Mapping[str, str] | None = None) -> Any:
    arguments = {**values, **(fields or {})}
    try:  # a button pressed with a form's id, or a form sent with fields its handler doesn't take
        inspect.signature(component.handler).bind(inv, responder, services, **arguments)
    except TypeError:
        await responder.error("This button or form does not fit its action (it may have changed); try again.")
        return None
    return await component.handler(inv, responder, services, **arguments)


async def complete(command: Command, option_name: str, inv: Invocation, services: Services,
                   typed: str) -> list[Choice]:
    """Up to 25 choices for an option being typed (none where the member may not run it)."""
    option = command.option(option_name)
    if option is None or option.autocomplete is None or await refusal(command, inv, services) is not None:
        return []
    return (await option.autocomplete(inv, services, typed))[:25]
