"""Users' ratings of answers, in Redis: who rated which answer how, and when.

A retried click is not counted twice, a changed mind moves the count. The question and answer
are copied out of the conversation's history when an answer is first rated, and only then:
the copy is deleted when the conversation is reset (contract/history.py). Keys: contract/keys.py.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import WatchError

from contract import keys
from contract.history import load_exchanges

EXCHANGE_TTL_S = 30 * 24 * 3600
KEPT_VOTES = 10_000
Rating = Literal["good", "bad"]
RATINGS: tuple[Rating, ...] = ("good", "bad")

# Returns 1 when the vote is new or changed, 0 when it repeats the person's current rating.
_RECORD = """
local vote_key, votes, counts = KEYS[1], KEYS[2], KEYS[3]
local job_id, user, rating, at, vote_ttl_s, kept_votes = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local previous = redis.call('GET', vote_key)
if previous == rating then return 0 end
redis.call('SET', vote_key, rating, 'EX', vote_ttl_s)
if previous then redis.call('HINCRBY', counts, previous, -1) end
redis.call('HINCRBY', counts, rating, 1)
redis.call('XADD', votes, 'MAXLEN', '~', kept_votes, '*', 'job', job_id, 'user', user, 'rating', rating, 'at', at)
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

    async def record(self, job_id: str, user: str, rating: Rating, conversation: str | None) -> bool:
        """Store a user's rating of an answer of `conversation`; False when it is the rating they gave already."""
        script_keys = [keys.feedback_vote(job_id, user), keys.FEEDBACK, keys.FEEDBACK_COUNTS]
        args = [job_id, user, rating, f"{time.time():.3f}", EXCHANGE_TTL_S, KEPT_VOTES]
        recorded = bool(await self._record(keys=script_keys, args=args))
        if recorded and conversation and not await self.redis.exists(keys.feedback_exchange(job_id)):
            await self._copy_exchange(job_id, conversation)
        return recorded

    async def _copy_exchange(self, job_id: str, conversation: str) -> None:
        """Keep the rated question and answer beyond the history (a history may be trimmed or expire)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            # A reset between reading the history and writing the copy would leave a copy of what it forgot.
            await pipe.watch(keys.turns(conversation))
            exchange = next((e for e in await load_exchanges(pipe, conversation) if e.assistant.job == job_id), None)
            if exchange is None:
                return
            fields = {"conversation": conversation, "question": exchange.user.text, "answer": exchange.assistant.text}
            if exchange.user.author_id:  # forget-user finds it after the history let the exchange go
                fields["author_id"] = exchange.user.author_id
            pipe.multi()
            pipe.hset(keys.feedback_exchange(job_id), mapping=fields)
            pipe.expire(keys.feedback_exchange(job_id), EXCHANGE_TTL_S)
            pipe.sadd(keys.rated(conversation), job_id)
            pipe.expire(keys.rated(conversation), EXCHANGE_TTL_S)
            with contextlib.suppress(WatchError):  # reset meanwhile: nothing to keep
                await pipe.execute()

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
