"""The Slack side of reply delivery: chat.postMessage, then chat.update of the same message."""

from __future__ import annotations

from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.messages import to_slack

# Slack accepts far longer text but advises staying under 4,000 characters; escaping (&amp; ...)
# grows what is sent, never what is shown, so the limit counts shown characters.
LIMIT = 3900


class SlackOutbox:
    limit = LIMIT

    def __init__(self, client: AsyncWebClient):
        self.client = client

    async def post(self, reply_to: dict[str, str], text: str) -> str:
        response = await self.client.chat_postMessage(
            channel=reply_to["channel"], thread_ts=reply_to.get("thread_ts"), text=to_slack(text)
        )
        return response["ts"]

    async def edit(self, reply_to: dict[str, str], message_id: str, text: str) -> None:
        await self.client.chat_update(channel=reply_to["channel"], ts=message_id, text=to_slack(text))
