"""The job queue in Redis: fair across conversations, ordered within one, at-least-once.

Layout (all keys under `chatbot:`):
  job:<id>            hash: data (Job JSON), conversation, epoch, attempts, owner
  conv:<c>:jobs       list of the conversation's job ids, oldest first; only the head is ever worked on
  ready               list of conversations whose head job waits for a worker (round robin)
  active              set of conversations that have queued jobs (in `ready` or leased)
  leases              zset job id -> deadline (ms); an expired lease puts the job back on `ready`
  worker:<owner>      a live worker's key, refreshed with its leases: once gone, its leases are due at once
  done:<id>           set once a job is answered: a redelivered job never answers twice
  replies:<platform>  stream of ReplyEvents for that platform's adapter (trimmed only below what it acknowledged)
  wake                a one-element list the worker blocks on while idle

A conversation is on `ready` at most once and leaves it while its head job is leased, so
its messages are answered in order and a batch never holds two jobs of one conversation.
After a job, its conversation goes to the back of `ready`: 50 queued messages in one
conversation take turns with the others instead of holding them back.

The scripts address keys they compute from job data, so this needs a single Redis server,
not Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from engine.config import LimitSettings
from engine.history import PREFIX, Exchange, Turn, epoch_key, pair_turns, turns_key
from engine.jobs import Conversation, Job, RejectedMessage, ReplyEvent, Submitted, clean_text

READY = PREFIX + "ready"
ACTIVE = PREFIX + "active"
LEASES = PREFIX + "leases"
WAKE = PREFIX + "wake"
QUEUED = PREFIX + "queued"
DONE_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Claim:
    job: Job
    history: list[Exchange]  # the conversation's stored exchanges, read in the same step as the lease


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def done_key(job_id: str) -> str:
    return f"{PREFIX}done:{job_id}"


def conv_jobs_key(conversation: str) -> str:
    return f"{PREFIX}conv:{conversation}:jobs"


def worker_key(owner: str) -> str:
    return f"{PREFIX}worker:{owner}"


def replies_key(platform: str) -> str:
    return f"{PREFIX}replies:{platform}"


_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('LLEN', KEYS[3]) >= tonumber(ARGV[4]) then return -2 end
local epoch = tonumber(redis.call('GET', KEYS[6]) or '0')
if ARGV[7] == '1' then
  if tonumber(redis.call('GET', KEYS[9]) or '0') >= tonumber(ARGV[5]) then return -3 end
  local sent = redis.call('INCR', KEYS[10])
  if sent == 1 then redis.call('EXPIRE', KEYS[10], 60) end
  if sent > tonumber(ARGV[6]) then return -4 end
  redis.call('INCR', KEYS[9])
  redis.call('EXPIRE', KEYS[9], 86400)  -- a count that went wrong heals within a day
  redis.call('HSET', KEYS[1], 'author_queued', KEYS[9])
end
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'conversation', ARGV[3], 'epoch', epoch, 'attempts', 0)
redis.call('RPUSH', KEYS[3], ARGV[2])
if redis.call('SADD', KEYS[5], ARGV[3]) == 1 then redis.call('RPUSH', KEYS[4], ARGV[3]) end
redis.call('DEL', KEYS[7])
redis.call('RPUSH', KEYS[7], 1)
-- ahead: queued before this one and not being answered yet (a leased job is in a worker's slot)
return math.max(0, redis.call('INCR', KEYS[8]) - 1 - redis.call('ZCARD', KEYS[11]))
"""

_CLAIM = """
local prefix, max_jobs, visibility, owner = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leases = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #leases, 2 do
  local job_id, deadline = leases[i], tonumber(leases[i + 1])
  local job = redis.call('HMGET', prefix .. 'job:' .. job_id, 'conversation', 'owner')
  -- due: its deadline passed, or its worker is gone (stopped, or silent past its liveness)
  if deadline <= now or redis.call('EXISTS', prefix .. 'worker:' .. (job[2] or '')) == 0 then
    redis.call('ZREM', KEYS[2], job_id)
    if job[1] and not redis.call('LPOS', KEYS[1], job[1]) then redis.call('LPUSH', KEYS[1], job[1]) end
  end
end
local claimed = {}
while #claimed < max_jobs do
  local conversation = redis.call('LPOP', KEYS[1])
  if not conversation then break end
  local job_id = redis.call('LINDEX', prefix .. 'conv:' .. conversation .. ':jobs', 0)
  if not job_id then
    redis.call('SREM', KEYS[3], conversation)
  elseif not redis.call('ZSCORE', KEYS[2], job_id) then
    local key = prefix .. 'job:' .. job_id
    redis.call('ZADD', KEYS[2], now + visibility, job_id)
    redis.call('HSET', key, 'owner', owner)
    local attempts = redis.call('HINCRBY', key, 'attempts', 1)
    local fields = redis.call('HMGET', key, 'data', 'epoch')
    local turns = redis.call('LRANGE', prefix .. 'conv:' .. conversation .. ':turns', 0, -1)
    table.insert(claimed, {fields[1], fields[2], attempts, turns})
  end
end
return claimed
"""

# Trims a reply stream after an XADD without dropping what an adapter has not acknowledged:
# with consumer groups, only entries below every group's oldest pending (or, with none
# pending, last delivered) entry go; a stream no adapter reads keeps its newest ARGV[maxlen].
_TRIM = """
local function older(a, b)
  local a_ms, a_seq = string.match(a, '(%d+)-(%d+)')
  local b_ms, b_seq = string.match(b, '(%d+)-(%d+)')
  if #a_ms ~= #b_ms then return #a_ms < #b_ms end
  if a_ms ~= b_ms then return a_ms < b_ms end
  return tonumber(a_seq) < tonumber(b_seq)
end
local function trim_replies(stream, maxlen)
  local groups = redis.call('XINFO', 'GROUPS', stream)
  if #groups == 0 then
    redis.call('XTRIM', stream, 'MAXLEN', '~', maxlen)
    return
  end
  local floor = nil
  for _, group in ipairs(groups) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local keep = info['last-delivered-id']
    if tonumber(info['pending']) > 0 then keep = redis.call('XPENDING', stream, info['name'])[2] end
    if floor == nil or older(keep, floor) then floor = keep end
  end
  redis.call('XTRIM', stream, 'MINID', '~', floor)
end
"""

_COMPLETE = _TRIM + """
local job_id, conversation, epoch = ARGV[1], ARGV[2], ARGV[3]
local answered = 0
local author_queued = redis.call('HGET', KEYS[2], 'author_queued')
if author_queued and redis.call('DECR', author_queued) < 0 then redis.call('SET', author_queued, 0) end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if (redis.call('GET', KEYS[8]) or '0') == epoch and tonumber(ARGV[9]) > 0 then
    for i = 10, 9 + tonumber(ARGV[9]) do redis.call('RPUSH', KEYS[7], ARGV[i]) end
    redis.call('LTRIM', KEYS[7], -tonumber(ARGV[5]), -1)
    redis.call('EXPIRE', KEYS[7], ARGV[6])
  end
  redis.call('XADD', KEYS[9], '*', 'event', ARGV[4])
  trim_replies(KEYS[9], ARGV[8])
  redis.call('SET', KEYS[1], 1, 'EX', ARGV[7])
  redis.call('DECR', KEYS[10])
  answered = 1
end
redis.call('LREM', KEYS[3], 1, job_id)
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[6], job_id)
if redis.call('LLEN', KEYS[3]) > 0 then
  if not redis.call('LPOS', KEYS[4], conversation) then redis.call('RPUSH', KEYS[4], conversation) end
else
  redis.call('SREM', KEYS[5], conversation)
end
return answered
"""

_RELEASE = """
for i, job_id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[2], job_id) == 1 then
    local key = KEYS[3] .. 'job:' .. job_id
    -- handed back, not failed: the delivery does not count against the job's attempts
    redis.call('HINCRBY', key, 'attempts', -1)
    local conversation = redis.call('HGET', key, 'conversation')
    if conversation and not redis.call('LPOS', KEYS[1], conversation) then
      redis.call('LPUSH', KEYS[1], conversation)
    end
  end
end
return 1
"""

_PARTIAL = _TRIM + """
if redis.call('EXISTS', KEYS[1]) == 1 or not redis.call('ZSCORE', KEYS[3], ARGV[1])
   or redis.call('HGET', KEYS[2], 'owner') ~= ARGV[2] then
  return 0
end
redis.call('XADD', KEYS[4], '*', 'event', ARGV[3])
trim_replies(KEYS[4], ARGV[4])
return 1
"""


class JobQueue:
    def __init__(
        self,
        redis: Redis,
        visibility_timeout_s: float = 60.0,
        reply_stream_maxlen: int = 10_000,
        limits: LimitSettings | None = None,
    ):
        self.redis = redis
        self.limits = limits or LimitSettings()
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.reply_stream_maxlen = reply_stream_maxlen
        self._submit = redis.register_script(_SUBMIT)
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)
        self._release = redis.register_script(_RELEASE)
        self._partial = redis.register_script(_PARTIAL)

    # --- adapters -------------------------------------------------------------------

    async def submit(
        self,
        conversation: Conversation,
        message_id: str,
        text: str,
        author: str | None = None,
        reply_to: dict[str, str] | None = None,
        author_id: str | None = None,
    ) -> Submitted:
        """Queue a platform message; the same message id is accepted once (retried deliveries).

        Raises RejectedMessage, with a sentence for the user, for an empty or over-long message
        and past the limits of the conversation or of its author (`author_id`, the platform's
        user id); nothing is queued then.
        """
        limits = self.limits
        job = Job(
            id=f"{conversation.platform}:{message_id}",
            conversation=conversation.key,
            platform=conversation.platform,
            text=clean_text(text, limits.max_message_chars),
            author=author,
            author_id=author_id,
            reply_to=reply_to or {},
        )
        person = f"{PREFIX}author:{conversation.platform}:{author_id or '-'}"
        keys = [
            job_key(job.id), done_key(job.id), conv_jobs_key(job.conversation), READY, ACTIVE,
            epoch_key(job.conversation), WAKE, QUEUED, f"{person}:queued", f"{person}:minute", LEASES,
        ]
        args = [
            job.model_dump_json(), job.id, job.conversation, limits.max_queued_per_conversation,
            limits.max_queued_per_author, limits.messages_per_minute_per_author, "1" if author_id else "0",
        ]
        ahead = await self._submit(keys=keys, args=args)
        if ahead == -1:
            return Submitted(job_id=job.id, ahead=0, duplicate=True)
        if ahead == -2:
            raise RejectedMessage(
                f"This conversation already has {limits.max_queued_per_conversation} messages waiting for an answer: "
                "please wait for them before sending more."
            )
        if ahead == -3:
            raise RejectedMessage(
                f"You already have {limits.max_queued_per_author} messages waiting for an answer: "
                "please wait for them before sending more."
            )
        if ahead == -4:
            raise RejectedMessage(
                f"You are sending messages faster than {limits.messages_per_minute_per_author} a minute: "
                "please wait a moment."
            )
        return Submitted(job_id=job.id, ahead=ahead)

    # --- worker ---------------------------------------------------------------------

    async def claim(self, owner: str, max_jobs: int = 1) -> list[Claim]:
        """Lease up to max_jobs head jobs, each from a different conversation, with their histories."""
        rows = await self._claim(keys=[READY, LEASES, ACTIVE], args=[PREFIX, max_jobs, self.visibility_ms, owner])
        claims = []
        for data, epoch, attempts, turns in rows:
            job = Job.model_validate_json(data).model_copy(update={"epoch": int(epoch), "attempts": int(attempts)})
            claims.append(Claim(job, pair_turns([Turn.model_validate_json(turn) for turn in turns])))
        return claims

    async def depth(self) -> tuple[int, int]:
        """Jobs waiting or being answered, and conversations waiting for a worker."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(QUEUED)
            pipe.llen(READY)
            queued, waiting = await pipe.execute()
        return int(queued or 0), waiting

    async def wait_for_work(self, timeout_s: float) -> None:
        await self.redis.blpop([WAKE], timeout=timeout_s)

    async def heartbeat(self, owner: str, jobs: list[Job]) -> None:
        """Say that worker `owner` is alive, and push the lease deadline of the jobs it is working on."""
        seconds, micros = await self.redis.time()
        deadline = seconds * 1000 + micros // 1000 + self.visibility_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(owner), deadline, px=self.visibility_ms)
            if jobs:
                pipe.zadd(LEASES, {job.id: deadline for job in jobs}, xx=True)
            await pipe.execute()

    async def gone(self, owner: str) -> None:
        """Worker `owner` has stopped: the leases it still holds are due at once."""
        await self.redis.delete(worker_key(owner))

    async def release(self, jobs: list[Job]) -> None:
        """Hand jobs back unanswered, first in line (the worker is stopping)."""
        if jobs:
            await self._release(keys=[READY, LEASES, PREFIX], args=[job.id for job in jobs])

    async def complete(
        self,
        job: Job,
        event: ReplyEvent,
        turns: list[Turn],
        max_turns: int,
        ttl_s: int,
    ) -> bool:
        """Post the reply, append the turns and mark the job done in one atomic step.

        Returns False if the job had been answered already (a redelivery): nothing is written.
        """
        keys = [
            done_key(job.id), job_key(job.id), conv_jobs_key(job.conversation), READY, ACTIVE, LEASES,
            turns_key(job.conversation), epoch_key(job.conversation), replies_key(job.platform), QUEUED,
        ]
        args = [
            job.id, job.conversation, str(job.epoch), event.model_dump_json(), max_turns, ttl_s, DONE_TTL_S,
            self.reply_stream_maxlen, len(turns), *(turn.model_dump_json() for turn in turns),
        ]
        return bool(await self._complete(keys=keys, args=args))

    async def publish_partial(self, job: Job, text: str, owner: str) -> bool:
        """Stream a partial answer, only while `owner` holds the job's lease and it is not answered yet.

        Returns False when it is not (so a late partial never follows the final reply); the caller
        then stops generating for the job.
        """
        event = ReplyEvent(job_id=job.id, conversation=job.conversation, kind="partial", text=text, reply_to=job.reply_to)
        keys = [done_key(job.id), job_key(job.id), LEASES, replies_key(job.platform)]
        return bool(await self._partial(keys=keys, args=[job.id, owner, event.model_dump_json(), self.reply_stream_maxlen]))
