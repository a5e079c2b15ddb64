"""The version of what the service keeps in Redis, so that a process never works on data it cannot read.

`schema` holds the version the data was written in. A long-running process (worker, adapter)
checks it before it starts: on an empty Redis it writes its own; on data it reads, it goes on;
otherwise it refuses to start, with one line saying what to do. README ("Upgrades") lists which
upgrades can roll (old and new processes side by side) and which need a drain.

Versions: 1, before pools (one queue: `ready`, `leases`, `queued`; no `schema` key);
2, pools (a queue per pool: `pool:<p>:*`).
"""

from __future__ import annotations

from redis.asyncio import Redis

from contract import keys
from service.config import ConfigError

SCHEMA_VERSION = 2
READABLE = frozenset({2})
_UNPOOLED_QUEUE = (keys.PREFIX + "ready", keys.PREFIX + "leases", keys.PREFIX + "queued")  # version 1's queue keys


async def check_schema(redis: Redis) -> int:
    """The version of the data in Redis, once it is one this code reads (set on first use); ConfigError otherwise."""
    stored = await redis.get(keys.SCHEMA)
    if stored is None:
        stored = await _first_use(redis)
    if int(stored) not in READABLE:
        raise ConfigError(
            f"Redis holds data of schema version {stored}, which this version of chatbot (schema {SCHEMA_VERSION}) "
            f"cannot read: {_advice(int(stored))}"
        )
    return int(stored)


async def _first_use(redis: Redis) -> str:
    """No version recorded: version 1's data, or a new Redis (or one whose queue drained before its upgrade)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.llen(_UNPOOLED_QUEUE[0])
        pipe.zcard(_UNPOOLED_QUEUE[1])
        pipe.get(_UNPOOLED_QUEUE[2])
        ready, leased, queued = await pipe.execute()
    if ready or leased or int(queued or 0) > 0:
        return "1"
    await redis.delete(*_UNPOOLED_QUEUE)  # a drained version 1 queue: nothing in it to carry over
    await redis.set(keys.SCHEMA, SCHEMA_VERSION, nx=True)
    return await redis.get(keys.SCHEMA)


def _advice(stored: int) -> str:
    if stored < SCHEMA_VERSION:
        return (
            "messages queued by the older version are waiting in its queue. Drain it first: `chatbot pause`, let the "
            "old workers answer what is queued, stop them, then start this version and `chatbot resume`"
        )
    return "it was written by a newer version; run that version (or newer) of chatbot"
