"""The bot's application commands: /reset (forget the channel's conversation) and /persona
(set, show or clear the channel's system prompt at run time, for members with Manage Channels)."""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from redis.asyncio import Redis

from bot.discord.outbox import LIMIT
from bot.discord.routing import conversation_of, scope_of
from bot.discord.rules import Seen, reset_refusal
from contract import history
from contract.jobs import Scope
from contract.personas import Personas, SystemPrompt
from service.config import Settings
from service.redis_client import REDIS_DOWN, REDIS_FAILED

log = logging.getLogger(__name__)

RESET_DONE = "Done: I have forgotten our conversation in this channel."
RESET_REFUSED = "Sorry, you may not reset this conversation."
RESET_FAILED = "Sorry, the conversation could not be reset right now. Please try again later."

PERSONA_REFUSED = "Sorry, only members who may manage this channel (Manage Channels) can use /persona here."
PERSONA_NOT_HERE = "Personas belong to server channels: use /persona in a channel of a server."
PERSONA_FAILED = "Sorry, the channel's persona cannot be reached right now. Please try again later."
PERSONA_SET = "Done: {channel} and its threads have a new persona ({chars:,} characters); it applies from the next message."
PERSONA_CLEARED = "Done: the persona set for {channel} is cleared; from the next message it is answered with {now}."
PERSONA_NONE_SET = "{channel} had no persona set with /persona; it is answered with {now}."
PERSONA_SHOWN = "The persona of {channel} ({source}):\n"
PERSONA_CUT = "\n(cut: the first {shown:,} of {total:,} characters)"

SOURCES = {
    "run time": "set with /persona set",
    "channel in config.yaml": "this channel's persona in config.yaml",
    "workspace in config.yaml": "this server's persona in config.yaml",
    "global system_prompt": "the bot's default system prompt; none is set for this channel or server",
}
NOW = {
    "channel in config.yaml": "its persona in config.yaml",
    "workspace in config.yaml": "this server's persona in config.yaml",
    "global system_prompt": "the bot's default system prompt",
}


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


def shown_persona(scope: Scope, prompt: SystemPrompt) -> str:
    """`/persona show`'s answer: the text under where it comes from, cut to one Discord message."""
    head = PERSONA_SHOWN.format(channel=f"<#{scope.channel}>", source=SOURCES[prompt.source])
    if len(head) + len(prompt.text) <= LIMIT:
        return head + prompt.text
    total = len(prompt.text)
    room = LIMIT - len(head) - len(PERSONA_CUT.format(shown=total, total=total))
    return head + prompt.text[:room] + PERSONA_CUT.format(shown=room, total=total)


def persona_group(redis: Redis, settings: Settings) -> app_commands.Group:
    """/persona set|show|clear: published for Manage Channels by default, and checked at run time,
    since a server's admins can open a command to anyone in its integration settings."""
    personas = Personas(redis, settings)
    group = app_commands.Group(
        name="persona",
        description="The system prompt the bot answers this channel with",
        guild_only=True,
        default_permissions=discord.Permissions(manage_channels=True),
    )

    async def admitted(interaction: discord.Interaction, action: str) -> Scope | None:
        """The channel's scope when the caller may change it, else None once they have been told why not."""
        who = {"user": interaction.user.id, "channel": interaction.channel_id, "action": action}
        if interaction.guild is None or interaction.channel is None:
            log.info("persona refused", extra={**who, "reason": "not in a server channel"})
            await interaction.response.send_message(PERSONA_NOT_HERE, ephemeral=True)
            return None
        if not interaction.permissions.manage_channels:
            log.info("persona refused", extra={**who, "reason": "no Manage Channels"})
            await interaction.response.send_message(PERSONA_REFUSED, ephemeral=True)
            return None
        return scope_of(interaction.guild, interaction.channel)

    async def answer(interaction: discord.Interaction, text: str) -> None:
        # A persona may hold anything, @everyone included: the answer pings nobody.
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    async def failed(interaction: discord.Interaction, action: str, error: Exception) -> None:
        log.error("persona failed", extra={"user": interaction.user.id, "channel": interaction.channel_id, "action": action, "error": str(error)})
        await answer(interaction, PERSONA_FAILED)

    @group.command(name="set", description="Give this channel (and its threads) a system prompt of its own")
    @app_commands.describe(text="The system prompt: who the bot is and how it answers here")
    async def set_persona(interaction: discord.Interaction, text: str) -> None:
        scope = await admitted(interaction, "set")
        if scope is None:
            return
        try:
            await personas.set(scope, text)
        except ValueError as refused:
            await answer(interaction, str(refused))
            return
        except REDIS_FAILED as error:
            await failed(interaction, "set", error)
            return
        chars = len(text.strip())
        log.info("persona set", extra={"user": interaction.user.id, "channel": interaction.channel_id, "scope": scope.channel, "chars": chars})
        await answer(interaction, PERSONA_SET.format(channel=f"<#{scope.channel}>", chars=chars))

    @group.command(name="show", description="Show the system prompt this channel is answered with, and where it comes from")
    async def show_persona(interaction: discord.Interaction) -> None:
        scope = await admitted(interaction, "show")
        if scope is None:
            return
        try:
            prompt = await personas.system_prompt(scope)
        except REDIS_FAILED as error:
            await failed(interaction, "show", error)
            return
        await answer(interaction, shown_persona(scope, prompt))

    @group.command(name="clear", description="Forget this channel's system prompt set with /persona set")
    async def clear_persona(interaction: discord.Interaction) -> None:
        scope = await admitted(interaction, "clear")
        if scope is None:
            return
        try:
            had_one = await personas.clear(scope)
            now = await personas.system_prompt(scope)
        except REDIS_FAILED as error:
            await failed(interaction, "clear", error)
            return
        log.info("persona cleared", extra={"user": interaction.user.id, "channel": interaction.channel_id, "scope": scope.channel, "had_one": had_one})
        sentence = PERSONA_CLEARED if had_one else PERSONA_NONE_SET
        # Another process may have set one in between: then that one applies.
        applies = NOW.get(now.source, "the persona set with /persona set")
        await answer(interaction, sentence.format(channel=f"<#{scope.channel}>", now=applies))

    return group


def command_tree(client: discord.Client, redis: Redis, settings: Settings) -> app_commands.CommandTree:
    tree = app_commands.CommandTree(client)
    discord_settings = settings.discord

    async def reset(interaction: discord.Interaction) -> None:
        who = {"user": interaction.user.id, "channel": interaction.channel_id}
        reason = reset_refusal(discord_settings, seen(interaction))
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

    guilds = [discord.Object(guild) for guild in discord_settings.guilds]
    command = app_commands.Command(name="reset", description="Forget this channel's conversation with the bot", callback=reset)
    tree.add_command(command, guilds=guilds)
    tree.add_command(persona_group(redis, settings), guilds=guilds)
    return tree


async def sync_commands(tree: app_commands.CommandTree, guild_ids: list[int]) -> None:
    """Publish the commands to the configured guilds, or globally when none are configured.

    The global list is synced in both cases: with guilds configured it is empty, which
    removes global commands an earlier configuration published (they would show up twice).
    """
    try:
        await tree.sync()
        for guild_id in guild_ids:
            await tree.sync(guild=discord.Object(guild_id))
    except discord.Forbidden as error:
        # The chat works without the commands; say what is missing instead of stopping.
        log.error(
            "could not publish /reset and /persona: invite the bot with the applications.commands scope",
            extra={"guilds": guild_ids, "error": str(error)},
        )
