"""Users' ratings of answers, in Redis: who rated which answer how, and when.

Layout (under `chatbot:`):
  feedback                 stream of votes: job, user, rating, at (newest 10,000 kept)
  feedback:exchange:<job>  hash: conversation, question, answer (kept EXCHANGE_TTL_S)
  feedback:vote:<job>:<user>  that user's current rating of that answer: a retried click is not
                           counted twice, a changed mind moves the count
  feedback:counts          hash: rating -> current votes
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from contract import keys

EXCHANGE_TTL_S = 30 * 24 * 3600
KEPT_VOTES = 10_000
Rating = Literal["good", "bad"]
RATINGS: tuple[Rating, ...] = ("good", "bad")

_RECORD = """
local previous = redis.call('GET', KEYS[1])
if previous == ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[5])
if previous then redis.call('HINCRBY', KEYS[3], previous, -1) end
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'job', ARGV[1], 'user', ARGV[2], 'rating', ARGV[3], 'at', ARGV[4])
return 1
"""


@dataclass(frozen=True)
class Vote:
    job_id: str
    user: str
    rating: str
    at: float
    conversation: str | None
    question: str | None  # None once the exchange expired
    answer: str | None


class FeedbackStore:
    def __init__(self, redis: Redis):
        self.redis = redis
        self._record = redis.register_script(_RECORD)

    async def remember_question(self, job_id: str, conversation: str, text: str) -> None:
        await self._remember(job_id, conversation=conversation, question=text)

    async def remember_answer(self, job_id: str, text: str) -> None:
        await self._remember(job_id, answer=text)

    async def _remember(self, job_id: str, **fields: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.feedback_exchange(job_id), mapping=fields)
            pipe.expire(keys.feedback_exchange(job_id), EXCHANGE_TTL_S)
            await pipe.execute()

    async def record(self, job_id: str, user: str, rating: Rating) -> bool:
        """Store a user's rating of an answer; False when it is the rating they gave already (a retried click)."""
        script_keys = [keys.feedback_vote(job_id, user), keys.FEEDBACK, keys.FEEDBACK_COUNTS]
        args = [job_id, user, rating, f"{time.time():.3f}", EXCHANGE_TTL_S, KEPT_VOTES]
        return bool(await self._record(keys=script_keys, args=args))

    async def counts(self) -> dict[str, int]:
        stored = await self.redis.hgetall(keys.FEEDBACK_COUNTS)
        return {rating: int(stored.get(rating, 0)) for rating in RATINGS}

    async def recent(self, limit: int) -> list[Vote]:
        """The newest votes first, with the question and answer they rate."""
        votes = []
        for _, fields in await self.redis.xrevrange(keys.FEEDBACK, count=limit):
            exchange = await self.redis.hgetall(keys.feedback_exchange(fields["job"]))
            votes.append(
                Vote(
                    job_id=fields["job"],
                    user=fields["user"],
                    rating=fields["rating"],
                    at=float(fields["at"]),
                    conversation=exchange.get("conversation"),
                    question=exchange.get("question"),
                    answer=exchange.get("answer"),
                )
            )
        return votes
