"""The ops commands, run as a user runs them, against a live worker."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from contract import history

ROOT = Path(__file__).resolve().parents[1]


async def chatbot(
    redis_url: str, tmp_path: Path, *args: str, environment: dict[str, str] | None = None, typed: str = ""
) -> tuple[int, str, str]:
    """Run `chatbot args` against this Redis with the tiny model; `typed` is what the user types on stdin."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "CHATBOT_CONFIG": str(tmp_path / "none.yaml"),
        "CHATBOT__RUN_DIR": str(tmp_path / "run"),
        "CHATBOT__MODEL__ID": "embedded:tiny-llama",
        "CHATBOT__MODEL__SEQUENCE_LENGTH": "512",
        "CHATBOT__MODEL__MAX_PROMPT_TOKENS": "384",
        **(environment or {}),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatbot", *args, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(typed.encode()), 120)
    return process.returncode, out.decode(), err.decode()


async def test_ask_prompt_and_reset(redis, redis_server, worker, tmp_path):
    code, out, err = await chatbot(redis_server.url, tmp_path, "ask", "--conversation", "cli:ops", "My favorite color is blue.")
    assert code == 0, err
    [exchange] = await history.load_exchanges(redis, "cli:ops")
    assert exchange.user.text == "My favorite color is blue." and out.strip() == exchange.assistant.text.strip()

    code, out, err = await chatbot(redis_server.url, tmp_path, "prompt", "cli:ops", "What is my favorite color?")
    assert code == 0, err
    assert "[INST] <<SYS>>" in out and "My favorite color is blue. [/INST]" in out
    assert out.rstrip().endswith("What is my favorite color? [/INST]")
    assert "1 exchanges kept, 0 dropped" in err

    code, out, _ = await chatbot(redis_server.url, tmp_path, "reset", "cli:ops")
    assert code == 0 and "history cleared" in out
    assert await history.load_exchanges(redis, "cli:ops") == []


async def test_ask_without_a_worker_times_out_with_a_sentence(redis, redis_server, tmp_path):
    code, _, err = await chatbot(redis_server.url, tmp_path, "ask", "--timeout", "1", "anyone?")
    assert code == 1 and "is `chatbot worker` running?" in err and "Traceback" not in err


LIMIT_100 = {"CHATBOT__LIMITS__MAX_MESSAGE_CHARS": "100"}
OVER_100 = "x" * 150
REFUSED = "Your message is 150 characters long; the limit is 100."


async def test_ask_refuses_a_message_over_the_configured_limit(redis, redis_server, tmp_path):
    code, _, err = await chatbot(redis_server.url, tmp_path, "ask", "--timeout", "5", OVER_100, environment=LIMIT_100)
    assert code == 1 and err.strip() == REFUSED  # not queued: no wait for a worker that is not running


async def test_the_env_file_is_read_and_the_real_environment_wins(redis, redis_server, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# what `chatbot init` writes\nCHATBOT__LIMITS__MAX_MESSAGE_CHARS=100\n")
    read = {"CHATBOT_ENV_FILE": str(env_file)}
    code, _, err = await chatbot(redis_server.url, tmp_path, "ask", "--timeout", "5", OVER_100, environment=read)
    assert code == 1 and err.strip() == REFUSED
    code, _, err = await chatbot(
        redis_server.url, tmp_path, "ask", "--timeout", "1", "y" * 150,
        environment={**read, "CHATBOT__LIMITS__MAX_MESSAGE_CHARS": "200"},
    )
    assert code == 1 and "is `chatbot worker` running?" in err  # accepted and queued: 200 from the environment, not 100


async def test_the_terminal_chat_refuses_a_message_over_the_configured_limit(redis, redis_server, tmp_path):
    typed = f"{OVER_100}\n/quit\n"
    code, out, err = await chatbot(redis_server.url, tmp_path, "demo", environment=LIMIT_100, typed=typed)
    assert code == 0, err
    assert f"({REFUSED})" in out and "bot>" not in out


async def test_a_bad_config_value_stops_with_the_field_named(redis_server, tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  backend: tpu\n")
    env_args = ("--config", str(tmp_path / "bad.yaml"), "reset", "cli:x")
    code, _, err = await chatbot(redis_server.url, tmp_path, *env_args)
    assert code == 2 and "model.backend" in err and "'transformers', 'neuron' or 'openai'" in err and "Traceback" not in err


async def test_a_bad_conversation_id_gets_one_sentence_saying_what_ids_look_like(redis_server, tmp_path):
    for args in (("ask", "--conversation", "t1", "hi"), ("reset", "unknown-id"), ("prompt", "t1")):
        code, out, err = await chatbot(redis_server.url, tmp_path, *args)
        assert code == 2, args
        last = err.strip().splitlines()[-1]
        assert "is not a conversation id: they look like platform:channel, e.g. cli:" in last, err
        assert "Traceback" not in err and "{" not in err and "validation error" not in err


async def test_redis_down_is_one_sentence_with_the_traceback_in_the_log_file(tmp_path):
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0", "CHATBOT_CONFIG": str(tmp_path / "none.yaml"),
           "CHATBOT__RUN_DIR": str(tmp_path / "run")}
    for args in (("ask", "--timeout", "5", "hi"), ("reset", "cli:t1")):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatbot", *args, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
        lines = err.decode().strip().splitlines()
        assert process.returncode == 1
        assert len(lines) == 1 and lines[0].startswith("chatbot: cannot reach Redis"), lines
        assert "set REDIS_URL" in lines[0]
    assert "Traceback" in (tmp_path / "run" / "chatbot.log").read_text()
