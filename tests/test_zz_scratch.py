import pytest
from tests.test_scenarios import *  # noqa
from tests.test_scenarios import open_bot, kind  # noqa

@pytest.mark.asyncio
async def test_explore(open_bot, kind):
    text = RecordingGenerator()
    async with open_bot({"text": text, "training": ScriptedGenerator(kind="training")}) as bot:
        fake = bot.fake
        news = fake.add_channel(fake.guild_id, "news")
        add = {"channel": news["id"], "when": "hourly", "kind": "text", "prompt": "News for {server} in #{channel}"}
        steps = [("schedule add", add), ("schedule list", {}), ("schedule pause", {"id": 1}),
                 ("schedule resume", {"id": 1}), ("schedule run", {"id": 1}), ("schedule remove", {"id": 1}),
                 ("retrain", {}), ("model versions", {}), ("model rollback", {}), ("community channel remove", {}), ("community channel list", {})]
        for name, options in steps:
            for user in ("moderator",):
                o = await bot.run(name, options, user)
                print(kind, user, name, o.normalized())
        print(text.calls, [m.content for m in fake.messages(news["id"])])
