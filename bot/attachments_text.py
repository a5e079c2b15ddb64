"""What files attached to a message add to its text, on any platform (as llmcord does): text files
read while they fit in the message, then cut to the room left and named as cut; other files named."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

TEXT_SUFFIXES = frozenset(
    ".txt .md .rst .log .csv .tsv .json .yaml .yml .toml .ini .cfg .xml .html .css .js .ts .tsx .jsx .py .rb .go .rs "
    ".java .kt .c .h .cpp .hpp .cs .php .sh .bash .sql .swift .lua .r .scala .pl".split()
)
SEPARATOR = "\n\n"  # before each attachment's part of the message
CUT_NOTICE = "I read only the first part of {files}: a message may hold at most {limit:,} characters, attachments included."


@dataclass(frozen=True)
class AttachedFile:
    """One attachment as the platform gave it: its text, or why it was not read."""

    name: str
    text: str | None
    why_not: str = ""


@dataclass(frozen=True)
class Attached:
    """What a message's attachments add to its text."""

    text: str
    read_any: bool
    cut: tuple[str, ...]  # names of the text files cut (or, with no room left at all, left out) to fit

    def cut_notice(self, limit: int) -> str | None:
        """The sentence for the person when a file was cut; None when none was."""
        return CUT_NOTICE.format(files=", ".join(self.cut), limit=limit) if self.cut else None


NOTHING_ATTACHED = Attached(text="", read_any=False, cut=())


def is_text(name: str, content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].startswith("text/") or PurePath(name).suffix.lower() in TEXT_SUFFIXES


def attached_text(files: list[AttachedFile], room: int) -> Attached:
    """What the files add to the message's text, each part after a SEPARATOR, in at most `room`
    characters: text files in full while they fit, then cut to the room left."""
    parts, cut, read_any = [], [], False
    for file in files:
        space = room - len(SEPARATOR)
        if file.text is None:
            part = f"(attached, not read: {file.name}, {file.why_not})"
        else:
            read_any = True
            part = f"--- {file.name} ---\n{file.text}"
            if len(part) > space:
                part = start_of_file(file.name, file.text, space)
                cut.append(file.name)
        # Left out when not even a file's heading, or a note, fits: the room is the message limit's.
        if part and len(part) <= space:
            parts.append(part)
            room = space - len(part)
    return Attached(text=SEPARATOR.join(parts), read_any=read_any, cut=tuple(cut))


def start_of_file(filename: str, content: str, space: int) -> str:
    """The file's part of the message cut to `space` characters, its heading saying so; empty when even the heading does not fit."""
    # With the whole length in both places the heading is at least as long as the one written.
    kept = first_lines(content, space - len(cut_heading(filename, len(content), len(content))))
    return cut_heading(filename, len(kept), len(content)) + kept if kept else ""


def cut_heading(filename: str, kept: int, total: int) -> str:
    return f"--- {filename} (cut: first {kept:,} of {total:,} characters) ---\n"


def first_lines(text: str, limit: int) -> str:
    """The start of `text` within `limit` characters, ending at a line break unless that would waste more than half."""
    if limit <= 0:
        return ""
    start = text[:limit]
    line_end = start.rfind("\n")
    # A file of few, long lines (minified code) is better cut mid-line than mostly dropped.
    return start[:line_end] if line_end > limit // 2 else start
