"""Reply streams: the worker writes each conversation's reply events to one of a platform's shards.

A platform's replies are spread over REPLY_SHARDS streams by conversation. Adapter processes
share them out (contract/reply_shards.py): each shard is read by exactly one process at a
time, through the consumer group as the group's one consumer, so a reply read by a process
that dies before delivering it stays pending and is read again, once, by the next holder of
its shard. All events of a conversation go to one shard, so one process delivers them, in
order. Scripts (`chatbot ask`, the terminal chat) follow one job's events without a group.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from contract import keys
from contract.jobs import ReplyEvent

log = logging.getLogger(__name__)
GROUP = "adapters"
# One consumer name for every process: a shard's holder reads as it, so the next holder finds
# what its predecessor read but never acknowledged as its own pending backlog.
CONSUMER = "delivery"
# Fixed: the worker and every adapter process must agree on it.
REPLY_SHARDS = 8
POSTED_TTL_S = 24 * 3600  # how long the platform message ids of a reply are kept (keys.posted), for edits after a restart

# Lua, run after each XADD to a reply stream (contract/work.py): trim without dropping what an
# adapter has not acknowledged. With consumer groups, only entries below every group's oldest
# pending (or, with none pending, last delivered) entry go; a stream no adapter reads keeps its
# newest `maxlen`.
TRIM_REPLIES = """
local function older(a, b)
  local a_ms, a_seq = string.match(a, '(%d+)-(%d+)')
  local b_ms, b_seq = string.match(b, '(%d+)-(%d+)')
  if #a_ms ~= #b_ms then return #a_ms < #b_ms end
  if a_ms ~= b_ms then return a_ms < b_ms end
  return tonumber(a_seq) < tonumber(b_seq)
end
local function trim_replies(stream, maxlen)
  local groups = redis.call('XINFO', 'GROUPS', stream)
  if #groups == 0 then
    redis.call('XTRIM', stream, 'MAXLEN', '~', maxlen)
    return
  end
  local floor = nil
  for _, group in ipairs(groups) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local keep = info['last-delivered-id']
    if tonumber(info['pending']) > 0 then keep = redis.call('XPENDING', stream, info['name'])[2] end
    if floor == nil or older(keep, floor) then floor = keep end
  end
  redis.call('XTRIM', stream, 'MINID', '~', floor)
end
"""


def shard_of(conversation: str) -> int:
    return zlib.crc32(conversation.encode()) % REPLY_SHARDS


def reply_stream(platform: str, conversation: str) -> str:
    """The stream a conversation's replies go to."""
    return keys.replies(platform, shard_of(conversation))


@dataclass(frozen=True)
class Entry:
    stream: str
    id: str
    shard: int
    event: ReplyEvent


class ReplyReader:
    """Reads a platform's shards that this process holds: a shard's pending backlog once when told
    to (what a previous holder read but never acknowledged), page by page, then new entries."""

    def __init__(self, redis: Redis, platform: str):
        self.redis = redis
        self.streams = [keys.replies(platform, shard) for shard in range(REPLY_SHARDS)]
        self._backlog_after: dict[int, str] = {}  # shard -> the last backlog id returned

    def reread(self, shards: set[int]) -> None:
        """Read these shards' pending backlog again, from its start: they were just taken, or a
        reply may have been lost on its way (the caller skips what it already has)."""
        for shard in shards:
            self._backlog_after[shard] = "0"

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    async def read(self, shards: set[int], block_ms: int = 1000, count: int = 100) -> list[Entry]:
        """Entries of the given shards: the backlog of those to be reread first, then new entries.

        An entry that cannot be read (trimmed while pending, or written by a newer worker) is
        logged and acknowledged, so it never blocks the ones behind it.
        """
        for shard, after in sorted(self._backlog_after.items()):
            if shard not in shards:
                continue
            entries = await self._read({self.streams[shard]: after}, count, block_ms=None)
            if not entries:
                del self._backlog_after[shard]
                continue
            parsed = await self._parse(entries)
            self._backlog_after[shard] = entries[-1][1]  # only once parsed: a failed page is read again
            return parsed
        if not shards:
            return []
        return await self._parse(await self._read({self.streams[shard]: ">" for shard in sorted(shards)}, count, block_ms))

    async def _read(self, streams: dict[str, str], count: int, block_ms: int | None) -> list[tuple[str, str, dict]]:
        response = await self.redis.xreadgroup(GROUP, CONSUMER, streams, count=count, block=block_ms)
        return [(stream, entry_id, fields) for stream, entries in response or [] for entry_id, fields in entries]

    async def _parse(self, entries: list[tuple[str, str, dict]]) -> list[Entry]:
        parsed, unreadable = [], []
        for stream, entry_id, fields in entries:
            try:
                event = ReplyEvent.model_validate_json((fields or {})["event"])
            except (KeyError, ValidationError) as error:
                log.error("unreadable reply event skipped", extra={"entry": entry_id, "error": str(error)[:200]})
                unreadable.append((stream, entry_id))
                continue
            parsed.append(Entry(stream, entry_id, self.streams.index(stream), event))
        for stream, entry_id in unreadable:
            await self.redis.xack(stream, GROUP, entry_id)
        return parsed

    async def ack(self, entries: list[Entry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, GROUP, *ids)
            await pipe.execute()


async def last_entry_id(redis: Redis, platform: str, conversation: str) -> str:
    newest = await redis.xrevrange(reply_stream(platform, conversation), count=1)
    return newest[0][0] if newest else "0-0"


async def follow(redis: Redis, platform: str, conversation: str, job_id: str, after: str) -> AsyncIterator[ReplyEvent]:
    """Yield one job's events read after entry id `after`, until its final or error event."""
    stream = reply_stream(platform, conversation)
    while True:
        response = await redis.xread({stream: after}, block=1000, count=100)
        for _, entries in response or []:
            for entry_id, fields in entries:
                after = entry_id
                if not fields:
                    continue  # trimmed
                event = ReplyEvent.model_validate_json(fields["event"])
                if event.job_id != job_id:
                    continue
                yield event
                if event.kind != "partial":
                    return
