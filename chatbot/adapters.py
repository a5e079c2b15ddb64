"""Adapter commands: each runs one platform adapter against the queue (the worker runs elsewhere)."""

from __future__ import annotations

import argparse
import asyncio

from chatbot.runtime import serve, startup
from service.process import on_terminate
from service.tasks import until_first_ends


def register(commands: argparse._SubParsersAction) -> None:
    discord = commands.add_parser("discord", help="run the Discord adapter")
    discord.set_defaults(handler=lambda args: run_adapter(args, "discord"))
    slack = commands.add_parser("slack", help="run the Slack adapter")
    slack.set_defaults(handler=lambda args: run_adapter(args, "slack"))


def adapter_runner(platform: str):
    """The adapter's `run(settings, secrets, redis)` coroutine function, imported only when used."""
    if platform == "discord":
        from bot.discord.app import run_discord

        return run_discord
    from bot.slack.app import run_slack

    return run_slack


def platforms_configured(secrets) -> list[str]:
    slack = secrets.get("SLACK_BOT_TOKEN") or secrets.get("SLACK_CLIENT_ID")  # one workspace, or many through OAuth
    return [platform for platform, wanted in (("discord", secrets.get("DISCORD_TOKEN")), ("slack", slack)) if wanted]


def run_adapter(args: argparse.Namespace, platform: str) -> int:
    settings, secrets = startup(args.config)
    run = adapter_runner(platform)

    async def until_stopped(redis) -> None:
        stop = asyncio.Event()
        on_terminate(stop.set)  # SIGTERM (docker stop) and Ctrl-C close connections cleanly
        await until_first_ends(run(settings, secrets, redis), stop.wait())

    # An adapter alone is no use without a worker: it joins the configured Redis or the one
    # `chatbot demo`/`chatbot worker` started, and never starts its own.
    return serve(settings, until_stopped, start_embedded=False)
