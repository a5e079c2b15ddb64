"""The thread's status ("is thinking…") while a message waits for its answer.

Slack removes a status after two minutes without a message in the thread, and a busy queue
can hold a message longer. Waiting messages are kept in Redis and their status set again
every `slack.status_refresh_s` until the first text of the answer is shown (the outbox says
so). Every adapter process shares the list; one of them refreshes per round.
It is Slack's `Waiting` indicator (bot/delivery.py): delivery says when the answer began.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from redis.asyncio import Redis

from bot.slack.budget import SLACK_FAILED, PacedSlack
from contract import keys
from service.redis_client import REDIS_FAILED
from service.slack_settings import SlackSettings

log = logging.getLogger(__name__)
# keys.SLACK_WAITING: hash job id -> {"reply_to", "since" (queued), "shown_at" (status set)}: unix times
GIVE_UP_S = 3600.0  # a message unanswered this long is not the queue's any more: stop showing its status
_UPDATE_IF_WAITING = "if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end"
_WAIT_UNLESS_BEGUN = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class ThreadStatus:
    def __init__(self, redis: Redis, slack: PacedSlack, settings: SlackSettings):
        self.redis = redis
        self.slack = slack
        self.settings = settings
        self._update = redis.register_script(_UPDATE_IF_WAITING)
        self._wait = redis.register_script(_WAIT_UNLESS_BEGUN)

    async def show(self, job_id: str, reply_to: dict[str, str], ahead: int) -> None:
        """Show the status under the thread; `ahead`: messages queued before this one."""
        entry = {"reply_to": reply_to, "since": time.time(), "shown_at": time.time()}
        if not await self._wait(keys=[keys.SLACK_WAITING, keys.slack_begun(job_id)], args=[job_id, json.dumps(entry)]):
            return  # the answer is already in the thread
        if not await self._show_unless_begun(job_id, reply_to, self.settings.status + (f" ({ahead} ahead of you)" if ahead else "")):
            entry["shown_at"] = 0.0  # the next round tries again
            await self._update(keys=[keys.SLACK_WAITING], args=[job_id, json.dumps(entry)])

    async def answered(self, job_id: str) -> None:
        """The answer's first text is in the thread, which clears the status: stop showing it."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(keys.slack_begun(job_id), 1, ex=int(GIVE_UP_S))
                pipe.hdel(keys.SLACK_WAITING, job_id)
                await pipe.execute()
        except REDIS_FAILED as error:  # the answer matters more; an entry left is dropped after GIVE_UP_S
            log.warning("redis unavailable", extra={"error": str(error)})

    async def keep_fresh(self) -> None:
        """Set the status again for messages still waiting, until cancelled."""
        period = self.settings.status_refresh_s / 4
        while True:
            await asyncio.sleep(period)
            try:
                # One process per round; the lock lapses before the next round is due.
                if await self.redis.set(keys.SLACK_STATUS_ROUND, 1, nx=True, px=int(period * 500)):
                    await self._refresh()
            except REDIS_FAILED as error:
                log.warning("redis unavailable", extra={"error": str(error)})

    async def _refresh(self) -> None:
        now = time.time()
        for job_id, raw in (await self.redis.hgetall(keys.SLACK_WAITING)).items():
            waiting = json.loads(raw)
            if now - waiting["since"] > GIVE_UP_S:
                await self.redis.hdel(keys.SLACK_WAITING, job_id)
            elif now - waiting["shown_at"] >= self.settings.status_refresh_s:
                if await self._show_unless_begun(job_id, waiting["reply_to"], self.settings.status):
                    waiting["shown_at"] = now
                    await self._update(keys=[keys.SLACK_WAITING], args=[job_id, json.dumps(waiting)])

    async def _show_unless_begun(self, job_id: str, reply_to: dict[str, str], status: str) -> bool:
        """Set the status; False when Slack did not take it (the caller tries again later)."""
        shown = await self._set(reply_to, status, wait=False)
        if await self.redis.exists(keys.slack_begun(job_id)):  # the answer began while the status was on its way
            await self._set(reply_to, "", wait=True)
        return shown

    async def _set(self, reply_to: dict[str, str], status: str, wait: bool) -> bool:
        try:
            await self.slack.call(
                "assistant.threads.setStatus", reply_to, wait=wait, channel_id=reply_to["channel"],
                thread_ts=reply_to["thread_ts"], status=status, loading_messages=(self.settings.loading_messages or None) if status else None,
            )
            return True
        except SLACK_FAILED as error:  # a status is a courtesy: the answer goes on without it
            log.info("thread status not set", extra={"channel": reply_to["channel"], "error": str(error) or type(error).__name__})
            return False
