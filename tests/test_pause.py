"""Pausing: new messages refused with one sentence, running answers finish, queued ones wait for the resume."""

from __future__ import annotations

import asyncio

import pytest

from contract import keys
from contract.jobs import Conversation, RejectedMessage
from contract.pause import PAUSED, pause, paused, resume
from tests.conftest import Queues, final_event, reply_events, running_worker, tiny_settings
from tests.test_cli import chatbot

ANN = Conversation(platform="local", channel="ann")
BOB = Conversation(platform="local", channel="bob")


async def test_a_pause_refuses_new_messages_and_starts_nothing_until_the_resume(redis, tiny_model):
    from tests.conftest import engine_for

    settings = tiny_settings(model={"batch_size": 1}, generation={"max_new_tokens": 200})
    queue = Queues(redis)
    async with running_worker(redis, engine_for(tiny_model, settings), settings):
        await queue.submit(ANN, "a1", "Write a long answer.")
        await queue.submit(BOB, "b1", "Queued before the pause.")
        while not await reply_events(redis, "local", "local:a1"):  # ann's answer is being written
            await asyncio.sleep(0.01)
        await pause(redis, "maintenance until 14:00 UTC")

        with pytest.raises(RejectedMessage) as refused:
            await queue.submit(ANN, "a2", "Hello?")
        assert str(refused.value) == f"{PAUSED} (maintenance until 14:00 UTC)"
        assert not await redis.exists(keys.job("local:a2"))  # nothing queued

        assert (await final_event(redis, "local", "local:a1")).kind == "final"  # the running answer finished
        await asyncio.sleep(1.5)  # idle turns of the worker: bob's message waits
        assert not await reply_events(redis, "local", "local:b1") and await redis.lrange(keys.ready("default"), 0, -1) == [BOB.key]

        assert await resume(redis) and not await resume(redis)
        assert (await final_event(redis, "local", "local:b1")).kind == "final"
        assert (await queue.submit(ANN, "a3", "Back?")).ahead >= 0


async def test_chatbot_pause_and_resume(redis, redis_server, tmp_path):
    code, out, err = await chatbot(redis_server.url, tmp_path, "pause", "maintenance")
    assert code == 0 and out.startswith("paused:"), err
    assert await paused(redis) == "maintenance"
    code, _, err = await chatbot(redis_server.url, tmp_path, "ask", "--timeout", "5", "anyone?")
    assert code == 1 and f"{PAUSED} (maintenance)" in err
    code, out, _ = await chatbot(redis_server.url, tmp_path, "resume")
    assert code == 0 and out.startswith("resumed") and await paused(redis) is None
