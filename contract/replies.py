"""Reading a platform's reply stream.

Adapters read through a consumer group, so a reply read by an adapter that dies before
delivering it stays pending and is read again by the restarted adapter; replies another
consumer left pending too long (a container replaced under another name) are adopted while
running. Scripts (`chatbot ask`) follow one job's events without a group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from contract import keys
from contract.jobs import ReplyEvent

log = logging.getLogger(__name__)
GROUP = "adapters"

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


def reply_stream(platform: str, conversation: str) -> str:
    """The stream a conversation's replies go to."""
    return keys.replies(platform)


class ReplyReader:
    def __init__(
        self, redis: Redis, platform: str, consumer: str, take_over_after_ms: int = 30_000, adopt_every_s: float = 30.0
    ):
        self.redis = redis
        self.stream = keys.replies(platform)
        self.consumer = consumer
        self.take_over_after_ms = take_over_after_ms
        self.adopt_every_s = adopt_every_s
        self._backlog_done = False
        self._adopted_at = 0.0

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def read(self, block_ms: int = 1000, count: int = 100) -> list[tuple[str, ReplyEvent]]:
        """Next events: first those this consumer read but never acknowledged (before a restart),
        then, now and then, those other consumers left pending, then new ones.

        An entry that cannot be read (trimmed while pending, or written by a newer worker) is
        logged and acknowledged, so it never blocks the ones behind it.
        """
        while not self._backlog_done:
            entries = await self._read("0", count, block_ms=None)
            self._backlog_done = not entries
            if events := await self._parse(entries):
                return events
        if time.monotonic() - self._adopted_at >= self.adopt_every_s:
            self._adopted_at = time.monotonic()
            adopted = await self._adopt(count)
            if adopted:
                return adopted
        return await self._parse(await self._read(">", count, block_ms))

    async def _read(self, start: str, count: int, block_ms: int | None) -> list:
        response = await self.redis.xreadgroup(GROUP, self.consumer, {self.stream: start}, count=count, block=block_ms)
        return response[0][1] if response else []

    async def _adopt(self, count: int) -> list[tuple[str, ReplyEvent]]:
        _, entries, *_ = await self.redis.xautoclaim(
            self.stream, GROUP, self.consumer, self.take_over_after_ms, start_id="0-0", count=count
        )
        if entries:
            log.info("adopted replies another adapter left undelivered", extra={"entries": len(entries)})
        return await self._parse(entries)

    async def _parse(self, entries) -> list[tuple[str, ReplyEvent]]:
        events, unreadable = [], []
        for entry_id, fields in entries:
            try:
                events.append((entry_id, ReplyEvent.model_validate_json((fields or {})["event"])))
            except (KeyError, ValidationError) as error:
                log.error("unreadable reply event skipped", extra={"entry": entry_id, "error": str(error)[:200]})
                unreadable.append(entry_id)
        await self.ack(*unreadable)
        return events

    async def ack(self, *entry_ids: str) -> None:
        if entry_ids:
            await self.redis.xack(self.stream, GROUP, *entry_ids)


async def last_entry_id(redis: Redis, platform: str) -> str:
    newest = await redis.xrevrange(keys.replies(platform), count=1)
    return newest[0][0] if newest else "0-0"


async def follow(redis: Redis, platform: str, job_id: str, after: str) -> AsyncIterator[ReplyEvent]:
    """Yield one job's events read after entry id `after`, until its final or error event."""
    stream = keys.replies(platform)
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
