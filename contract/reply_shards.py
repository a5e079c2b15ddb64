"""Sharing a platform's reply shards among its adapter processes: each shard has one holder.

Each process registers itself as live and holds leases on shards, renewed every third of
`lease_s`. A process takes free shards up to its fair share (all shards divided by the live
processes, rounded up); one holding more than its share stops reading the extra ones and
gives them up once what it read from them is delivered. A process that stops cleanly gives
its shards up at once; one that dies loses them when their leases lapse, so another takes
them, and the replies the dead one left undelivered, within `lease_s` plus one round.
The clock is Redis's, so processes on several machines agree.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable

from redis.asyncio import Redis

from contract import keys
from contract.replies import REPLY_SHARDS

log = logging.getLogger(__name__)

# Returns, for each shard key, 1 if the lease is (now) this holder's, else 0.
_RENEW_OR_TAKE = """
local holder, lease_ms, take = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local held = {}
for i, shard_key in ipairs(KEYS) do
  local current = redis.call('GET', shard_key)
  if current == holder or (not current and take) then
    redis.call('SET', shard_key, holder, 'PX', lease_ms)
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
"""

_GIVE_UP = """
for _, shard_key in ipairs(KEYS) do
  if redis.call('GET', shard_key) == ARGV[1] then redis.call('DEL', shard_key) end
end
return 1
"""

_REGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""


class ShardLeases:
    def __init__(self, redis: Redis, platform: str, holder: str, lease_s: float):
        self.redis = redis
        self.platform = platform
        self.holder = holder
        self.lease_s = lease_s
        self.lease_ms = int(lease_s * 1000)
        self.round_s = lease_s / 3
        self.renewed_at = 0.0  # monotonic: when the last round that renewed the leases began
        self.held: set[int] = set()
        self.draining: set[int] = set()  # held, no longer read: given up once delivered
        # Each holder tries shards in its own order, so processes starting together spread out.
        start = zlib.crc32(holder.encode()) % REPLY_SHARDS
        self._preference = [(start + n) % REPLY_SHARDS for n in range(REPLY_SHARDS)]
        self._renew_or_take = redis.register_script(_RENEW_OR_TAKE)
        self._give_up = redis.register_script(_GIVE_UP)
        self._register = redis.register_script(_REGISTER)

    @property
    def reading(self) -> set[int]:
        return self.held - self.draining

    def holds(self, shard: int) -> bool:
        """Whether this process may still deliver the shard's replies: held, and renewed recently
        enough that its lease cannot have lapsed for another process to take it."""
        return shard in self.held and time.monotonic() - self.renewed_at < self.lease_s * 2 / 3

    async def round(self, busy: Callable[[int], bool]) -> set[int]:
        """Keep the shards held, take free ones up to a fair share, give up extras `busy` says are
        delivered; returns the shards taken (their pending backlog is to be read)."""
        started = time.monotonic()
        live = await self._register(keys=[keys.reply_holders(self.platform)], args=[self.holder, self.lease_ms])
        share = math.ceil(REPLY_SHARDS / max(1, live))
        kept = await self._keep(sorted(self.held))
        if lost := self.held - kept:
            log.warning("reply shards lost to another adapter process", extra={"shards": sorted(lost)})
        taken = await self._take(share - len(kept), exclude=kept)
        # Assigned at once, after every await: a lane never sees a shard missing in between.
        self.held, self.draining, self.renewed_at = kept | taken, self.draining & kept, started
        to_drain = len(self.held) - share - len(self.draining)
        if to_drain > 0:
            self.draining |= set(sorted(self.reading, reverse=True)[:to_drain])
        if delivered := {shard for shard in self.draining if not busy(shard)}:
            await self.give_up(delivered)
        return taken

    async def give_up(self, shards: set[int]) -> None:
        """Stop holding `shards`: the next holder reads what is left pending."""
        if shards:
            await self._give_up(keys=[keys.reply_shard(self.platform, shard) for shard in sorted(shards)], args=[self.holder])
        self.held -= shards
        self.draining -= shards

    async def leave(self) -> None:
        """This process stops: its shards go to the others at their next round."""
        await self.redis.zrem(keys.reply_holders(self.platform), self.holder)
        await self.give_up(set(self.held))

    async def _keep(self, shards: list[int]) -> set[int]:
        if not shards:
            return set()
        mine = await self._renew_or_take(
            keys=[keys.reply_shard(self.platform, shard) for shard in shards], args=[self.holder, self.lease_ms, "0"]
        )
        return {shard for shard, kept in zip(shards, mine) if kept}

    async def _take(self, wanted: int, exclude: set[int]) -> set[int]:
        taken: set[int] = set()
        for shard in self._preference:
            if len(taken) >= wanted:
                break
            if shard not in exclude:
                [mine] = await self._renew_or_take(
                    keys=[keys.reply_shard(self.platform, shard)], args=[self.holder, self.lease_ms, "1"]
                )
                if mine:
                    taken.add(shard)
        return taken
