"""The Slack adapter's parts; `bot.slack_app` puts them together (`build_app`, `run_slack`)."""
