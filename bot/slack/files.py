"""Files shared with a Slack message: text files downloaded with the workspace's bot token, as Slack requires,
and read into the message by bot/attachments_text.py's rules (Discord's attachments follow them too)."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import aiohttp

from bot.attachments_text import NOTHING_ATTACHED, SEPARATOR, Attached, AttachedFile, attached_text, is_text
from bot.slack.messages import SharedFile
from bot.slack.tokens import BotTokens

log = logging.getLogger(__name__)

NOT_READABLE = "I can read text and text files (.txt, .md, code), but not images or other files."
# Slack wants the event acknowledged within 3 s, and the acknowledgement waits for the job:
# a file not downloaded by then is named as not read.
DOWNLOAD_TIMEOUT_S = 2.0


class SlackFiles:
    def __init__(self, tokens: BotTokens, api_url: str, max_bytes: int):
        self.tokens = tokens
        self.slack_host = urlsplit(api_url).hostname or ""
        self.max_bytes = max_bytes

    async def message_text(
        self, text: str, files: tuple[SharedFile, ...], max_chars: int, where: dict[str, str]
    ) -> tuple[str | None, Attached]:
        """The message's text followed by what its files add, within `max_chars` (a text file cut to
        fit says so), with what the files added; None for files alone of which none could be read.
        `where` names the workspace (a reply_to) whose token reads them."""
        attached = attached_text(await self.read(files, where), room=max_chars - len(text)) if files else NOTHING_ATTACHED
        if files and not text and not attached.read_any:
            return None, attached
        if attached.cut:
            log.info("shared file cut to fit the message", extra={"files": list(attached.cut), "max_chars": max_chars})
        return SEPARATOR.join(part for part in (text, attached.text) if part), attached

    async def read(self, files: tuple[SharedFile, ...], where: dict[str, str]) -> list[AttachedFile]:
        timeout = aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_S)
        token = await self.tokens.of(where)
        async with aiohttp.ClientSession(timeout=timeout, headers={"Authorization": f"Bearer {token}"}) as session:
            return list(await asyncio.gather(*(self._read(session, file) for file in files)))

    async def _read(self, session: aiohttp.ClientSession, file: SharedFile) -> AttachedFile:
        if not is_text(file.name, file.mimetype):
            return AttachedFile(file.name, None, "not a text file")
        if file.size > self.max_bytes:
            return AttachedFile(file.name, None, "too large")
        if not self._on_slack(file.url):
            return AttachedFile(file.name, None, "not available to the bot")
        content = await self._download(session, file)
        if content is None:
            return AttachedFile(file.name, None, "could not be downloaded")
        return AttachedFile(file.name, content.decode("utf-8", "replace").strip())

    async def _download(self, session: aiohttp.ClientSession, file: SharedFile) -> bytes | None:
        try:
            # Not following redirects: without a token it accepts, Slack redirects to its sign-in page.
            async with session.get(file.url, allow_redirects=False) as response:
                if response.status == 200:
                    return await response.read()
                error = f"HTTP {response.status}"
        except (TimeoutError, aiohttp.ClientError) as failure:
            error = str(failure) or type(failure).__name__
        log.warning("shared file not read", extra={"file": file.name, "error": error})
        return None

    def _on_slack(self, url: str) -> bool:
        # The bot token goes to Slack's own hosts only: files.slack.com beside the Web API's slack.com.
        host = urlsplit(url).hostname or ""
        return bool(self.slack_host) and (host == self.slack_host or host.endswith("." + self.slack_host))
