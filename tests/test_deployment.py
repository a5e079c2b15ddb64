"""docker-compose.yml and the images, checked as Compose and Docker would read them (no Docker engine
here): the Compose specification, health checks that use each process's /healthz, secrets only where
needed, and `chatbot` as each container's main process."""

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


def test_each_container_runs_chatbot_as_its_main_process(compose):
    # An ENTRYPOINT left to the base image (the Neuron image's dockerd-entrypoint.py) runs the
    # command as its child: SIGTERM and the exit status never pass between Docker and chatbot.
    for name in ("worker", "discord", "slack"):
        service = compose["services"][name]
        image = final_instructions(ROOT / service["build"]["dockerfile"])
        assert "ENTRYPOINT" in image, f"{name}: the image inherits its base image's ENTRYPOINT"
        entrypoint = service.get("entrypoint", exec_form(image["ENTRYPOINT"]))
        command = service.get("command", exec_form(image["CMD"]))
        assert entrypoint + command == ["chatbot", name], name


def test_the_worker_has_time_to_hand_its_jobs_back_on_docker_stop(compose):
    from engine.worker import RELEASE_PATIENCE_S
    from service.config import load_settings

    worker = compose["services"]["worker"]
    environment = {key: str(value) for key, value in worker["environment"].items() if value is not None}
    step_timeout_s = load_settings(ROOT / "config.yaml", environment).queue.step_timeout_s
    # The model step in flight ends, then the jobs are released and the worker's record removed.
    needed_s = step_timeout_s + 2 * RELEASE_PATIENCE_S
    assert seconds(worker.get("stop_grace_period", "10s")) > needed_s  # 10 s: Docker's default


def final_instructions(dockerfile: Path) -> dict[str, str]:
    """The last stage's instructions, each name to the arguments of its last occurrence."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    stage = lines[max(index for index, line in enumerate(lines) if line.upper().startswith("FROM ")):]
    return {name.upper(): arguments for name, _, arguments in (line.partition(" ") for line in stage)}


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form instruction; shell form would make /bin/sh the main process."""
    argv = json.loads(arguments)
    assert isinstance(argv, list) and all(isinstance(arg, str) for arg in argv), arguments
    return argv


def seconds(duration: str) -> float:
    """A Compose duration such as 45s, 1m30s or 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)
