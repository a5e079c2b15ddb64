"""docker-compose.yml and the images, checked as Compose and Docker would read them (no Docker engine
here): the Compose specification, health checks that use each process's /healthz, secrets only where
needed, `chatbot` as each container's main process, and the neuron-serve profile (the model in
`optimum-cli neuron serve`, the worker on the openai backend)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "HF_TOKEN"}
SECRETS |= {"OPENAI_API_KEY", "VLLM_API_KEY"}  # the model server's key, on the worker's side and on vLLM's
SERVICES = ["redis", "worker", "discord", "slack", "neuron-server", "worker-openai", "prometheus", "grafana"]
MONITORING = {"prometheus", "grafana"}  # profile monitoring: tests/test_monitoring.py checks them
NEEDS = {
    "worker": {"HF_TOKEN"},
    "discord": {"DISCORD_TOKEN"},
    "slack": {"SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"},
    "redis": set(),
    "neuron-server": {"VLLM_API_KEY"},  # the key it requires on /v1, OPENAI_API_KEY's value
    "worker-openai": {"HF_TOKEN", "OPENAI_API_KEY"},
    "prometheus": set(),
    "grafana": set(),
}
PROFILE = "neuron-serve"
CHATBOT_COMMANDS = {"worker": "worker", "worker-openai": "worker", "discord": "discord", "slack": "slack"}


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


def read_compose(env: dict[str, str]) -> dict:
    data = yaml.safe_load(interpolated((ROOT / "docker-compose.yml").read_text(), env))
    return {key: value for key, value in data.items() if not key.startswith("x-")}  # anchors, merged by YAML


@pytest.fixture(scope="module")
def compose() -> dict:
    return read_compose(env_example())


def test_the_compose_file_follows_the_compose_specification(compose):
    assert PyCompose.from_json(json.dumps(compose)).service_names() == SERVICES


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
        if name in MONITORING:  # their own health endpoints: tests/test_monitoring.py
            continue
        if name == "neuron-server":  # vLLM's own health endpoint, on the port it serves
            assert f"http://127.0.0.1:{server_port(service)}/health'" in test
            continue
        port = service["environment"]["CHATBOT__METRICS__PORT"]
        assert f"http://127.0.0.1:{port}/healthz" in test, name


def test_each_service_gets_only_the_secrets_it_needs(compose):
    for name, service in compose["services"].items():
        assert "env_file" not in service, name  # an env file would hand every secret to every service
        given = set(service.get("environment", {})) & SECRETS
        assert given == NEEDS[name], name


def test_slack_http_mode_publishes_its_port(compose):
    from service.slack_settings import SlackSettings

    [published] = compose["services"]["slack"]["ports"]
    assert published.endswith(f":{SlackSettings().http_port}")


def test_each_container_runs_chatbot_as_its_main_process(compose):
    # An ENTRYPOINT left to the base image (the Neuron image's dockerd-entrypoint.py) runs the
    # command as its child: SIGTERM and the exit status never pass between Docker and chatbot.
    for name, subcommand in CHATBOT_COMMANDS.items():
        service = compose["services"][name]
        image = final_instructions(ROOT / service["build"]["dockerfile"])
        assert "ENTRYPOINT" in image, f"{name}: the image inherits its base image's ENTRYPOINT"
        entrypoint = service.get("entrypoint", exec_form(image["ENTRYPOINT"]))
        command = service.get("command", exec_form(image["CMD"]))
        assert entrypoint + command == ["chatbot", subcommand], name


def test_the_model_server_runs_optimum_cli_as_its_main_process(compose):
    # optimum-neuron's vLLM image starts an entrypoint.sh that adds --port 8080 and options from SM_ON_*
    # variables; the service calls optimum-cli itself, in exec form.
    server = compose["services"]["neuron-server"]
    assert server["entrypoint"] == ["optimum-cli", "neuron", "serve"]
    assert option(server["command"], "--model") == "/models/compiled"


def test_the_worker_has_time_to_hand_its_jobs_back_on_docker_stop(compose):
    from engine.worker import RELEASE_PATIENCE_S
    from service.config import load_settings

    worker = compose["services"]["worker"]
    environment = {key: str(value) for key, value in worker["environment"].items() if value is not None}
    step_timeout_s = load_settings(ROOT / "config.yaml", environment).queue.step_timeout_s
    # The model step in flight ends, then the jobs are released and the worker's record removed.
    needed_s = step_timeout_s + 2 * RELEASE_PATIENCE_S
    assert seconds(worker.get("stop_grace_period", "10s")) > needed_s  # 10 s: Docker's default


def test_the_adapters_have_time_to_finish_a_post_and_hand_their_shards_over_on_docker_stop(compose):
    from bot.delivery import GIVE_UP_PATIENCE_S
    from bot.slack.app import web_client
    from service.slack_settings import SlackSettings

    slack_call_timeout_s = web_client("xoxb-unused", SlackSettings().api_url).timeout  # how long a Web API call may take before it fails
    for name in ("discord", "slack"):
        grace = seconds(compose["services"][name].get("stop_grace_period", "10s"))
        assert grace > slack_call_timeout_s + GIVE_UP_PATIENCE_S, name


def test_the_neuron_serve_profile_holds_the_model_server_and_its_worker(compose):
    services = compose["services"]
    profiled = {name for name, service in services.items() if "profiles" in service} - MONITORING
    assert profiled == {"neuron-server", "worker-openai"}
    for name in profiled:
        assert services[name]["profiles"] == [PROFILE], name
    # Without the profile, the services as before: the worker runs optimum-neuron itself.
    assert services["worker"]["environment"]["CHATBOT__MODEL__BACKEND"] == "neuron"


def test_the_openai_worker_streams_from_the_model_server(compose):
    server, worker = compose["services"]["neuron-server"], compose["services"]["worker-openai"]
    environment = worker["environment"]
    assert environment["CHATBOT__MODEL__BACKEND"] == "openai"
    assert environment["CHATBOT__OPENAI__BASE_URL"] == f"http://neuron-server:{server_port(server)}/v1"
    assert environment["CHATBOT__OPENAI__SERVED_MODEL"] == option(server["command"], "--served-model-name")
    # The tokenizer comes from the folder the server serves, mounted read-only on both sides.
    folder = option(server["command"], "--model")
    assert environment["CHATBOT__MODEL__ID"] == folder
    assert read_only_mounts(worker)[folder] == read_only_mounts(server)[folder]
    # The compiled shape, as the in-process worker has it: in-flight requests and the length limit.
    for key in ("CHATBOT__MODEL__BATCH_SIZE", "CHATBOT__MODEL__SEQUENCE_LENGTH", "CHATBOT__MODEL__MAX_PROMPT_TOKENS"):
        assert environment[key] == compose["services"]["worker"]["environment"][key], key
    assert worker["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "neuron-server": {"condition": "service_healthy"},
    }
    assert worker["stop_grace_period"] == compose["services"]["worker"]["stop_grace_period"]  # checked above


def test_neuron_server_gets_the_workers_devices_and_worker_openai_none(compose):
    services = compose["services"]
    assert services["neuron-server"]["devices"] == services["worker"]["devices"]
    assert "devices" not in services["worker-openai"]


def test_the_worker_and_the_model_server_share_one_api_key():
    compose = read_compose({**env_example(), "OPENAI_API_KEY": "sk-test"})
    assert compose["services"]["worker-openai"]["environment"]["OPENAI_API_KEY"] == "sk-test"
    assert compose["services"]["neuron-server"]["environment"]["VLLM_API_KEY"] == "sk-test"


def test_the_openai_worker_settings_load(compose):
    from service.config import Settings, load_settings

    if "openai" not in Settings.model_fields:
        pytest.skip("service/config.py has no openai section yet")
    worker = compose["services"]["worker-openai"]
    environment = {key: str(value) for key, value in worker["environment"].items() if value is not None}
    settings = load_settings(ROOT / "config.yaml", environment)
    assert settings.model.backend == "openai"
    assert settings.openai.base_url == environment["CHATBOT__OPENAI__BASE_URL"]
    assert settings.openai.served_model == environment["CHATBOT__OPENAI__SERVED_MODEL"]


def server_port(server: dict) -> int:
    return int(option(server["command"], "--port"))


def option(command: list[str], name: str) -> str:
    """The value after `name` in an exec-form command."""
    assert command.count(name) == 1, (name, command)
    return command[command.index(name) + 1]


def read_only_mounts(service: dict) -> dict[str, str]:
    """Container path to host path of the service's read-only short-syntax volumes."""
    mounts = {}
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        if mode == ["ro"]:
            mounts[target] = source
    return mounts


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
