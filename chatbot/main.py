"""`chatbot` command line: one entry point for the worker, the adapters, local chat and model tooling."""

from __future__ import annotations

import argparse
import logging
import sys

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatbot.env_file import EnvFile
from service.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from chatbot import adapters, init, ops, worker
    from engine.neuron import cli as neuron_cli

    parser = argparse.ArgumentParser(prog="chatbot", description=__doc__)
    parser.add_argument("--config", help="path to config.yaml (default: $CHATBOT_CONFIG or ./config.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="the whole service: worker plus every adapter whose tokens are set (else local chat)")
    run.set_defaults(handler=lambda args: run_all(args, local_only=False))
    demo = commands.add_parser("demo", help="the embedded default: private Redis, small model, worker, terminal chat")
    demo.set_defaults(handler=lambda args: run_all(args, local_only=True))
    worker.register(commands)
    adapters.register(commands)
    ops.register(commands)
    init.register(commands)
    neuron_cli.register(commands)
    return parser


def run_all(args: argparse.Namespace, local_only: bool) -> int:
    from bot.terminal import chat
    from chatbot.adapters import adapter_runner, platforms_configured
    from chatbot.runtime import log_to_file, serve, startup
    from engine.serving import load_engine
    from engine.serving.engine import MODEL_THREAD
    from engine.worker import Worker
    from service.process import on_terminate, process_identity
    from service.tasks import until_first_ends

    settings, secrets = startup(args.config)
    platforms = [] if local_only else platforms_configured(secrets)
    print(f"Loading model {settings.model.id} (the first run prepares it: about a minute)...", file=sys.stderr)
    model = MODEL_THREAD.submit(load_engine, settings).result()
    if not platforms:
        # The terminal is the chat from here on: keep structured logs out of it.
        print(f"Logs go to {log_to_file(settings, secrets)}", file=sys.stderr)

    async def main(redis) -> None:
        worker = Worker(redis, model, settings, process_identity(settings.worker_name))
        on_terminate(worker.stop)
        fronts = [adapter_runner(p)(settings, secrets, redis) for p in platforms] or [chat(redis, settings)]
        try:
            # The worker ends on SIGTERM/SIGINT, the terminal chat on /quit, an adapter on a fatal error.
            await until_first_ends(worker.run(), *fronts)
        finally:
            worker.stop()

    return serve(settings, main)


def main(argv: list[str] | None = None) -> int:
    EnvFile.configured().load()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except ConfigError as error:
        print(f"chatbot: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (RedisConnectionError, RedisTimeoutError) as error:
        logging.getLogger("chatbot").exception("redis unreachable")
        print(f"chatbot: cannot reach Redis ({error}): start it, or set REDIS_URL to the server the worker uses", file=sys.stderr)
        return 1
    except Exception as error:
        # The traceback goes to the structured log; the operator gets one line.
        logging.getLogger("chatbot").exception("stopped by an unexpected error")
        print(f"chatbot: stopped: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
