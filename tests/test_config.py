"""Configuration: file, environment overrides, clear refusals, secrets kept out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.config import ConfigError, Secrets, load_settings
from service.logs import ConsoleFormatter, JsonFormatter

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_config_is_valid_and_is_the_embedded_default():
    settings = load_settings(ROOT / "config.yaml", environ={})
    assert settings.model.id == "embedded:smollm2" and settings.redis_url is None


def test_environment_overrides_the_file(tmp_path):
    settings = load_settings(
        ROOT / "config.yaml",
        environ={"CHATBOT__GENERATION__TEMPERATURE": "0.2", "CHATBOT__DISCORD__CHANNELS": "[1, 2]", "REDIS_URL": "redis://r:6379/1"},
    )
    assert settings.generation.temperature == 0.2
    assert settings.discord.channels == [1, 2]
    assert settings.redis_url == "redis://r:6379/1"


def test_string_settings_take_the_environment_value_as_written():
    settings = load_settings(
        ROOT / "config.yaml",
        environ={
            "CHATBOT__SYSTEM_PROMPT": "You are bot #1: {be: brief}",
            "CHATBOT__WORKER_NAME": "007",
            "CHATBOT__MODEL__ID": "yes",
            "CHATBOT__SLACK__RESET_COMMAND": "/reset",
            "CHATBOT__RUN_DIR": "null",
            "CHATBOT__MODEL__THREADS": "1",
        },
    )
    assert settings.system_prompt == "You are bot #1: {be: brief}"
    assert settings.worker_name == "007" and settings.model.id == "yes"
    assert settings.run_dir == Path("null")
    assert settings.model.threads == 1  # other settings still read YAML


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CHATBOT__MODEL__BACKEND": "tpu"}, "model.backend: Input should be 'transformers', 'neuron' or 'openai', got 'tpu'"),
        ({"CHATBOT__GENERATION__TOP_P": "1.5"}, "generation.top_p"),
        ({"CHATBOT__MODEL__MAX_PROMPT_TOKENS": "4096"}, "must be below sequence_length"),
        ({"CHATBOT__MODEL__COLOUR": "red"}, "model.colour: unknown setting"),
        ({"CHATBOT__SLACK__MODE": "webhook"}, "slack.mode: Input should be 'socket' or 'http'"),
    ],
)
def test_a_wrong_value_names_the_field_and_the_allowed_values(environ, message):
    with pytest.raises(ConfigError) as error:
        load_settings(ROOT / "config.yaml", environ=environ)
    assert message in str(error.value)


def test_secrets_in_the_config_file_are_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("discord_token: abc\n")
    with pytest.raises(ConfigError, match="secrets belong in the environment"):
        load_settings(path, environ={})


def test_repetition_penalty_with_on_device_sampling_is_refused():
    environ = {
        "CHATBOT__MODEL__BACKEND": "neuron",
        "CHATBOT__GENERATION__DO_SAMPLE": "true",
        "CHATBOT__GENERATION__REPETITION_PENALTY": "1.2",
    }
    with pytest.raises(ConfigError, match="repetition_penalty"):
        load_settings(ROOT / "config.yaml", environ=environ)


def test_missing_secret_is_named_and_secrets_never_reach_logs(caplog):
    secrets = Secrets(values={"SLACK_BOT_TOKEN": "xoxb-very-secret"})
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        secrets.require("DISCORD_TOKEN")
    assert "xoxb" not in repr(secrets)
    record = logging.makeLogRecord({"msg": "token is %s", "args": ("xoxb-very-secret",), "levelname": "INFO"})
    assert "xoxb-very-secret" not in JsonFormatter(["xoxb-very-secret"]).format(record)


def test_console_logs_are_key_value_lines_and_mask_secrets_too():
    record = logging.makeLogRecord(
        {"name": "engine.worker", "msg": "job answered", "levelname": "INFO", "job": "slack:1", "token": "xoxb-very-secret"}
    )
    line = ConsoleFormatter(["xoxb-very-secret"]).format(record)
    assert "engine.worker: job answered" in line and "job=slack:1" in line and "token=***" in line
