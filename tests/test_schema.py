"""The schema version of what the service keeps in Redis: a process never starts on data it cannot read."""

from __future__ import annotations

import pytest

from contract import keys
from contract.schema import SCHEMA_VERSION, check_schema
from service.config import ConfigError
from tests.test_cli import chatbot


async def test_a_new_redis_gets_this_version_and_a_drained_old_queue_is_taken_over(redis):
    assert await check_schema(redis) == SCHEMA_VERSION and await redis.get(keys.SCHEMA) == str(SCHEMA_VERSION)
    await redis.flushdb()
    await redis.set(keys.PREFIX + "queued", 0)  # version 1's counter, its queue empty
    assert await check_schema(redis) == SCHEMA_VERSION and not await redis.exists(keys.PREFIX + "queued")


async def test_version_1_with_queued_messages_is_refused_with_how_to_drain(redis):
    await redis.rpush(keys.PREFIX + "ready", "discord:c1")
    with pytest.raises(ConfigError, match=r"schema version 1.*Drain it first: `chatbot pause`"):
        await check_schema(redis)
    assert not await redis.exists(keys.SCHEMA)


async def test_a_worker_refuses_to_start_on_data_of_a_newer_version(redis, redis_server, tmp_path):
    await redis.set(keys.SCHEMA, SCHEMA_VERSION + 1)
    code, _, err = await chatbot(redis_server.url, tmp_path, "worker")
    assert code == 2
    [line] = err.strip().splitlines()
    assert f"schema version {SCHEMA_VERSION + 1}" in line and "written by a newer version" in line
