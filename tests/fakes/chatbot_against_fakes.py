"""`python -m tests.fakes.chatbot_against_fakes ARGS`: `chatbot ARGS`, with discord.py pointed at the fake
Discord of $FAKE_DISCORD (Slack's Web API comes from slack.api_url). A module of its own, importing only
what `chatbot` does: the tests' own modules bring torch and transformers, seconds a process."""

from __future__ import annotations

import os
import sys

import discord
import yarl

from chatbot.main import main
from tests.fakes.discord_server import API_PREFIX, GATEWAY_PATH

COMMAND = ("-m", "tests.fakes.chatbot_against_fakes")

if __name__ == "__main__":
    base = os.environ["FAKE_DISCORD"]
    discord.http.Route.BASE = base + API_PREFIX
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(base.replace("http://", "ws://") + GATEWAY_PATH)
    sys.exit(main(sys.argv[1:]))
