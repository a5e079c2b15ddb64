"""The Discord adapter's parts; `bot.discord.app.run_discord` puts them together."""
