"""Every Redis key the service uses, in one place: what it holds, who writes it, how long it lives.

All keys start with `chatbot:`. "Bounded" means the key expires, or is a shared structure
whose size is capped (a stream trimmed, a set or hash pruned), so nothing grows forever.

  schema                   the version of the data below (contract/schema.py)

Queue (contract/intake.py writes, contract/work.py serves). Each pool of workers (contract/pools.py) has
its own line; a conversation's jobs are in one list, and it waits in the line of its head job's pool:
  job:<id>                 hash: data (Job JSON), conversation, pool, epoch, attempts, server_faults, owner,
                           queued_at, author_queued, passed_at; deleted when the job is answered
  done:<id>                set once a job is answered: a redelivered job never answers twice (DONE_TTL_S)
  conv:<c>:jobs            list of a conversation's job ids, oldest first; only the head is worked on;
                           empty (gone) once its jobs are answered
  pool:<p>:ready           list of conversations whose head job waits for one of the pool's workers (round robin)
  pool:<p>:leases          zset of the pool's jobs being answered: job id -> lease deadline (ms)
  pool:<p>:queued          counter of the pool's jobs waiting or being answered
  pool:<p>:wake            one-element list the pool's idle workers block on
  pool:<p>:alive           set while a worker of the pool serves (pools.absent_after_s after its last heartbeat)
  pools                    set of the pools jobs were ever queued for: swept for messages no worker serves even
                           after config.yaml stops naming a pool (bounded: one member per pool name)
  active                   set of conversations with queued jobs (in a pool's ready line, or leased)
  suspects                 set of job ids whose lease fell due (their worker died): served alone, each such
                           delivery charged an attempt (work.py); an id leaves when its job is answered
  paused                   set while an operator has paused the service: its reason (contract/pause.py)
  wake:<owner>             the pool's wake, for one worker: a message for a conversation whose context it
                           holds (AFFINITY_TTL_S)
  conv:<c>:affinity        the worker that served the conversation last and keeps its context (an engine
                           with a prefix cache): its next message waits a moment for that worker (AFFINITY_TTL_S)
  worker:<owner>           a live worker's key (expires after the visibility timeout)
  stop:<id>                set when someone asked to stop the job's answer (contract/controls.py; STOP_TTL_S)
  author:<platform>:<user>:queued   that person's waiting jobs (1 day)
  author:<platform>:<user>:minute   that person's messages this minute (60 s)

History (contract/history.py):
  conv:<c>:turns           list of turns (history.ttl_seconds after the last answer)
  conv:<c>:epoch           reset count (EPOCH_TTL_S after the last reset or message)

Replies (contract/replies.py reads; the worker writes):
  replies:<platform>:<shard>          stream of ReplyEvents of the conversations in that shard; trimmed
                                      below what its adapter acknowledged
  replies:<platform>:<shard>:holder   the adapter process delivering that shard (a lease: adapter_lease_s)
  replies:<platform>:holders          zset of the platform's live adapter processes (expiry as score)
  posted:<job>             platform message ids of a job's reply, for an adapter restarted mid-reply (1 day)

Usage (contract/usage.py):
  usage:<day>:<dimension>:<measure>   hash author|conversation|workspace -> tokens in, tokens out, or answers
                           that day (UTC), written with each answer (USAGE_KEEP_DAYS)

Personas (contract/personas.py):
  personas                 hash "<platform>:<channel>" -> the system prompt an admin set for that channel at run
                           time (bounded: one field per channel, removed by clearing it)

Feedback (contract/feedback.py):
  feedback                 stream of votes (newest KEPT_VOTES)
  feedback:counts          hash rating -> votes
  feedback:exchange:<job>  question and answer of a rated answer, copied from the history when first
                           rated (EXCHANGE_TTL_S; deleted when the conversation is reset)
  feedback:vote:<job>:<user>  that user's current rating of that answer (EXCHANGE_TTL_S)
  conv:<c>:rated           set of job ids rated in the conversation, for reset (EXCHANGE_TTL_S)

Slack (bot/slack/):
  slack:dm-threads:<channel>   zset of a DM's conversations (threads) by last message, for /reset; threads
                           quiet longer than what they leave lasts (history, rated copies) are dropped,
                           and the key expires then
  slack:prompts:<team>:<user>  set while that person's suggested prompts need not be set again
                           (slack.prompts_interval_s)
  slack:waiting            hash job id -> thread waiting for its answer (entries pruned after GIVE_UP_S)
  slack:waiting:round      lock of one status refresh round (lapses within the round)
  slack:begun:<job>        the answer's first text is shown (GIVE_UP_S)
  slack:budget:<scope>:<method>  a rate-limit bucket (its refill time + 60 s)
  slack:installation:<enterprise or ->:<team or ->  a workspace's installation of the app (many-workspace mode),
                           Fernet-encrypted JSON; deleted on uninstall or when its bot token is revoked
  slack:oauth-state:<state>  an install in progress, used once by Slack's redirect (600 s)

Discord (bot/discord/sharding.py):
  discord:identify:<bucket>  set while that gateway rate-limit bucket's last IDENTIFY is too recent for another
                           (discord.identify_spacing_s, Discord's 5 s); holds the shard that took it

The scripts address keys they compute from job data, so this needs a single Redis server,
not Redis Cluster.
"""

from __future__ import annotations

PREFIX = "chatbot:"

SCHEMA = PREFIX + "schema"
ACTIVE = PREFIX + "active"
SUSPECTS = PREFIX + "suspects"
PAUSED = PREFIX + "paused"
POOLS = PREFIX + "pools"
PERSONAS = PREFIX + "personas"
FEEDBACK = PREFIX + "feedback"
FEEDBACK_COUNTS = PREFIX + "feedback:counts"
SLACK_WAITING = PREFIX + "slack:waiting"
SLACK_STATUS_ROUND = PREFIX + "slack:waiting:round"


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def stop(job_id: str) -> str:
    return f"{PREFIX}stop:{job_id}"


def usage_day(day: str) -> str:
    """The prefix of a day's usage hashes; `<dimension>:<measure>` completes it."""
    return f"{PREFIX}usage:{day}:"


def done(job_id: str) -> str:
    return f"{PREFIX}done:{job_id}"


def conv_jobs(conversation: str) -> str:
    return f"{PREFIX}conv:{conversation}:jobs"


def turns(conversation: str) -> str:
    return f"{PREFIX}conv:{conversation}:turns"


def epoch(conversation: str) -> str:
    return f"{PREFIX}conv:{conversation}:epoch"


def rated(conversation: str) -> str:
    return f"{PREFIX}conv:{conversation}:rated"


def affinity(conversation: str) -> str:
    return f"{PREFIX}conv:{conversation}:affinity"


def wake_worker(owner: str) -> str:
    return f"{PREFIX}wake:{owner}"


def ready(pool: str) -> str:
    return f"{PREFIX}pool:{pool}:ready"


def leases(pool: str) -> str:
    return f"{PREFIX}pool:{pool}:leases"


def queued(pool: str) -> str:
    return f"{PREFIX}pool:{pool}:queued"


def wake(pool: str) -> str:
    return f"{PREFIX}pool:{pool}:wake"


def pool_alive(pool: str) -> str:
    return f"{PREFIX}pool:{pool}:alive"


def worker(owner: str) -> str:
    return f"{PREFIX}worker:{owner}"


def author(platform: str, user: str | None) -> str:
    return f"{PREFIX}author:{platform}:{user or '-'}"


def replies(platform: str, shard: int) -> str:
    return f"{PREFIX}replies:{platform}:{shard}"


def reply_shard(platform: str, shard: int) -> str:
    return f"{PREFIX}replies:{platform}:{shard}:holder"


def reply_holders(platform: str) -> str:
    return f"{PREFIX}replies:{platform}:holders"


def posted(job_id: str) -> str:
    return f"{PREFIX}posted:{job_id}"


def feedback_exchange(job_id: str) -> str:
    return f"{PREFIX}feedback:exchange:{job_id}"


def feedback_vote(job_id: str, user: str) -> str:
    return f"{PREFIX}feedback:vote:{job_id}:{user}"


def slack_dm_threads(channel: str) -> str:
    return f"{PREFIX}slack:dm-threads:{channel}"


def slack_prompts_set(team: str | None, user: str) -> str:
    return f"{PREFIX}slack:prompts:{team or '-'}:{user}"


def slack_begun(job_id: str) -> str:
    return f"{PREFIX}slack:begun:{job_id}"


def slack_budget(scope: str, method: str) -> str:
    return f"{PREFIX}slack:budget:{scope}:{method}"
