"""The /reset application command: forget the conversation of the channel it is used in."""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from redis.asyncio import Redis

from bot.discord.routing import conversation_of
from bot.discord.rules import Seen, reset_refusal
from bot.discord.settings import DiscordSettings
from contract import history
from service.redis_client import REDIS_DOWN

log = logging.getLogger(__name__)

RESET_DONE = "Done: I have forgotten our conversation in this channel."
RESET_REFUSED = "Sorry, you may not reset this conversation."
RESET_FAILED = "Sorry, the conversation could not be reset right now. Please try again later."


def seen(interaction: discord.Interaction) -> Seen:
    channel = interaction.channel
    return Seen(
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        parent_id=channel.parent_id if isinstance(channel, discord.Thread) else None,
        role_ids=frozenset(role.id for role in getattr(interaction.user, "roles", ())),
        from_bot=interaction.user.bot,
        system=False,
        mentions_me=True,  # a command is addressed to the bot, as a mention is
    )


def command_tree(client: discord.Client, redis: Redis, settings: DiscordSettings) -> app_commands.CommandTree:
    tree = app_commands.CommandTree(client)

    async def reset(interaction: discord.Interaction) -> None:
        who = {"user": interaction.user.id, "channel": interaction.channel_id}
        reason = reset_refusal(settings, seen(interaction))
        if reason:
            log.info("reset refused", extra={**who, "reason": reason})
            await interaction.response.send_message(RESET_REFUSED, ephemeral=True)
            return
        conversation = conversation_of(interaction.channel_id)
        try:
            epoch = await history.reset(redis, conversation.key)
        except REDIS_DOWN as error:
            log.error("reset failed", extra={**who, "error": str(error)})
            await interaction.response.send_message(RESET_FAILED, ephemeral=True)
            return
        log.info("conversation reset", extra={**who, "conversation": conversation.key, "epoch": epoch})
        await interaction.response.send_message(RESET_DONE, ephemeral=True)

    command = app_commands.Command(name="reset", description="Forget this channel's conversation with the bot", callback=reset)
    tree.add_command(command, guilds=[discord.Object(guild) for guild in settings.guilds])
    return tree


async def sync_commands(tree: app_commands.CommandTree, guild_ids: list[int]) -> None:
    """Publish /reset to the configured guilds, or globally when none are configured.

    The global list is synced in both cases: with guilds configured it is empty, which
    removes a global /reset an earlier configuration published (it would show up twice).
    """
    try:
        await tree.sync()
        for guild_id in guild_ids:
            await tree.sync(guild=discord.Object(guild_id))
    except discord.Forbidden as error:
        # The chat works without /reset; say what is missing instead of stopping.
        log.error(
            "could not publish /reset: invite the bot with the applications.commands scope",
            extra={"guilds": guild_ids, "error": str(error)},
        )
