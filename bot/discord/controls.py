"""The buttons on answers: Stop while an answer streams, Regenerate under a finished one.

Each is a DynamicItem whose custom_id names the job it acts on (`stop:<job>`, `regenerate:<job>`):
a click is dispatched on its custom_id alone, so buttons posted before a restart, or by another
adapter process, keep working. Who may press them is decided by contract/controls.py and
Intake.regenerate: the person who asked, or a member with Manage Messages in the channel.
"""

from __future__ import annotations

import logging
import re

import discord

from bot.delivery import Part
from bot.discord.routing import conversation_of, reply_route, scope_of
from contract.controls import request_stop
from contract.intake import Intake
from contract.jobs import UNAVAILABLE, RejectedMessage
from service.redis_client import REDIS_FAILED

log = logging.getLogger(__name__)

REGENERATING = "Writing a new answer; it replaces this one."
# Job ids are `discord:<snowflake>` or `discord:regenerate:<snowflake>`: with the prefix, at most
# about 50 of the 100 characters Discord allows in a custom_id.
JOB_ID = r"(?P<job_id>discord:[0-9a-z:]+)"


def controls_for(part: Part) -> discord.ui.View | None:
    """The buttons a reply's message shows: Stop while its text streams, Regenerate under the last
    message of a finished answer, none otherwise (an edit without them removes them)."""
    if not part.settled:
        button: discord.ui.DynamicItem = StopButton(part.job_id)
    elif part.feedback:
        button = RegenerateButton(part.job_id)
    else:
        return None
    view = discord.ui.View(timeout=None)
    view.add_item(button)
    return view


def intake(interaction: discord.Interaction) -> Intake:
    """The queue of the client that received the click (bot/discord/client.py's ChatClient)."""
    return interaction.client.queue


def is_admin(interaction: discord.Interaction) -> bool:
    # In a DM the permissions are empty: only the asker may press the buttons there.
    return interaction.permissions.manage_messages


async def tell(interaction: discord.Interaction, text: str) -> None:
    """Answer the click with a sentence only the clicker sees."""
    try:
        await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as error:
        # Every adapter process gets every click; Discord takes the first answer and refuses the others.
        log.info("click already answered", extra={"interaction": interaction.id, "error": str(error)})


class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=re.compile("(?!)")):
    """A button acting on one job; each kind has its action (the custom_id's prefix), label and template."""

    action: str
    label: str

    def __init__(self, job_id: str) -> None:
        button = discord.ui.Button(label=self.label, style=discord.ButtonStyle.secondary, custom_id=f"{self.action}:{job_id}")
        super().__init__(button)
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]):
        return cls(match["job_id"])


class StopButton(JobButton, template=re.compile("stop:" + JOB_ID)):
    action, label = "stop", "Stop"

    async def callback(self, interaction: discord.Interaction) -> None:
        who = {"user": interaction.user.id, "job": self.job_id}
        try:
            sentence = await request_stop(
                intake(interaction).redis, self.job_id, by=str(interaction.user.id), admin=is_admin(interaction)
            )
            log.info("stop requested", extra={**who, "answer": sentence})
        except RejectedMessage as refused:
            log.info("stop refused", extra=who)
            sentence = str(refused)
        except REDIS_FAILED as error:
            log.error("stop failed", extra={**who, "error": str(error)})
            sentence = UNAVAILABLE
        await tell(interaction, sentence)


class RegenerateButton(JobButton, template=re.compile("regenerate:" + JOB_ID)):
    action, label = "regenerate", "Regenerate"

    async def callback(self, interaction: discord.Interaction) -> None:
        who = {"user": interaction.user.id, "job": self.job_id}
        message, channel_id = interaction.message, interaction.channel_id
        # The new answer edits the old one's messages; should their record have expired, it is posted
        # as a reply to the question (what the first message answers), or to the clicked message.
        answered = message.reference.message_id if message.reference else message.id
        try:
            submitted = await intake(interaction).regenerate(
                conversation_of(channel_id), self.job_id, str(interaction.id), by=str(interaction.user.id),
                admin=is_admin(interaction), reply_to=reply_route(channel_id, answered),
                scope=scope_of(interaction.guild, interaction.channel),
            )
        except RejectedMessage as refused:
            log.info("regenerate refused", extra={**who, "reason": str(refused)})
            await tell(interaction, str(refused))
            return
        except REDIS_FAILED as error:
            log.error("regenerate failed", extra={**who, "error": str(error)})
            await tell(interaction, UNAVAILABLE)
            return
        if submitted.duplicate:
            return  # the same click again (another adapter process, a replayed event): the first one answered it
        log.info("regenerate queued", extra={**who, "new_job": submitted.job_id, "ahead": submitted.ahead})
        await tell(interaction, REGENERATING)
