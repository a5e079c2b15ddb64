"""docker-compose.yml, checked as Compose would read it (no Docker engine here): the Compose
specification, health checks that use each process's /healthz, and secrets only where needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "HF_TOKEN"}
NEEDS = {
    "worker": {"HF_TOKEN"},
    "discord": {"DISCORD_TOKEN"},
    "slack": {"SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"},
    "redis": set(),
}


def interpolated(text: str, env: dict[str, str]) -> str:
    """${VAR}, ${VAR:-default} and ${VAR:?message} as Compose substitutes them."""

    def value(match: re.Match) -> str:
        name, operator, default = match.group(1), match.group(2), match.group(3) or ""
        if env.get(name):
            return env[name]
        if operator == ":?":
            raise AssertionError(f"{name} must be set: {default}")
        return default

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", value, text)


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(interpolated((ROOT / "docker-compose.yml").read_text(), env_example()))
    return {key: value for key, value in data.items() if not key.startswith("x-")}  # anchors, merged by YAML


def test_the_compose_file_follows_the_compose_specification(compose):
    assert PyCompose.from_json(json.dumps(compose)).service_names() == ["redis", "worker", "discord", "slack"]


def test_the_validation_catches_mistakes(compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["restart"] = "sometimes"
    with pytest.raises(ValueError, match="unknown variant `sometimes`"):
        PyCompose.from_json(json.dumps(broken))


def test_every_service_has_a_health_check_on_its_own_healthz(compose):
    for name, service in compose["services"].items():
        test = " ".join(service["healthcheck"]["test"])
        if name == "redis":
            assert "redis-cli ping" in test
            continue
        port = service["environment"]["CHATBOT__METRICS__PORT"]
        assert f"http://127.0.0.1:{port}/healthz" in test, name


def test_each_service_gets_only_the_secrets_it_needs(compose):
    for name, service in compose["services"].items():
        assert "env_file" not in service, name  # an env file would hand every secret to every service
        given = set(service.get("environment", {})) & SECRETS
        assert given == NEEDS[name], name


def test_slack_http_mode_publishes_its_port(compose):
    from bot.slack.settings import SlackSettings

    [published] = compose["services"]["slack"]["ports"]
    assert published.endswith(f":{SlackSettings().http_port}")
