"""Operator commands that act through Redis, as an adapter would: ask, reset, pause, feedback, usage, forget-user, doctor."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from chatbot.doctor import doctor_command
from chatbot.runtime import one_shot_client
from contract import history, keys
from contract.erasure import forget_user
from contract.feedback import FeedbackStore
from contract.intake import Intake
from contract.jobs import RejectedMessage, conversation_argument
from contract.pause import pause, resume
from contract.replies import follow, last_entry_id
from contract.usage import DIMENSIONS, USAGE_KEEP_DAYS, report
from service.config import load_settings

DEFAULT_CONVERSATION = "cli:default"


def register(commands: argparse._SubParsersAction) -> None:
    ask = commands.add_parser("ask", help="send one message through the queue and print the reply")
    ask.add_argument("text")
    ask.add_argument(
        "--conversation", type=conversation_argument, default=DEFAULT_CONVERSATION, help="conversation id, e.g. cli:default"
    )
    ask.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the reply")
    ask.set_defaults(handler=ask_command)

    reset = commands.add_parser("reset", help="forget a conversation's history")
    reset.add_argument(
        "conversation", type=conversation_argument, help="conversation id as the logs show it, e.g. discord:1234 or slack:D0123:1700000000.000100"
    )
    reset.set_defaults(handler=reset_command)

    pause = commands.add_parser("pause", help="stop taking new messages (people are told); running answers finish")
    pause.add_argument("reason", nargs="?", default="", help="shown to people with the refusal, e.g. 'maintenance until 14:00 UTC'")
    pause.set_defaults(handler=pause_command)

    resume = commands.add_parser("resume", help="take messages again after `chatbot pause`")
    resume.set_defaults(handler=resume_command)

    feedback = commands.add_parser("feedback", help="print users' recent ratings of answers, with question and answer")
    feedback.add_argument("--limit", type=int, default=20, help="how many ratings, newest first (default 20)")
    feedback.set_defaults(handler=feedback_command)

    usage = commands.add_parser("usage", help="print tokens used per author, conversation or workspace over the last days")
    usage.add_argument("--by", choices=DIMENSIONS, default="author", help="group by (default: author)")
    usage.add_argument(
        "--days", type=int, choices=range(1, USAGE_KEEP_DAYS + 1), default=7, metavar=f"1..{USAGE_KEEP_DAYS}",
        help="days back, today (UTC) included (default 7)",
    )
    usage.add_argument("--limit", type=int, default=50, help="rows, most tokens first (default 50)")
    usage.set_defaults(handler=usage_command)

    forget = commands.add_parser(
        "forget-user", help="erase one person's messages, the answers to them, their ratings and usage everywhere"
    )
    forget.add_argument("platform", choices=["discord", "slack", "local"])
    forget.add_argument("user_id", help="the platform's user id (Discord: a number; Slack: U0123ABCD)")
    forget.set_defaults(handler=forget_user_command)

    doctor = commands.add_parser("doctor", help="pre-flight checks before going live: Redis, the model budget, the Slack and Discord apps")
    doctor.set_defaults(handler=doctor_command)


def ask_command(args: argparse.Namespace) -> int:
    settings, redis = one_shot_client(args.config)
    conversation = args.conversation

    async def ask() -> int:
        queue = Intake(redis, settings.limits, settings.pools)
        after = await last_entry_id(redis, conversation.platform, conversation.key)
        try:
            submitted = await queue.submit(conversation, uuid.uuid4().hex, args.text)
        except RejectedMessage as rejected:
            print(rejected, file=sys.stderr)
            return 1
        async for event in follow(redis, conversation.platform, conversation.key, submitted.job_id, after):
            if event.kind != "partial":
                print(event.text, file=sys.stdout if event.kind == "final" else sys.stderr)
                return 0 if event.kind == "final" else 1
        return 1

    async def main() -> int:
        try:
            return await asyncio.wait_for(ask(), args.timeout)
        except TimeoutError:
            print(f"no reply within {args.timeout:g} s: is `chatbot worker` running?", file=sys.stderr)
            return 1
        finally:
            await redis.aclose()

    return asyncio.run(main())


def against_redis(args: argparse.Namespace, work: Callable[[Redis], Awaitable[int]]) -> int:
    """Run one command's work with a connection to the configured Redis, closed after."""
    _, redis = one_shot_client(args.config)

    async def main() -> int:
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


def reset_command(args: argparse.Namespace) -> int:
    async def reset(redis: Redis) -> int:
        epoch = await history.reset(redis, args.conversation.key)
        print(f"{args.conversation.key}: history cleared (reset #{epoch})")
        return 0

    return against_redis(args, reset)


def pause_command(args: argparse.Namespace) -> int:
    async def pause_all(redis: Redis) -> int:
        await pause(redis, args.reason)
        settings = load_settings(args.config)
        queued = sum([int(await redis.get(keys.queued(pool)) or 0) for pool in settings.pools.names])
        print(
            f"paused: new messages are refused with a sentence{' giving the reason' if args.reason else ''}; "
            f"answers being written finish; {queued} queued or running message(s) wait for `chatbot resume`"
        )
        return 0

    return against_redis(args, pause_all)


def resume_command(args: argparse.Namespace) -> int:
    async def resume_all(redis: Redis) -> int:
        was_paused = await resume(redis)
        print("resumed: messages are taken again" if was_paused else "not paused: nothing to resume")
        return 0

    return against_redis(args, resume_all)


def feedback_command(args: argparse.Namespace) -> int:
    async def show(redis: Redis) -> int:
        store = FeedbackStore(redis)
        votes, counts = await store.recent(args.limit), await store.counts()
        print(f"{counts['good']} good, {counts['bad']} bad in all; the newest {len(votes)}:")
        for vote in votes:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(vote.at))
            print(f"\n{when} UTC  {vote.rating.upper()}  by {vote.user}  in {vote.conversation or '?'}  (job {vote.job_id})")
            print(f"  asked:    {_one_line(vote.question)}")
            print(f"  answered: {_one_line(vote.answer)}")
        return 0

    return against_redis(args, show)


def usage_command(args: argparse.Namespace) -> int:
    async def show(redis: Redis) -> int:
        rows = await report(redis, args.by, args.days)
        print(f"{args.by:<48} {'tokens in':>12} {'tokens out':>12} {'answers':>9}   (last {args.days} day(s), UTC)")
        for row in rows[: args.limit]:
            print(f"{row.name:<48} {row.tokens_in:>12,} {row.tokens_out:>12,} {row.messages:>9,}")
        if len(rows) > args.limit:
            print(f"... and {len(rows) - args.limit} more (--limit)")
        total_in, total_out = sum(r.tokens_in for r in rows), sum(r.tokens_out for r in rows)
        print(f"{'total':<48} {total_in:>12,} {total_out:>12,} {sum(r.messages for r in rows):>9,}")
        return 0

    return against_redis(args, show)


def forget_user_command(args: argparse.Namespace) -> int:
    async def forget(redis: Redis) -> int:
        erased = await forget_user(redis, args.platform, args.user_id)
        print(f"forgot {args.platform} user {args.user_id}: {erased.summary()}")
        if erased.still_queued:
            print("their queued messages will be answered and stored: run this again once they are (or pause first)")
        return 0

    return against_redis(args, forget)


def _one_line(text: str | None, limit: int = 200) -> str:
    if text is None:
        return "(no longer stored)"
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
