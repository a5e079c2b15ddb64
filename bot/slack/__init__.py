"""The Slack adapter's parts; `bot.slack.app` puts them together (`build_app`, `run_slack`)."""
