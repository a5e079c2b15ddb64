"""Reply delivery shared by the adapters: reply shards in, platform messages posted and edited out.

The platform side is an `Outbox` (post, edit, remove, a length limit) and a `Waiting`
indicator (Discord's typing, Slack's thread status). Delivery reads the reply shards this
process holds (contract/reply_shards.py), one lane per conversation, shows streamed text by
editing one message (at most one edit per `edit_interval_s` per message), continues long
text in follow-up messages, and records the platform message ids of each job in Redis before
acknowledging: a process that takes over a shard mid-reply edits the messages already
posted instead of posting them again.

Per reply, the outbox sees each message's parts with their index, hears once that a
message is settled (its text will not change again), and the waiting indicator hears once
that the answer's first text is shown.

Stopping (shutdown, or a shard handed to another process) cancels the lanes concerned, at any point but
one: a post whose request went out (`request_sent`) is waited for and its id recorded first, so the next
holder edits that message instead of posting it again. A wait for a platform's rate limit is no such point,
so a conversation waiting on one never holds up a shard's hand-over.

A regeneration's text goes into the messages of the answer it replaces (their ids are taken
over on its first event). If it brings no answer (refused, stopped before it began, failed,
empty) the old answer stays, shown again where partials had overwritten it, and the reason is
a short note of its own below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.split import split_message
from contract import keys
from contract.jobs import ReplyEvent
from contract.replies import POSTED_TTL_S, Entry, ReplyReader, shard_of
from contract.reply_shards import ShardLeases
from service.observability import DELIVERIES, PLATFORM_ERRORS
from service.process import process_identity
from service.redis_client import REDIS_FAILED, after, with_backoff
from service.tasks import cancel_until_done, to_the_end

log = logging.getLogger(__name__)
ABANDONED_AFTER_S = 3600  # a streamed reply silent this long will not be finished
FAILED = "Sorry, I could not deliver the answer."
LANE_IDLE_S = 30.0  # a conversation's lane ends after this long without replies
GIVE_UP_PATIENCE_S = 2.0  # on shutdown, how long to try handing the shards over before their leases lapse
RECORD_PATIENCE_S = 30.0  # how long a posted message's id waits for Redis to be recorded (then only this process knows it)
REREAD_PENDING_S = 60.0  # how often the pending replies of the shards held are read again
REMEMBER_ACKED_S = 10.0  # longer than a read of pending replies takes to come back
# A final the platform fails to show (5xx, internal_error, a timeout, a dropped connection) is tried again this
# often, after 0.5, 1 and 2 s, before the person gets the apology: a final is acknowledged only once it is shown
# or apologised for. A refusal for good (Outbox.refused) is not tried again, nor are partials: the next one
# carries their text.
FINAL_TRIES = 4
FINAL_RETRY_S = 0.5


@dataclass
class _Request:
    """Where a post's request to the platform stands: sent (a message may exist), or refused with a 429."""

    sent: asyncio.Event = field(default_factory=asyncio.Event)
    refused: asyncio.Event = field(default_factory=asyncio.Event)


_POST_REQUEST: ContextVar[_Request | None] = ContextVar("post_request", default=None)


def request_sent() -> None:
    """Outboxes call this as a request that may create a message goes out, after any wait for a rate limit:
    from then on, stopping the delivery waits for that post and records the new message's id."""
    if (request := _POST_REQUEST.get()) is not None:
        request.refused.clear()
        request.sent.set()


def request_refused() -> None:
    """The platform answered 429: nothing was created, and stopping need not wait for the retry."""
    if (request := _POST_REQUEST.get()) is not None:
        request.sent.clear()
        request.refused.set()


@dataclass(frozen=True)
class Part:
    """One platform message of a reply, as it should show now."""

    job_id: str
    reply_to: dict[str, str]
    text: str
    settled: bool = True  # its text will not change again (the reply ended, or it is full)
    index: int = 0  # which message of the reply: 0 answers the user's message, later ones continue it
    feedback: bool = False  # the last message of a finished answer: it may ask for a rating
    conversation: str = ""


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

    def refused(self, error: Exception) -> bool:
        """Whether `error` is the platform refusing for good (no permission, no such channel, content it
        rejects), which trying again cannot change; otherwise it may pass (a 5xx, a timeout, a dropped line)."""


class Waiting(Protocol):
    """What shows the user that an answer is on its way, until its first text is shown."""

    async def answered(self, job_id: str) -> None:
        """The answer's first text is shown (or the reply failed): stop showing that it waits."""


class NoWaiting:
    async def answered(self, job_id: str) -> None:
        pass


@dataclass
class Shown:
    """What a job's messages show now, as far as this adapter process knows."""

    message_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    settled: int = 0  # how many of the first messages were shown settled
    edited_at: float = 0.0


class Delivery:
    def __init__(
        self,
        redis: Redis,
        platform: str,
        outbox: Outbox,
        edit_interval_s: float,
        lease_s: float,
        waiting: Waiting | None = None,
        holder: str | None = None,
    ):
        self.redis = redis
        self.platform = platform
        self.reader = ReplyReader(redis, platform)
        self.shards = ShardLeases(redis, platform, holder or process_identity(f"{platform}-{socket.gethostname()}"), lease_s)
        self.outbox = outbox
        self.waiting = waiting or NoWaiting()
        self.edit_interval_s = edit_interval_s
        self.shown: dict[str, Shown] = {}
        self.finished: dict[str, float] = {}  # job id -> when its final was shown: later partials are stale
        self.in_flight: dict[tuple[str, str], Entry] = {}  # read, not yet acknowledged: never queued twice
        self.acked: dict[tuple[str, str], float] = {}  # acknowledged lately: a pending list read just before is stale
        # One lane per conversation with replies in flight: in order within a conversation, and a
        # slow or rate-limited channel (a held edit, a 429 wait) never delays the others.
        self.lanes: dict[str, tuple[asyncio.Queue[Entry], asyncio.Task[None]]] = {}
        self.handing_over: asyncio.Task[None] | None = None  # stopping the lanes of shards beyond the share

    async def run(self) -> None:
        groups_made, round_at, reread_at = False, 0.0, time.monotonic()
        try:
            while True:
                for _, task in self.lanes.values():
                    if task.done():
                        task.result()  # a lane that failed stops the adapter, loudly
                try:
                    if not groups_made:
                        await self.reader.ensure_groups()
                        groups_made = True
                    if time.monotonic() - round_at >= self.shards.round_s:
                        self.reader.reread(await self.shards.round())
                        round_at = time.monotonic()
                        if self.shards.draining and (self.handing_over is None or self.handing_over.done()):
                            # Apart from this loop, which goes on renewing the leases meanwhile.
                            self.handing_over = asyncio.create_task(self._hand_over(set(self.shards.draining)))
                        self._forget_old()
                    if time.monotonic() - reread_at >= REREAD_PENDING_S:
                        # A read whose answer the network lost leaves its replies pending here, unseen.
                        self.reader.reread(self.shards.reading)
                        reread_at = time.monotonic()
                    # Blocks no longer than a round, so the leases are renewed in time.
                    entries = await self.reader.read(self.shards.reading, block_ms=int(min(1.0, self.shards.round_s) * 1000))
                except REDIS_FAILED as error:  # down, or refusing writes (full): the leases outlive a few rounds
                    log.warning("redis unavailable", extra={"error": str(error)})
                    if "NOGROUP" in str(error):  # Redis lost its data (restarted without it, or flushed)
                        groups_made = False
                    await asyncio.sleep(1)
                    continue
                if not self.shards.reading:
                    await asyncio.sleep(min(1.0, self.shards.round_s))  # every shard is another process's
                for entry in entries:
                    if (entry.stream, entry.id) not in self.in_flight and (entry.stream, entry.id) not in self.acked:
                        self.in_flight[entry.stream, entry.id] = entry
                        self._lane(entry.event.conversation).put_nowait(entry)
        finally:
            try:
                lanes = [task for _, task in self.lanes.values()]
                await cancel_until_done(lanes + ([self.handing_over] if self.handing_over else []))
            finally:  # however often the lanes' end was interrupted: the shards go to the others at once
                with contextlib.suppress(*REDIS_FAILED, TimeoutError):
                    await to_the_end(asyncio.wait_for(self.shards.leave(), GIVE_UP_PATIENCE_S))

    async def _hand_over(self, shards: set[int]) -> None:
        """Give up shards beyond this process's share: their conversations' lanes stop (a post already sent is
        finished first), and what they read but did not acknowledge is the next holder's backlog."""
        stopping = [conversation for conversation in self.lanes if shard_of(conversation) in shards]
        await cancel_until_done([self.lanes[conversation][1] for conversation in stopping])
        for conversation in stopping:
            del self.lanes[conversation]
        self.in_flight = {key: entry for key, entry in self.in_flight.items() if entry.shard not in shards}
        with contextlib.suppress(*REDIS_FAILED):  # held still: the next round tries again
            await self.shards.give_up(shards)

    def _lane(self, conversation: str) -> asyncio.Queue[Entry]:
        if conversation not in self.lanes:
            queue: asyncio.Queue[Entry] = asyncio.Queue()
            self.lanes[conversation] = (queue, asyncio.create_task(self._drain(conversation, queue)))
        return self.lanes[conversation][0]

    async def _drain(self, conversation: str, queue: asyncio.Queue[Entry]) -> None:
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), LANE_IDLE_S)
            except TimeoutError:
                if queue.empty():  # no await between this check and leaving: nothing can slip in
                    del self.lanes[conversation]
                    return
                continue
            entries = [first] + [queue.get_nowait() for _ in range(queue.qsize())]
            shard = shard_of(conversation)
            for event in self._latest_per_job(entries):
                if not await self._still_ours(shard):
                    # The shard went to another process, which reads what is pending as its backlog:
                    # delivering on would show the reply twice.
                    break
                await self.deliver(event)
                # Acknowledged once shown, job by job: a lane stopped midway leaves only what it did not show.
                await self._acknowledge([entry for entry in entries if entry.event.job_id == event.job_id])
            else:  # what remains are stale partials of jobs already answered
                await self._acknowledge([entry for entry in entries if (entry.stream, entry.id) in self.in_flight])
            for entry in entries:
                self.in_flight.pop((entry.stream, entry.id), None)

    async def _acknowledge(self, entries: list[Entry]) -> None:
        if entries:
            await self._redis(functools.partial(self.reader.ack, entries), "acknowledge replies")
        now = time.monotonic()
        for entry in entries:
            self.in_flight.pop((entry.stream, entry.id), None)
            self.acked[entry.stream, entry.id] = now

    async def _still_ours(self, shard: int) -> bool:
        """Whether the shard's replies may still be delivered here. A renewal that looks late is waited out
        (a round or two) rather than given up on: the batch keeps its place before the conversation's newer
        replies, and is not left waiting for the reread of what is pending (REREAD_PENDING_S)."""
        deadline = time.monotonic() + self.shards.lease_s * 2
        while not self.shards.holds(shard):
            if shard not in self.shards.held or time.monotonic() > deadline:
                return False
            await asyncio.sleep(self.shards.round_s / 2)
        return True

    def _forget_old(self) -> None:
        """Drop what we track of replies whose final event never came (their job was given up), and old finals."""
        now = time.monotonic()
        self.shown = {job: shown for job, shown in self.shown.items() if now - shown.edited_at < ABANDONED_AFTER_S}
        self.finished = {job: at for job, at in self.finished.items() if now - at < ABANDONED_AFTER_S}
        self.acked = {entry: at for entry, at in self.acked.items() if now - at < REMEMBER_ACKED_S}

    def _latest_per_job(self, entries: list[Entry]) -> list[ReplyEvent]:
        """A partial followed by a newer event of the same job, or of a job already answered, is stale: skip it."""
        latest: dict[str, ReplyEvent] = {}
        for entry in entries:
            event = entry.event
            if event.kind == "partial" and event.job_id in self.finished:
                continue
            if event.job_id in latest and latest[event.job_id].kind != "partial":
                continue
            latest[event.job_id] = event
        return list(latest.values())

    async def deliver(self, event: ReplyEvent) -> None:
        note_apart = event.kind == "error" and event.replaces is not None
        shown = self.shown.get(event.job_id) or await self._recall(event, take_over=not note_apart)
        final = event.kind != "partial"
        wait = self.edit_interval_s - (time.monotonic() - shown.edited_at)
        if wait > 0:
            if not final:
                return
            # The final text must show, but no sooner than the edit rate allows: this holds
            # this conversation's lane only, for less than one interval.
            await asyncio.sleep(wait)
        began = bool(shown.message_ids)
        try:
            await self._try_showing(event, shown, note_apart)
            DELIVERIES.labels(self.platform, event.kind).inc()
        except Deferred:
            pass  # a partial the rate budget had no room for: the next one carries its text
        except Exception:
            log.exception("delivery failed", extra={"job": event.job_id, "kind": event.kind})
            if final:
                await self._apologise(event)
        if not began and (shown.message_ids or final):
            await self._stop_waiting(event.job_id)
        if final:
            self.shown.pop(event.job_id, None)
            self.finished[event.job_id] = time.monotonic()
        else:
            self.shown[event.job_id] = shown

    async def _try_showing(self, event: ReplyEvent, shown: Shown, note_apart: bool) -> None:
        """Show the event; a final the platform fails to show for now is tried again (FINAL_TRIES)."""
        tries = 1 if event.kind == "partial" else FINAL_TRIES
        for attempt in range(tries):
            try:
                if note_apart:
                    await self._note_apart(event, shown)
                else:
                    await self._show(event, shown, split_message(event.text, self.outbox.limit))
                return
            except Deferred:
                raise
            except Exception as error:
                PLATFORM_ERRORS.labels(self.platform, type(error).__name__).inc()
                if attempt + 1 == tries or self.outbox.refused(error):
                    raise
                log.warning(
                    "delivery failed; trying again",
                    extra={"job": event.job_id, "kind": event.kind, "error": repr(error), "attempt": attempt + 1},
                )
                await asyncio.sleep(FINAL_RETRY_S * 2**attempt)  # what was posted is edited, not posted again

    async def _stop_waiting(self, job_id: str) -> None:
        try:
            await self.waiting.answered(job_id)
        except Exception:  # a courtesy: the answer matters more
            log.exception("could not stop the waiting indicator", extra={"job": job_id})

    async def _note_apart(self, event: ReplyEvent, shown: Shown) -> None:
        """A regeneration that brought no answer: the old answer as it was, the reason below it."""
        if shown.message_ids and event.restore is not None:  # its partials had replaced the old answer's text
            old = event.model_copy(update={"job_id": event.replaces, "kind": "final", "text": event.restore})
            await self._show(old, shown, split_message(event.restore, self.outbox.limit))
        await self.outbox.post(Part(event.job_id, event.reply_to, event.text, conversation=event.conversation))

    async def _apologise(self, event: ReplyEvent) -> None:
        # What failed the reply (no permission in the channel, a deleted channel) usually
        # fails this too; it must not stop delivery, or the next holder of the shard meets the
        # same unacknowledged event and stops again.
        try:
            await self.outbox.post(Part(event.job_id, event.reply_to, FAILED, conversation=event.conversation))
        except Exception:
            log.exception("could not tell the user that delivery failed", extra={"job": event.job_id})

    async def _show(self, event: ReplyEvent, shown: Shown, chunks: list[str]) -> None:
        final = event.kind != "partial"
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            part = Part(
                event.job_id, event.reply_to, chunk, settled=final or not last, index=index,
                feedback=last and event.kind == "final", conversation=event.conversation,
            )
            if index < len(shown.message_ids):
                changed = index >= len(shown.texts) or shown.texts[index] != chunk
                if changed or (self.outbox.settles and part.settled and index >= shown.settled):
                    await self.outbox.edit(shown.message_ids[index], part)
            else:
                await self._post(part, shown)
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
            await self._redis(self._record_posted(event.job_id, shown), "record posted ids")

    async def _post(self, part: Part, shown: Shown) -> None:
        """Post the part as a new message of its job and record the message's id. Cancelled before its request
        went out, nothing was posted; after, the post is waited for and its id recorded first."""
        request = _Request()

        async def post_and_record() -> None:
            _POST_REQUEST.set(request)
            shown.message_ids.append(await self.outbox.post(part))
            await self._redis(self._record_posted(part.job_id, shown), "record posted ids", after(RECORD_PATIENCE_S))

        posting = asyncio.create_task(post_and_record())
        try:
            await asyncio.shield(posting)
        except asyncio.CancelledError:
            if request.sent.is_set():  # finished and recorded, unless the platform answers 429 meanwhile
                refusal = asyncio.ensure_future(request.refused.wait())
                with contextlib.suppress(Exception):
                    await to_the_end(asyncio.wait([posting, refusal], return_when=asyncio.FIRST_COMPLETED))
                refusal.cancel()
            await cancel_until_done([posting])  # if it is waiting out a rate limit, or never went out
            raise

    def _record_posted(self, job_id: str, shown: Shown):
        return functools.partial(self.redis.set, keys.posted(job_id), json.dumps(shown.message_ids), ex=POSTED_TTL_S)

    async def _recall(self, event: ReplyEvent, take_over: bool) -> Shown:
        """The job's messages posted so far (by this process before a restart, or by another); a regeneration
        with none yet `take_over`s the messages of the answer it replaces."""
        raw = await self._redis(lambda: self.redis.get(keys.posted(event.job_id)), "read posted ids")
        if not raw and take_over and event.replaces:
            raw = await self._redis(lambda: self.redis.get(keys.posted(event.replaces)), "read posted ids")
            if raw:
                await self._redis(
                    lambda: self.redis.set(keys.posted(event.job_id), raw, ex=POSTED_TTL_S, nx=True), "record posted ids"
                )
        return Shown(message_ids=json.loads(raw)) if raw else Shown()

    @staticmethod
    async def _redis(operation, what: str, give_up=lambda: False):
        """Wait out Redis being down (until `give_up`); a write it refuses (full, read-only) is logged and
        skipped, so answers still reach the platform (a reply left unacknowledged is read again by the next
        holder)."""
        try:
            return await with_backoff(operation, what, give_up)
        except RedisError as error:
            log.error("redis refused a delivery write", extra={"operation": what, "error": str(error)})
            return None
