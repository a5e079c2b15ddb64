"""Spacing gateway IDENTIFYs across every process of the bot, as Discord requires.

Discord starts at most one session per rate-limit bucket (`shard_id % max_concurrency`) every
5 s, counting all the bot's connections, whichever process or machine makes them. discord.py
spaces the shards of one process only; here a lock in Redis per bucket does it for all of them:
a shard about to IDENTIFY takes its bucket's key with SET NX PX and never releases it, so the
key lapsing is what lets the bucket's next IDENTIFY through.

Key: `discord:identify:<bucket>` (listed with the others in contract/keys.py).
"""

from __future__ import annotations

import asyncio
import logging
import random

from redis.asyncio import Redis

from contract.keys import PREFIX
from service.redis_client import REDIS_FAILED

log = logging.getLogger(__name__)

# Under the 60 s discord.py gives a reconnecting shard's whole handshake: past it the shard gives
# up (TimeoutError) and discord.py retries its connection later, rather than break Discord's limit.
MAX_WAIT_S = 45.0
JITTER_S = 0.05  # waiters of one bucket do not all ask again at the same instant


def identify_key(bucket: int) -> str:
    return f"{PREFIX}discord:identify:{bucket}"


class IdentifyLock:
    def __init__(self, redis: Redis, spacing_s: float):
        self.redis = redis
        self.spacing_ms = max(1, round(spacing_s * 1000))

    async def take(self, shard_id: int, max_concurrency: int) -> None:
        """Return once `shard_id` may IDENTIFY: its bucket is free, and now held for the spacing."""
        key = identify_key(shard_id % max_concurrency)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_WAIT_S
        while loop.time() < deadline:
            try:
                if await self.redis.set(key, str(shard_id), nx=True, px=self.spacing_ms):
                    return
                left_ms = await self.redis.pttl(key)  # -2: gone already, ask again at once
            except REDIS_FAILED as error:
                # Spaced as discord.py would within this process; other processes may start a session alongside.
                log.warning("identify lock unavailable", extra={"shard": shard_id, "error": str(error)})
                await asyncio.sleep(self.spacing_ms / 1000)
                return
            await asyncio.sleep(max(left_ms, 0) / 1000 + random.uniform(0, JITTER_S))
        raise TimeoutError(f"shard {shard_id} waited {MAX_WAIT_S:.0f} s for its turn to identify")
