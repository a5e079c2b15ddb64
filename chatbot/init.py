"""`chatbot init`: from nothing to a bot whose tokens work, saved in .env.

It says where to click, asks for each token (never shown), checks it live as `chatbot doctor`
does, writes it to the env file (owner-only; never config.yaml), prints the Discord invite link,
and ends with `chatbot doctor`. Tokens already set (in the environment or the env file) are
checked, not asked again, so a second run changes nothing. With --no-input nothing is asked:
what is missing or wrong is one sentence and a non-zero exit status, and nothing is written.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from dataclasses import dataclass
from typing import TextIO

from chatbot.doctor import run_doctor
from chatbot.env_file import EnvFile
from chatbot.runtime import log_to_file
from service.config import ConfigError, Secrets, Settings, load_settings
from service.doctor import APP_CONFIG_TOKEN, Check
from service.logs import mask

PLATFORMS = ("discord", "slack")


@dataclass
class Person:
    """Who `chatbot init` talks to: someone at the terminal, or a script that answers nothing (--no-input)."""

    out: TextIO
    answers: bool

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def secret(self, question: str) -> str:
        """What the person pastes, not shown on a terminal; "" when nothing (Enter, end of input, --no-input)."""
        if not self.answers:
            return ""
        if sys.stdin.isatty():
            return getpass.getpass(question + " ").strip()
        self.say(question)
        return sys.stdin.readline().strip()

    def ready(self, question: str) -> bool:
        """Whether the person pressed Enter to go on (not at the end of input, not with --no-input)."""
        if not self.answers:
            return False
        self.say(question)
        return bool(sys.stdin.readline())


def register(commands: argparse._SubParsersAction) -> None:
    init = commands.add_parser("init", help="set up the Discord bot or the Slack app: tokens checked and saved in .env")
    init.add_argument("platforms", nargs="*", type=_platform, metavar="PLATFORM", help="discord, slack or both (default: ask)")
    init.add_argument(
        "--no-input", action="store_true",
        help="ask nothing: tokens come from the environment (DISCORD_TOKEN, SLACK_BOT_TOKEN, SLACK_APP_TOKEN, SLACK_APP_CONFIG_TOKEN)",
    )
    init.set_defaults(handler=init_command)


def _platform(name: str) -> str:
    # Not argparse's choices: with nargs="*" they refuse an empty list.
    if name not in PLATFORMS:
        raise argparse.ArgumentTypeError(f"{name} is not a platform: discord or slack")
    return name


def init_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    # The libraries' logs go to the file (the terminal is the conversation), each pasted token masked.
    log_to_file(settings, Secrets.from_env())
    person = Person(sys.stdout, answers=not args.no_input)
    env = EnvFile.configured()
    platforms = args.platforms or _which(person)
    for platform in dict.fromkeys(platforms):
        values = asyncio.run(set_up_discord(person, settings) if platform == "discord" else set_up_slack(person, settings, env))
        if values is None:
            return 1
        changed = env.keep(values)
        person.say(f"Saved {', '.join(changed)} in {env.path} (readable by you only)." if changed else f"{env.path} already holds these.")
    person.say("\nchatbot doctor:")
    return run_doctor(settings, Secrets.from_env())


def _which(person: Person) -> list[str]:
    if not person.answers:
        raise ConfigError("name the platform to set up: `chatbot init discord`, `chatbot init slack`, or both")
    person.say("Which platform: discord, slack or both?")
    answer = sys.stdin.readline().strip().lower()
    chosen = {"discord": ["discord"], "slack": ["slack"], "both": ["discord", "slack"]}.get(answer)
    if chosen is None:
        raise ConfigError(f"{answer or 'nothing'} is not a platform: answer discord, slack or both")
    return chosen


def _token(person: Person, name: str, question: str) -> str:
    """The token in the environment (or env file), else what the person pastes."""
    value = os.environ.get(name) or person.secret(question)
    if value:
        mask(value)
    return value


# --- Discord ----------------------------------------------------------------------------------


async def set_up_discord(person: Person, settings: Settings) -> dict[str, str] | None:
    from bot.discord.doctor import PORTAL_STEPS, find_bot, intent_check, invite_url

    if not os.environ.get("DISCORD_TOKEN"):
        person.say(PORTAL_STEPS)
    token = ""
    while True:
        token = token or _token(person, "DISCORD_TOKEN", "Paste the bot token (it is not shown):")
        if not token:
            person.say("chatbot init: DISCORD_TOKEN is not set: export it, or run `chatbot init discord` at a terminal to paste it.")
            return None
        bot = await find_bot(token)
        if isinstance(bot, Check):
            person.say(bot.line())
            os.environ.pop("DISCORD_TOKEN", None)
            token = ""
            if not person.answers:
                return None
            continue
        intent = intent_check(bot.flags, settings.discord)
        person.say(bot.token_check().line())
        person.say(intent.line())
        if intent.status != "FAIL":
            break
        if not person.ready("Press Enter to check again once it is on."):
            return None
    person.say(f"Invite the bot to your server (with exactly the permissions it uses):\n  {invite_url(bot.application_id)}")
    if not bot.guilds:
        person.ready("Press Enter once it is in your server.")
    return {"DISCORD_TOKEN": token}


# --- Slack ------------------------------------------------------------------------------------


async def set_up_slack(person: Person, settings: Settings, env: EnvFile) -> dict[str, str] | None:
    from bot.slack.doctor import slack_checks
    from bot.slack.setup import APPS_PAGE, BY_HAND, app_page, create_app

    second = "SLACK_APP_TOKEN" if settings.slack.mode == "socket" else "SLACK_SIGNING_SECRET"
    # Not saved: it lasts 12 hours. Where given, the checks also compare the app's events and commands.
    config_token = os.environ.get(APP_CONFIG_TOKEN, "")
    if not (os.environ.get("SLACK_BOT_TOKEN") and os.environ.get(second)):
        app_id = os.environ.get("SLACK_APP_ID")
        if not app_id:
            config_token = config_token or _token(
                person, APP_CONFIG_TOKEN,
                f"To create the app from slack_manifest.yaml, paste an app configuration token ({APPS_PAGE} -> "
                "Your App Configuration Tokens -> Generate Token; not shown), or press Enter to create it yourself:",
            )
            if config_token:
                created = await create_app(config_token, settings.slack.api_url)
                if isinstance(created, Check):
                    person.say(created.line())
                    return None
                app_id = created.app_id
                # Saved at once: run again, init finds this app instead of creating another.
                env.keep({"SLACK_APP_ID": app_id, "SLACK_SIGNING_SECRET": created.signing_secret})
                person.say(
                    f"Created the Slack app {app_id} (its id and signing secret saved in {env.path}). "
                    f"Install it in your workspace: open\n  {created.install_url}\nand Allow."
                )
            else:
                person.say(BY_HAND)
        oauth = app_page(app_id, "oauth") if app_id else "the app's OAuth & Permissions page"
        general = app_page(app_id, "general") if app_id else "the app's Basic Information page"
        person.say(f"Then copy the Bot User OAuth Token (xoxb-...) from {oauth}.")
        if second == "SLACK_APP_TOKEN":
            person.say(f"And on {general}, App-Level Tokens -> Generate Token and Scopes, add connections:write, and copy it (xapp-...).")
    values = {"SLACK_BOT_TOKEN": "", second: ""}
    questions = {
        "SLACK_BOT_TOKEN": "Paste the bot token (xoxb-..., not shown):",
        "SLACK_APP_TOKEN": "Paste the app-level token (xapp-..., not shown):",
        "SLACK_SIGNING_SECRET": "Paste the Signing Secret (Basic Information -> App Credentials; not shown):",
    }
    while True:
        for name in values:
            values[name] = values[name] or _token(person, name, questions[name])
        missing = [name for name, value in values.items() if not value]
        if missing:
            person.say(f"chatbot init: {' and '.join(missing)} not set: export them, or run `chatbot init slack` at a terminal to paste them.")
            return None
        checks = await slack_checks(settings, Secrets(values={**values, **({APP_CONFIG_TOKEN: config_token} if config_token else {})}))
        for check in checks:
            person.say(check.line())
        failed = {check.name for check in checks if check.status == "FAIL"}
        if not failed:
            return values
        if not person.answers:
            return None
        # A token Slack refused is asked again; anything else is fixed on Slack's side, then checked again.
        refused = {"slack bot token": "SLACK_BOT_TOKEN", "slack socket mode": "SLACK_APP_TOKEN"}
        for name in (refused[check] for check in failed if check in refused):
            values[name] = ""
            os.environ.pop(name, None)
        if not failed & set(refused) and not person.ready("Press Enter to check again once that is fixed."):
            return None

