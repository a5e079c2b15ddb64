"""Engine commands: the worker, and small ops tools that talk to it through Redis."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from engine import history
from engine.feedback import FeedbackStore
from engine.jobs import Conversation, RejectedMessage
from engine.queue import JobQueue
from engine.redis_client import connect
from engine.replies import follow, last_entry_id
from engine.runtime import log_to_file, redis_url, run_worker, serve, startup

DEFAULT_CONVERSATION = "cli:default"


def conversation_id(text: str) -> Conversation:
    """argparse type: a bad id is reported by argparse as one line, with the usage."""
    try:
        return Conversation.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="serve the model: take jobs from Redis, answer them")
    worker.set_defaults(handler=worker_command)

    ask = commands.add_parser("ask", help="send one message through the queue and print the reply")
    ask.add_argument("text")
    ask.add_argument(
        "--conversation", type=conversation_id, default=DEFAULT_CONVERSATION, help="conversation id, e.g. cli:default"
    )
    ask.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the reply")
    ask.set_defaults(handler=ask_command)

    reset = commands.add_parser("reset", help="forget a conversation's history")
    reset.add_argument(
        "conversation", type=conversation_id, help="conversation id as the logs show it, e.g. discord:1234 or slack:D0123:1700000000.000100"
    )
    reset.set_defaults(handler=reset_command)

    prompt = commands.add_parser("prompt", help="print the exact prompt the worker would build next")
    prompt.add_argument("conversation", type=conversation_id, help="conversation id, e.g. cli:default")
    prompt.add_argument("text", nargs="?", default="(next message)", help="the next message (default: a placeholder)")
    prompt.set_defaults(handler=prompt_command)

    feedback = commands.add_parser("feedback", help="print users' recent ratings of answers, with question and answer")
    feedback.add_argument("--limit", type=int, default=20, help="how many ratings, newest first (default 20)")
    feedback.set_defaults(handler=feedback_command)


def worker_command(args: argparse.Namespace) -> int:
    settings, _ = startup(args.config)
    return serve(settings, lambda redis: run_worker(settings, redis))


def _client(args: argparse.Namespace):
    settings, secrets = startup(args.config)
    # A one-shot command speaks to the terminal in sentences; details go to the log file.
    log_to_file(settings, secrets)
    url, _ = redis_url(settings, start_embedded=False)
    return settings, connect(url)


def ask_command(args: argparse.Namespace) -> int:
    settings, redis = _client(args)
    conversation = args.conversation

    async def ask() -> int:
        queue = JobQueue(redis)
        after = await last_entry_id(redis, conversation.platform)
        try:
            submitted = await queue.submit(conversation, uuid.uuid4().hex, args.text)
        except RejectedMessage as rejected:
            print(rejected, file=sys.stderr)
            return 1
        async for event in follow(redis, conversation.platform, submitted.job_id, after):
            if event.kind != "partial":
                print(event.text, file=sys.stdout if event.kind == "final" else sys.stderr)
                return 0 if event.kind == "final" else 1
        return 1

    async def main() -> int:
        try:
            return await asyncio.wait_for(ask(), args.timeout)
        except asyncio.TimeoutError:
            print(f"no reply within {args.timeout:g} s: is `chatbot worker` running?", file=sys.stderr)
            return 1
        finally:
            await redis.aclose()

    return asyncio.run(main())


def reset_command(args: argparse.Namespace) -> int:
    _, redis = _client(args)

    async def main() -> int:
        try:
            epoch = await history.reset(redis, args.conversation.key)
        finally:
            await redis.aclose()
        print(f"{args.conversation.key}: history cleared (reset #{epoch})")
        return 0

    return asyncio.run(main())


def prompt_command(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from engine.assets import resolve_model
    from engine.prompts import PromptBuilder

    settings, redis = _client(args)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings.model.id))
    builder = PromptBuilder(tokenizer, settings.system_prompt, settings.model.max_prompt_tokens)

    async def main() -> int:
        try:
            exchanges = await history.load_exchanges(redis, args.conversation.key)
        finally:
            await redis.aclose()
        prompt = builder.build(exchanges, args.text)
        print(prompt.text)
        print(
            f"--- {len(prompt.ids)} tokens (budget {settings.model.max_prompt_tokens}); "
            f"{prompt.kept_exchanges} exchanges kept, {prompt.dropped_exchanges} dropped"
            + ("; message cut" if prompt.cut else ""),
            file=sys.stderr,
        )
        return 0

    return asyncio.run(main())



def feedback_command(args: argparse.Namespace) -> int:
    _, redis = _client(args)

    async def main() -> int:
        store = FeedbackStore(redis)
        try:
            votes, counts = await store.recent(args.limit), await store.counts()
        finally:
            await redis.aclose()
        print(f"{counts['good']} good, {counts['bad']} bad in all; the newest {len(votes)}:")
        for vote in votes:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(vote.at))
            print(f"\n{when} UTC  {vote.rating.upper()}  by {vote.user}  in {vote.conversation or '?'}  (job {vote.job_id})")
            print(f"  asked:    {_one_line(vote.question)}")
            print(f"  answered: {_one_line(vote.answer)}")
        return 0

    return asyncio.run(main())


def _one_line(text: str | None, limit: int = 200) -> str:
    if text is None:
        return "(no longer stored)"
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
