"""The worker's side of the queue: claim jobs under a lease, keep the lease, answer once.

A claimed job is leased: if its worker dies, the job is delivered again when the lease
expires, or at once when the worker's liveness key (`worker:<owner>`) is gone. A conversation
leaves `ready` while its head job is leased, so its messages are answered in order and a
batch never holds two jobs of one conversation; after a job the conversation goes to the
back of `ready`, so one busy conversation takes turns with the others.

A worker crash counts only against the job that causes it. A job whose lease falls due
becomes a suspect, uncharged: any job of the dead worker's batch may have caused the crash.
A suspect is served alone: a busy worker claims neither a suspect nor anything behind one in
`ready`, so it drains its batch, then claims the suspect by itself and admits nothing else
until it ends (engine/worker.py). Claiming a suspect charges it an attempt, so only a job that
was alone when its worker died runs up attempts; a suspect handed back is not charged for it.

The answer (reply event, history turns, done-mark) is written by one script: a redelivered
job never answers twice or duplicates a turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from contract import keys
from contract.history import APPEND_TURNS, Exchange, Turn, pair_turns
from contract.jobs import Job, ReplyEvent
from contract.replies import TRIM_REPLIES, reply_stream
from contract.usage import COUNT_USAGE, Usage, usage_args

DONE_TTL_S = 7 * 24 * 3600
AFFINITY_TTL_S = 3600  # a worker's prefix cache rarely keeps a conversation's context longer on a busy service
MAX_PASSED = 16  # conversations one claim may leave to the workers that hold their context


# Lua, in the claim and in the no-worker sweep: put the jobs whose lease is due back at the front of `ready`.
# Due: the deadline passed, or the holder is gone (stopped, or silent past its liveness). With `suspects`,
# each is marked a suspect (its worker may have died of it).
RETURN_DUE_LEASES = """
local function return_due_leases(leases, ready, prefix, now, suspects)
  local held = redis.call('ZRANGE', leases, 0, -1, 'WITHSCORES')
  for i = 1, #held, 2 do
    local job_id, deadline = held[i], tonumber(held[i + 1])
    local job = redis.call('HMGET', prefix .. 'job:' .. job_id, 'conversation', 'owner')
    local conversation, job_owner = job[1], job[2]
    if deadline <= now or redis.call('EXISTS', prefix .. 'worker:' .. (job_owner or '')) == 0 then
      redis.call('ZREM', leases, job_id)
      if suspects then redis.call('SADD', suspects, job_id) end
      if conversation and not redis.call('LPOS', ready, conversation) then redis.call('LPUSH', ready, conversation) end
    end
  end
end
"""


@dataclass(frozen=True)
class Claim:
    job: Job
    history: list[Exchange]  # the conversation's stored exchanges, read in the same step as the lease
    suspect: bool  # delivered again after its worker died: to be served alone


_CLAIM = RETURN_DUE_LEASES + f"local MAX_PASSED = {MAX_PASSED}" + """
local ready, leases, active, suspects = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, max_jobs, visibility, owner, busy = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5] == '1'
local keeps_context, affinity_wait, affinity_ttl = ARGV[6] == '1', tonumber(ARGV[7]), tonumber(ARGV[8])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- the conversation's context is held by another live worker, and its job has not waited for it long yet
local free_in = -1  -- ms until the first job passed over may be taken by anyone: the caller waits no longer
local function left_to_its_worker(affinity_key, job_key)
  if affinity_wait <= 0 then return false end
  local preferred = redis.call('GET', affinity_key)
  if not preferred or preferred == owner or redis.call('EXISTS', prefix .. 'worker:' .. preferred) == 0 then
    return false
  end
  redis.call('HSETNX', job_key, 'passed_at', now)
  local left = affinity_wait - (now - tonumber(redis.call('HGET', job_key, 'passed_at')))
  if left <= 0 then return false end
  if free_in < 0 or left < free_in then free_in = left end
  return true
end

return_due_leases(leases, ready, prefix, now, suspects)

local claimed, passed = {}, {}
if redis.call('EXISTS', prefix .. 'paused') == 1 then return {claimed, -1} end  -- paused: running answers finish, nothing starts
while #claimed < max_jobs and #passed < MAX_PASSED do
  local conversation = redis.call('LPOP', ready)
  if not conversation then break end
  local conv_prefix = prefix .. 'conv:' .. conversation
  local job_id = redis.call('LINDEX', conv_prefix .. ':jobs', 0)
  if not job_id then
    redis.call('SREM', active, conversation)
  elseif not redis.call('ZSCORE', leases, job_id) then
    local suspect = redis.call('SISMEMBER', suspects, job_id) == 1
    if suspect and (busy or #claimed > 0) then
      -- first in line, and nothing behind it is taken: this worker drains, then a worker takes it alone
      redis.call('LPUSH', ready, conversation)
      break
    end
    local job_key = prefix .. 'job:' .. job_id
    if not suspect and left_to_its_worker(conv_prefix .. ':affinity', job_key) then
      table.insert(passed, conversation)
    else
      redis.call('ZADD', leases, now + visibility, job_id)
      redis.call('HSET', job_key, 'owner', owner)
      if keeps_context then redis.call('SET', conv_prefix .. ':affinity', owner, 'EX', affinity_ttl) end
      if suspect then redis.call('HINCRBY', job_key, 'attempts', 1) end
      local fields = redis.call('HMGET', job_key, 'data', 'epoch', 'attempts', 'server_faults')
      local turns = redis.call('LRANGE', conv_prefix .. ':turns', 0, -1)
      table.insert(claimed, {fields[1], fields[2], fields[3], suspect and 1 or 0, turns, fields[4] or '0'})
      if suspect then break end
    end
  end
end
-- passed over, not moved: they keep their places at the front, in order
for i = #passed, 1, -1 do redis.call('LPUSH', ready, passed[i]) end
return {claimed, free_in}
"""

_COMPLETE = TRIM_REPLIES + APPEND_TURNS + COUNT_USAGE + """
local done_key, job_key, conv_jobs, active, leases, turns_key, epoch_key, replies, queued, suspects =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local job_id, conversation, epoch, event = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max_turns, history_ttl_s, done_ttl_s, replies_maxlen = tonumber(ARGV[5]), ARGV[6], ARGV[7], ARGV[8]
local prefix, default_pool, replaces = ARGV[10], ARGV[11], ARGV[12]
local usage_day, usage_keep_s, tokens_in, tokens_out = ARGV[13], ARGV[14], tonumber(ARGV[15]), tonumber(ARGV[16])
local usage_names = {ARGV[17], ARGV[18], ARGV[19]}
local new_turns = {unpack(ARGV, 20, 19 + tonumber(ARGV[9]))}

local answered = 0
local author_queued = redis.call('HGET', job_key, 'author_queued')
-- a counter gone (expired, or erased with its person by forget-user) stays gone: recreated, it would never expire
if author_queued and redis.call('EXISTS', author_queued) == 1 and redis.call('DECR', author_queued) <= 0 then
  redis.call('DEL', author_queued)
end
if redis.call('EXISTS', done_key) == 0 then
  append_turns(turns_key, epoch_key, epoch, max_turns, history_ttl_s, new_turns, replaces)
  redis.call('XADD', replies, '*', 'event', event)
  trim_replies(replies, replies_maxlen)
  redis.call('SET', done_key, 1, 'EX', done_ttl_s)
  redis.call('DECR', queued)
  if usage_day ~= '' then count_usage(usage_day, usage_keep_s, tokens_in, tokens_out, usage_names) end
  answered = 1
end
redis.call('LREM', conv_jobs, 1, job_id)
redis.call('DEL', job_key)
redis.call('ZREM', leases, job_id)
redis.call('SREM', suspects, job_id)
local next_job = redis.call('LINDEX', conv_jobs, 0)
if next_job then
  -- the conversation waits in the line of its next job's pool (the same one, unless config.yaml moved its channel)
  local pool = redis.call('HGET', prefix .. 'job:' .. next_job, 'pool') or default_pool
  local ready = prefix .. 'pool:' .. pool .. ':ready'
  if not redis.call('LPOS', ready, conversation) then redis.call('RPUSH', ready, conversation) end
else
  redis.call('SREM', active, conversation)
end
return answered
"""

_RELEASE = """
local ready, leases, suspects = KEYS[1], KEYS[2], KEYS[3]
local prefix, owner, server_fault = ARGV[1], ARGV[2], ARGV[3] == '1'
for i = 4, #ARGV do
  local job_id = ARGV[i]
  local job_key = prefix .. 'job:' .. job_id
  -- only a lease still this worker's: a job taken over since is the new owner's, charge included
  if redis.call('HGET', job_key, 'owner') == owner and redis.call('ZREM', leases, job_id) == 1 then
    -- handed back, not failed: a suspect's claim charged this delivery (no other claim charges)
    if redis.call('SISMEMBER', suspects, job_id) == 1 then redis.call('HINCRBY', job_key, 'attempts', -1) end
    if server_fault then redis.call('HINCRBY', job_key, 'server_faults', 1) end
    local conversation = redis.call('HGET', job_key, 'conversation')
    if conversation and not redis.call('LPOS', ready, conversation) then redis.call('LPUSH', ready, conversation) end
  end
end
return 1
"""

_PARTIAL = TRIM_REPLIES + """
local done_key, job_key, leases, replies = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, owner, event, replies_maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', done_key) == 1 or not redis.call('ZSCORE', leases, job_id)
   or redis.call('HGET', job_key, 'owner') ~= owner then
  return 0
end
redis.call('XADD', replies, '*', 'event', event)
trim_replies(replies, replies_maxlen)
return 1
"""


_UNSERVED = RETURN_DUE_LEASES + """
local prefix, owner, visibility, absent_after, max_jobs = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local claimed = {}
-- paused: the workers are away on purpose, and the messages wait for the resume
if redis.call('EXISTS', prefix .. 'paused') == 1 then return claimed end
for i = 6, #ARGV do
  local pool = prefix .. 'pool:' .. ARGV[i]
  if redis.call('EXISTS', pool .. ':alive') == 0 then
    -- a sweeper that died between taking a job and telling its person: no worker of this pool returns it
    return_due_leases(pool .. ':leases', pool .. ':ready', prefix, now, nil)
    for _, conversation in ipairs(redis.call('LRANGE', pool .. ':ready', 0, max_jobs - 1)) do
      local job_id = redis.call('LINDEX', prefix .. 'conv:' .. conversation .. ':jobs', 0)
      local job_key = prefix .. 'job:' .. (job_id or '')
      if job_id and #claimed < max_jobs and now - tonumber(redis.call('HGET', job_key, 'queued_at') or '0') >= absent_after then
        -- leased like a claim, so that a worker arriving meanwhile does not answer it as well
        redis.call('LREM', pool .. ':ready', 1, conversation)
        redis.call('ZADD', pool .. ':leases', now + visibility, job_id)
        redis.call('HSET', job_key, 'owner', owner)
        redis.call('SET', prefix .. 'worker:' .. owner, now + visibility, 'PX', visibility)
        local fields = redis.call('HMGET', job_key, 'data', 'epoch')
        table.insert(claimed, {fields[1], fields[2]})
      end
    end
  end
end
return claimed
"""


class WorkQueue:
    def __init__(
        self,
        redis: Redis,
        visibility_timeout_s: float = 60.0,
        reply_stream_maxlen: int = 10_000,
        affinity_wait_s: float = 0.0,
        pool: str = "default",
    ):
        """A queue as one pool's workers see it: they claim, hold and hand back that pool's jobs."""
        self.redis = redis
        self.pool = pool
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.affinity_wait_ms = int(affinity_wait_s * 1000)
        self.reply_stream_maxlen = reply_stream_maxlen
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)
        self._release = redis.register_script(_RELEASE)
        self._partial = redis.register_script(_PARTIAL)
        self._unserved = redis.register_script(_UNSERVED)
        # After a claim: how long until a job it passed over (left to the worker holding its context) is anyone's.
        self.passed_free_in_s: float | None = None

    async def claim(self, owner: str, max_jobs: int = 1, busy: bool = False, keeps_context: bool = False) -> list[Claim]:
        """Lease up to max_jobs head jobs, each from a different conversation, with their histories.

        A suspect comes alone, and only to a worker that is not `busy` (serving nothing); a busy
        worker gets no job from the suspect on, so it drains its batch first.

        A worker that `keeps_context` (a prefix cache) becomes its conversations' preferred worker:
        their next jobs are left to it for up to `affinity_wait_s` while it is alive, keeping their
        places in line, so order and turns are as without a preference; after that any worker takes them
        (`passed_free_in_s` says when).
        """
        rows, free_in_ms = await self._claim(
            keys=[keys.ready(self.pool), keys.leases(self.pool), keys.ACTIVE, keys.SUSPECTS],
            args=[
                keys.PREFIX, max_jobs, self.visibility_ms, owner, int(busy), int(keeps_context), self.affinity_wait_ms,
                AFFINITY_TTL_S,
            ],
        )
        self.passed_free_in_s = free_in_ms / 1000 if free_in_ms >= 0 else None
        claims = []
        for data, epoch, attempts, suspect, turns, server_faults in rows:
            job = Job.model_validate_json(data).model_copy(
                update={"epoch": int(epoch), "attempts": int(attempts), "server_faults": int(server_faults)}
            )
            claims.append(Claim(job, pair_turns([Turn.model_validate_json(turn) for turn in turns]), bool(suspect)))
        return claims

    async def claim_unserved(self, owner: str, pools: list[str], absent_after_s: float, max_jobs: int = 100) -> list[Job]:
        """Lease the head jobs that waited `absent_after_s` in pools no live worker serves, to be told so."""
        rows = await self._unserved(
            keys=[], args=[keys.PREFIX, owner, self.visibility_ms, int(absent_after_s * 1000), max_jobs, *pools]
        )
        return [Job.model_validate_json(data).model_copy(update={"epoch": int(epoch)}) for data, epoch in rows]

    async def depth(self) -> tuple[int, int]:
        """The pool's jobs waiting or being answered, and its conversations waiting for a worker."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.queued(self.pool))
            pipe.llen(keys.ready(self.pool))
            queued, waiting = await pipe.execute()
        return int(queued or 0), waiting

    async def wait_for_work(self, owner: str, timeout_s: float) -> None:
        """Block until a message arrives (one for a conversation whose context `owner` holds, or any of the pool's),
        or a job the last claim passed over is anyone's, or `timeout_s` has passed."""
        if self.passed_free_in_s is not None:
            timeout_s = max(0.01, min(timeout_s, self.passed_free_in_s))  # BLPOP's 0 would block for ever
        await self.redis.blpop([keys.wake_worker(owner), keys.wake(self.pool)], timeout=timeout_s)

    async def heartbeat(self, owner: str, jobs: list[Job], serving_for_s: float | None = None) -> None:
        """Say that worker `owner` is alive, and push the lease deadline of the jobs it is working on.

        With `serving_for_s`, the pool counts as served for that long: its messages wait for a worker
        rather than being told that none is serving (claim_unserved). A worker that cannot serve
        (its model server is down) leaves it out.
        """
        seconds, micros = await self.redis.time()
        deadline = seconds * 1000 + micros // 1000 + self.visibility_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.worker(owner), deadline, px=self.visibility_ms)
            if serving_for_s is not None:
                pipe.set(keys.pool_alive(self.pool), owner, px=int(serving_for_s * 1000))
            if jobs:
                pipe.zadd(keys.leases(self.pool), {job.id: deadline for job in jobs}, xx=True)
            await pipe.execute()

    async def gone(self, owner: str) -> None:
        """Worker `owner` has stopped: the leases it still holds are due at once."""
        await self.redis.delete(keys.worker(owner))

    async def release(self, owner: str, jobs: list[Job], server_fault: bool = False) -> None:
        """Hand back the jobs worker `owner` still holds, unanswered and first in line (the worker is stopping, or
        its model server failed them: `server_fault` counts that against each, so it cannot go on for ever)."""
        if jobs:
            await self._release(
                keys=[keys.ready(self.pool), keys.leases(self.pool), keys.SUSPECTS],
                args=[keys.PREFIX, owner, int(server_fault), *(job.id for job in jobs)],
            )

    async def complete(
        self,
        job: Job,
        event: ReplyEvent,
        turns: list[Turn] = (),
        max_turns: int = 0,
        ttl_s: int = 0,
        usage: Usage | None = None,
    ) -> bool:
        """Post the reply, append the turns (up to the conversation's newest `max_turns`, kept `ttl_s`),
        count the answer's `usage` and mark the job done in one atomic step.

        Returns False if the job had been answered already (a redelivery): nothing is written.
        """
        script_keys = [
            keys.done(job.id), keys.job(job.id), keys.conv_jobs(job.conversation), keys.ACTIVE, keys.leases(job.pool),
            keys.turns(job.conversation), keys.epoch(job.conversation), reply_stream(job.platform, job.conversation),
            keys.queued(job.pool), keys.SUSPECTS,
        ]
        args = [
            job.id, job.conversation, str(job.epoch), event.model_dump_json(), max_turns, ttl_s, DONE_TTL_S,
            self.reply_stream_maxlen, len(turns), keys.PREFIX, self.pool, job.replaces or "", *usage_args(job, usage),
            *(turn.model_copy(update={"job": job.id, "author_id": job.author_id}).model_dump_json() for turn in turns),
        ]
        return bool(await self._complete(keys=script_keys, args=args))

    async def publish_partial(self, job: Job, text: str, owner: str) -> bool:
        """Stream a partial answer, only while `owner` holds the job's lease and it is not answered yet.

        Returns False when it is not (so a late partial never follows the final reply); the caller
        then stops generating for the job.
        """
        event = ReplyEvent.of(job, "partial", text)
        script_keys = [keys.done(job.id), keys.job(job.id), keys.leases(job.pool), reply_stream(job.platform, job.conversation)]
        args = [job.id, owner, event.model_dump_json(), self.reply_stream_maxlen]
        return bool(await self._partial(keys=script_keys, args=args))
