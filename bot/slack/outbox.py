"""The Slack side of reply delivery: answers stream natively into their thread, within the rate budget.

A reply's first message starts a stream, streamed through slack-sdk's buffered helper
(`AsyncChatStream`: chat.startStream, then chat.appendStream once `stream_buffer_chars` of
new text gathered); the stream is stopped (chat.stopStream) when the message is settled,
with the feedback and Regenerate buttons on an answer's last message (an edited, not streamed,
answer carries a Stop button while it is written: bot/slack/controls.py). Every call the helper makes passes
the workspace's rate budget. Where streaming fails (an expired stream, a workspace without
the feature, a method or network error) that message falls back to chat.update of its whole
text, and the log says so; a workspace that has no streaming is not asked again for
STREAMING_RETRY_S. Text that is settled when first shown (a short answer, a refusal) is one
chat.postMessage. Once an answer's last message is shown, its thread's agent session goes back to
`active` (bot/slack/sessions.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_chat_stream import AsyncChatStream
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bot.delivery import Deferred, Part
from bot.slack.budget import CALL_FAILED, PacedSlack
from bot.slack.messages import to_markdown
from bot.slack.sessions import AgentSessions
from service.observability import PLATFORM_ERRORS
from service.slack_settings import SlackSettings

log = logging.getLogger(__name__)

# Slack accepts longer text, but a message reads best under 4,000 characters (and
# chat.appendStream takes at most 12,000 at once).
LIMIT = 3900
FEEDBACK_ACTION = "answer_feedback"
STOP_ACTION = "stop_answer"
REGENERATE_ACTION = "regenerate_answer"
STREAMING_RETRY_S = 600.0
# chat.startStream errors that mean the workspace or app cannot stream at all, not just this message.
NO_STREAMING = {"feature_not_enabled", "not_allowed", "unknown_method", "missing_scope", "method_deprecated"}


class PacedStreamCalls:
    """The three methods AsyncChatStream calls on its client, through the workspace's rate budget.

    A short budget raises Deferred out of `append`; the helper keeps its buffer, which it
    empties only after a call succeeded (slack_sdk/web/async_chat_stream.py, `_flush_buffer`),
    so that text goes with the next call. Stopping waits for the budget: the final text lands.
    """

    def __init__(self, slack: PacedSlack, reply_to: dict[str, str]):
        self.slack = slack
        self.reply_to = reply_to

    async def chat_startStream(self, **arguments: Any) -> AsyncSlackResponse:
        return await self.slack.call("chat.startStream", self.reply_to, wait=False, **arguments)

    async def chat_appendStream(self, **arguments: Any) -> AsyncSlackResponse:
        return await self.slack.call("chat.appendStream", self.reply_to, wait=False, **arguments)

    async def chat_stopStream(self, **arguments: Any) -> AsyncSlackResponse:
        return await self.slack.call("chat.stopStream", self.reply_to, wait=True, **arguments)


@dataclass
class Stream:
    helper: AsyncChatStream
    given: str  # the markdown handed to the helper so far: Slack has it, or the helper's buffer does


def feedback_block(job_id: str, conversation: str) -> dict:
    """Good/bad buttons; a click's value says how, which answer, and of which conversation (see feedback_value)."""

    def button(text: str, rating: str) -> dict:
        value = f"{rating} {job_id} {conversation}"
        return {"text": {"type": "plain_text", "text": text}, "accessibility_label": f"{text} answer", "value": value}

    buttons = {"positive_button": button("Good", "good"), "negative_button": button("Bad", "bad")}
    return {"type": "context_actions", "elements": [{"type": "feedback_buttons", "action_id": FEEDBACK_ACTION, **buttons}]}


def button_block(action_id: str, text: str, job_id: str) -> dict:
    """One button whose click names the answer (its job id)."""
    button = {"type": "button", "action_id": action_id, "text": {"type": "plain_text", "text": text}, "value": job_id}
    return {"type": "actions", "elements": [button]}


def feedback_value(value: str) -> tuple[str, str, str | None]:
    """Rating, job id and conversation of a feedback click (buttons posted before conversations were added lack it)."""
    parts = value.split(" ", 2)
    rating, job_id = (parts + ["", ""])[:2]
    return rating, job_id, parts[2] if len(parts) == 3 else None


# Errors Slack answers that say nothing about the request: trying again may succeed.
PASSING_ERRORS = {"internal_error", "fatal_error", "request_timeout", "service_unavailable", "ratelimited"}


class SlackOutbox:
    limit = LIMIT
    settles = True  # a message whose text is complete is told so: its stream is stopped

    def __init__(self, slack: PacedSlack, settings: SlackSettings, sessions: AgentSessions):
        self.slack = slack
        self.settings = settings
        self.sessions = sessions
        self.streams: dict[str, Stream] = {}  # by message ts, while the message streams
        self.no_streaming_until: dict[str, float] = {}  # team -> time.monotonic()

    async def post(self, part: Part) -> str:
        reply_to = part.reply_to
        if not part.settled and self._may_stream(reply_to):
            markdown = to_markdown(part.text)
            helper = AsyncChatStream(
                PacedStreamCalls(self.slack, reply_to),  # in place of its client: the calls it makes, paced
                logger=log, channel=reply_to["channel"], thread_ts=reply_to["thread_ts"],
                buffer_size=self.settings.stream_buffer_chars,
                recipient_team_id=reply_to.get("team"), recipient_user_id=reply_to.get("user"),
            )
            try:
                # Passing chunks makes the helper flush at once (async_chat_stream.py: `or chunks is not None`):
                # the message must exist now, whatever the buffer size.
                await helper.append(markdown_text=markdown, chunks=[])
                self.streams[helper.ts] = Stream(helper, markdown)
                return helper.ts
            except CALL_FAILED as error:
                self._stream_failed(part, "chat.startStream", error)
        response = await self.slack.call(
            "chat.postMessage", reply_to, wait=part.settled,
            channel=reply_to["channel"], thread_ts=reply_to.get("thread_ts"), **self._content(part, edit=False),
        )
        await self._end_session_if_over(part)
        return response["ts"]

    async def edit(self, message_id: str, part: Part) -> None:
        stream = self.streams.get(message_id)
        if stream is not None:
            markdown = to_markdown(part.text)
            if markdown.startswith(stream.given):
                try:
                    await self._stream_on(message_id, stream, part, markdown)
                    await self._end_session_if_over(part)
                    return
                except CALL_FAILED as error:  # Slack may or may not have the text: rewrite it whole
                    self._stream_failed(part, "chat.appendStream/stopStream", error)
            else:  # the text was re-split across messages: it is rewritten, not appended to
                log.info("streamed message rewritten with chat.update", extra={"job": part.job_id})
                with contextlib.suppress(*CALL_FAILED):
                    await stream.helper.stop()
            self.streams.pop(message_id, None)
        await self.slack.call(
            "chat.update", part.reply_to, wait=part.settled, channel=part.reply_to["channel"], ts=message_id,
            **self._content(part, edit=True),
        )
        await self._end_session_if_over(part)

    def refused(self, error: Exception) -> bool:
        if not isinstance(error, SlackApiError):
            return False  # a timeout or a dropped connection
        return error.response.status_code < 500 and error.response.get("error") not in PASSING_ERRORS

    def forget_streams(self, message_ids: list[str]) -> None:
        """Slack stopped these streams (its native Stop): their messages are finished with chat.update."""
        for message_id in message_ids:
            self.streams.pop(message_id, None)

    async def remove(self, message_id: str, reply_to: dict[str, str]) -> None:
        self.streams.pop(message_id, None)
        await self.slack.call("chat.delete", reply_to, wait=True, channel=reply_to["channel"], ts=message_id)

    async def _stream_on(self, message_id: str, stream: Stream, part: Part, markdown: str) -> None:
        new_text, stream.given = markdown[len(stream.given):], markdown
        if part.settled:
            await stream.helper.stop(markdown_text=new_text or None, blocks=self._controls(part) or None)
            del self.streams[message_id]
        elif await stream.helper.append(markdown_text=new_text) is None:
            raise Deferred("buffered")  # in the helper's buffer: it goes with a later call

    def _may_stream(self, reply_to: dict[str, str]) -> bool:
        # Slack streams only into threads, and outside DMs only to a named recipient.
        in_dm = reply_to["channel"].startswith("D")
        return (
            self.settings.streaming
            and "thread_ts" in reply_to
            and (in_dm or ("team" in reply_to and "user" in reply_to))
            and time.monotonic() >= self.no_streaming_until.get(reply_to.get("team", ""), 0.0)
        )

    def _stream_failed(self, part: Part, method: str, error: BaseException) -> None:
        reason = error.response.get("error", "unknown") if isinstance(error, SlackApiError) else type(error).__name__
        team = part.reply_to.get("team", "")
        if method == "chat.startStream" and reason in NO_STREAMING:
            self.no_streaming_until[team] = time.monotonic() + STREAMING_RETRY_S
        PLATFORM_ERRORS.labels("slack", f"stream_fallback:{reason}").inc()
        log.warning(
            "slack streaming failed: falling back to post and chat.update",
            extra={"job": part.job_id, "method": method, "error": reason, "team": team},
        )

    async def _end_session_if_over(self, part: Part) -> None:
        # A settled message ends the answer when it is the finished answer's last, or when the job
        # is gone (an error reply); a full message with more to come leaves the session processing.
        if part.settled and (part.feedback or await self.sessions.ended(part.job_id)):
            await self.sessions.active(part.reply_to)

    def _content(self, part: Part, edit: bool) -> dict:
        markdown = to_markdown(part.text)
        controls = self._controls(part)
        if not controls and not edit:
            return {"markdown_text": markdown}
        # An edit names all its blocks, so no button of the message's earlier text (a Stop, a
        # replaced answer's Regenerate) stays. With blocks, `text` is only the notification;
        # markdown_text cannot go with blocks.
        return {"text": markdown, "blocks": [{"type": "markdown", "text": markdown}, *controls]}

    def _controls(self, part: Part) -> list[dict]:
        """Stop while the answer is written; the feedback buttons and Regenerate once it is finished."""
        if part.feedback:
            feedback = [feedback_block(part.job_id, part.conversation)] if self.settings.feedback else []
            return [*feedback, button_block(REGENERATE_ACTION, "Regenerate", part.job_id)]
        if not part.settled:
            return [button_block(STOP_ACTION, "Stop", part.job_id)]
        return []
