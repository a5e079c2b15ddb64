"""`chatbot doctor`: pre-flight checks an operator runs before going live.

One line per check as it comes, and a non-zero exit status when any check fails: Redis
(service/doctor.py), the model (engine/doctor.py), and each platform whose token is set
(bot/slack/doctor.py, bot/discord/doctor.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from chatbot.runtime import log_to_file, redis_url, startup
from engine.doctor import model_checks
from service.config import ConfigError, Secrets, Settings
from service.doctor import Check, redis_checks, skipped, within


async def diagnose(
    settings: Settings, secrets: Secrets, redis_at: str | None, out: TextIO = sys.stdout
) -> int:
    """Run every check, print one line each as they come; 1 if any failed, else 0.

    `redis_at`: None when there is no Redis to check (the embedded one is started by the service itself).
    """
    results: list[Check] = []

    def show(checks: list[Check]) -> None:
        for check in checks:
            print(check.line(), file=out, flush=True)
        results.extend(checks)

    if redis_at is None:
        show([skipped("redis", "no REDIS_URL set and no embedded redis-server running: `chatbot run` starts its own")])
    else:
        show(await within("redis", redis_checks(redis_at)))
    # In a thread: loading a tokenizer takes seconds, and the model server's health is a blocking call.
    show(await asyncio.to_thread(model_checks, settings, secrets.get("OPENAI_API_KEY")))
    if secrets.get("SLACK_BOT_TOKEN"):
        from bot.slack.doctor import slack_checks

        show(await within("slack", slack_checks(settings, secrets)))
    elif secrets.get("SLACK_CLIENT_ID"):  # one app installed in many workspaces
        from bot.slack.doctor import workspace_checks

        show(await within("slack", workspace_checks(settings, secrets, redis_at)))
    else:
        show([skipped("slack", "neither SLACK_BOT_TOKEN nor SLACK_CLIENT_ID is set")])
    if secrets.get("DISCORD_TOKEN"):
        from bot.discord.doctor import discord_checks

        show(await within("discord", discord_checks(settings.discord, secrets.get("DISCORD_TOKEN"))))
    else:
        show([skipped("discord", "DISCORD_TOKEN is not set")])

    failed = sum(check.status == "FAIL" for check in results)
    print(f"{failed} of {len(results)} checks failed" if failed else f"all {len(results)} checks passed or skipped", file=out)
    return 1 if failed else 0


def doctor_command(args: argparse.Namespace) -> int:
    settings, secrets = startup(args.config)
    # The terminal gets one line per check; the libraries' logs go to the file, with every token masked.
    log_to_file(settings, secrets)
    return run_doctor(settings, secrets)


def run_doctor(settings: Settings, secrets: Secrets) -> int:
    """Every check against the configured Redis, or the embedded one that is running, if any."""
    try:
        url, _ = redis_url(settings, start_embedded=False)
    except ConfigError:
        url = None
    return asyncio.run(diagnose(settings, secrets, url))
