"""Creating the Slack app from slack_manifest.yaml for `chatbot init`, and where its pages are.

apps.manifest.create takes an app configuration token (made at api.slack.com/apps, valid 12
hours) and returns the new app's id, its credentials and the URL that installs it. It returns no
bot token: the person installs the app through that URL, then copies the bot token from the
app's OAuth & Permissions page, and for Socket Mode makes an app-level token on its Basic
Information page, which no API call can make.
"""

from __future__ import annotations

from dataclasses import dataclass

from slack_sdk.errors import SlackApiError

from bot.slack.app import web_client
from bot.slack.doctor import UNREACHABLE, load_manifest
from service.doctor import Check, fail

APPS_PAGE = "https://api.slack.com/apps"
NEW_APP_PAGE = "https://api.slack.com/apps?new_app=1"
# Creating the app without a configuration token, as `chatbot init` tells it.
BY_HAND = f"""Slack: create the app from the manifest.
  1. Open {NEW_APP_PAGE}, choose From a manifest, then your workspace.
  2. Paste the contents of slack_manifest.yaml (YAML tab), Next, Create.
  3. Install App -> Install to Workspace -> Allow."""
# What Slack answers for a configuration token that is wrong, expired, or of another kind.
TOKEN_REFUSED = {"invalid_auth", "not_authed", "token_expired", "token_revoked", "not_allowed_token_type"}


@dataclass(frozen=True)
class CreatedApp:
    app_id: str
    install_url: str
    signing_secret: str  # what HTTP mode verifies Slack's requests with


def app_page(app_id: str, page: str) -> str:
    """One of an app's settings pages: `oauth` (OAuth & Permissions), `general` (Basic Information)."""
    return f"{APPS_PAGE}/{app_id}/{page}"


async def create_app(config_token: str, api_url: str) -> CreatedApp | Check:
    """The app, created from slack_manifest.yaml; or the failed check saying why not."""
    manifest = load_manifest()
    if manifest is None:
        return fail("slack app", "slack_manifest.yaml not found here", "run `chatbot init` in the project's folder")
    try:
        answer = await web_client(config_token, api_url).apps_manifest_create(manifest=manifest)
    except SlackApiError as error:
        code = error.response.get("error", "")
        if code in TOKEN_REFUSED:
            return fail(
                "slack app", f"apps.manifest.create refused the app configuration token ({code})",
                f"generate a new one at {APPS_PAGE} (Your App Configuration Tokens -> Generate Token; they last 12 hours)",
            )
        problems = "; ".join(f"{item.get('pointer', '')}: {item.get('message', '')}" for item in error.response.get("errors") or [])
        return fail(
            "slack app", f"apps.manifest.create refused the manifest ({code}{': ' + problems if problems else ''})",
            "correct slack_manifest.yaml (docs/slack.md says what each part is for)",
        )
    except UNREACHABLE as error:
        return fail("slack app", f"could not ask Slack: {error}", "check that this machine can reach slack.com")
    return CreatedApp(answer["app_id"], answer["oauth_authorize_url"], answer["credentials"]["signing_secret"])
