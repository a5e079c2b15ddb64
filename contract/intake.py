"""The adapters' side of the queue: submit a platform message as a job, within the limits.

A job waits in its conversation's list (`conv:<c>:jobs`); a conversation with waiting jobs
is on `ready` once. contract/work.py says how a worker takes them.
"""

from __future__ import annotations

from redis.asyncio import Redis

from contract import keys
from contract.controls import NOT_YOURS, ONLY_THE_LATEST, WAIT_FOR_QUEUED
from contract.history import EPOCH_TTL_S, load_exchanges
from contract.jobs import Conversation, Job, RejectedMessage, Scope, Submitted, clean_text
from contract.pause import paused, paused_sentence
from contract.pools import pool_for
from contract.usage import author_name, day, over_budget
from contract.work import AFFINITY_TTL_S
from service.config import LimitSettings, PoolSettings

# Result codes of _SUBMIT below zero; zero or more is the number of jobs ahead.
DUPLICATE, CONVERSATION_FULL, AUTHOR_FULL, AUTHOR_TOO_FAST, PAUSED, OVER_BUDGET, BUSY = -1, -2, -3, -4, -5, -6, -7

_SUBMIT = """
local job_key, done_key, conv_jobs, ready, active, epoch_key, wake, queued, author_queued, author_minute, leases, affinity =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local paused, used_in, used_out, pools = KEYS[13], KEYS[14], KEYS[15], KEYS[16]
local data, job_id, conversation, pool = ARGV[1], ARGV[2], ARGV[3], ARGV[11]
local daily_budget, author_name, regenerates = tonumber(ARGV[12]), ARGV[13], ARGV[14] == '1'
local max_per_conversation, max_per_author, per_minute = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local has_author, epoch_ttl_s, prefix, affinity_ttl_s = ARGV[7] == '1', ARGV[8], ARGV[9], ARGV[10]

if redis.call('EXISTS', job_key) == 1 or redis.call('EXISTS', done_key) == 1 then return -1 end  -- DUPLICATE
if redis.call('EXISTS', paused) == 1 then return -5 end  -- PAUSED
-- a regeneration replaces the latest answer: with messages waiting, it would not be the latest when answered
if regenerates and redis.call('LLEN', conv_jobs) > 0 then return -7 end  -- BUSY
if redis.call('LLEN', conv_jobs) >= max_per_conversation then return -2 end  -- CONVERSATION_FULL
local epoch = tonumber(redis.call('GET', epoch_key) or '0')
-- kept while jobs arrive: a job answered after its epoch expired would find 0 and drop its turns
if epoch > 0 then redis.call('EXPIRE', epoch_key, epoch_ttl_s) end
if has_author then
  if daily_budget > 0 then
    local used = tonumber(redis.call('HGET', used_in, author_name) or '0') + tonumber(redis.call('HGET', used_out, author_name) or '0')
    if used >= daily_budget then return -6 end  -- OVER_BUDGET
  end
  if tonumber(redis.call('GET', author_queued) or '0') >= max_per_author then return -3 end  -- AUTHOR_FULL
  local sent = redis.call('INCR', author_minute)
  if sent == 1 then redis.call('EXPIRE', author_minute, 60) end
  if sent > per_minute then return -4 end  -- AUTHOR_TOO_FAST
  redis.call('INCR', author_queued)
  redis.call('EXPIRE', author_queued, 86400)  -- a count that went wrong heals within a day
  redis.call('HSET', job_key, 'author_queued', author_queued)
end
local t = redis.call('TIME')
redis.call(
  'HSET', job_key, 'data', data, 'conversation', conversation, 'pool', pool, 'epoch', epoch, 'attempts', 0,
  'queued_at', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
)
redis.call('RPUSH', conv_jobs, job_id)
if redis.call('SADD', active, conversation) == 1 then
  redis.call('RPUSH', ready, conversation)
  redis.call('SADD', pools, pool)  -- swept even once config.yaml no longer names it (contract/pools.py)
end
-- one idle worker of the pool is woken, and the worker that holds the conversation's context if it is alive:
-- the idle one takes the message once it has waited affinity_wait_s for the other (contract/work.py)
local wakes = {wake}
local preferred = redis.call('GET', affinity)
if preferred and redis.call('EXISTS', prefix .. 'worker:' .. preferred) == 1 then
  wakes[2] = prefix .. 'wake:' .. preferred
end
for _, woken in ipairs(wakes) do
  redis.call('DEL', woken)
  redis.call('RPUSH', woken, 1)
  redis.call('EXPIRE', woken, affinity_ttl_s)
end
-- ahead: queued before this one and not being answered yet (a leased job is in a worker's slot)
return math.max(0, redis.call('INCR', queued) - 1 - redis.call('ZCARD', leases))
"""


class Intake:
    def __init__(self, redis: Redis, limits: LimitSettings, pools: PoolSettings | None = None):
        self.redis = redis
        self.limits = limits
        self.pools = pools or PoolSettings()
        self._submit = redis.register_script(_SUBMIT)

    async def submit(
        self,
        conversation: Conversation,
        message_id: str,
        text: str,
        author: str | None = None,
        reply_to: dict[str, str] | None = None,
        author_id: str | None = None,
        scope: Scope | None = None,
    ) -> Submitted:
        """Queue a platform message; the same message id is accepted once (retried deliveries).

        Raises RejectedMessage, with a sentence for the user, for an empty or over-long message
        and past the limits of the conversation or of its author (`author_id`, the platform's
        user id); nothing is queued then. `scope` defaults to the conversation's own channel, and
        chooses the pool of workers that answers it.
        """
        text = clean_text(text, self.limits.max_message_chars)
        return await self._enqueue(self._job(conversation, message_id, text, author, author_id, reply_to, scope))

    async def regenerate(
        self,
        conversation: Conversation,
        answer_job_id: str,
        request_id: str,
        by: str | None,
        admin: bool = False,
        reply_to: dict[str, str] | None = None,
        scope: Scope | None = None,
    ) -> Submitted:
        """Queue a new answer to the question of answer `answer_job_id`, to replace it (in history and
        on the platform, where its messages are edited); `request_id` (the platform's click id)
        makes a retried click a no-op, and the regeneration counts against the asker's limits as a
        message does. Only the conversation's latest answer can be regenerated, by its asker (the
        platform user id `by`) or an admin, and not while the conversation has messages waiting;
        RejectedMessage otherwise, with a sentence for the user.
        """
        exchanges = await load_exchanges(self.redis, conversation.key)
        if not exchanges or exchanges[-1].assistant.job != answer_job_id:
            raise RejectedMessage(ONLY_THE_LATEST)
        question = exchanges[-1].user
        if not admin and question.author_id != by:
            raise RejectedMessage(NOT_YOURS)
        job = self._job(
            conversation, f"regenerate:{request_id}", question.text, question.name, question.author_id, reply_to, scope,
            replaces=answer_job_id,
        )
        return await self._enqueue(job)

    def _job(
        self,
        conversation: Conversation,
        message_id: str,
        text: str,
        author: str | None,
        author_id: str | None,
        reply_to: dict[str, str] | None,
        scope: Scope | None,
        replaces: str | None = None,
    ) -> Job:
        """A job of the conversation; its scope (by default the conversation's own channel) chooses its pool."""
        scope = scope or Scope(platform=conversation.platform, channel=conversation.channel)
        return Job(
            id=f"{conversation.platform}:{message_id}",
            conversation=conversation.key,
            platform=conversation.platform,
            text=text,
            author=author,
            author_id=author_id,
            reply_to=reply_to or {},
            scope=scope,
            pool=pool_for(self.pools, scope),
            replaces=replaces,
        )

    async def _enqueue(self, job: Job) -> Submitted:
        limits, author_id = self.limits, job.author_id
        person = keys.author(job.platform, author_id)
        today = keys.usage_day(day())
        script_keys = [
            keys.job(job.id), keys.done(job.id), keys.conv_jobs(job.conversation), keys.ready(job.pool), keys.ACTIVE,
            keys.epoch(job.conversation), keys.wake(job.pool), keys.queued(job.pool), f"{person}:queued", f"{person}:minute",
            keys.leases(job.pool), keys.affinity(job.conversation), keys.PAUSED, today + "author:in", today + "author:out",
            keys.POOLS,
        ]
        args = [
            job.model_dump_json(), job.id, job.conversation, limits.max_queued_per_conversation,
            limits.max_queued_per_author, limits.messages_per_minute_per_author, "1" if author_id else "0", EPOCH_TTL_S,
            keys.PREFIX, AFFINITY_TTL_S, job.pool, limits.daily_tokens_per_author or 0, author_name(job.platform, author_id),
            "1" if job.replaces else "0",
        ]
        ahead = await self._submit(keys=script_keys, args=args)
        if ahead == DUPLICATE:
            return Submitted(job_id=job.id, ahead=0, duplicate=True)
        if ahead == CONVERSATION_FULL:
            raise RejectedMessage(
                f"This conversation already has {limits.max_queued_per_conversation} messages waiting for an answer: "
                "please wait for them before sending more."
            )
        if ahead == AUTHOR_FULL:
            raise RejectedMessage(
                f"You already have {limits.max_queued_per_author} messages waiting for an answer: "
                "please wait for them before sending more."
            )
        if ahead == AUTHOR_TOO_FAST:
            raise RejectedMessage(
                f"You are sending messages faster than {limits.messages_per_minute_per_author} a minute: "
                "please wait a moment."
            )
        if ahead == OVER_BUDGET:
            raise RejectedMessage(over_budget(limits.daily_tokens_per_author or 0))
        if ahead == BUSY:
            raise RejectedMessage(WAIT_FOR_QUEUED)
        if ahead == PAUSED:
            raise RejectedMessage(paused_sentence(await paused(self.redis) or ""))
        return Submitted(job_id=job.id, ahead=ahead)
