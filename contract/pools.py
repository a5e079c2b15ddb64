"""Pools of workers: each serves one model, and answers the messages of the channels routed to it.

A message's pool is chosen at submission from where it was written (pools.routes, most specific
first, else pools.default) and travels with its job; a worker claims only its own pool's jobs
(contract/work.py), so order within a conversation and fairness across conversations hold in
each pool. A pool whose workers are all gone does not leave people waiting in silence: once a
message has waited `pools.absent_after_s` with no live worker in its pool, whichever process
sweeps next (any worker, any adapter) answers it with one sentence. The sweep visits every pool a
job was ever queued for, so a pool removed from config.yaml with messages still waiting does not
hold their conversations for ever; while the service is paused it tells nobody (the messages wait
for the resume).
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from contract import keys
from contract.jobs import Job, ReplyEvent, Scope, most_specific
from contract.work import WorkQueue
from service.config import PoolSettings, Settings
from service.redis_client import REDIS_FAILED

log = logging.getLogger(__name__)

NO_WORKER = "No model is serving this channel right now. Please try again later."


def pool_for(pools: PoolSettings, scope: Scope | None) -> str:
    found = most_specific(pools.routes, scope)
    return found[0].pool if found else pools.default


async def answer_unserved(queue: WorkQueue, owner: str, pools: PoolSettings) -> list[Job]:
    """Tell the people whose messages waited too long for a pool without workers; returns those jobs."""
    known = sorted(set(pools.names) | await queue.redis.smembers(keys.POOLS))
    jobs = await queue.claim_unserved(owner, known, pools.absent_after_s)
    for job in jobs:
        await queue.complete(job, ReplyEvent.of(job, "error", NO_WORKER))
        log.warning("no worker serves the pool; the user was told", extra={"job": job.id, "pool": job.pool})
    return jobs


async def keep_answering_unserved(redis: Redis, settings: Settings, owner: str) -> None:
    """An adapter's share of the sweep, so that people hear back even when no worker of any pool is alive."""
    pools = settings.pools
    queue = WorkQueue(redis, settings.queue.visibility_timeout_s, settings.queue.reply_stream_maxlen)
    while True:
        try:
            await answer_unserved(queue, owner, pools)
        except REDIS_FAILED as error:
            log.warning("could not look for messages no worker serves", extra={"error": str(error)})
        await asyncio.sleep(min(10.0, pools.absent_after_s / 4))
