"""Model pools: channels routed to named pools, each served by its own workers and model, through real workers and Redis."""

from __future__ import annotations

import asyncio

import pytest

from contract import keys
from contract.intake import Intake
from contract.jobs import Conversation, Scope
from contract.pause import pause, resume
from contract.pools import NO_WORKER, answer_unserved, keep_answering_unserved
from contract.work import WorkQueue
from engine.serving.transformers_engine import TransformersEngine
from service.config import PoolSettings
from tests.conftest import final_event, reply_events, running_worker, tiny_settings
from tests.test_discord import fake as discord_fake
from tests.test_personas import recording_engine
from tests.test_slack import fake as slack_fake

__all__ = ["discord_fake", "slack_fake"]  # the platforms' fake-server fixtures

ROUTES = [
    {"platform": "discord", "workspace": "g1", "pool": "big"},
    {"platform": "discord", "channel": "c2", "pool": "tiny"},  # a channel's route beats its workspace's
    {"platform": "local", "channel": "tiny-room", "pool": "tiny"},
]


def pool_settings(serve: str | None = None, **sections):
    return tiny_settings(pools={"default": "small", "routes": ROUTES, "serve": serve, "absent_after_s": 4}, **sections)


async def pool_of(redis, job_id: str) -> str:
    """The pool a job was queued for, once it is queued."""
    while (pool := await redis.hget(keys.job(job_id), "pool")) is None:
        await asyncio.sleep(0.02)
    return pool


async def test_each_message_is_queued_for_the_pool_of_its_channel_or_workspace(redis):
    intake = Intake(redis, pool_settings().limits, pool_settings().pools)
    places = {
        "big": Scope(platform="discord", workspace="g1", channel="c1"),
        "tiny": Scope(platform="discord", workspace="g1", channel="c2"),
        "small": Scope(platform="discord", workspace="g2", channel="c3"),
    }
    for pool, scope in places.items():
        submitted = await intake.submit(Conversation(platform="discord", channel=scope.channel), f"m-{pool}", "Hi", scope=scope)
        assert await redis.hget(keys.job(submitted.job_id), "pool") == pool
        assert await redis.lrange(keys.ready(pool), 0, -1) == [f"discord:{scope.channel}"]
        assert submitted.ahead == 0  # counted within its own pool


def test_a_worker_serves_a_pool_some_message_can_reach():
    assert pool_settings(serve="tiny").pools.served == "tiny" and pool_settings().pools.served == "small"
    with pytest.raises(Exception, match="no message reaches pool 'nowhere'"):
        pool_settings(serve="nowhere")
    with pytest.raises(Exception, match="absent_after_s"):
        tiny_settings(pools={"absent_after_s": 1})  # below the visibility timeout: a live pool would look absent
    assert PoolSettings(routes=ROUTES).names == ["default", "big", "tiny"]


async def test_two_pools_with_two_models_and_one_stopped(redis, tiny_model):
    """Two channels, each answered by its own pool's model; with one pool's worker stopped, its channel is told
    so after the wait, and the other pool goes on answering."""
    small_settings = pool_settings(model={"id": "embedded:smollm2", "dtype": "float32"})
    small = recording_engine(TransformersEngine.load(small_settings.model, small_settings.generation), small_settings)
    tiny_pool = pool_settings(serve="tiny")
    tiny = recording_engine(tiny_model, tiny_pool)
    intake = Intake(redis, small_settings.limits, small_settings.pools)
    tiny_room, lobby = Conversation(platform="local", channel="tiny-room"), Conversation(platform="local", channel="lobby")

    async with running_worker(redis, small, small_settings, owner="small-worker"):
        async with running_worker(redis, tiny, tiny_pool, owner="tiny-worker"):
            await intake.submit(tiny_room, "t1", "Which model are you?")
            await intake.submit(lobby, "l1", "And you?")
            assert (await final_event(redis, "local", "local:t1")).kind == "final"
            assert (await final_event(redis, "local", "local:l1")).kind == "final"
        # Each model was given only its own channel's prompt, in its own chat template.
        assert [tiny.tokenizer.decode(p).count("Which model are you?") for p in tiny.prompts] == [1]
        assert "And you?" not in tiny.tokenizer.decode(tiny.prompts[0])
        assert [small.tokenizer.decode(p).count("And you?") for p in small.prompts] == [1]
        assert "<|im_start|>" in small.tokenizer.decode(small.prompts[0])  # SmolLM2's template, not Llama-2's

        # The tiny pool's worker is gone: its channel waits, then hears why; the lobby is answered meanwhile.
        await intake.submit(tiny_room, "t2", "Still there?")
        await intake.submit(lobby, "l2", "Still there?")
        assert (await final_event(redis, "local", "local:l2", timeout=30)).kind == "final"
        told = await final_event(redis, "local", "local:t2", timeout=30)
        assert (told.kind, told.text) == ("error", NO_WORKER)
    assert len(tiny.prompts) == 1 and len(small.prompts) == 2


async def test_an_adapter_tells_people_when_no_worker_of_any_pool_is_alive(redis):
    settings = pool_settings()
    submitted = await Intake(redis, settings.limits, settings.pools).submit(
        Conversation(platform="local", channel="lobby"), "m1", "Anyone?"
    )
    sweeping = asyncio.create_task(keep_answering_unserved(redis, settings, "adapter-1"))
    try:
        await asyncio.sleep(1)
        assert not await redis.exists(keys.done(submitted.job_id))  # not before the wait is over
        told = await final_event(redis, "local", submitted.job_id, timeout=15)
        assert (told.kind, told.text) == ("error", NO_WORKER)
        assert not await redis.llen(keys.ready("small")) and not await redis.exists(keys.job(submitted.job_id))
    finally:
        sweeping.cancel()


async def test_a_discord_guild_routed_to_a_pool_without_workers_hears_why(redis, discord_fake):
    """Through the real Discord adapter: its sweep tells the channel once the message has waited its pool's wait."""
    from tests.fakes.discord_server import GUILD_ID
    from tests.test_discord import adapter, say, shown_answer

    settings = tiny_settings(
        discord={"guilds": [GUILD_ID]},
        pools={"routes": [{"platform": "discord", "workspace": str(GUILD_ID), "pool": "inf2"}], "absent_after_s": 4},
    )
    async with adapter(redis, discord_fake, settings):
        message_id = await say(discord_fake, "Anyone serving here?")
        queued_in = await asyncio.wait_for(pool_of(redis, f"discord:{message_id}"), 10)
        await shown_answer(discord_fake, message_id, NO_WORKER)
    assert queued_in == "inf2"


async def test_a_slack_channel_routed_to_a_pool_without_workers_hears_why(redis, slack_fake):
    from tests.test_slack import DM, adapter, answer_shown, send_dm, slack_settings

    settings = slack_settings().model_copy(
        update={"pools": PoolSettings(routes=[{"platform": "slack", "channel": DM, "pool": "inf2"}], absent_after_s=4)}
    )
    async with adapter(slack_fake, redis, settings):
        sent = await send_dm(slack_fake, "Anyone serving here?")
        assert await redis.hget(keys.job(sent.job_id), "pool") == "inf2"
        assert (await answer_shown(slack_fake, redis, sent.job_id, before=0)).text == NO_WORKER


async def test_while_paused_messages_wait_for_the_resume_however_long_the_workers_are_away(redis):
    """Before: a maintenance pause longer than absent_after_s answered the queued messages "no model is serving"."""
    settings = pool_settings()
    intake = Intake(redis, settings.limits, settings.pools)
    submitted = await intake.submit(Conversation(platform="local", channel="lobby"), "m1", "Anyone?")
    await pause(redis, "maintenance")
    queue = WorkQueue(redis, 4.0)
    assert await answer_unserved(queue, "adapter-1", settings.pools.model_copy(update={"absent_after_s": 0})) == []
    assert await redis.lrange(keys.ready("small"), 0, -1) == ["local:lobby"]
    await resume(redis)
    [told] = await answer_unserved(queue, "adapter-1", settings.pools.model_copy(update={"absent_after_s": 0}))
    assert told.id == submitted.job_id


async def test_a_sweep_that_dies_between_taking_and_telling_strands_nothing(redis):
    """Before: the job stayed leased to the dead sweeper for ever, since only the pool's (absent) workers
    return expired leases."""
    settings = pool_settings()
    submitted = await Intake(redis, settings.limits, settings.pools).submit(
        Conversation(platform="local", channel="lobby"), "m1", "Anyone?"
    )
    queue = WorkQueue(redis, visibility_timeout_s=0.5)
    [taken] = await queue.claim_unserved("adapter-1", ["small"], absent_after_s=0)  # then adapter-1 is killed
    assert taken.id == submitted.job_id
    assert await queue.claim_unserved("adapter-2", ["small"], absent_after_s=0) == []  # still adapter-1's
    await asyncio.sleep(0.6)
    [again] = await answer_unserved(queue, "adapter-2", settings.pools.model_copy(update={"absent_after_s": 0}))
    assert again.id == submitted.job_id
    assert [e.kind for e in await reply_events(redis, "local", submitted.job_id)] == ["error"]


async def test_messages_queued_for_a_pool_removed_from_config_are_told_and_the_conversation_goes_on(redis, tiny_engine):
    """Before: no worker may serve an unconfigured pool and the sweep visited configured pools only, so the
    conversation was wedged for ever behind its old job."""
    before = pool_settings()
    lobby = Conversation(platform="local", channel="tiny-room")
    stranded = await Intake(redis, before.limits, before.pools).submit(lobby, "m1", "Anyone?")
    assert await redis.hget(keys.job(stranded.job_id), "pool") == "tiny"
    after = tiny_settings(pools={"absent_after_s": 4})  # the operator dropped the pools: one default pool
    follow_up = await Intake(redis, after.limits, after.pools).submit(lobby, "m2", "Hello?")
    async with running_worker(redis, tiny_engine, after):
        told = await final_event(redis, "local", stranded.job_id, timeout=30)
        assert (told.kind, told.text) == ("error", NO_WORKER)
        assert (await final_event(redis, "local", follow_up.job_id, timeout=30)).kind == "final"
