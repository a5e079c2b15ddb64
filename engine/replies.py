"""Reading a platform's reply stream.

Adapters read through a consumer group, so a reply read by an adapter that dies before
delivering it stays pending and is read again by the restarted adapter. Scripts (`chatbot
ask`) follow one job's events without a group.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.jobs import ReplyEvent
from engine.queue import replies_key

GROUP = "adapters"


class ReplyReader:
    def __init__(self, redis: Redis, platform: str, consumer: str, take_over_after_ms: int = 30_000):
        self.redis = redis
        self.stream = replies_key(platform)
        self.consumer = consumer
        self.take_over_after_ms = take_over_after_ms
        self._backlog_done = False

    async def ensure_group(self) -> None:
        """Create the group if needed, and adopt what a vanished consumer read but never delivered.

        A container restarted under a new host name is a new consumer: without this, replies
        its predecessor had read would stay pending forever.
        """
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        start = "0-0"
        while True:
            start, *_ = await self.redis.xautoclaim(
                self.stream, GROUP, self.consumer, self.take_over_after_ms, start_id=start, count=100
            )
            if start == "0-0":
                return

    async def read(self, block_ms: int = 1000, count: int = 100) -> list[tuple[str, ReplyEvent]]:
        """Next events; first those this consumer read but never acknowledged (before a restart)."""
        if not self._backlog_done:
            pending = await self._read("0", count, block_ms=None)
            if pending:
                return pending
            self._backlog_done = True
        return await self._read(">", count, block_ms)

    async def _read(self, start: str, count: int, block_ms: int | None) -> list[tuple[str, ReplyEvent]]:
        response = await self.redis.xreadgroup(GROUP, self.consumer, {self.stream: start}, count=count, block=block_ms)
        entries = response[0][1] if response else []
        return [(entry_id, ReplyEvent.model_validate_json(fields["event"])) for entry_id, fields in entries]

    async def ack(self, *entry_ids: str) -> None:
        if entry_ids:
            await self.redis.xack(self.stream, GROUP, *entry_ids)


async def last_entry_id(redis: Redis, platform: str) -> str:
    newest = await redis.xrevrange(replies_key(platform), count=1)
    return newest[0][0] if newest else "0-0"


async def follow(redis: Redis, platform: str, job_id: str, after: str) -> AsyncIterator[ReplyEvent]:
    """Yield one job's events read after entry id `after`, until its final or error event."""
    stream = replies_key(platform)
    while True:
        response = await redis.xread({stream: after}, block=1000, count=100)
        for _, entries in response or []:
            for entry_id, fields in entries:
                after = entry_id
                event = ReplyEvent.model_validate_json(fields["event"])
                if event.job_id != job_id:
                    continue
                yield event
                if event.kind != "partial":
                    return
