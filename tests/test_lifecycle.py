"""The conversation lifecycle as a state machine (Hypothesis): random interleavings of what people, operators,
processes and platforms do, with the invariants checked after every settle.

Real Redis, the real Worker (the tiny Llama, 10 ms a step so that a stop can land mid-answer), the real Intake,
controls, erasure and pause, and the real Delivery of an adapter process into a recording platform that can
fail a call once. Rules: submit, stop, regenerate, reset, pause/resume, forget-user, a worker killed and
restarted, an adapter killed (its leases lapse) or stopped (SIGTERM: a post on its way is finished, its shards
handed over) and restarted, a platform call failing once, and settle; the platform answers a post a moment
after the message exists. A settle resumes the service, makes sure a worker and an adapter run, and waits
until nothing is queued, leased or undelivered.

Invariants after each settle (each message carries a marker word unique to it, so erasure is checkable):
1. every accepted message of a person not erased since gets exactly one final reply shown (posted once);
2. no reply is posted twice, and no message that showed an answer shows an error sentence afterwards;
3. what a conversation shows as its latest answer is what its history holds (less the stopped note), unless
   it was reset or erased since;
4. a message stopped while it still waited in the queue is never run: nothing of it shown or stored;
5. after forget-user (at a settled moment) no value in Redis holds any marker of that person;
6. no key lives for ever but the documented shared ones.

`make test` runs a bounded, derandomized run and reports the steps per rule; `make soak` runs it for as long as
asked (LIFECYCLE_SOAK_S), with a new seed per round, and prints the steps run and the violations.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
import time
from concurrent.futures import Future

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bot.delivery import FAILED, Delivery, request_sent
from contract import history, keys
from contract.controls import ONLY_THE_LATEST, REGENERATION_STOPPED, request_stop
from contract.erasure import forget_user
from contract.intake import Intake
from contract.jobs import Conversation, RejectedMessage
from contract.pause import pause, resume
from contract.pools import NO_WORKER
from contract.replies import GROUP, REPLY_SHARDS
from engine.worker import (
    EMPTY_ANSWER,
    GAVE_UP,
    MODEL_FAILED,
    SERVER_KEPT_FAILING,
    STOPPED_BEFORE_ANSWER,
    STOPPED_NOTE,
    THOUGHT_TOO_LONG,
    Worker,
)
from service.redis_client import connect
from service.redis_server import RedisServer
from service.tasks import cancel_until_done
from tests.conftest import tiny_settings
from tests.test_controls import Recording, slow_engine
from tests.test_key_lifetimes import unbounded_keys

PEOPLE = ["ann", "bob", "cy"]
CONVERSATIONS = [Conversation(platform="local", channel=name) for name in ("lobby", "desk")]
# What a reply says when it is not an answer: errors, and the notes of a stop or a regeneration that brought none.
NOTES = {MODEL_FAILED, GAVE_UP, EMPTY_ANSWER, THOUGHT_TOO_LONG, SERVER_KEPT_FAILING, FAILED, ONLY_THE_LATEST, NO_WORKER,
         STOPPED_BEFORE_ANSWER, REGENERATION_STOPPED}
SETTLE_S = 30.0
LEASE_S = 0.6
SETTINGS = tiny_settings(
    model={"batch_size": 1, "max_prompt_tokens": 200},  # one slot: messages wait, and more lands while they do
    generation={"max_new_tokens": 10},
    queue={"visibility_timeout_s": 2, "step_timeout_s": 1, "partial_interval_s": 0.0, "adapter_lease_s": LEASE_S},
    limits={"messages_per_minute_per_author": 1000, "max_queued_per_author": 50, "max_queued_per_conversation": 50},
    pools={"absent_after_s": 2},
)


class Platform(Recording):
    """The platform as people see it (test_controls.Recording), counting posts per reply part, and failing its
    next calls when told, as a 5xx or Slack's internal_error reaches the outbox."""

    def __init__(self):
        super().__init__()
        self.posts: collections.Counter[tuple[str, int]] = collections.Counter()  # (job, part index) -> posts
        self.showed_answer: set[str] = set()  # messages that have shown a finished answer
        self.failing = 0

    def _maybe_fail(self) -> None:
        if self.failing:
            self.failing -= 1
            raise RuntimeError("internal_error")

    async def post(self, part) -> str:
        self._maybe_fail()
        request_sent()
        self.posts[part.job_id, part.index] += 1
        message_id = await super().post(part)  # the message exists from here; its id comes back a moment later
        await asyncio.sleep(0.005)
        return message_id

    async def edit(self, message_id, part) -> None:
        self._maybe_fail()
        await super().edit(message_id, part)

    def show(self, message_id, part) -> None:
        super().show(message_id, part)
        if part.feedback and part.text not in NOTES:  # the last message of a final answer
            self.showed_answer.add(message_id)

    async def remove(self, message_id, reply_to) -> None:
        self._maybe_fail()
        await super().remove(message_id, reply_to)


class Loop:
    """An event loop on a thread of its own, for the service's tasks; rules run coroutines on it and wait."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 60):
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Lifecycle(RuleBasedStateMachine):
    """One run: a fresh Redis database, a worker and an adapter; the class attributes are set by the test."""

    redis_url: str = ""
    tiny_model = None
    steps: collections.Counter[str] = collections.Counter()

    def __init__(self):
        super().__init__()
        self.loop = Loop()
        self.redis = connect(self.redis_url)
        self.loop.run(self.redis.flushall())
        self.platform = Platform()
        self.intake = Intake(self.redis, SETTINGS.limits, SETTINGS.pools)
        self.worker: tuple[Worker, asyncio.Task] | None = None
        self.adapter: tuple[Delivery, asyncio.Task] | None = None
        self.processes = 0  # names each worker and adapter process apart
        self.messages = 0
        self.accepted: dict[str, str] = {}  # job id -> its person
        self.markers: dict[str, list[str]] = {person: [] for person in PEOPLE}
        self.erased_jobs: set[str] = set()  # jobs of people erased after submitting: their replies may never show
        self.reset_since_answer: set[str] = set()  # conversations reset or erased since their last settled check
        self.stopped: set[str] = set()
        self.stopped_queued: set[str] = set()  # stopped while still waiting in the queue: never to be run
        self.violations: list[str] = []
        self.settles = 0

    # --- processes ----------------------------------------------------------------------------

    def _start_worker(self) -> None:
        self.processes += 1
        engine = slow_engine(self.tiny_model, SETTINGS)
        worker = Worker(self.redis, engine, SETTINGS, owner=f"worker-{self.processes}")
        self.worker = (worker, self.loop.loop.create_task(worker.run()))

    def _start_adapter(self) -> None:
        self.processes += 1
        delivery = Delivery(self.redis, "local", self.platform, 0.0, LEASE_S, holder=f"adapter-{self.processes}")
        self.adapter = (delivery, self.loop.loop.create_task(delivery.run()))

    async def _kill(self, task: asyncio.Task) -> None:
        await cancel_until_done([task])

    @initialize()
    def start(self) -> None:
        self.loop.run(self._started())

    async def _started(self) -> None:
        self._start_worker()
        self._start_adapter()

    def teardown(self) -> None:
        async def stop() -> None:
            for process in (self.worker, self.adapter):
                if process:
                    await self._kill(process[1])
            await self.redis.aclose()

        try:
            self.loop.run(stop())
        finally:
            self.loop.close()
        assert not self.violations, self.violations

    # --- what people do ---------------------------------------------------------------------------

    @rule(messages=st.lists(st.tuples(st.sampled_from(PEOPLE), st.sampled_from(CONVERSATIONS)), min_size=1, max_size=3))
    def submit(self, messages: list[tuple[str, Conversation]]) -> None:
        for person, conversation in messages:
            self._submit(person, conversation)

    def _submit(self, person: str, conversation: Conversation) -> None:
        self.steps["submit"] += 1
        self.messages += 1
        marker = f"zq{person}{self.messages}x"
        try:
            submitted = self.loop.run(self.intake.submit(
                conversation, f"m{self.messages}", f"Tell me about {marker}.", author=person.title(), author_id=person
            ))
        except RejectedMessage:
            self.steps["submit refused"] += 1
            return  # paused: nothing was queued, and the person was told
        self.accepted[submitted.job_id] = person
        self.markers[person].append(marker)

    # Preconditions and draws depend only on earlier draws, never on timing: Hypothesis replays them.
    @precondition(lambda self: self.accepted)
    @rule(newest=st.integers(0, 3))
    def stop(self, newest: int) -> None:
        """The asker stops one of their recent messages: queued, streaming, or already answered."""
        self.steps["stop"] += 1
        recent = list(self.accepted)[-4:]
        job = recent[-1 - newest % len(recent)]
        self.loop.run(request_stop(self.redis, job, self.accepted[job]))
        self.stopped.add(job)
        if self.loop.run(self._still_queued(job)):  # the flag is set: a worker claiming it from now on sees it
            self.stopped_queued.add(job)

    async def _still_queued(self, job: str) -> bool:
        pool = SETTINGS.pools.default
        return bool(await self.redis.exists(keys.job(job))) and await self.redis.zscore(keys.leases(pool), job) is None

    @precondition(lambda self: self.accepted)
    @rule(conversation=st.sampled_from(CONVERSATIONS))
    def regenerate(self, conversation: Conversation) -> None:
        self.steps["regenerate"] += 1
        deadline = time.monotonic() + 1  # a moment for an answer to regenerate, if one is on its way
        while not (exchanges := self.loop.run(history.load_exchanges(self.redis, conversation.key))):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        latest = exchanges[-1].assistant
        try:
            submitted = self.loop.run(self.intake.regenerate(conversation, latest.job, f"click-{self.messages}", by=latest.author_id))
        except RejectedMessage:
            self.steps["regenerate refused"] += 1
            return  # waiting messages, paused, or no longer the latest: the clicker is told, nothing is queued
        self.steps["regenerate queued"] += 1
        self.messages += 1
        self.accepted[submitted.job_id] = latest.author_id

    # The rules that wipe out what the others build run less often, so that histories grow to regenerate.
    @precondition(lambda self: self.messages % 3 == 0)
    @rule(conversation=st.sampled_from(CONVERSATIONS))
    def reset(self, conversation: Conversation) -> None:
        self.steps["reset"] += 1
        self.loop.run(history.reset(self.redis, conversation.key))
        self.reset_since_answer.add(conversation.key)

    # --- what operators do ------------------------------------------------------------------------

    @rule(paused=st.booleans())
    def pause_or_resume(self, paused: bool) -> None:
        self.steps["pause" if paused else "resume"] += 1
        self.loop.run(pause(self.redis, "maintenance") if paused else resume(self.redis))

    @precondition(lambda self: self.messages % 5 == 0)
    @rule(person=st.sampled_from(PEOPLE))
    def forget_midway(self, person: str) -> None:
        """forget-user while messages are queued or streaming: their replies may then never show (documented)."""
        self.steps["forget_midway"] += 1
        self.loop.run(forget_user(self.redis, "local", person))
        self.erased_jobs |= {job for job, who in self.accepted.items() if who == person}
        self.reset_since_answer |= {conversation.key for conversation in CONVERSATIONS}

    @precondition(lambda self: self.settles % 3 == 2)  # a settle and a scan of every key: now and then
    @rule(person=st.sampled_from(PEOPLE))
    def forget_settled(self, person: str) -> None:
        """forget-user with nothing queued: afterwards no value anywhere holds a marker of theirs."""
        self.steps["forget_settled"] += 1
        self.settle()
        self.loop.run(forget_user(self.redis, "local", person))
        self.erased_jobs |= {job for job, who in self.accepted.items() if who == person}
        self.reset_since_answer |= {conversation.key for conversation in CONVERSATIONS}
        stored = self.loop.run(everything_stored(self.redis))
        left = [marker for marker in self.markers[person] if marker in stored]
        if left:
            self.violations.append(f"after forget-user {person}, Redis still holds {left}")

    # --- processes and platforms failing ---------------------------------------------------------------

    @precondition(lambda self: self.worker is not None)
    @rule()
    def kill_worker(self) -> None:
        self.steps["kill_worker"] += 1
        self.loop.run(self._kill(self.worker[1]))
        self.worker = None

    @precondition(lambda self: self.adapter is not None)
    @rule(cleanly=st.booleans())
    def end_adapter(self, cleanly: bool) -> None:
        """The adapter is stopped (SIGTERM: a post on its way is finished and recorded, its shards handed over),
        or dies without a word (its shards lapse after their lease, and another process reads them)."""
        self.steps["stop_adapter" if cleanly else "kill_adapter"] += 1
        if not cleanly:
            async def die() -> None:
                pass

            self.adapter[0].shards.leave = die
        self.loop.run(self._kill(self.adapter[1]))
        self.adapter = None

    @rule(calls=st.integers(1, 2))
    def platform_fails(self, calls: int) -> None:
        self.steps["platform_fails"] += 1
        self.platform.failing = calls

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.3]))
    def wait(self, seconds: float) -> None:
        self.steps["wait"] += 1
        time.sleep(seconds)

    @rule()
    def settle(self) -> None:
        self.steps["settle"] += 1
        self.settles += 1
        self.loop.run(resume(self.redis))
        if self.worker is None:
            self.loop.loop.call_soon_threadsafe(self._start_worker)
        if self.adapter is None:
            self.loop.loop.call_soon_threadsafe(self._start_adapter)
        self.loop.run(self._quiet(), timeout=SETTLE_S + 5)
        self._check()

    async def _quiet(self) -> None:
        deadline = time.monotonic() + SETTLE_S
        while not await self._is_quiet():
            if time.monotonic() > deadline:
                self.violations.append("did not settle: " + await self._what_is_left())
                return
            await asyncio.sleep(0.05)

    async def _is_quiet(self) -> bool:
        unanswered = [job for job in self.accepted if not await self.redis.exists(keys.done(job))]
        if unanswered or await self.redis.scard(keys.ACTIVE):
            return False
        for shard in range(REPLY_SHARDS):
            stream = keys.replies("local", shard)
            if not await self.redis.exists(stream):
                continue
            groups = {group["name"]: group for group in await self.redis.xinfo_groups(stream)}
            group = groups.get(GROUP)
            last = (await self.redis.xinfo_stream(stream))["last-generated-id"]
            if group is None or group["pending"] or group["last-delivered-id"] != last:
                return False
        return True

    async def _what_is_left(self) -> str:
        unanswered = [job for job in self.accepted if not await self.redis.exists(keys.done(job))]
        return f"unanswered {unanswered}, active {await self.redis.smembers(keys.ACTIVE)}"

    # --- invariants --------------------------------------------------------------------------------

    def _check(self) -> None:
        platform = self.platform
        for (job, index), posts in platform.posts.items():
            if posts > 1:
                self.violations.append(f"{job} part {index} posted {posts} times")
        shown_jobs = set(platform.jobs.values())
        for job, person in self.accepted.items():
            if job in self.erased_jobs:
                continue
            regeneration = ":regenerate:" in job
            if not regeneration and platform.posts[job, 0] != 1 and job not in shown_jobs:
                self.violations.append(f"{job} of {person} accepted, never shown")
        for message_id in platform.showed_answer:
            if message_id in platform.messages and platform.messages[message_id] in NOTES:
                self.violations.append(f"{message_id} showed an answer, now a note: {platform.messages[message_id]!r}")
        for job in self.stopped_queued - self.erased_jobs:
            shown = [text for message_id, text in platform.messages.items() if platform.jobs[message_id] == job]
            if any(text not in (STOPPED_BEFORE_ANSWER, REGENERATION_STOPPED) for text in shown):
                self.violations.append(f"{job} stopped while queued, yet run: shown {shown!r}")
        for conversation in CONVERSATIONS:
            exchanges = self.loop.run(history.load_exchanges(self.redis, conversation.key))
            for exchange in exchanges:
                if exchange.assistant.job in self.stopped_queued:
                    self.violations.append(f"{exchange.assistant.job} stopped while queued, yet stored")
            if not exchanges or conversation.key in self.reset_since_answer:
                continue
            latest = exchanges[-1].assistant
            shown = [text for message_id, text in platform.messages.items() if platform.jobs[message_id] == latest.job]
            expected = latest.text
            if not any(text.removesuffix(STOPPED_NOTE).strip() == expected for text in shown):
                self.violations.append(f"{conversation.key}: history's latest {latest.job} {expected!r}, shown {shown!r}")
        self.reset_since_answer.clear()
        left = self.loop.run(unbounded_keys(self.redis))
        if left:
            self.violations.append(f"keys that never expire: {left}")
        assert not self.violations, self.violations

    @invariant()
    def nothing_doubled(self) -> None:
        doubled = [key for key, posts in self.platform.posts.items() if posts > 1]
        assert not doubled, f"posted twice: {doubled}"


async def everything_stored(redis) -> str:
    async def expired(key: str) -> None:  # gone between SCAN and TYPE
        return None

    read = {"none": expired, "string": redis.get, "list": lambda k: redis.lrange(k, 0, -1), "hash": redis.hgetall, "set": redis.smembers,
            "zset": lambda k: redis.zrange(k, 0, -1), "stream": redis.xrange}
    return json.dumps([await read[await redis.type(key)](key) async for key in redis.scan_iter(match="*")], default=str)


def run_lifecycle(redis_url: str, tiny_model, examples: int, steps: int, derandomize: bool = True) -> collections.Counter:
    Lifecycle.redis_url, Lifecycle.tiny_model = redis_url, tiny_model
    Lifecycle.steps = collections.Counter()
    run_state_machine_as_test(Lifecycle, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=derandomize, database=None,
        suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
        # Each step drives real processes: a failing run is reported as it ran (its steps are printed), unshrunk.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    ))
    return Lifecycle.steps


def steps_run(steps: collections.Counter[str]) -> int:
    """Rules run; the counts with a space in their name ("regenerate refused") say how some of them ended."""
    return sum(n for rule, n in steps.items() if " " not in rule)


@pytest.fixture(scope="module")
def lifecycle_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("lifecycle")).start()
    yield server
    server.stop()


@pytest.mark.timeout(300)
def test_the_conversation_lifecycle_keeps_its_invariants_under_random_interleavings(lifecycle_redis, tiny_model, capsys):
    steps = run_lifecycle(lifecycle_redis.url, tiny_model, examples=int(os.environ.get("LIFECYCLE_EXAMPLES", 60)), steps=30)
    with capsys.disabled():
        print(f"\nlifecycle: {steps_run(steps)} steps: " + ", ".join(f"{rule} {n}" for rule, n in sorted(steps.items())))
    for rule_name in ("submit", "stop", "regenerate", "reset", "pause", "resume", "forget_midway", "forget_settled",
                      "kill_worker", "kill_adapter", "stop_adapter", "platform_fails", "settle"):
        assert steps[rule_name] >= 5, (rule_name, steps)


@pytest.mark.soak
def test_soak(lifecycle_redis, tiny_model, capsys):
    """`make soak`: rounds of new seeds until LIFECYCLE_SOAK_S have passed."""
    until = time.monotonic() + float(os.environ.get("LIFECYCLE_SOAK_S", 600))
    total: collections.Counter[str] = collections.Counter()
    rounds = violations = 0
    while time.monotonic() < until:
        rounds += 1
        try:
            total += run_lifecycle(lifecycle_redis.url, tiny_model, examples=5, steps=40, derandomize=False)
        except Exception as violation:
            violations += 1
            # A violation that timing made unrepeatable comes wrapped (Hypothesis' FlakyFailure): show what failed.
            found = violation.exceptions if isinstance(violation, BaseExceptionGroup) else [violation]
            with capsys.disabled():
                print(f"\nround {rounds}: " + " | ".join(f"{type(error).__name__}: {error}"[:2000] for error in found))
    with capsys.disabled():
        print(f"\nsoak: {rounds} rounds, {steps_run(total)} steps, {violations} violation(s): {dict(sorted(total.items()))}")
    assert violations == 0
