"""Token usage per author, conversation and workspace, per day (UTC), and the daily budget per author.

The worker counts an answer's tokens in the script that records the answer (contract/work.py),
so a job delivered again is never counted twice. Each day has one hash per dimension and
measure (`usage:<day>:<dimension>:<measure>`, field: the author, conversation or workspace),
kept USAGE_KEEP_DAYS. Intake checks an author's daily budget before queueing a message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from contract import keys
from contract.jobs import Job

USAGE_KEEP_DAYS = 90
Dimension = Literal["author", "conversation", "workspace"]
DIMENSIONS: tuple[Dimension, ...] = ("author", "conversation", "workspace")
MEASURES = ("in", "out", "messages")  # prompt tokens, generated tokens, answers

# Lua, run inside the answer script: add one answer's tokens to the day's counts of its author,
# conversation and workspace (an empty name: the job has none of that dimension).
COUNT_USAGE = """
local function count_usage(day_prefix, keep_s, tokens_in, tokens_out, names)
  local dimensions = {'author', 'conversation', 'workspace'}
  for i, dimension in ipairs(dimensions) do
    if names[i] ~= '' then
      for measure, amount in pairs({['in'] = tokens_in, out = tokens_out, messages = 1}) do
        local key = day_prefix .. dimension .. ':' .. measure
        redis.call('HINCRBY', key, names[i], amount)
        redis.call('EXPIRE', key, keep_s)
      end
    end
  end
end
"""


@dataclass(frozen=True)
class Usage:
    """What one answer cost: its prompt's tokens (in) and the tokens generated (out)."""

    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class UsageRow:
    name: str
    tokens_in: int
    tokens_out: int
    messages: int


def day(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if at is None else at))


def author_name(platform: str, author_id: str | None) -> str:
    return f"{platform}:{author_id}" if author_id else ""


def names_of(job: Job) -> list[str]:
    """The job's author, conversation and workspace as usage counts them ('' for none)."""
    workspace = f"{job.scope.platform}:{job.scope.workspace}" if job.scope and job.scope.workspace else ""
    return [author_name(job.platform, job.author_id), job.conversation, workspace]


def usage_args(job: Job, usage: Usage | None, at: float | None = None) -> list[str | int]:
    """COUNT_USAGE's arguments for the answer script: nothing is counted without `usage` (an answer with an error)."""
    if usage is None:
        return ["", 0, 0, 0, "", "", ""]
    return [keys.usage_day(day(at)), USAGE_KEEP_DAYS * 86400, usage.prompt_tokens, usage.output_tokens, *names_of(job)]


async def report(redis: Redis, by: Dimension, days: int, now: float | None = None) -> list[UsageRow]:
    """Usage over the last `days` days (today included), by author, conversation or workspace; most tokens first."""
    now = time.time() if now is None else now
    totals: dict[str, list[int]] = {}
    async with redis.pipeline(transaction=False) as pipe:
        for back in range(days):
            for measure in MEASURES:
                pipe.hgetall(keys.usage_day(day(now - back * 86400)) + f"{by}:{measure}")
        counts = await pipe.execute()
    for index, found in enumerate(counts):
        for name, amount in found.items():
            totals.setdefault(name, [0, 0, 0])[index % len(MEASURES)] += int(amount)
    rows = [UsageRow(name, *amounts) for name, amounts in totals.items()]
    return sorted(rows, key=lambda row: (-(row.tokens_in + row.tokens_out), row.name))


def over_budget(budget: int, now: float | None = None) -> str:
    now = time.time() if now is None else now
    left = 86400 - int(now) % 86400
    return (
        f"You have used your {budget:,} tokens for today. Your budget renews at 00:00 UTC, "
        f"in {left // 3600} h {left % 3600 // 60:02d} min."
    )
