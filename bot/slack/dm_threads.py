"""The conversations (threads) of each DM with the bot, so that /reset in the DM forgets them all.

Slack sends no slash command from inside a thread, so /reset in a DM stands for all of its
threads. They are kept in a sorted set by last message; a thread quiet for longer than what
it leaves in Redis lasts (its history, the copies of its rated answers) has nothing left to
forget and is dropped, so an active user's set stays the size of the threads they used lately.
A reset thread stays listed: forgetting it again is harmless, and dropping it could drop a
message that arrived during the reset.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from contract import history, keys
from contract.jobs import Conversation


class DmThreads:
    def __init__(self, redis: Redis, keep_s: int):
        self.redis = redis
        self.keep_s = keep_s  # as long as a thread leaves anything to forget

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
        return len(conversations)
