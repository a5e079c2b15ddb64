"""`chatbot doctor`'s Discord checks (`chatbot init` runs the first two): the token, the Message Content
intent, the bot's permissions in its servers.

The permissions the adapter needs are listed here and nowhere else: the invite link the checks
print is built from them (docs/discord.md shows the same link).
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import discord

from service.discord_settings import DiscordSettings
from service.doctor import Check, fail, ok

# discord.py's name -> Discord's (the server settings' and the invite page's), and what needs it.
NEEDED = {
    "view_channel": "View Channels",  # the messages it answers
    "send_messages": "Send Messages",  # answers, refusals, the typing indicator
    "send_messages_in_threads": "Send Messages in Threads",  # answers in threads
    "read_message_history": "Read Message History",  # an answer is a reply to its message
}
FOR_THREADS = {  # with discord.threads or discord.thread_channels
    "create_public_threads": "Create Public Threads",  # a thread opened on the message it answers
    "manage_threads": "Manage Threads",  # deleting that thread again when the queue refuses the message
}
# Granted in the invite for members' sake: /reset and /persona are application commands.
INVITE = {**NEEDED, **FOR_THREADS, "use_application_commands": "Use Application Commands"}
INVITE_SCOPES = ("bot", "applications.commands")
GUILDS_PER_PAGE = 200  # Discord's most per GET /users/@me/guilds
# Where a bot token comes from, as `chatbot init` tells it.
PORTAL_STEPS = """Discord: the bot's token.
  1. Open https://discord.com/developers/applications, press New Application, name it, Create.
  2. Open Bot, press Reset Token, and copy the token.
  3. On the same page, under Privileged Gateway Intents, turn on Message Content Intent and save
     (or set discord.message_content: false in config.yaml: mentions, DMs and slash commands only)."""


def invite_url(application_id: int) -> str:
    permissions = discord.Permissions(**dict.fromkeys(INVITE, True))
    return discord.utils.oauth_url(application_id, permissions=permissions, scopes=INVITE_SCOPES)


def needed(settings: DiscordSettings) -> dict[str, str]:
    return {**NEEDED, **FOR_THREADS} if settings.threads or settings.thread_channels else NEEDED


@dataclass(frozen=True)
class Bot:
    """What Discord says of the bot a token belongs to."""

    user: str
    application_name: str
    application_id: int
    flags: discord.ApplicationFlags
    guilds: list[dict]  # each with the bot's `permissions` there

    def token_check(self) -> Check:
        return ok("discord token", f"valid: bot {self.user} of application {self.application_name} ({self.application_id})")


async def find_bot(token: str) -> Bot | Check:
    """The token's bot, or the failed check saying why there is none."""
    async with discord.Client(intents=discord.Intents.none()) as client:
        try:
            await client.login(token)  # GET /users/@me, then the application (/oauth2/applications/@me)
            guilds = await _guilds(client)
        except discord.LoginFailure:
            return fail(
                "discord token", "Discord refused DISCORD_TOKEN (401)", "copy the bot token again (Developer Portal -> Bot -> Reset Token)"
            )
        except (discord.HTTPException, aiohttp.ClientError, OSError) as error:
            return fail("discord token", f"could not ask Discord: {error}", "check that this machine can reach discord.com")
        application = client.application
        return Bot(str(client.user), application.name, application.id, application.flags, guilds)


async def discord_checks(settings: DiscordSettings, token: str) -> list[Check]:
    bot = await find_bot(token)
    if isinstance(bot, Check):
        return [bot]
    return [bot.token_check(), intent_check(bot.flags, settings), *_permissions(bot.guilds, settings, bot.application_id)]


async def _guilds(client: discord.Client) -> list[dict]:
    """The bot's servers, each with its `permissions` there (a string bitfield): discord.Guild keeps no such field."""
    guilds: list[dict] = []
    while True:
        page = await client.http.get_guilds(GUILDS_PER_PAGE, after=guilds[-1]["id"] if guilds else None)
        guilds += page
        if len(page) < GUILDS_PER_PAGE:
            return guilds


def intent_check(flags: discord.ApplicationFlags, settings: DiscordSettings) -> Check:
    if not settings.message_content:
        return ok("discord intents", "Message Content intent not requested (discord.message_content: false)")
    if flags.gateway_message_content:
        return ok("discord intents", "Message Content intent enabled")
    if flags.gateway_message_content_limited:
        return ok("discord intents", "Message Content intent enabled (below 100 servers; verification needs Discord's approval for it)")
    return fail(
        "discord intents", "the Message Content intent is off: Discord refuses the connection",
        "Developer Portal -> your application -> Bot -> Privileged Gateway Intents -> turn on Message Content Intent,"
        " or set discord.message_content: false (mentions, DMs and slash commands only)",
    )


def _permissions(guilds: list[dict], settings: DiscordSettings, application_id: int) -> list[Check]:
    """One line per server the bot chats in (discord.guilds, or every one it is in), with what it lacks there."""
    wanted = needed(settings)
    invite = f"invite the bot again with {invite_url(application_id)}"
    present = {int(guild["id"]) for guild in guilds}
    checks = [
        fail(f"discord server {guild_id}", "the bot is not in this server of discord.guilds", invite)
        for guild_id in settings.guilds
        if guild_id not in present
    ]
    if not guilds:
        return [*checks, fail("discord servers", "the bot is in no server", invite)]
    for guild in guilds:
        if settings.guilds and int(guild["id"]) not in settings.guilds:
            continue
        granted = discord.Permissions(int(guild["permissions"]))
        name = f"discord server {guild['name']} ({guild['id']})"
        missing = [] if granted.administrator else [label for flag, label in wanted.items() if not getattr(granted, flag)]
        if missing:
            checks.append(
                fail(name, f"the bot lacks {', '.join(missing)}", f"grant them to the bot's role in Server Settings -> Roles, or {invite}")
            )
        else:
            # Server-wide roles only: a channel's own overwrites can still take a permission away there.
            checks.append(ok(name, f"the bot's roles grant {', '.join(wanted.values())}"))
    return checks
