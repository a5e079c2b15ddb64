"""The Discord adapter's parts; `bot.discord_app.run_discord` puts them together."""
