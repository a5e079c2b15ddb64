"""Reply delivery shared by the adapters: reply stream in, platform messages posted and edited out.

The platform side is an `Outbox` (post, edit, a length limit). Delivery reads the
platform's reply stream through the consumer group, shows streamed text by editing one
message (at most one edit per `edit_interval_s` per message), continues long text in
follow-up messages, and records the platform message ids of each job in Redis before
acknowledging: an adapter restarted mid-reply edits the messages it already posted
instead of posting them again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis

from bot.split import split_message
from contract import keys
from contract.jobs import ReplyEvent
from contract.replies import ReplyReader
from service.observability import DELIVERIES, PLATFORM_ERRORS
from service.redis_client import REDIS_DOWN, with_backoff
from service.tasks import cancel_until_done

log = logging.getLogger(__name__)
POSTED_TTL_S = 24 * 3600
ABANDONED_AFTER_S = 3600  # a streamed reply silent this long will not be finished
FAILED = "Sorry, I could not deliver the answer."
LANE_IDLE_S = 30.0  # a conversation's lane ends after this long without replies


@dataclass(frozen=True)
class Part:
    """One platform message of a reply, as it should show now."""

    job_id: str
    reply_to: dict[str, str]
    text: str
    settled: bool = True  # its text will not change again (the reply ended, or it is full)
    answer: str | None = None  # on the last message of a finished answer: the whole answer (for feedback)


class Deferred(Exception):
    """This partial text is not shown yet (the rate budget is short, or it waits in a buffer); a newer one will be."""


class Outbox(Protocol):
    limit: int  # most characters in one platform message
    settles: bool  # True: a message whose text stops changing gets one more edit, marked settled

    async def post(self, part: Part) -> str:
        """Post a new message; returns its platform id. May raise Deferred for an unsettled part."""

    async def edit(self, message_id: str, part: Part) -> None:
        """Show the part's text in the message. May raise Deferred for an unsettled part."""

    async def remove(self, message_id: str, reply_to: dict[str, str]) -> None:
        """Delete a message the finished reply no longer needs."""


@dataclass
class Shown:
    """What a job's messages show now, as far as this adapter process knows."""

    message_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    settled: int = 0  # how many of the first messages were shown settled
    edited_at: float = 0.0


class Delivery:
    def __init__(self, redis: Redis, platform: str, consumer: str, outbox: Outbox, edit_interval_s: float):
        self.redis = redis
        self.platform = platform
        self.reader = ReplyReader(redis, platform, consumer)
        self.outbox = outbox
        self.edit_interval_s = edit_interval_s
        self.shown: dict[str, Shown] = {}
        # One lane per conversation with replies in flight: in order within a conversation, and a
        # slow or rate-limited channel (a held edit, a 429 wait) never delays the others.
        self.lanes: dict[str, tuple[asyncio.Queue[tuple[str, ReplyEvent]], asyncio.Task[None]]] = {}

    async def run(self) -> None:
        await with_backoff(self.reader.ensure_group, "create the reply group")
        try:
            while True:
                for _, task in self.lanes.values():
                    if task.done():
                        task.result()  # a lane that failed stops the adapter, loudly
                try:
                    events = await self.reader.read(block_ms=1000)
                except REDIS_DOWN as error:
                    log.warning("redis unavailable", extra={"error": str(error)})
                    await asyncio.sleep(1)
                    continue
                for entry in events:
                    self._lane(entry[1].conversation).put_nowait(entry)
                self._forget_abandoned()
        finally:
            await cancel_until_done([task for _, task in self.lanes.values()])

    def _lane(self, conversation: str) -> asyncio.Queue[tuple[str, ReplyEvent]]:
        if conversation not in self.lanes:
            queue: asyncio.Queue[tuple[str, ReplyEvent]] = asyncio.Queue()
            self.lanes[conversation] = (queue, asyncio.create_task(self._drain(conversation, queue)))
        return self.lanes[conversation][0]

    async def _drain(self, conversation: str, queue: asyncio.Queue[tuple[str, ReplyEvent]]) -> None:
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), LANE_IDLE_S)
            except asyncio.TimeoutError:
                if queue.empty():  # no await between this check and leaving: nothing can slip in
                    del self.lanes[conversation]
                    return
                continue
            entries = [first] + [queue.get_nowait() for _ in range(queue.qsize())]
            for event in self._latest_per_job(entries):
                await self.deliver(event)
            entry_ids = [entry_id for entry_id, _ in entries]
            await with_backoff(functools.partial(self.reader.ack, *entry_ids), "acknowledge replies")

    def _forget_abandoned(self) -> None:
        """Drop what we track of replies whose final event never came (their job was given up)."""
        now = time.monotonic()
        self.shown = {job: shown for job, shown in self.shown.items() if now - shown.edited_at < ABANDONED_AFTER_S}

    @staticmethod
    def _latest_per_job(events: list[tuple[str, ReplyEvent]]) -> list[ReplyEvent]:
        """A partial followed by a newer event of the same job is stale: skip it."""
        latest: dict[str, ReplyEvent] = {}
        for _, event in events:
            if event.job_id in latest and latest[event.job_id].kind != "partial":
                continue
            latest[event.job_id] = event
        return list(latest.values())

    async def deliver(self, event: ReplyEvent) -> None:
        shown = self.shown.get(event.job_id) or await self._recall(event.job_id)
        final = event.kind != "partial"
        wait = self.edit_interval_s - (time.monotonic() - shown.edited_at)
        if wait > 0:
            if not final:
                return
            # The final text must show, but no sooner than the edit rate allows: this holds
            # this conversation's lane only, for less than one interval.
            await asyncio.sleep(wait)
        try:
            await self._show(event, shown, split_message(event.text, self.outbox.limit))
            DELIVERIES.labels(self.platform, event.kind).inc()
        except Deferred:
            pass  # a partial the rate budget had no room for: the next one carries its text
        except Exception as error:
            PLATFORM_ERRORS.labels(self.platform, type(error).__name__).inc()
            log.exception("delivery failed", extra={"job": event.job_id, "kind": event.kind})
            if final and not shown.message_ids:
                await self._apologise(event)
        if final:
            self.shown.pop(event.job_id, None)
        else:
            self.shown[event.job_id] = shown

    async def _apologise(self, event: ReplyEvent) -> None:
        # What failed the reply (no permission in the channel, a deleted channel) usually
        # fails this too; it must not stop delivery, or the restarted adapter meets the
        # same unacknowledged event and stops again.
        try:
            await self.outbox.post(Part(event.job_id, event.reply_to, FAILED))
        except Exception:
            log.exception("could not tell the user that delivery failed", extra={"job": event.job_id})

    async def _show(self, event: ReplyEvent, shown: Shown, chunks: list[str]) -> None:
        final = event.kind != "partial"
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            answer = event.text if last and event.kind == "final" else None
            part = Part(event.job_id, event.reply_to, chunk, settled=final or not last, answer=answer)
            if index < len(shown.message_ids):
                changed = index >= len(shown.texts) or shown.texts[index] != chunk
                if changed or (self.outbox.settles and part.settled and index >= shown.settled):
                    await self.outbox.edit(shown.message_ids[index], part)
            else:
                shown.message_ids.append(await self.outbox.post(part))
                await with_backoff(self._record_posted(event.job_id, shown), "record posted ids")
            shown.texts[index:index + 1] = [chunk]
            if part.settled:
                shown.settled = index + 1
            shown.edited_at = time.monotonic()
        if final and len(shown.message_ids) > len(chunks):
            # The reply ended shorter than its partials reached (an error, a regenerated answer):
            # the messages after it would keep old text.
            for message_id in shown.message_ids[len(chunks):]:
                await self.outbox.remove(message_id, event.reply_to)
            del shown.message_ids[len(chunks):]
            await with_backoff(self._record_posted(event.job_id, shown), "record posted ids")

    def _record_posted(self, job_id: str, shown: Shown):
        return functools.partial(self.redis.set, keys.posted(job_id), json.dumps(shown.message_ids), ex=POSTED_TTL_S)

    async def _recall(self, job_id: str) -> Shown:
        raw = await with_backoff(lambda: self.redis.get(keys.posted(job_id)), "read posted ids")
        return Shown(message_ids=json.loads(raw)) if raw else Shown()
