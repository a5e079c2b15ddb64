"""The Discord adapter: gateway messages in as jobs, reply events out as channel messages."""

from __future__ import annotations

import logging

import discord
from redis.asyncio import Redis

from bot.delivery import Delivery
from bot.discord.client import ChatClient
from bot.discord.commands import command_tree, sync_commands
from bot.discord.outbox import DiscordOutbox
from bot.discord.routing import PLATFORM
from bot.discord.typing_indicator import TypingIndicators
from contract.intake import Intake
from contract.pools import keep_answering_unserved
from service.config import ConfigError, Secrets, Settings
from service.observability import HEALTH
from service.tasks import until_first_ends

log = logging.getLogger(__name__)

NO_MESSAGE_CONTENT = (
    "discord.message_content is false: the Message Content intent is not requested, so the bot answers only"
    " mentions (replies to it included), DMs and slash commands"
)


def gateway_check(client: discord.Client):
    async def check() -> str | None:
        return None if client.is_ready() and not client.is_closed() else "not connected to the Discord gateway"

    return check


async def run_discord(settings: Settings, secrets: Secrets, redis: Redis) -> None:
    """Serve Discord until cancelled."""
    token = secrets.require("DISCORD_TOKEN")["DISCORD_TOKEN"]
    typing = TypingIndicators(redis)
    client = ChatClient(settings.discord, Intake(redis, settings.limits, settings.pools), typing)
    tree = command_tree(client, redis, settings)
    delivery = Delivery(
        redis, PLATFORM, DiscordOutbox(client), settings.discord.edit_interval_s, settings.queue.adapter_lease_s, waiting=typing
    )
    async with client:
        try:
            # client.start() is login() then connect(); between the two, the commands are published
            # and delivery starts, since posting needs the login.
            await client.login(token)
            if client.publishes_commands:
                await sync_commands(tree, settings.discord.guilds)
            log.info("discord adapter started", extra={"bot_user": client.user.id, "guilds": settings.discord.guilds})
            if not settings.discord.message_content:
                log.warning(NO_MESSAGE_CONTENT)
            with HEALTH.checking("discord", gateway_check(client)):
                await until_first_ends(
                    client.connect(), delivery.run(), keep_answering_unserved(redis, settings, delivery.shards.holder)
                )
        except discord.LoginFailure:
            raise ConfigError("Discord rejected DISCORD_TOKEN: copy the bot token again from the Developer Portal") from None
        except discord.PrivilegedIntentsRequired:
            raise ConfigError(
                "Discord refused the Message Content intent: enable it for the bot in the Developer Portal,"
                " or set discord.message_content: false to answer only mentions, DMs and slash commands"
            ) from None
        finally:
            await typing.close()
