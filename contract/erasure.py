"""Erasing a person: everything the service keeps about one platform user, removed on an operator's request.

What goes: their messages and the answers to them in every conversation's history (turns carry
the asker's user id), the rated copies of their exchanges (also those the history has let go:
trimmed, expired or regenerated) and their reply events still in the reply streams, the ratings
they gave (also those older than the vote stream keeps), their usage counts, their limit counters
and Slack's note of their suggested prompts. Turns stored before turns carried user ids cannot be
told apart and stay.
Messages of theirs still queued are counted, not removed: run it again once they are answered
(or pause the service first).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from contract import keys
from contract.jobs import Job, ReplyEvent
from contract.replies import GROUP

# Removes the person's turns from one conversation's history; returns how many, and their job ids.
_FORGET_TURNS = """
local turns_key, user = KEYS[1], ARGV[1]
local removed, jobs = 0, {}
for _, raw in ipairs(redis.call('LRANGE', turns_key, 0, -1)) do
  local turn = cjson.decode(raw)
  if turn.author_id == user then
    redis.call('LREM', turns_key, 1, raw)
    removed = removed + 1
    if type(turn.job) == 'string' then jobs[#jobs + 1] = turn.job end
  end
end
return {removed, jobs}
"""


@dataclass
class Erased:
    turns: int = 0
    conversations: int = 0
    rated_copies: int = 0
    reply_events: int = 0
    ratings_given: int = 0
    usage_days: int = 0
    other_keys: int = 0
    still_queued: int = 0

    def summary(self) -> str:
        return (
            f"{self.turns} turns (their messages and the answers to them) in {self.conversations} conversation(s), "
            f"{self.rated_copies} rated cop(ies) of those exchanges, {self.reply_events} reply event(s), "
            f"{self.ratings_given} rating(s) they gave, their usage on {self.usage_days} day(s), "
            f"{self.other_keys} other key(s); {self.still_queued} message(s) of theirs still queued"
        )


async def forget_user(redis: Redis, platform: str, user_id: str) -> Erased:
    erased = Erased()
    forget_turns = redis.register_script(_FORGET_TURNS)
    jobs: set[str] = set()
    async for turns_key in redis.scan_iter(match=f"{keys.PREFIX}conv:{platform}:*:turns", count=1000):
        removed, job_ids = await forget_turns(keys=[turns_key], args=[user_id])
        if removed:
            erased.turns += int(removed)
            erased.conversations += 1
            jobs.update(job_ids)
    for job_id in jobs:
        erased.other_keys += await redis.delete(keys.posted(job_id))
    erased.rated_copies = await _forget_rated_copies(redis, platform, user_id, jobs)
    erased.reply_events = await _forget_reply_events(redis, platform, user_id, jobs)
    erased.ratings_given = await _forget_ratings(redis, platform, user_id)
    erased.usage_days = await _forget_usage(redis, f"{platform}:{user_id}")
    person = keys.author(platform, user_id)
    erased.other_keys += await redis.delete(f"{person}:queued", f"{person}:minute")
    if platform == "slack":
        async for key in redis.scan_iter(match=keys.slack_prompts_set("*", user_id), count=1000):
            erased.other_keys += await redis.delete(key)
    async for job_key in redis.scan_iter(match=f"{keys.PREFIX}job:{platform}:*", count=1000):
        data = await redis.hget(job_key, "data")
        if data and Job.model_validate_json(data).author_id == user_id:
            erased.still_queued += 1
    return erased


async def _forget_rated_copies(redis: Redis, platform: str, user_id: str, jobs: set[str]) -> int:
    """Copies of their rated exchanges: those of their turns' jobs, and any copy naming them as the asker."""
    doomed = {keys.feedback_exchange(job_id) for job_id in jobs}
    async for key in redis.scan_iter(match=keys.feedback_exchange(f"{platform}:*"), count=1000):
        if await redis.hget(key, "author_id") == user_id:
            doomed.add(key)
    return await redis.delete(*doomed) if doomed else 0


async def _forget_reply_events(redis: Redis, platform: str, user_id: str, jobs: set[str]) -> int:
    """Reply events of their questions still in the platform's reply streams (also those of a replaced answer);
    an event an adapter has read but not acknowledged stays (deleting it would break its delivery), and is
    trimmed once delivered."""
    deleted = 0
    async for stream in redis.scan_iter(match=f"{keys.PREFIX}replies:{platform}:*", _type="stream", count=1000):
        pending = set()
        if any(group["name"] == GROUP for group in await redis.xinfo_groups(stream)):
            pending = {entry["message_id"] for entry in await redis.xpending_range(stream, GROUP, "-", "+", 100_000)}
        doomed = [
            entry_id for entry_id, fields in await redis.xrange(stream)
            if entry_id not in pending and _theirs(ReplyEvent.model_validate_json(fields["event"]), user_id, jobs)
        ]
        if doomed:
            deleted += await redis.xdel(stream, *doomed)
    return deleted


def _theirs(event: ReplyEvent, user_id: str, jobs: set[str]) -> bool:
    return event.author_id == user_id or event.job_id in jobs


async def _forget_ratings(redis: Redis, platform: str, user_id: str) -> int:
    """Their votes: in the vote stream, and each vote key (the person's current rating of an answer, counted in
    the totals), which outlives the stream's newest KEPT_VOTES."""
    mine = [
        entry_id for entry_id, fields in await redis.xrange(keys.FEEDBACK)
        if fields["user"] == user_id and fields["job"].startswith(f"{platform}:")
    ]
    if mine:
        await redis.xdel(keys.FEEDBACK, *mine)
    votes = 0
    async for key in redis.scan_iter(match=keys.feedback_vote(f"{platform}:*", user_id), count=1000):
        if current := await redis.getdel(key):
            await redis.hincrby(keys.FEEDBACK_COUNTS, current, -1)
            votes += 1
    return max(votes, len(mine))


async def _forget_usage(redis: Redis, name: str) -> int:
    days = set()
    async for key in redis.scan_iter(match=f"{keys.PREFIX}usage:*:author:*", count=1000):
        if await redis.hdel(key, name):
            days.add(key.split(":")[2])
    return len(days)
