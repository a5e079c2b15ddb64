"""The thread's agent session: `processing` while an answer is on its way, which gives Slack's native Stop.

Slack shows a Stop button under a thread whose agent session is `processing`
(agents.sessions.setStatus); a click sends `agent_session_stopped` (bot/slack/controls.py).
Slack does not move the session on by itself: it goes back to `active` when the answer ends,
with the stream's last chat.stopStream (`session_status`) or, where the answer was not
streamed, with a call here. A workspace or app without agent sessions refuses the call: the
answer goes on without a native Stop, and the log says so.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from bot.slack.budget import SLACK_FAILED, PacedSlack
from contract import keys
from service.redis_client import REDIS_FAILED

log = logging.getLogger(__name__)
PROCESSING, ACTIVE = "processing", "active"


class AgentSessions:
    def __init__(self, redis: Redis, slack: PacedSlack):
        self.redis = redis
        self.slack = slack

    async def processing(self, reply_to: dict[str, str], initiator: str | None) -> None:
        await self._set(reply_to, PROCESSING, initiator_user_id=initiator)

    async def active(self, reply_to: dict[str, str]) -> None:
        await self._set(reply_to, ACTIVE)

    async def ended(self, job_id: str) -> bool:
        """Whether the job's answer is over (the worker deletes a job with its final or error reply)."""
        try:
            return not await self.redis.exists(keys.job(job_id))
        except REDIS_FAILED as error:  # not known to be over: the session stays as it is
            log.warning("redis unavailable", extra={"error": str(error)})
            return False

    async def _set(self, reply_to: dict[str, str], status: str, **arguments: str | None) -> None:
        if "thread_ts" not in reply_to:
            return  # sessions are threads: an answer outside one has none
        try:
            await self.slack.call(
                "agents.sessions.setStatus", reply_to, wait=status == ACTIVE, channel_id=reply_to["channel"],
                thread_ts=reply_to["thread_ts"], status=status, **{name: value for name, value in arguments.items() if value},
            )
        except SLACK_FAILED as error:  # the answer matters more than its session's status
            log.info("agent session status not set", extra={"status": status, "error": str(error) or type(error).__name__})
