"""Sharing a platform's reply shards among its adapter processes: each shard has one holder.

Each process registers itself as live and holds leases on shards, renewed every third of
`lease_s`. A process takes free shards up to its fair share (all shards divided by the live
processes, rounded up); one holding more than its share gives the extra ones up, once it
has stopped delivering them. A process that stops cleanly gives its shards up at once (the
key says "released").

A shard whose key is missing may still be delivered by a process that believes it holds it:
its lease lapsed (the process stalled), or Redis lost its data (a flush, a restart without
its data, a failover to an empty replica), and a holder trusts its lease for two thirds of
`lease_s` after its last renewal. So a missing key is marked vacant, and another process
takes it only once it has been vacant that long; a process that held it takes it back at
once, if it can still trust its lease (else it waits like the others). A process that dies
therefore loses its shards, and the replies it left undelivered go to another process, within
5/3 of `lease_s` plus a round or two; and the first process of a deployment starts delivering
after two thirds of `lease_s`.
The clock is Redis's, so processes on several machines agree.
"""

from __future__ import annotations

import logging
import math
import time
import zlib

from redis.asyncio import Redis

from contract import keys
from contract.replies import REPLY_SHARDS

log = logging.getLogger(__name__)

# The part of `lease_s` for which a holder trusts its last renewal (ShardLeases.holds), and for which a shard's
# key must have been vacant before a process that did not hold it takes it.
TRUSTED_PART = 2 / 3

# For each shard key: 0 not this holder's, 1 kept, 2 taken (its pending backlog is to be read). A key holds its
# holder, "released" (given up cleanly: taken at once), or "vacant:<ms>" (found missing then, by Redis's clock).
# ARGV[4] is 1 for shards this holder holds and trusts: a missing or vacant key is taken back at once.
_RENEW_OR_TAKE = """
local holder, lease_ms, trusted_ms, held = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local result = {}
for i, shard_key in ipairs(KEYS) do
  local current = redis.call('GET', shard_key)
  local vacant_since = current and tonumber(string.match(current, '^vacant:(%d+)$'))
  result[i] = 0
  if current == holder then
    result[i] = 1
  elseif current == 'released' or ((not current or vacant_since) and held) then
    result[i] = 2
  elseif vacant_since and now - vacant_since >= trusted_ms then
    result[i] = 2
  elseif not current then
    redis.call('SET', shard_key, 'vacant:' .. now, 'PX', lease_ms + trusted_ms)
  end
  if result[i] > 0 then redis.call('SET', shard_key, holder, 'PX', lease_ms) end
end
return result
"""

_GIVE_UP = """
for _, shard_key in ipairs(KEYS) do
  if redis.call('GET', shard_key) == ARGV[1] then redis.call('SET', shard_key, 'released', 'PX', ARGV[2]) end
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
        self.draining: set[int] = set()  # held beyond the fair share, no longer read: to be given up
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
        return shard in self.held and time.monotonic() - self.renewed_at < self.lease_s * TRUSTED_PART

    async def round(self) -> set[int]:
        """Keep the shards held, take free ones up to a fair share, and mark those beyond it `draining` (the
        caller stops delivering them, then gives them up); returns the shards taken (their pending backlog is
        to be read)."""
        started = time.monotonic()
        live = await self._register(keys=[keys.reply_holders(self.platform)], args=[self.holder, self.lease_ms])
        share = math.ceil(REPLY_SHARDS / max(1, live))
        kept, retaken = await self._keep(sorted(self.held))
        if lost := self.held - kept - retaken:
            log.warning("reply shards lost to another adapter process", extra={"shards": sorted(lost)})
        taken = retaken | await self._take(share - len(kept | retaken), exclude=kept | retaken)
        # Assigned at once, after every await: a lane never sees a shard missing in between.
        self.held, self.renewed_at = kept | taken, started
        self.draining = set(sorted(self.held, reverse=True)[: max(0, len(self.held) - share)])
        return taken

    async def give_up(self, shards: set[int]) -> None:
        """Stop holding `shards`: the next holder reads what is left pending."""
        if shards:
            await self._give_up(
                keys=[keys.reply_shard(self.platform, shard) for shard in sorted(shards)], args=[self.holder, self.lease_ms]
            )
        self.held -= shards
        self.draining -= shards

    async def leave(self) -> None:
        """This process stops: its shards go to the others at their next round."""
        await self.redis.zrem(keys.reply_holders(self.platform), self.holder)
        await self.give_up(set(self.held))

    async def _keep(self, shards: list[int]) -> tuple[set[int], set[int]]:
        """The shards still this holder's: those whose lease it renewed, and those it took back (their key had
        gone missing: a pending backlog may have to be read again)."""
        kept: set[int] = set()
        retaken: set[int] = set()
        # A lease this holder could still trust (holds) is taken back at once if its key went missing; one it
        # could not (it stalled) waits out the vacancy like any other process's.
        trusted = [shard for shard in shards if self.holds(shard)]
        for group, held in ((trusted, True), ([shard for shard in shards if shard not in trusted], False)):
            if group:
                codes = await self._renew_or_take(keys=[keys.reply_shard(self.platform, s) for s in group], args=self._args(held))
                kept |= {shard for shard, code in zip(group, codes) if code == 1}
                retaken |= {shard for shard, code in zip(group, codes) if code == 2}
        return kept, retaken

    async def _take(self, wanted: int, exclude: set[int]) -> set[int]:
        taken: set[int] = set()
        for shard in self._preference:
            if len(taken) >= wanted:
                break
            if shard not in exclude:
                [code] = await self._renew_or_take(keys=[keys.reply_shard(self.platform, shard)], args=self._args(held=False))
                if code:
                    taken.add(shard)
        return taken

    def _args(self, held: bool) -> list:
        return [self.holder, self.lease_ms, int(self.lease_ms * TRUSTED_PART), int(held)]
