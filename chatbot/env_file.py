"""The env file: variables `chatbot` reads before anything else (what `chatbot init` writes; docker
compose reads the same file). ./.env unless CHATBOT_ENV_FILE names another; the real environment wins."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dotenv import load_dotenv

ENV_FILE = "CHATBOT_ENV_FILE"
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")


class EnvFile:
    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def configured(cls) -> EnvFile:
        return cls(Path(os.environ.get(ENV_FILE, ".env")))

    def load(self) -> None:
        """Its variables that the environment does not set already."""
        if self.path.is_file():
            load_dotenv(self.path, override=False)

    def keep(self, values: dict[str, str]) -> list[str]:
        """Write `values` (replacing a variable's line in place, keeping the others; mode 0600) and set
        them in this process's environment; the names whose value changed."""
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        changed = []
        for name, value in values.items():
            os.environ[name] = value
            line = f"{name}={value}"
            index = next((i for i, old in enumerate(lines) if (m := _LINE.match(old)) and m.group(1) == name), None)
            if index is None:
                lines.append(line)
            elif lines[index] != line:
                lines[index] = line
            else:
                continue
            changed.append(name)
        if changed:
            staged = self.path.with_name(self.path.name + ".new")
            with os.fdopen(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
                file.write("\n".join(lines) + "\n")
            os.replace(staged, self.path)
        return changed
