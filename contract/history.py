"""Conversation history in Redis: turns with their token counts, and resets.

A conversation's turns live in one list. Each turn carries the token count it adds to a
prompt under the served tokenizer, so truncation never re-tokenizes old turns. A reset
bumps the conversation's epoch: the worker writes a job's turns only if the epoch it was
submitted under is still current, so a reply to a message sent before a reset cannot bring
old turns back.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from contract import keys

# A job submitted before a reset must still see the new epoch when it is answered; a job is never
# answered later than a done-mark lasts, so the epoch need not outlive that.
EPOCH_TTL_S = 7 * 24 * 3600

_RESET = """
local epoch_key, turns_key, rated_key = KEYS[1], KEYS[2], KEYS[3]
local prefix, epoch_ttl_s = ARGV[1], ARGV[2]
local epoch = redis.call('INCR', epoch_key)
redis.call('EXPIRE', epoch_key, epoch_ttl_s)
redis.call('DEL', turns_key)
for _, job_id in ipairs(redis.call('SMEMBERS', rated_key)) do
  redis.call('DEL', prefix .. 'feedback:exchange:' .. job_id)
end
redis.call('DEL', rated_key)
return epoch
"""

# Lua, run inside the worker's answer script (contract/work.py): append a job's turns if the
# conversation was not reset since the job was submitted, keep the newest max_turns. A regeneration
# first drops the exchange it replaces, if that is still the latest.
APPEND_TURNS = """
local function append_turns(turns_key, epoch_key, submitted_epoch, max_turns, ttl_s, new_turns, replaces)
  if (redis.call('GET', epoch_key) or '0') ~= submitted_epoch or #new_turns == 0 then return end
  local last = redis.call('LINDEX', turns_key, -1)
  if replaces ~= '' and last and cjson.decode(last).job == replaces then redis.call('LTRIM', turns_key, 0, -3) end
  for _, turn in ipairs(new_turns) do redis.call('RPUSH', turns_key, turn) end
  redis.call('LTRIM', turns_key, -max_turns, -1)
  redis.call('EXPIRE', turns_key, ttl_s)
end
"""


class Turn(BaseModel):
    role: Literal["user", "assistant"]
    text: str
    name: str | None = None  # the author's display name, for user turns in shared channels
    author_id: str | None = None  # the asker's platform user id, on both turns: who may regenerate the answer
    tokens: int = Field(ge=0)  # what this turn adds to a prompt; an exchange's template overhead is booked on its reply
    job: str | None = None  # the job that wrote it: a rating of that answer finds its question and answer here
    # Prompt tokens of the conversation's earlier turns since its start or reset: a position that trimming old
    # turns does not move, so truncation can cut at the same places turn after turn. None: stored before offsets.
    offset: int | None = Field(None, ge=0)
    at: float = Field(default_factory=time.time)


class Exchange(BaseModel):
    user: Turn
    assistant: Turn

    @property
    def tokens(self) -> int:
        return self.user.tokens + self.assistant.tokens


def pair_turns(turns: list[Turn]) -> list[Exchange]:
    """Group stored turns into exchanges; a turn without its partner (trimmed away) is skipped."""
    exchanges = []
    for index in range(len(turns) - 1):
        first, second = turns[index], turns[index + 1]
        if first.role == "user" and second.role == "assistant":
            exchanges.append(Exchange(user=first, assistant=second))
    return exchanges


async def load_exchanges(redis: Redis, conversation: str) -> list[Exchange]:
    raw = await redis.lrange(keys.turns(conversation), 0, -1)
    return pair_turns([Turn.model_validate_json(item) for item in raw])


async def reset(redis: Redis, conversation: str) -> int:
    """Forget the conversation, and the copies of its rated answers; returns the new epoch."""
    return int(await redis.eval(
        _RESET, 3, keys.epoch(conversation), keys.turns(conversation), keys.rated(conversation), keys.PREFIX, EPOCH_TTL_S
    ))
