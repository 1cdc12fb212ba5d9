"""Conversations: reply chains from SQLite, separate conversations, token trimming, hidden reasoning."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from bot.core import conversation
from bot.core.conversation import build_history, prepare_reply, strip_reasoning
from bot.core.flow import OutputGuard
from bot.core.invocation import Button, Form, Invocation, Status
from bot.core.services import Services
from generators.base import Request
from generators.text import TextGenerator
from storage.conversations import ConversationError, NewTurn, Turn
from storage.jobs import JobRecord
from tests.databases import store_settings
from tests.handlers import C1, OTHER_G, make_services

G = "100000000000000001"


@pytest_asyncio.fixture
async def services(tmp_path: Path, db_target: Path | str) -> AsyncIterator[Services]:
    services = make_services(tmp_path, **store_settings(db_target), system_prompt="GLOBAL")
    yield services
    await services.close()


def _inv(user: str = "u1", guild: str | None = G) -> Invocation:
    return Invocation(user_id=user, source="test", guild_id=guild, channel_id=C1)


async def _exchange(services: Services, prompt: str, answer: str, *, prompt_id: str, answer_id: str,
                    reply_to: str | None = None, user: str = "u1") -> conversation.ChatContext:
    """One /chat round: prepare the context, 'generate', record; returns the context used."""
    context = await conversation.prepare_chat(services, _inv(user), prompt, reply_to=reply_to)
    await conversation.record_exchange(services, _inv(user), context, prompt_message_id=prompt_id, prompt=prompt,
                                       answer_message_id=answer_id, answer=answer)
    return context


def _pairs(history: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(turn["role"], turn["content"]) for turn in history]


# --- reply chains ----------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_reply_chain_rebuilds_the_history(services: Services) -> None:
    first = await _exchange(services, "hi", "hello!", prompt_id="i1", answer_id="b1")
    assert first.history == [] and first.parent_message_id is None
    second = await _exchange(services, "how are you?", "fine.", prompt_id="u2", answer_id="b2", reply_to="b1")
    assert _pairs(second.history) == [("user", "hi"), ("assistant", "hello!")]
    assert second.parent_message_id == "b1"
    third = await conversation.prepare_chat(services, _inv(), "and then?", reply_to="b2")
    assert _pairs(third.history) == [("user", "hi"), ("assistant", "hello!"), ("user", "how are you?"),
                                     ("assistant", "fine.")]
    assert third.job_params()["history"] == third.history
    # Replying to an earlier answer branches: the later turns are not part of that chain.
    branch = await conversation.prepare_chat(services, _inv(), "no, back to that", reply_to="b1")
    assert _pairs(branch.history) == [("user", "hi"), ("assistant", "hello!")]
    turns = services.conversations.chain("b2", G)
    assert [t.message_id for t in turns] == ["i1", "b1", "u2", "b2"]
    assert [t.parent_message_id for t in turns] == [None, "i1", "b1", "u2"]
    assert len({t.conversation_id for t in turns}) == 1


@pytest.mark.asyncio
async def test_two_concurrent_conversations_stay_separate(services: Services) -> None:
    await _exchange(services, "A: pick a fruit", "apple", prompt_id="a1", answer_id="ab1", user="alice")
    await _exchange(services, "B: pick a colour", "blue", prompt_id="b1", answer_id="bb1", user="bob")
    await _exchange(services, "A: another", "banana", prompt_id="a2", answer_id="ab2", reply_to="ab1", user="alice")
    await _exchange(services, "B: another", "green", prompt_id="b2", answer_id="bb2", reply_to="bb1", user="bob")
    alice = await conversation.prepare_chat(services, _inv("alice"), "A: last", reply_to="ab2")
    bob = await conversation.prepare_chat(services, _inv("bob"), "B: last", reply_to="bb2")
    assert [c for _, c in _pairs(alice.history)] == ["A: pick a fruit", "apple", "A: another", "banana"]
    assert [c for _, c in _pairs(bob.history)] == ["B: pick a colour", "blue", "B: another", "green"]
    a_id = services.conversations.get("ab2", G).conversation_id  # type: ignore[union-attr]
    b_id = services.conversations.get("bb2", G).conversation_id  # type: ignore[union-attr]
    assert a_id != b_id
    assert [t.message_id for t in services.conversations.conversation(a_id)] == ["a1", "ab1", "a2", "ab2"]


@pytest.mark.asyncio
async def test_unknown_or_foreign_reply_starts_a_new_conversation(services: Services) -> None:
    await _exchange(services, "secret plan", "noted", prompt_id="p1", answer_id="q1")
    fresh = await conversation.prepare_chat(services, _inv(), "hello", reply_to="never-recorded")
    assert fresh.history == [] and fresh.parent_message_id is None
    foreign = await conversation.prepare_chat(services, _inv(guild=OTHER_G), "what was it?", reply_to="q1")
    assert foreign.history == []  # another server cannot continue (or read) this one
    with pytest.raises(ConversationError, match="already recorded"):
        services.conversations.add_turns(G, C1, [NewTurn("q1", "user", "u1", "again")])
    assert [t.content for t in services.conversations.chain("q1", G)] == ["secret plan", "noted"]


# --- trimming --------------------------------------------------------------------------------
def _turns(*contents: str) -> list[Turn]:
    roles = ["user", "assistant"]
    return [Turn(i, G, C1, "c", f"m{i}", f"m{i - 1}" if i else None, roles[i % 2], "x", text, None, None, 0.0)
            for i, text in enumerate(contents)]


def _words(text: str) -> int:
    return len(text.split())


def test_trimming_keeps_the_newest_turns_within_the_budget() -> None:
    turns = _turns("one two three", "four five", "six seven eight nine", "ten", "eleven twelve", "thirteen")
    kwargs = {"system_prompt": "be brief", "prompt": "new question here", "count_tokens": _words,
              "per_turn_tokens": 1, "reserve_tokens": 5}
    fixed = 2 + 3 + 3 + 5  # system, prompt, three overheads (system, prompt, answer header), the reserve

    def kept(budget: int) -> list[str]:
        return [t["content"] for t in build_history(turns, context_tokens=fixed + budget, **kwargs)]

    # Turns cost their words + 1, newest first: thirteen 2, eleven twelve 3, ten 2, six..nine 5.
    assert kept(12) == ["six seven eight nine", "ten", "eleven twelve", "thirteen"]
    assert kept(1000) == [t.content for t in turns]
    # One token less: six..nine no longer fits, and "ten" (an answer) never opens a history.
    assert kept(11) == ["eleven twelve", "thirteen"]
    # The system prompt and the new prompt are never dropped: with no room, no history at all.
    assert kept(0) == [] and kept(-50) == []


def test_trimmed_history_never_starts_with_an_answer() -> None:
    turns = _turns("q1 q1 q1 q1", "a1", "q2", "a2")  # costs 5, 2, 2, 2 with an overhead of 1

    def kept(budget: int) -> list[tuple[str, str]]:
        history = build_history(turns, system_prompt="s", prompt="p", count_tokens=_words,
                                context_tokens=1 + 1 + 3 + budget, per_turn_tokens=1)
        return _pairs(history)

    assert kept(6) == [("user", "q2"), ("assistant", "a2")]  # a1 fits, but its question does not
    assert kept(3) == []  # only a2 fits, and it would open the history alone
    assert kept(11) == [("user", "q1 q1 q1 q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]


def test_trimming_with_the_tiny_models_tokenizer(tiny_model_dir: Path) -> None:
    generator = TextGenerator(str(tiny_model_dir), device="cpu", quantization_mode="none")
    unloaded = conversation.token_counter(generator)
    assert unloaded("hello world") == conversation.estimate_tokens("hello world")
    assert conversation.context_window(generator) == conversation.DEFAULT_CONTEXT
    generator.load()
    count = conversation.token_counter(generator)
    assert count("hello world") == generator.count_tokens("hello world") == 11  # one token a character
    assert conversation.context_window(generator) == 8192
    overhead = conversation.turn_overhead(generator)
    assert overhead == len("<|im_start|>assistant\n<|im_end|>\n") - len("<|im_start|><|im_end|>") + 2
    turns = _turns(*(f"turn {i} " + "x" * (10 + i) for i in range(12)))
    system, prompt, reserve, window = "You are terse.", "What now?", 32, 300
    history = build_history(turns, system_prompt=system, prompt=prompt, count_tokens=count,
                            context_tokens=window, reserve_tokens=reserve, per_turn_tokens=overhead)
    contents = [t["content"] for t in history]
    assert 0 < len(contents) < len(turns)
    assert contents == [t.content for t in turns[-len(contents):]]  # the newest, in order
    request = Request(job_id=1, prompt=prompt, params={"system_prompt": system, "history": history})
    assert generator.count_tokens(generator.format_prompt(request)) + reserve <= window
    longer = [{"role": t.role, "content": t.content} for t in turns[-len(contents) - 2:]]
    request = Request(job_id=1, prompt=prompt, params={"system_prompt": system, "history": longer})
    assert generator.count_tokens(generator.format_prompt(request)) + reserve > window  # trimming was needed


# --- reasoning -------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "visible", "reasoning"), [
    ("Hello", "Hello", ""),
    ("<think>the user greets</think>\n\nHello!", "Hello!", "the user greets"),
    ("<THINK>a</THINK>Yes.<think>b</think> Really.", "Yes. Really.", "a\n\nb"),
    ("<think>still thinking when the tokens ran out", "", "still thinking when the tokens ran out"),
    ("the template opened the block</think>Answer", "Answer", "the template opened the block"),
    ("Answer first <think>then an unclosed thought", "Answer first", "then an unclosed thought"),
])
def test_strip_reasoning(raw: str, visible: str, reasoning: str) -> None:
    assert strip_reasoning(raw) == (visible, reasoning)


def test_prepare_reply_attaches_reasoning_only_when_asked() -> None:
    raw = "<think>count the r's</think>There are three."
    assert prepare_reply(raw, attach_reasoning=False) == conversation.Reply("There are three.", "count the r's")
    attached = prepare_reply(raw, attach_reasoning=True)
    assert attached.attachment == ("reasoning.txt", b"count the r's")
    assert prepare_reply("no thoughts", attach_reasoning=True).attachment is None
    assert "only reasoned" in prepare_reply("<think>hmm", attach_reasoning=False).text


@dataclass
class Inner:
    """The front end's responder behind an `OutputGuard`: what reaches the member, in order."""

    events: list[tuple[str, object]] = field(default_factory=list)

    async def accepted(self, record: JobRecord) -> None:
        self.events.append(("accepted", record.id))

    async def status(self, status: Status) -> None:
        self.events.append(("status", status.text))

    async def partial(self, text: str) -> None:
        self.events.append(("partial", text))

    async def result(self, record: JobRecord, buttons: Sequence[Button] = ()) -> str | None:
        self.events.append(("result", record.result))
        return "answer-message"

    async def error(self, message: str) -> None:
        self.events.append(("error", message))

    async def info(self, message: str, buttons: Sequence[Button] = ()) -> None:
        self.events.append(("info", message))

    async def form(self, form: Form) -> None:
        self.events.append(("form", form.title))


def _record(text: str) -> JobRecord:
    return JobRecord(id=7, kind="text", model="m", source="test", requester="u1", guild=G, channel=C1, prompt="p",
                     params={}, delivery={}, status="succeeded", priority=0, attempts=1, cancel_requested=False,
                     worker=None, created_at=0.0, started_at=0.0, finished_at=1.0, error=None,
                     result={"text": text, "metadata": {"tokens": 5}})


@pytest.mark.asyncio
async def test_output_guard_hides_reasoning_while_streaming_and_at_the_end(services: Services) -> None:
    services.config.set(G, "attach_reasoning", "true", channel=C1, by="mod")
    inner = Inner()
    guard = OutputGuard(_inv(), inner, services, 7)
    await guard.status(Status(7, "queued", position=1))
    await guard.partial("<think>plan the")
    await guard.partial("<think>plan the answer</think>Hel")
    final = await guard.check(_record("<think>plan the answer</think>Hello there"))
    assert final is not None
    await inner.result(final)
    assert inner.events == [
        ("status", "⏳ Queued (job 7) — position 1"), ("status", "⚙️ Thinking…"), ("partial", "Hel"),
        ("result", {"text": "Hello there", "metadata": {"tokens": 5}, "reasoning": "plan the answer"})]


@pytest.mark.asyncio
async def test_output_guard_withholds_a_blocked_answer_and_logs_it_once(services: Services) -> None:
    services.safety.add(G, "zorblax", by="mod")
    inner = Inner()
    guard = OutputGuard(_inv(), inner, services, 7)
    await guard.partial("Sure, the word is zorb")
    await guard.partial("Sure, the word is zorblax")
    await guard.partial("Sure, the word is zorblax, again zorblax")
    await guard.status(Status(7, "progress", progress=0.9))  # nothing more is shown once withheld
    assert await guard.check(_record("Sure, the word is zorblax, again zorblax.")) is None
    assert [kind for kind, _ in inner.events] == ["partial", "status", "error"]
    assert inner.events[1] == ("status", "⚠️ This answer is being withheld.")
    assert inner.events[2][1] == "🚫 The answer was withheld: it contained a word or pattern this server has blocked."
    rows = services.db.execute("SELECT kind, rule, category FROM safety_log").fetchall()
    assert rows == [("text-output", "blocklist #1", "blocklist")]
