"""Conversations over Discord replies, through the real bot and the fake Discord.

A /chat answer is recorded as a conversation turn; a reply to it is the next prompt, answered
with the chain's history from SQLite (never Discord's message history).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from bot.core.conversation import PER_TURN_TOKENS, estimate_tokens
from generators.base import Request, Result
from generators.text import TextGenerator
from tests.discord_bots import (
    RecordingGenerator,
    bot_reply,
    chat_answer,
    command,
    make_bot,
    reply_text,
    turn_of,
)
from tests.fakediscord import FakeDiscord, running_client

__all__ = ["make_bot"]  # the fixture


class RecordingTextGenerator(TextGenerator):
    """The real text generator (tiny model), keeping the exact text each request showed the model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prompts: list[str] = []

    def format_prompt(self, request: Request) -> str:
        text = super().format_prompt(request)
        self.prompts.append(text)
        return text


class ThinkingGenerator(RecordingGenerator):
    """Answers like a reasoning model: hidden thoughts, then the answer."""

    def generate(self, requests: list[Request]) -> list[Result]:
        results = super().generate(requests)
        for request, result in zip(requests, results, strict=True):
            result.text = f"<think>pondering {request.prompt}</think>Answer to {request.prompt}."
        return results


def chatml(messages: list[tuple[str, str]]) -> str:
    """The tiny model's chat template, rendered by hand."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages) + \
        "<|im_start|>assistant\n"


@pytest.mark.asyncio
async def test_three_turns_over_replies_keep_their_context_apart_from_a_parallel_conversation(
        fake_discord: FakeDiscord, make_bot: Any, tiny_model_dir: Any) -> None:
    fake = fake_discord
    text = RecordingTextGenerator(str(tiny_model_dir), quantization_mode="none", device="cpu", max_new_tokens=6)
    bot, services = await make_bot({"text": text}, max_new_tokens=6)
    bob = fake.add_member(fake.guild_id, fake.add_user("bob"))
    async with running_client(bot, fake):
        a1 = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "apples one", "temperature": 0.0}))
        b1 = await fake.dispatch_interaction(
            fake.slash_command("chat", {"prompt": "zebras one", "temperature": 0.0}, user=bob))
        a1_answer, b1_answer = await chat_answer(fake, a1), await chat_answer(fake, b1)
        await turn_of(services, a1_answer.id, fake.guild_id)
        await turn_of(services, b1_answer.id, fake.guild_id)
        # Both users reply at once: two conversations in flight in one channel.
        a2 = await fake.send_user_message("apples two", reply_to=a1_answer)
        b2 = await fake.send_user_message("zebras two", reply_to=b1_answer, user=bob)
        (a2_answer, _), (b2_answer, _) = await asyncio.gather(bot_reply(fake, services, a2),
                                                              bot_reply(fake, services, b2))
        a3 = await fake.send_user_message("apples three", reply_to=a2_answer)
        a3_answer, _ = await bot_reply(fake, services, a3)

    chain = await services.adb.run(services.conversations.chain, a3_answer.id, fake.guild_id)
    assert [t.role for t in chain] == ["user", "assistant"] * 3
    assert [t.message_id for t in chain] == [str(a1.id), a1_answer.id, a2.id, a2_answer.id, a3.id, a3_answer.id]
    assert [t.content for t in chain[::2]] == ["apples one", "apples two", "apples three"]
    assert {t.author for t in chain[::2]} == {fake.member["user"]["id"]}
    answers = [t.content for t in chain[1::2]]
    assert a3_answer.content == (answers[2] or "(the model returned no text)")
    assert a3_answer.data["message_reference"]["message_id"] == a3.id  # a reply to the user's message

    system = services.settings.system_prompt
    [third] = [p for p in text.prompts if "apples three" in p]
    assert third == chatml([("system", system), ("user", "apples one"), ("assistant", answers[0]),
                            ("user", "apples two"), ("assistant", answers[1]), ("user", "apples three")])
    [bob_second] = [p for p in text.prompts if "zebras two" in p]
    bob_chain = await services.adb.run(services.conversations.chain, b2_answer.id, fake.guild_id)
    assert bob_second == chatml([("system", system), ("user", "zebras one"), ("assistant", bob_chain[1].content),
                                 ("user", "zebras two")])
    assert all("zebras" not in p for p in text.prompts if "apples" in p)
    assert bob_chain[0].conversation_id != chain[0].conversation_id


@pytest.mark.asyncio
async def test_long_conversations_keep_the_newest_turns_within_the_context(fake_discord: FakeDiscord,
                                                                           make_bot: Any) -> None:
    fake = fake_discord
    text = RecordingGenerator()  # answers "<prompt>:1"; no tokenizer, so token counts are estimates
    bot, services = await make_bot({"text": text})
    q1, q2, q3 = ("a" * 1500, "b" * 1500, "c" * 1500)  # ~500 estimated tokens each; the context is 2048
    async with running_client(bot, fake):
        first = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": q1}))
        answer1 = await chat_answer(fake, first)
        await turn_of(services, answer1.id, fake.guild_id)
        second = await fake.send_user_message(q2, reply_to=answer1)
        answer2, _ = await bot_reply(fake, services, second)
        third = await fake.send_user_message(q3, reply_to=answer2)
        await bot_reply(fake, services, third)
    assert "history" not in text.params[0]
    assert text.params[1]["history"] == [{"role": "user", "content": q1}, {"role": "assistant", "content": q1 + ":1"}]
    # The third prompt no longer fits the whole chain: the oldest exchange goes, the newest stays.
    history = text.params[2]["history"]
    assert history == [{"role": "user", "content": q2}, {"role": "assistant", "content": q2 + ":1"}]
    used = sum(estimate_tokens(t["content"]) + PER_TURN_TOKENS for t in history)
    fixed = estimate_tokens(services.settings.system_prompt) + estimate_tokens(q3) + 3 * PER_TURN_TOKENS
    assert used + fixed <= 2048 - 256  # the context less the answer's room
    assert used + fixed + estimate_tokens(q1 + ":1") + PER_TURN_TOKENS > 2048 - 256  # one more would not fit


@pytest.mark.asyncio
async def test_a_reply_streams_into_one_message_edited_at_most_once_a_second(fake_discord: FakeDiscord,
                                                                            make_bot: Any) -> None:
    fake = fake_discord
    text = RecordingGenerator()
    bot, services = await make_bot({"text": text})
    async with running_client(bot, fake):
        first = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "start"}))
        answer = await chat_answer(fake, first)
        await turn_of(services, answer.id, fake.guild_id)
        text.steps, text.step_s = 25, 0.1  # ~2.5 s of "tokens"
        since = len(fake.requests)
        follow_up = await fake.send_user_message("go on", reply_to=answer)
        reply, turn = await bot_reply(fake, services, follow_up)
    assert reply.content == turn.content == "go on:25"
    posts = [r for r in fake.requests[since:] if r.method == "POST" and r.path.endswith("/messages")]
    assert len(posts) == 1 and str(posts[0].json["message_reference"]["message_id"]) == follow_up.id
    assert posts[0].json["allowed_mentions"]["parse"] == []  # no pings from the bot's answer
    edits = [r for r in fake.requests[since:] if r.method == "PATCH" and r.path.endswith(f"/messages/{reply.id}")]
    streamed = [h["content"] for h in reply.history if h["content"].startswith("go on:")]
    assert len(streamed) >= 1 and len(edits) >= 2  # streamed as it grew, then the final edit
    times = [posts[0].time] + [e.time for e in edits]
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.95


@pytest.mark.asyncio
async def test_blocked_reply_is_refused_briefly_logged_and_never_generated(fake_discord: FakeDiscord,
                                                                          make_bot: Any) -> None:
    fake = fake_discord
    text = RecordingGenerator()
    bot, services = await make_bot({"text": text})
    modlog = fake.add_channel(fake.guild_id, "mod-log")
    async with running_client(bot, fake):
        await command(fake, "config set", {"key": "modlog_channel", "value": f"<#{modlog['id']}>"},
                      user=fake.moderator)
        await command(fake, "blocklist add", {"pattern": "zorblax"}, user=fake.moderator)
        first = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "hello"}))
        answer = await chat_answer(fake, first)
        await turn_of(services, answer.id, fake.guild_id)
        bad = await fake.send_user_message("tell me about ZORBLAX", reply_to=answer)
        refusal = await fake.wait_until(lambda: next(
            (m for m in fake.messages() if (m.data.get("message_reference") or {}).get("message_id") == bad.id), None))
        [note] = await fake.wait_until(lambda: fake.messages(modlog["id"]))
        # A reply without the ping arrives without its text (no Message Content intent): a hint, no job.
        silent = await fake.send_user_message("and more?", reply_to=answer, mention_author=False)
        hint = await fake.wait_until(lambda: next(
            (m for m in fake.messages() if (m.data.get("message_reference") or {}).get("message_id") == silent.id),
            None))
    assert refusal.content.startswith("🚫 Request refused")
    assert "zorblax" not in refusal.content.lower()  # which entry matched stays private
    assert text.calls == [["hello"]]  # neither the blocked reply nor the unreadable one was generated
    assert f"<@{fake.member['user']['id']}>" in note.content and "/chat prompt" in note.content
    assert "@mention" in hint.content
    assert await services.adb.run(services.conversations.get, bad.id, fake.guild_id) is None


@pytest.mark.asyncio
async def test_with_the_message_content_intent_any_reply_continues(fake_discord: FakeDiscord,
                                                                   make_bot: Any) -> None:
    fake = fake_discord
    text = RecordingGenerator()
    bot, services = await make_bot({"text": text}, discord_message_content=True)
    async with running_client(bot, fake):
        session = await fake.wait_for_session()
        first = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "hello"}))
        answer = await chat_answer(fake, first)
        await turn_of(services, answer.id, fake.guild_id)
        quiet = await fake.send_user_message("quietly", reply_to=answer, mention_author=False)
        reply, _ = await bot_reply(fake, services, quiet)
    assert session.has_intent(1 << 15)
    assert reply.content == "quietly:1"
    assert text.params[1]["history"] == [{"role": "user", "content": "hello"},
                                         {"role": "assistant", "content": "hello:1"}]


@pytest.mark.asyncio
async def test_persona_and_reasoning_follow_the_conversation(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    text = ThinkingGenerator()
    bot, services = await make_bot({"text": text})
    async with running_client(bot, fake):
        await command(fake, "persona add", {"name": "pirate", "system_prompt": "Talk like a pirate.",
                                            "sampling": "temperature=0.3"}, user=fake.moderator)
        await command(fake, "config set", {"key": "attach_reasoning", "value": "true"}, user=fake.moderator)
        first = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "ahoy", "persona": "pirate"}))
        answer = await chat_answer(fake, first)
        await turn_of(services, answer.id, fake.guild_id)
        follow_up = await fake.send_user_message("where is the treasure?", reply_to=answer)
        reply, turn = await bot_reply(fake, services, follow_up)
        unknown = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "hi", "persona": "ninja"}))
        refusal = await reply_text(fake, unknown)
    assert answer.content == "Answer to ahoy."
    [reasoning] = [a for a in answer.attachments if a.filename == "reasoning.txt"]
    assert reasoning.data == b"pondering ahoy"
    assert turn.content == "Answer to where is the treasure?." and "reasoning.txt" in [a.filename for a in
                                                                                       reply.attachments]
    # The reply used the persona the conversation started with, and never saw the reasoning.
    assert [p["system_prompt"] for p in text.params] == ["Talk like a pirate."] * 2
    assert text.params[1]["temperature"] == 0.3
    assert text.params[1]["history"] == [{"role": "user", "content": "ahoy"},
                                         {"role": "assistant", "content": "Answer to ahoy."}]
    assert "no persona named 'ninja'" in refusal


@pytest.mark.asyncio
async def test_a_regenerated_answer_is_checked_like_chat_and_continues_the_same_conversation(
        fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    text = ThinkingGenerator()
    bot, services = await make_bot({"text": text})
    async with running_client(bot, fake):
        first = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "ahoy"}))
        answer = await chat_answer(fake, first)
        first_turn = await turn_of(services, answer.id, fake.guild_id)
        again = await fake.dispatch_interaction(fake.component_click("aigc:regen:1", message=answer))
        regenerated = await chat_answer(fake, again)
        turn = await turn_of(services, regenerated.id, fake.guild_id)
        follow_up = await fake.send_user_message("more", reply_to=regenerated)
        await bot_reply(fake, services, follow_up)
    assert regenerated.content == "Answer to ahoy." and not regenerated.attachments  # reasoning stripped
    assert (turn.role, turn.parent_message_id, turn.job_id) == ("assistant", str(first.id), 2)
    assert turn.conversation_id == first_turn.conversation_id  # another answer to the same prompt
    assert text.params[2]["history"] == [{"role": "user", "content": "ahoy"},
                                         {"role": "assistant", "content": "Answer to ahoy."}]
