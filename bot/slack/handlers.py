"""What the bot does with the requests bolt hands it: queue messages, show the agent surface, reset, personas, feedback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext

from bot.delivery import Part
from bot.slack.budget import SLACK_FAILED, PacedSlack
from bot.slack.dm_threads import DmThreads
from bot.slack.files import NOT_READABLE, SlackFiles
from bot.slack.messages import PLATFORM, Incoming, direct_message, from_slack, mention, workspace
from bot.slack.outbox import FEEDBACK_ACTION, SlackOutbox, feedback_value
from bot.slack.sessions import AgentSessions
from bot.slack.status import ThreadStatus
from bot.titles import thread_title
from contract import keys
from contract.feedback import RATINGS, FeedbackStore
from contract.intake import Intake
from contract.jobs import UNAVAILABLE, RejectedMessage, Scope
from contract.personas import Personas
from service.observability import FEEDBACK
from service.redis_client import REDIS_FAILED
from service.slack_settings import SlackSettings

log = logging.getLogger(__name__)

RESET_DONE = "Done: I have forgotten our conversations."
RESET_IN_CHANNEL = "In channels every thread is its own conversation: mention me in a new thread to start afresh."
RESET_FAILED = "Sorry, the conversations could not be reset right now. Please try again later."
# Slack shows an error unless a slash command is acknowledged within 3 s, and the
# acknowledgement carries the answer: the reset gets what is left after network time.
RESET_TIMEOUT_S = 2.0
PERSONA_TIMEOUT_S = 2.0  # the same budget for /persona's Redis work
PERSONA_NOT_ADMIN = "Only the bot's admins can change this channel's persona."
PERSONA_NO_ADMINS = "Nobody can change personas: no admins are configured (slack.admin_user_ids in config.yaml)."
PERSONA_SET = "Persona set for this channel: it applies from the next message."
PERSONA_FAILED = "Sorry, the persona could not be changed or shown right now. Please try again later."


def persona_usage(command: str) -> str:
    return f"Usage: `{command} set <persona text>`, `{command} show` or `{command} clear`."


def persona_shown(text: str, source: str) -> str:
    # Escaped as Slack asks of message text, so the persona reads exactly as it is stored.
    quoted = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"This channel's system prompt ({source}):\n>>> {quoted}"


def persona_cleared(had_one: bool, source: str) -> str:
    if had_one:
        return f"Persona cleared: from the next message this channel gets its default system prompt ({source})."
    return f"This channel had no persona set at run time: it gets its default system prompt ({source})."


class DisplayNames:
    """Authors' names for prompts in shared channels, looked up once per user per process."""

    def __init__(self, slack: PacedSlack):
        self.slack = slack
        self.known: dict[str, str] = {}

    async def of(self, user_id: str | None, reply_to: dict[str, str]) -> str | None:
        if not user_id:
            return None
        if user_id not in self.known:
            try:  # not waiting for the budget: without the name, the prompt still has the message
                response = await self.slack.call("users.info", reply_to, wait=False, user=user_id)
            except SLACK_FAILED as error:
                log.warning("user name lookup failed", extra={"user": user_id, "error": str(error)})
                return None
            user = response["user"]
            profile = user.get("profile", {})
            self.known[user_id] = profile.get("display_name") or profile.get("real_name") or user.get("name") or user_id
        return self.known[user_id]


class Background:
    """Best-effort calls that go on after the acknowledgement: a failure is logged, never raised."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()  # held until done: the event loop keeps only weak references

    def run(self, what: str, call: Awaitable) -> None:
        task = asyncio.create_task(self._best_effort(what, call))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _best_effort(what: str, call: Awaitable) -> None:
        try:
            await call
        except (*SLACK_FAILED, *REDIS_FAILED) as error:
            log.info("slack call skipped", extra={"what": what, "error": str(error) or type(error).__name__})


class SlackListeners:
    """One method per kind of request bolt delivers; `register` wires them to the app."""

    def __init__(
        self, slack: PacedSlack, settings: SlackSettings, queue: Intake, outbox: SlackOutbox, status: ThreadStatus,
        feedback: FeedbackStore, files: SlackFiles, dm_threads: DmThreads, personas: Personas, sessions: AgentSessions,
    ):
        self.slack = slack
        self.settings = settings
        self.queue = queue
        self.redis = queue.redis
        self.outbox = outbox
        self.status = status
        self.feedback = feedback
        self.files = files
        self.dm_threads = dm_threads
        self.personas = personas
        self.sessions = sessions
        self.names = DisplayNames(slack)
        self.background = Background()
        self.prompts = [prompt.model_dump() for prompt in settings.suggested_prompts]

    def register(self, app: AsyncApp) -> None:
        app.event("message")(self.on_message)
        # Registered even when mentions are off: an unhandled event would get a 404 and be retried.
        app.event("app_mention")(self.on_mention)
        app.event("app_home_opened")(self.on_home_opened)
        app.action(FEEDBACK_ACTION)(self.on_feedback)
        app.command(self.settings.reset_command)(self.on_reset)
        app.command(self.settings.persona_command)(self.on_persona)
        if not self.settings.admin_user_ids:
            log.warning(
                f"{self.settings.persona_command} refuses everyone: slack.admin_user_ids is empty",
                extra={"command": self.settings.persona_command},
            )

    async def on_message(self, event: dict, context: AsyncBoltContext) -> None:
        incoming = direct_message(event, context.team_id, context.enterprise_id)
        if incoming is None:
            log.debug("message event ignored", extra={"subtype": event.get("subtype"), "channel_type": event.get("channel_type")})
            return
        await self.submit(incoming, author=None)

    async def on_mention(self, event: dict, context: AsyncBoltContext) -> None:
        incoming = mention(event, context.team_id, context.bot_user_id, context.enterprise_id) if self.settings.answer_mentions else None
        if incoming is None:
            return
        await self.submit(incoming, await self.names.of(incoming.user, incoming.reply_to))

    async def on_home_opened(self, event: dict, context: AsyncBoltContext) -> None:
        # An agent app sets its prompts for the chat, never for a thread (with thread_ts the call
        # silently fails), where they stay for the next new thread: Slack sends this event on every
        # open of the Messages tab, and the prompts are set again only after prompts_interval_s.
        if event.get("tab") != "messages" or not self.prompts:
            return
        key = keys.slack_prompts_set(context.team_id, event["user"])
        try:
            due = await self.redis.set(key, 1, nx=True, ex=int(self.settings.prompts_interval_s))
        except REDIS_FAILED as error:
            log.info("suggested prompts skipped", extra={"user": event["user"], "error": str(error) or type(error).__name__})
            return
        if due:
            chat = {"channel": event["channel"], **workspace(context.team_id, context.enterprise_id)}
            self.background.run("suggested prompts", self.set_prompts(chat, key))

    async def set_prompts(self, chat: dict[str, str], key: str) -> None:
        try:
            await self.slack.call(
                "assistant.threads.setSuggestedPrompts", chat, wait=False,
                channel_id=chat["channel"], title=self.settings.prompts_title or None, prompts=self.prompts,
            )
        except SLACK_FAILED:
            await self.redis.delete(key)  # not set: the next open tries again
            raise

    async def on_feedback(self, ack: AsyncAck, body: dict, action: dict) -> None:
        await ack()
        rating, job_id, conversation = feedback_value(action.get("value", ""))
        user = body.get("user", {}).get("id", "")
        if rating not in RATINGS or not job_id:
            log.warning("feedback click not understood", extra={"value": action.get("value")})
            return
        # A click Slack delivers again carries the same rating: stored once. Another rating replaces it.
        if not await self.feedback.record(job_id, user, rating, conversation):
            log.info("repeated feedback click ignored", extra={"job": job_id, "user": user})
            return
        FEEDBACK.labels(PLATFORM, rating).inc()
        log.info("feedback recorded", extra={"job": job_id, "user": user, "rating": rating, **await self.feedback.counts()})

    async def on_reset(self, ack: AsyncAck, command: dict) -> None:
        who = {"user": command.get("user_id"), "channel": command.get("channel_id")}
        if command.get("channel_name") != "directmessage":
            await ack(response_type="ephemeral", text=RESET_IN_CHANNEL)
            return
        try:
            forgotten = await asyncio.wait_for(self.dm_threads.forget_all(command["channel_id"]), RESET_TIMEOUT_S)
        except (TimeoutError, *REDIS_FAILED) as error:
            log.error("reset failed", extra={**who, "error": str(error) or type(error).__name__})
            await ack(response_type="ephemeral", text=RESET_FAILED)
            return
        log.info("conversations reset", extra={**who, "conversations": forgotten})
        await ack(response_type="ephemeral", text=RESET_DONE)

    async def on_persona(self, ack: AsyncAck, command: dict) -> None:
        """`set <text>`, `show`, `clear` the channel's run-time persona; admins only, answered on the acknowledgement."""
        user = command.get("user_id")
        who = {"user": user, "channel": command.get("channel_id"), "team": command.get("team_id")}
        if user not in self.settings.admin_user_ids:
            refusal = PERSONA_NOT_ADMIN if self.settings.admin_user_ids else PERSONA_NO_ADMINS
            log.warning("persona command refused", extra={**who, "reason": refusal})
            await ack(response_type="ephemeral", text=refusal)
            return
        words = (command.get("text") or "").split(maxsplit=1)  # `set`, then the persona with its line breaks
        action, rest = (words[0].lower() if words else ""), (words[1] if len(words) > 1 else "")
        if action not in ("set", "show", "clear") or (action != "set" and rest):
            await ack(response_type="ephemeral", text=persona_usage(self.settings.persona_command))
            return
        scope = Scope(platform=PLATFORM, workspace=command.get("team_id") or None, channel=command["channel_id"])
        try:
            answer = await asyncio.wait_for(self.persona_action(action, scope, from_slack(rest), who), PERSONA_TIMEOUT_S)
        except (TimeoutError, *REDIS_FAILED) as error:
            log.error("persona command failed", extra={**who, "action": action, "error": str(error) or type(error).__name__})
            answer = PERSONA_FAILED
        await ack(response_type="ephemeral", text=answer)

    async def persona_action(self, action: str, scope: Scope, text: str, who: dict) -> str:
        if action == "set":
            try:
                await self.personas.set(scope, text)
            except ValueError as refused:  # the persona itself: empty, too long; the message is for the user
                log.info("persona refused", extra={**who, "reason": str(refused)})
                return str(refused)
            log.info("persona set", extra={**who, "chars": len(text.strip())})
            return PERSONA_SET
        if action == "show":
            shown = await self.personas.system_prompt(scope)
            log.info("persona shown", extra={**who, "source": shown.source})
            return persona_shown(shown.text, shown.source)
        had_one = await self.personas.clear(scope)
        now = await self.personas.system_prompt(scope)
        log.info("persona cleared", extra={**who, "had_one": had_one, "now": now.source})
        return persona_cleared(had_one, now.source)

    async def submit(self, incoming: Incoming, author: str | None) -> None:
        reply_to = incoming.reply_to
        limit = self.queue.limits.max_message_chars
        text, attached = await self.files.message_text(incoming.text, incoming.files, limit, reply_to)
        if text is None:
            log.info("message without readable text", extra={"slack_message": incoming.message_id})
            self.tell(incoming, NOT_READABLE)
            return
        try:
            if incoming.in_dm:  # remembered before queueing: a /reset racing this message must find its thread
                await self.dm_threads.remember(incoming.conversation)
            submitted = await self.queue.submit(
                incoming.conversation, incoming.message_id, text, author, reply_to, author_id=incoming.user,
                scope=incoming.scope,
            )
        except RejectedMessage as rejected:
            log.info("message refused", extra={"slack_message": incoming.message_id, "reason": str(rejected)})
            self.tell(incoming, str(rejected))
            return
        except REDIS_FAILED as error:
            # Answered and acknowledged: an error would make Slack send the event again, into a second apology.
            log.error("could not queue a message", extra={"slack_message": incoming.message_id, "error": str(error)})
            self.tell(incoming, UNAVAILABLE)
            return
        log.info(
            "retried delivery ignored" if submitted.duplicate else "message queued",
            extra={"job": submitted.job_id, "conversation": incoming.conversation.key, "ahead": submitted.ahead},
        )
        if submitted.duplicate:
            return
        if attached.cut:
            self.tell(incoming, attached.cut_notice(limit))
        # Slack wants the event acknowledged within 3 s: its status and title go on after.
        self.background.run("status", self.status.show(submitted.job_id, reply_to, submitted.ahead))
        # Slack's native Stop shows while the thread's agent session is processing (bot/slack/controls.py).
        self.background.run("session", self.sessions.processing(reply_to, incoming.user))
        if incoming.starts_thread:
            title = thread_title(incoming.text or ", ".join(file.name for file in incoming.files))
            self.background.run("title", self.slack.call(
                "assistant.threads.setTitle", reply_to, wait=False, channel_id=reply_to["channel"], thread_ts=reply_to["thread_ts"], title=title
            ))

    def tell(self, incoming: Incoming, text: str) -> None:
        """One sentence in the message's thread, after the acknowledgement: a post held by Slack's rate
        limit must not make Slack deliver the event again."""
        self.background.run("reply", self.outbox.post(Part(f"{PLATFORM}:{incoming.message_id}", incoming.reply_to, text)))
