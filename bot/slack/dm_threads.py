"""The conversations (threads) of each DM with the bot, so that /reset in the DM forgets them all.

Slack sends no slash command from inside a thread, so /reset in a DM stands for all of its
threads. They are kept in a sorted set by last message; a thread quiet for longer than its
history lasts has nothing left to forget and is dropped, so an active user's set stays the
size of the threads they used lately.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from contract import history, keys
from contract.jobs import Conversation


class DmThreads:
    def __init__(self, redis: Redis, keep_s: int):
        self.redis = redis
        self.keep_s = keep_s  # history.ttl_seconds

    async def remember(self, conversation: Conversation) -> None:
        key, now = keys.slack_dm_threads(conversation.channel), time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {conversation.key: now})
            pipe.zremrangebyscore(key, "-inf", now - self.keep_s)
            pipe.expire(key, self.keep_s)
            await pipe.execute()

    async def forget_all(self, channel: str) -> int:
        """Reset every thread of the DM; returns how many."""
        key = keys.slack_dm_threads(channel)
        conversations = await self.redis.zrange(key, 0, -1)
        for conversation in conversations:
            await history.reset(self.redis, conversation)
            await self.redis.zrem(key, conversation)
        return len(conversations)
