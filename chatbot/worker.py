"""The model worker's commands: serve, and show the exact prompt it would build next."""

from __future__ import annotations

import argparse
import asyncio
import sys

from redis.asyncio import Redis

from chatbot.runtime import one_shot_client, serve, startup
from contract import history
from contract.jobs import Scope, conversation_argument
from contract.personas import Personas
from contract.pools import pool_for
from service.config import Settings
from service.process import on_terminate, process_identity


def register(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="serve the model: take jobs from Redis, answer them")
    worker.set_defaults(handler=worker_command)

    prompt = commands.add_parser("prompt", help="print the exact prompt the worker would build next")
    prompt.add_argument("conversation", type=conversation_argument, help="conversation id, e.g. cli:default")
    prompt.add_argument("text", nargs="?", default="(next message)", help="the next message (default: a placeholder)")
    prompt.add_argument("--workspace", help="the Discord guild or Slack team id, for a persona set for a workspace")
    prompt.add_argument("--channel", help="the channel whose persona applies (default: the conversation's; a thread's parent)")
    prompt.set_defaults(handler=prompt_command)


async def run_worker(settings: Settings, redis: Redis) -> None:
    """Load the model and serve until SIGTERM/SIGINT."""
    # Imported here: torch and transformers take seconds to import, and `chatbot ask/reset` need neither.
    from engine.serving import load_engine
    from engine.serving.engine import on_model_thread
    from engine.worker import Worker

    engine = await on_model_thread(load_engine, settings)
    worker = Worker(redis, engine, settings, process_identity(settings.worker_name))
    on_terminate(worker.stop)
    await worker.run()


def worker_command(args: argparse.Namespace) -> int:
    settings, _ = startup(args.config)
    return serve(settings, lambda redis: run_worker(settings, redis))


def prompt_command(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from engine.assets import resolve_model
    from engine.prompts import PromptBuilder

    settings, redis = one_shot_client(args.config)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings.model.id))
    builder = PromptBuilder.for_settings(tokenizer, settings)

    conversation = args.conversation
    scope = Scope(platform=conversation.platform, workspace=args.workspace, channel=args.channel or conversation.channel)

    async def main() -> int:
        try:
            exchanges = await history.load_exchanges(redis, conversation.key)
            system_prompt = await Personas(redis, settings).system_prompt(scope)
        finally:
            await redis.aclose()
        prompt = builder.with_system_prompt(system_prompt.text).build(exchanges, args.text)
        print(prompt.text)
        print(
            f"--- pool: {pool_for(settings.pools, scope)}; system prompt: {system_prompt.source}; {len(prompt.ids)} tokens (budget {settings.model.max_prompt_tokens}); "
            f"{prompt.kept_exchanges} exchanges kept, {prompt.dropped_exchanges} dropped"
            + ("; message cut" if prompt.cut else ""),
            file=sys.stderr,
        )
        return 0

    return asyncio.run(main())
