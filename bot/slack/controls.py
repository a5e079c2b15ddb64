"""Stop and Regenerate on Slack: Slack's native Stop, a Stop button where there is none, a Regenerate button.

- Native Stop: while an answer is on its way the thread's agent session is `processing`
  (bot/slack/sessions.py), and Slack shows its own Stop; a click sends `agent_session_stopped`
  with the thread, and every job of that thread's conversation the clicker may stop is stopped.
- A Stop button (`stop_answer`) rides on an answer that is posted and edited rather than
  streamed (streaming off, or fallen back): a streaming message takes blocks only when it stops.
- A Regenerate button (`regenerate_answer`) sits under each finished answer, beside the
  feedback buttons; the new answer edits the old one's messages (bot/delivery.py).

Only the person who asked, or one of `slack.admin_user_ids`, may press them; anyone else is
told so in a message only they see (chat.postEphemeral). Clicks are acknowledged at once.
"""

from __future__ import annotations

import logging

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext

from bot.slack.budget import SLACK_FAILED, PacedSlack
from bot.slack.messages import PLATFORM, workspace
from bot.slack.outbox import REGENERATE_ACTION, STOP_ACTION, SlackOutbox
from bot.slack.sessions import AgentSessions
from contract import keys
from contract.controls import ALREADY_FINISHED, STOPPING, request_stop
from contract.history import load_exchanges
from contract.intake import Intake
from contract.jobs import UNAVAILABLE, Conversation, RejectedMessage, Scope
from service.redis_client import REDIS_FAILED
from service.slack_settings import SlackSettings

log = logging.getLogger(__name__)


class SlackControls:
    def __init__(self, slack: PacedSlack, settings: SlackSettings, queue: Intake, outbox: SlackOutbox, sessions: AgentSessions):
        self.slack = slack
        self.settings = settings
        self.queue = queue
        self.redis = queue.redis
        self.outbox = outbox
        self.sessions = sessions

    def register(self, app: AsyncApp) -> None:
        app.action(STOP_ACTION)(self.on_stop)
        app.action(REGENERATE_ACTION)(self.on_regenerate)
        app.event("agent_session_stopped")(self.on_session_stopped)

    def admin(self, user: str) -> bool:
        return user in self.settings.admin_user_ids

    async def on_stop(self, ack: AsyncAck, body: dict, action: dict) -> None:
        await ack()
        user, job_id, where = body["user"]["id"], action.get("value", ""), clicked_in(body)
        try:
            said = await request_stop(self.redis, job_id, by=user, admin=self.admin(user))
        except RejectedMessage as refused:
            said = str(refused)
        except REDIS_FAILED as error:
            log.error("could not stop an answer", extra={"job": job_id, "error": str(error)})
            said = UNAVAILABLE
        log.info("stop button", extra={"job": job_id, "user": user, "answer": said})
        if said != STOPPING:  # a stopped answer says so itself, and loses its button
            await self.tell(where, user, said)

    async def on_session_stopped(self, event: dict, context: AsyncBoltContext) -> None:
        user = event.get("user", "")
        where = {"channel": event["channel"], "thread_ts": event["thread_ts"], **workspace(context.team_id, context.enterprise_id)}
        # Slack stopped these streams: what is left of their answers is written with chat.update.
        self.outbox.forget_streams(event.get("streaming_message_ts") or [])
        conversation = Conversation(platform=PLATFORM, channel=event["channel"], thread=event["thread_ts"])
        said = []
        try:
            for job_id in await self.redis.lrange(keys.conv_jobs(conversation.key), 0, -1):
                try:
                    said.append(await request_stop(self.redis, job_id, by=user, admin=self.admin(user)))
                except RejectedMessage as refused:
                    said.append(str(refused))
        except REDIS_FAILED as error:
            log.error("could not stop an answer", extra={"conversation": conversation.key, "error": str(error)})
            said.append(UNAVAILABLE)
        log.info("native stop", extra={"conversation": conversation.key, "user": user, "answers": said})
        if STOPPING in said:
            return  # the session goes back to active when the stopped answer is shown
        if not said or said == [ALREADY_FINISHED] * len(said):
            await self.sessions.active(where)  # nothing was running: Slack leaves the session to us
        else:
            await self.tell(where, user, said[0])

    async def on_regenerate(self, ack: AsyncAck, body: dict, action: dict) -> None:
        await ack()
        user, job_id, where = body["user"]["id"], action.get("value", ""), clicked_in(body)
        if "thread_ts" not in where:
            log.warning("regenerate click outside a thread", extra={"job": job_id})
            return
        conversation = Conversation(platform=PLATFORM, channel=where["channel"], thread=where["thread_ts"])
        # Slack sends a click again with the same action_ts: the same request, queued once.
        request_id = f"{user}-{action.get('action_ts', '')}"
        try:
            asker = await self.asker(conversation)
            reply_to = {**where, **({"user": asker} if asker else {})}  # as a message's (bot/slack/messages.py)
            submitted = await self.queue.regenerate(
                conversation, job_id, request_id, by=user, admin=self.admin(user), reply_to=reply_to,
                scope=Scope(platform=PLATFORM, workspace=where.get("team"), channel=where["channel"]),
            )
        except RejectedMessage as refused:
            log.info("regenerate refused", extra={"job": job_id, "user": user, "reason": str(refused)})
            await self.tell(where, user, str(refused))
            return
        except REDIS_FAILED as error:
            log.error("could not regenerate an answer", extra={"job": job_id, "error": str(error)})
            await self.tell(where, user, UNAVAILABLE)
            return
        log.info(
            "retried click ignored" if submitted.duplicate else "regeneration queued",
            extra={"job": submitted.job_id, "replaces": job_id, "user": user},
        )
        if not submitted.duplicate:
            await self.sessions.processing(reply_to, asker)

    async def asker(self, conversation: Conversation) -> str | None:
        """Who asked the latest question: the new answer streams to them, as the first one did."""
        exchanges = await load_exchanges(self.redis, conversation.key)
        return exchanges[-1].user.author_id if exchanges else None

    async def tell(self, where: dict[str, str], user: str, text: str) -> None:
        """A sentence only `user` sees, in the thread they clicked in."""
        try:
            await self.slack.call(
                "chat.postEphemeral", where, wait=False, channel=where["channel"], user=user, text=text,
                **({"thread_ts": where["thread_ts"]} if "thread_ts" in where else {}),
            )
        except SLACK_FAILED as error:
            log.info("ephemeral answer not sent", extra={"user": user, "error": str(error) or type(error).__name__})


def clicked_in(body: dict) -> dict[str, str]:
    """The channel and thread of the message a button is on, and the workspace, as reply_to has them."""
    container, message = body.get("container") or {}, body.get("message") or {}
    where = {"channel": container.get("channel_id") or body["channel"]["id"]}
    thread = container.get("thread_ts") or message.get("thread_ts")
    if thread:
        where["thread_ts"] = thread
    return {**where, **workspace((body.get("team") or {}).get("id"), (body.get("enterprise") or {}).get("id"))}
