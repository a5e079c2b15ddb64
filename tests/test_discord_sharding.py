"""Discord sharding: adapter processes splitting the gateway shards of one bot, against the fake
Discord (which routes each server's events to its shard, DMs to shard 0), with a real worker and Redis.
Also the mode without the Message Content intent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.discord.app import NO_MESSAGE_CONTENT
from bot.discord.commands import RESET_DONE
from contract import history, keys
from contract.replies import REPLY_SHARDS, shard_of
from service.discord_settings import DiscordSettings
from tests import test_discord
from tests.conftest import running_worker, started, tiny_settings
from tests.fakes.chatbot_against_fakes import COMMAND as CHATBOT_AGAINST_FAKES
from tests.fakes.discord_server import (
    ADMIN,
    ALICE,
    APPLICATION_ID,
    BOB,
    BOT,
    CAROL,
    DAVE,
    DM_CHANNEL,
    GENERAL,
    GUILD_ID,
    BotMessage,
    FakeDiscord,
)
from tests.fakes.discord_server import shard_of as gateway_shard_of
from tests.test_controls import slow_engine
from tests.test_discord import TOKEN, adapter, ephemeral_answer, jobs_for, say, settle

pytestmark = pytest.mark.timeout(180)
fake = test_discord.fake  # the fake Discord, with discord.py pointed at it (for adapters in this process)

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 4
SPACING_S = 0.5  # identify_spacing_s in these tests (Discord's is 5 s)
LEASE_S = 2.0  # queue.adapter_lease_s: a killed process's reply shards are taken over after this
TYPING_REPEAT_S = 5  # discord.py sends the typing indicator again this often while it lasts
MESSAGE_CONTENT = 1 << 15  # the intent's bit in IDENTIFY's `intents`
AUTHORS = (ALICE, BOB, ADMIN, CAROL, DAVE)  # one message each: under limits.max_queued_per_author


ADAPTER = (*CHATBOT_AGAINST_FAKES, "discord")


def adapter_process(
    redis_url: str, run_dir: Path, fake: FakeDiscord, shard_ids: list[int], lease_s: float = LEASE_S
) -> subprocess.Popen:
    name = "shards-" + "-".join(map(str, shard_ids))
    environ = {
        **os.environ,
        "REDIS_URL": redis_url,
        "CHATBOT_CONFIG": str(run_dir / "none.yaml"),
        "CHATBOT__RUN_DIR": str(run_dir),
        "DISCORD_TOKEN": TOKEN,
        "FAKE_DISCORD": fake.cdn_base,
        "CHATBOT__DISCORD__SHARD_COUNT": str(SHARDS),
        "CHATBOT__DISCORD__SHARD_IDS": str(shard_ids),
        "CHATBOT__DISCORD__IDENTIFY_SPACING_S": str(SPACING_S),
        "CHATBOT__QUEUE__ADAPTER_LEASE_S": str(lease_s),
        # A test may send many messages as one person.
        "CHATBOT__LIMITS__MAX_QUEUED_PER_AUTHOR": "1000",
        "CHATBOT__LIMITS__MESSAGES_PER_MINUTE_PER_AUTHOR": "1000",
        "CHATBOT__DISCORD__QUEUE_NOTICE_THRESHOLD": "1000",  # no notice replies: a question's one reply is its answer
    }
    return started([sys.executable, *ADAPTER], environ, run_dir / f"{name}.log", cwd=ROOT)


@contextlib.asynccontextmanager
async def two_adapter_processes(redis, redis_url: str, run_dir: Path, fake: FakeDiscord, lease_s: float = LEASE_S):
    """Processes running shards [0, 1] and [2, 3] of four, once all four shards are connected and
    both processes hold reply shards; both killed when the block ends."""
    processes = [adapter_process(redis_url, run_dir, fake, shards, lease_s) for shards in ([0, 1], [2, 3])]
    try:
        deadline = time.monotonic() + 60
        while not (
            {identify.shard for identify in fake.identifies} == {(shard, SHARDS) for shard in range(SHARDS)}
            and {process.pid for process in processes} == set((await reply_holders(redis)).values())
        ):
            for process in processes:
                assert process.poll() is None, f"an adapter exited with {process.returncode}; see the logs in {run_dir}"
            assert time.monotonic() < deadline, f"the adapters did not start; see the logs in {run_dir}"
            await asyncio.sleep(0.05)
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait(10)


async def reply_holders(redis) -> dict[int, int]:
    """Reply shard -> the pid of the adapter process holding it (its identity holds its pid)."""
    holders = {}
    for shard in range(REPLY_SHARDS):
        holder = await redis.get(keys.reply_shard("discord", shard))
        if holder and not holder.startswith("vacant:") and holder != "released":  # held by a process
            holders[shard] = int(holder.split("-")[-2])
    return holders


def servers_on_every_shard(fake: FakeDiscord) -> dict[int, int]:
    """Gateway shard -> a channel of a server on it: the test guild is on shard 0, one more server per other shard."""
    return {0: GENERAL, **{shard: fake.add_guild(shard, SHARDS)[1] for shard in range(1, SHARDS)}}


async def answer_shown(redis, fake: FakeDiscord, channel_id: int, question: int, timeout: float = 60) -> list[BotMessage]:
    """The bot's messages answering `question` once they show the answer its conversation's history holds
    (the reply stream is trimmed once delivered, the history stays)."""
    deadline = time.monotonic() + timeout
    while not (exchanges := await history.load_exchanges(redis, f"discord:{channel_id}")):
        assert time.monotonic() < deadline, f"no answer to {question} in the history"
        await asyncio.sleep(0.05)
    wanted = exchanges[-1].assistant.text.split()
    while " ".join(m.text for m in fake.replies_to(question)).split() != wanted:
        messages = fake.replies_to(question)
        assert time.monotonic() < deadline, f"the answer to {question} shows {[m.text for m in messages]}, not {wanted}"
        await asyncio.sleep(0.05)
    return fake.replies_to(question)


def posts_answering(fake: FakeDiscord, question: int) -> list[BotMessage]:
    return [message for message in fake.bot_messages.values() if message.reply_to == question]


async def test_two_processes_split_four_shards_and_answer_every_server_and_dm_once(redis, redis_server, fake, tiny_engine, tmp_path):
    fake.max_concurrency = 2  # buckets: shards 0 and 2, shards 1 and 3
    channels = servers_on_every_shard(fake)
    settings = tiny_settings()
    async with two_adapter_processes(redis, redis_server.url, tmp_path, fake), running_worker(redis, tiny_engine, settings):
        # Each shard identified once, asking for Message Content by default; a bucket's identifies,
        # from both processes, at least the spacing apart.
        assert sorted(identify.shard for identify in fake.identifies) == [(shard, SHARDS) for shard in range(SHARDS)]
        assert all(identify.intents & MESSAGE_CONTENT for identify in fake.identifies)
        for bucket in range(fake.max_concurrency):
            times = sorted(i.at for i in fake.identifies if i.shard[0] % fake.max_concurrency == bucket)
            assert all(later - earlier >= SPACING_S * 0.9 for earlier, later in zip(times, times[1:])), times
        # The commands are published by the process running shard 0 only.
        assert len(fake.requests("PUT", f"/applications/{APPLICATION_ID}/commands")) == 1

        asked = {channel: await say(fake, f"Hello from shard {shard}", author=AUTHORS[shard], channel_id=channel)
                 for shard, channel in channels.items()}
        asked[DM_CHANNEL] = await say(fake, "Hello in a DM", author=AUTHORS[SHARDS], channel_id=DM_CHANNEL)
        for channel, question in asked.items():
            await answer_shown(redis, fake, channel, question)
        assert all(len(posts_answering(fake, question)) == 1 for question in asked.values())

        # /reset in a server of the other process's shards is answered there, once.
        reset = fake.interaction("reset", user=ALICE, channel_id=channels[3])
        await fake.dispatch("INTERACTION_CREATE", reset)
        [callback] = await fake.wait_for(lambda: fake.requests("POST", f"/interactions/{reset['id']}/"))
        assert ephemeral_answer(callback) == RESET_DONE
        assert await history.load_exchanges(redis, f"discord:{channels[3]}") == []

        # Typing stops once the answer shows, also where another process delivered it: no
        # indicator is sent again after discord.py's repeat interval.
        await asyncio.sleep(TYPING_REPEAT_S + 1)
        for channel in asked:
            assert len(fake.requests("POST", f"/channels/{channel}/typing")) == 1, channel


async def test_a_killed_process_leaves_its_replies_to_the_other_within_the_lease(redis, redis_server, fake, tiny_model, tmp_path):
    fake.max_concurrency = 1
    channels = servers_on_every_shard(fake)
    # Answers that stream for seconds (the slow engine): long enough to kill a process mid-way.
    settings = tiny_settings(model={"batch_size": SHARDS, "max_prompt_tokens": 100}, generation={"max_new_tokens": 300})
    async with two_adapter_processes(redis, redis_server.url, tmp_path, fake) as processes:
        identified = sorted(identify.at for identify in fake.identifies)  # one bucket: all four spaced
        assert all(later - earlier >= SPACING_S * 0.9 for earlier, later in zip(identified, identified[1:])), identified
        async with running_worker(redis, slow_engine(tiny_model, settings), settings):
            asked = {channel: await say(fake, "Write a long answer.", author=AUTHORS[shard], channel_id=channel)
                     for shard, channel in channels.items()}
            # Every answer shown; killed: the process delivering most of those still streaming (with a Stop button).
            await fake.wait_for(lambda: all(fake.replies_to(question) for question in asked.values()))
            holders = await reply_holders(redis)
            streaming = {channel: holders[shard_of(f"discord:{channel}")] for channel, question in asked.items()
                         if fake.replies_to(question)[-1].button("stop:")}
            victim = max(processes, key=lambda process: list(streaming.values()).count(process.pid))
            orphaned = [channel for channel, pid in streaming.items() if pid == victim.pid]
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            victim.wait(10)

            # Its replies go on, edited by the other process, once its reply shards' leases lapse.
            resumed = await fake.wait_for(
                lambda: all(fake.replies_to(asked[c])[-1].times[-1] > killed_at for c in orphaned) and time.monotonic(),
                timeout=LEASE_S + 10,
            )
            assert resumed - killed_at < LEASE_S + 5
            for channel, question in asked.items():
                await answer_shown(redis, fake, channel, question)
    # Continued in the messages already posted: each question answered by one reply, never posted twice.
    assert all(len(posts_answering(fake, question)) == 1 for question in asked.values())
    assert orphaned


async def test_after_redis_lost_its_data_every_message_sent_since_is_answered_and_none_twice(
    redis, redis_server, fake, tiny_engine, tmp_path
):
    """Issue 22, item 5: two adapter processes and a worker running, Redis's data lost (FLUSHALL, as a restart
    without its data or a failover to an empty replica) while answers stream. Before (defect 10), both
    processes took the shards whose leases were gone, and posted replies twice."""
    channels = servers_on_every_shard(fake)
    settings = tiny_settings(model={"batch_size": SHARDS, "max_prompt_tokens": 100}, generation={"max_new_tokens": 16})
    lease_s = 9.0  # rounds 3 s apart: after the loss, each process goes on believing in its leases for that long
    async with (
        two_adapter_processes(redis, redis_server.url, tmp_path, fake, lease_s),
        running_worker(redis, tiny_engine, settings),
    ):
        before = {channel: await say(fake, "Hello.", author=AUTHORS[shard], channel_id=channel)
                  for shard, channel in channels.items()}
        await fake.wait_for(lambda: all(fake.replies_to(question) for question in before.values()))
        await redis.flushall()
        after = []  # a question to each server every 0.3 s for 4.5 s
        for _ in range(15):
            after += [await say(fake, "And now?", channel_id=channel) for channel in channels.values()]
            await asyncio.sleep(0.3)
        deadline = time.monotonic() + 120
        # Answered by the worker (no adapter refused the message), and shown.
        while unanswered := [question for question in after if not await redis.exists(keys.done(f"discord:{question}"))]:
            assert time.monotonic() < deadline, f"{unanswered} not answered"
            await asyncio.sleep(0.05)
        await fake.wait_for(lambda: all(posts_answering(fake, question) for question in after), timeout=30)
        await asyncio.sleep(lease_s)  # the shards' hand-overs after the loss are over
    # Each answered once; what was streaming when the data went may stop where it was, but is never doubled.
    assert [question for question in after if len(posts_answering(fake, question)) != 1] == []
    assert all(len(posts_answering(fake, question)) <= 1 for question in before.values())


async def test_one_process_without_a_shard_count_runs_the_count_discord_recommends(redis, fake):
    fake.recommended_shards = 2
    _, other_channel = fake.add_guild(1, 2)
    settings = test_discord.discord_settings(guilds=[], channels=[], identify_spacing_s=SPACING_S)
    async with adapter(redis, fake, settings):
        await fake.wait_for(lambda: len(fake.identifies) == 2)
        assert sorted(identify.shard for identify in fake.identifies) == [(0, 2), (1, 2)]
        first = await say(fake, "On shard 0")
        second = await say(fake, "On shard 1", channel_id=other_channel, author=BOB)
        await jobs_for(redis, first, second)
    assert gateway_shard_of(GUILD_ID, 2) == 0 and gateway_shard_of(fake.guild_of[other_channel], 2) == 1


async def test_without_message_content_it_answers_mentions_and_dms_only_and_says_so(redis, fake, caplog):
    settings = test_discord.discord_settings(message_content=False)
    with caplog.at_level(logging.WARNING, logger="bot.discord.app"):
        async with adapter(redis, fake, settings):
            [identify] = fake.identifies
            assert not identify.intents & MESSAGE_CONTENT and identify.intents & (1 << 9)  # guild messages still
            plain = await say(fake, "Anyone there?")
            dm = await say(fake, "Hello in a DM", channel_id=DM_CHANNEL, author=BOB)
            mention = fake.message(f"<@{BOT.id}> Hello bot", mentions=(BOT,))
            jobs = await settle(fake, redis, mention)
    assert f"discord:{dm}" in jobs and f"discord:{plain}" not in jobs
    assert jobs[f"discord:{mention['id']}"].text == "Hello bot"
    assert [record.message for record in caplog.records].count(NO_MESSAGE_CONTENT) == 1


@pytest.mark.parametrize(
    ("wanted", "error"),
    [
        ({"shard_ids": [0]}, "shard_ids needs shard_count"),
        ({"shard_count": 2, "shard_ids": [1, 2]}, r"shard_ids \[2\] are not below shard_count \(2\)"),
        ({"shard_count": 4, "shard_ids": [1, 1]}, "shard_ids lists a shard twice"),
        ({"shard_count": 4, "shard_ids": []}, "at least 1 item"),
    ],
)
def test_shard_settings_must_fit_together(wanted, error):
    with pytest.raises(ValidationError, match=error):
        DiscordSettings(**wanted)
    assert DiscordSettings(shard_count=4, shard_ids=[3, 0]).shard_ids == [3, 0]

