"""Local chat in the terminal: an adapter like the Discord and Slack ones, on the same queue and reply stream.

The input line stays at the bottom of the terminal (prompt_toolkit) while answers print above it,
so the person can stop an answer, or type the next message, while one streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
import uuid
from dataclasses import dataclass
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.input import Input
from prompt_toolkit.output import DummyOutput, Output
from prompt_toolkit.patch_stdout import patch_stdout
from redis.asyncio import Redis

from contract import history
from contract.controls import STOPPING, request_stop
from contract.intake import Intake
from contract.jobs import Conversation, RejectedMessage, Submitted
from contract.replies import follow, last_entry_id
from service.config import Settings
from service.tasks import until_first_ends

HELP = (
    "Type a message and press Enter, also while an answer streams (it is answered next). "
    "/stop ends the answer, /regenerate answers the last message anew, /reset forgets the conversation, /quit leaves."
)
USER = "terminal"  # whoever sits at this terminal asked every message here, and may stop or regenerate any answer
YOU, BOT = "you> ", "bot> "
REPLACES = "(a new answer to the last message, replacing the previous one)"


@dataclass(frozen=True)
class Pending:
    """An answer to show after those asked before it: its job, the reply stream entry its events come after,
    and the line printed above it."""

    job_id: str
    after: str
    heading: str


async def chat(
    redis: Redis,
    settings: Settings,
    conversation: Conversation | None = None,
    input: Input | None = None,
    output: Output | None = None,
    out: TextIO | None = None,
) -> None:
    """Chat until /quit or Ctrl-C, or until the input ends and the answers asked for are shown.

    `input` and `output` are the terminal's by default (tests pass a pipe and a DummyOutput);
    the transcript goes to `out`, stdout by default.
    """
    if output is None and not sys.stdout.isatty():
        output = DummyOutput()  # a prompt drawn into a pipe would fill it with escape codes: the transcript alone goes there
    print(HELP, file=out or sys.stdout, flush=True)  # before the input line is drawn, which it would overlap
    # patch_stdout makes sys.stdout print above the input line rather than through it.
    with patch_stdout() if output is None else contextlib.nullcontext():
        conversation = conversation or Conversation(platform="local", channel="terminal")
        await TerminalChat(redis, settings, conversation, out or sys.stdout, input, output).run()


class TerminalChat:
    def __init__(
        self, redis: Redis, settings: Settings, conversation: Conversation, out: TextIO, input: Input | None, output: Output | None
    ):
        self.redis = redis
        self.conversation = conversation
        self.out = out
        self.intake = Intake(redis, settings.limits, settings.pools)
        self.answers: asyncio.Queue[Pending] = asyncio.Queue()
        self.showing: str | None = None  # the job whose answer is printing
        self.line = ""  # that answer's unfinished last line
        # Erased once typed: a message is printed above its answer instead, so the transcript reads in order.
        self.session: PromptSession[str] = PromptSession(self.prompt, erase_when_done=True, input=input, output=output)
        self.drawn = not isinstance(self.session.output, DummyOutput)

    async def run(self) -> None:
        # The answers are shown until the person leaves; an error showing them ends the chat too.
        await until_first_ends(self.read(), self.show_answers())

    async def read(self) -> None:
        while True:
            try:
                # SIGINT stays the worker's (it ends the whole process); Ctrl-C at the prompt is a key.
                line = await self.session.prompt_async(handle_sigint=False)
            except EOFError:  # a pipe ran dry, or Ctrl-D: show what was asked, then leave
                await self.answers.join()
                return
            except KeyboardInterrupt:  # Ctrl-C leaves, as /quit does
                return
            text = line.strip()
            if text in ("/quit", "/exit"):
                return
            try:
                if text == "/reset":
                    await history.reset(self.redis, self.conversation.key)
                    self.say("conversation forgotten")
                elif text == "/stop":
                    await self.stop()
                elif text == "/regenerate":
                    await self.regenerate()
                else:
                    after = await self.reply_position()
                    submitted = await self.intake.submit(self.conversation, uuid.uuid4().hex, line, author_id=USER)
                    self.expect(submitted, after, f"{YOU}{text}")
            except RejectedMessage as refused:
                self.say(str(refused))

    async def stop(self) -> None:
        if self.showing is None:
            self.say("no answer to stop")
            return
        sentence = await request_stop(self.redis, self.showing, USER, admin=True)
        if sentence != STOPPING:  # a stopped answer says so at its end
            self.say(sentence)

    async def regenerate(self) -> None:
        if self.showing is not None or not self.answers.empty():
            # Until then the latest exchange in the history is not the latest answer asked for.
            self.say("wait for the answers to end, or /stop them, before regenerating")
            return
        exchanges = await history.load_exchanges(self.redis, self.conversation.key)
        if not exchanges:
            self.say("no answer to regenerate")
            return
        after = await self.reply_position()
        submitted = await self.intake.regenerate(
            self.conversation, exchanges[-1].assistant.job, uuid.uuid4().hex, by=USER, admin=True
        )
        self.expect(submitted, after, REPLACES)

    async def reply_position(self) -> str:
        """Where the conversation's reply stream ends: taken before submitting, so no event of the answer is missed."""
        return await last_entry_id(self.redis, self.conversation.platform, self.conversation.key)

    def expect(self, submitted: Submitted, after: str, heading: str) -> None:
        if submitted.ahead:
            self.say(f"queued behind {submitted.ahead} message(s)")
        self.answers.put_nowait(Pending(submitted.job_id, after, heading))

    async def show_answers(self) -> None:
        """Print the answers in the order they were asked for, each as it streams: each event holds the whole text so far."""
        conversation = self.conversation
        while True:
            pending = await self.answers.get()
            self.showing = pending.job_id
            self.print(pending.heading)
            self.line, shown = BOT, ""
            async for event in follow(self.redis, conversation.platform, conversation.key, pending.job_id, pending.after):
                if not event.text.startswith(shown):  # the worker rewrote the answer: show it again, whole
                    self.end_line()
                    shown = ""
                self.write(event.text[len(shown):])
                shown = event.text
            self.end_line()
            self.showing = None
            self.answers.task_done()

    def write(self, text: str) -> None:
        """Print the answer's finished lines; its unfinished one is drawn above the input line until it ends."""
        *finished, self.line = (self.line + text).split("\n")
        if self.drawn:
            # Above the input line, one row of it shows: rows are printed as they fill, broken between words.
            columns = self.session.output.get_size().columns - 1  # the last column would wrap on some terminals
            exact = {"drop_whitespace": False, "expand_tabs": False, "replace_whitespace": False}  # rows join back into the line
            *rows, last = textwrap.wrap(self.line, columns, **exact) or [""]
            finished += [row.rstrip() for row in rows]
            self.line = last.lstrip() if rows else last
        for line in finished:
            self.print(line)
        self.session.app.invalidate()

    def end_line(self) -> None:
        self.print(self.line)
        self.line = ""
        self.session.app.invalidate()

    def prompt(self) -> str:
        return f"{self.line}\n{YOU}" if self.line else YOU

    def say(self, sentence: str) -> None:
        self.print(f"({sentence})")

    def print(self, line: str) -> None:
        print(line, file=self.out, flush=True)
