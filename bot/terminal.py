"""Local chat in the terminal: an adapter like the Discord and Slack ones, on the same queue and reply stream."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from contract import history
from contract.intake import Intake
from contract.jobs import Conversation, RejectedMessage, ReplyEvent
from contract.replies import follow, last_entry_id
from service.config import Settings

HELP = "Type a message and press Enter. /reset forgets the conversation, /quit leaves."


async def read_line(prompt: str) -> str | None:
    """input() in a daemon thread: a pending read must not keep the process alive at shutdown."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str | None] = loop.create_future()

    def read() -> None:
        try:
            value = input(prompt)
        except EOFError:
            value = None
        with contextlib.suppress(RuntimeError):  # the loop closed while we waited
            loop.call_soon_threadsafe(lambda: line.done() or line.set_result(value))

    threading.Thread(target=read, daemon=True).start()
    return await line


async def chat(redis: Redis, settings: Settings, conversation: Conversation | None = None, out=sys.stdout) -> None:
    conversation = conversation or Conversation(platform="local", channel="terminal")
    queue = Intake(redis, settings.limits, settings.pools)
    print(HELP, file=out)
    while (line := await read_line("you> ")) is not None:
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            await history.reset(redis, conversation.key)
            print("(conversation forgotten)", file=out)
            continue
        after = await last_entry_id(redis, conversation.platform, conversation.key)
        try:
            submitted = await queue.submit(conversation, uuid.uuid4().hex, line)
        except RejectedMessage as rejected:
            print(f"({rejected})", file=out)
            continue
        if submitted.ahead:
            print(f"(queued behind {submitted.ahead} message(s))", file=out)
        await show_reply(follow(redis, conversation.platform, conversation.key, submitted.job_id, after), out)


async def show_reply(events: AsyncIterator[ReplyEvent], out) -> None:
    """Print the reply as it streams: each partial event holds the whole text so far."""
    print("bot> ", end="", file=out, flush=True)
    shown = ""
    async for event in events:
        if event.text.startswith(shown):
            print(event.text[len(shown):], end="", file=out, flush=True)
        else:
            print(f"\n{event.text}", end="", file=out, flush=True)
        shown = event.text
    print(file=out)
