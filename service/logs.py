"""Structured logs with the `extra=` fields of each call, secrets masked.

One JSON object per line for machines (files, containers); `key=value` lines when a person
watches a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets: list[str] = []
        for secret in secrets:
            self.mask(secret)

    def mask(self, secret: str) -> None:
        # Shorter values are no secrets (an empty or placeholder variable) and would mask ordinary text.
        if len(secret) >= 6:
            self.secrets.append(secret)

    def fields(self, record: logging.LogRecord) -> dict:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return entry

    def render(self, entry: dict) -> str:
        return json.dumps(entry, default=str, ensure_ascii=False)

    def format(self, record: logging.LogRecord) -> str:
        line = self.render(self.fields(record))
        for secret in self.secrets:
            line = line.replace(secret, "***")
        return line


class ConsoleFormatter(JsonFormatter):
    def render(self, entry: dict) -> str:
        head = f"{entry.pop('ts')[11:19]} {entry.pop('level'):<7} {entry.pop('logger')}: {entry.pop('msg')}"
        exception = entry.pop("exception", None)
        line = " ".join([head, *(f"{k}={v}" for k, v in entry.items())])
        return f"{line}\n{exception}" if exception else line


def setup_logging(level: str, secrets: list[str], stream=None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    formatter = ConsoleFormatter if stream.isatty() else JsonFormatter
    handler.setFormatter(formatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "discord", "slack_bolt", "slack_sdk", "websockets", "aiohttp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def mask(secret: str) -> None:
    """Mask a secret learnt after logging was set up (one a person pastes into `chatbot init`)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.mask(secret)
