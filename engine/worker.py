"""The model worker: the Redis side of serving (claims, leases, partial and final answers).

One process, one model, one loop. Each turn of the loop admits new jobs into free slots
(prefill), runs one decode step for every live slot, then answers the slots that ended and
streams the others. Model calls run on the model thread, one at a time, each bounded by
`queue.step_timeout_s`; everything that touches Redis runs in this loop, between steps, so
nothing runs in the background that could fail unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from contract.controls import ONLY_THE_LATEST, REGENERATION_STOPPED, stops_requested
from contract.jobs import EMPTY_MESSAGE, Job, ReplyEvent, is_blank
from contract.personas import Personas, configured
from contract.pools import answer_unserved
from contract.usage import Usage
from contract.work import Claim, WorkQueue
from engine.prompts import Prompt, PromptBuilder, PromptTooSmall
from engine.reasoning import CLOSE, OPEN, Reasoning, split_reasoning
from engine.serving.engine import Engine, EngineRequestFailed, on_model_thread
from engine.serving.scheduler import Scheduler, Slot
from service.config import HistorySettings, Settings
from service.observability import (
    ACTIVE_SLOTS,
    GENERATED_TOKENS,
    HEALTH,
    JOBS,
    PREFILLED_TOKENS,
    PREFIX_CACHE_LOOKUPS,
    QUEUED_JOBS,
    TIME_IN_QUEUE,
    TIME_TO_FINAL,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    WAITING_CONVERSATIONS,
)
from service.process import Stuck
from service.redis_client import REDIS_DOWN, REDIS_FAILED, after, with_backoff

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ATTEMPTS = 3  # a job whose worker died this often while serving it alone is answered with an error instead
MAX_SERVER_FAULTS = 3  # a job handed back this often because its model server failed its request is answered instead
IDLE_WAIT_S = 1.0  # how long an idle worker blocks for new work before looking for expired leases
RELEASE_PATIENCE_S = 5.0  # on shutdown, don't wait longer than this for Redis: the lease expires anyway
HEALTH_CHECK_TIMEOUT_S = 10.0  # a model server's health check that takes longer counts as failing
MODEL_FAILED = "Sorry, something went wrong while writing the answer. Please try again."
GAVE_UP = "Sorry, this message could not be answered: it failed several times."
SERVER_KEPT_FAILING = "Sorry, the model server kept failing on this message. Please try again later."
EMPTY_ANSWER = "The model returned an empty answer. Please rephrase your message."
PERSONA_TOO_LONG = "This channel's persona is too long for the model's context: an admin can shorten or clear it."
THOUGHT_TOO_LONG = (
    "The model spent its whole answer budget thinking and did not reach an answer. Please ask again, perhaps more simply."
)
STOPPED_NOTE = "_(stopped)_"
STOPPED_BEFORE_ANSWER = "_(stopped before the answer began)_"
MAX_PERSONA_BUILDERS = 256  # builders kept, one per distinct system prompt
THINKING_TAIL_TOKENS = 16  # while a think block is open, a look decodes the new tokens and this many before them


def readable_text(tokenizer, tokens: list[int]) -> str:
    """The answer so far as text, without the half character a step can end in (byte-fallback
    tokens of one emoji arrive over several steps and decode to U+FFFD until complete)."""
    return tokenizer.decode(tokens, skip_special_tokens=True).strip().rstrip("\ufffd").rstrip()


class StepTimedOut(Stuck):
    """A model call outlived queue.step_timeout_s: the model is stuck, and only a new process recovers it."""


@dataclass
class Answer:
    """What the worker keeps about a job while its answer is written in a slot (the slot keeps the tokens)."""

    job: Job
    prompt: Prompt
    suspect: bool  # its last worker died with it: served alone, nothing else is admitted until it ends
    claimed_at: float  # wall clock, comparable with job.submitted_at
    published_at: float | None = None  # monotonic: when the last partial went out; None: the first goes out at once
    first_token_at: float | None = None  # wall clock
    cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache
    partial_failed: bool = False  # a failed partial is logged once, not once per step
    thinks_first: bool = False  # the prompt ends with <think> (the template opens the block): output starts inside it
    thinking_open: bool = False  # a think block was open at the last look: only its end is looked for
    thinking_tokens: int = 0  # the think block's tokens, markers included (while open: as many as at the last look)
    replaced_text: str | None = None  # a regeneration: the answer it replaces, shown again if this one fails


def answer_so_far(tokenizer, slot: Slot[Answer], done: bool = False) -> Reasoning:
    """The slot's output split into thinking and answer (engine/reasoning.py). While a think block is
    open, a look decodes only the newest tokens, for its end: the slot is looked at every step until
    its answer starts, and thinking can take thousands of tokens."""
    answer = slot.payload
    if answer.thinking_open and not done:
        tail = slot.tokens[max(0, answer.thinking_tokens - THINKING_TAIL_TOKENS):]
        if CLOSE not in tokenizer.decode(tail, skip_special_tokens=True):
            answer.thinking_tokens = len(slot.tokens)
            return Reasoning("", "", "thinking")
    text = readable_text(tokenizer, slot.tokens)
    split = split_reasoning(OPEN + text if answer.thinks_first else text, done)
    if split.state == "thinking" or answer.thinking_open:  # still open, or closed since the last look
        answer.thinking_tokens = len(slot.tokens)
    answer.thinking_open = split.state == "thinking"
    return split


def shown_text(answer: Answer, text: str) -> str:
    """The reply as posted: the user is told when their message was cut to fit the context."""
    return f"{answer.prompt.cut.notice()}\n\n{text}" if answer.prompt.cut else text


def record_answered(slot: Slot[Answer], done: float, stopped: bool = False) -> None:
    """Metrics and the log line of an answered job, its times measured from submission."""
    answer, job = slot.payload, slot.payload.job
    first = answer.first_token_at or done
    GENERATED_TOKENS.inc(len(slot.tokens))
    TIME_TO_FIRST_TOKEN.observe(max(0.0, first - job.submitted_at))
    TIME_TO_FINAL.observe(max(0.0, done - job.submitted_at))
    log.info(
        "job answered",
        extra={
            "job": job.id,
            "conversation": job.conversation,
            "prompt_tokens": len(answer.prompt.ids),
            "cached_tokens": answer.cached_tokens,
            "dropped_turns": 2 * answer.prompt.dropped_exchanges,
            "cut": bool(answer.prompt.cut),
            "new_tokens": len(slot.tokens),
            "thinking_tokens": answer.thinking_tokens,
            "queue_s": round(answer.claimed_at - job.submitted_at, 3),
            "ttft_s": round(first - job.submitted_at, 3),
            "total_s": round(done - job.submitted_at, 3),
            "tokens_per_s": round(len(slot.tokens) / (done - first), 1) if done > first else None,
            "attempt": job.attempts,
            "stopped": stopped,
        },
    )


class Publisher:
    """A worker's writes to Redis: answers, partials while the lease is its own, jobs handed back."""

    def __init__(self, queue: WorkQueue, owner: str, history: HistorySettings, stopping: asyncio.Event):
        self.queue = queue
        self.owner = owner
        self.history = history
        self.stopping = stopping

    async def answer(
        self, job: Job, kind: str, text: str, turns=(), usage: Usage | None = None, restore: str | None = None
    ) -> None:
        event = ReplyEvent.of(job, kind, text, restore)
        try:
            # Keep trying while serving: the answer is worth the wait. Once stopping, the lease
            # runs out instead and the job is answered again by the next worker.
            answered = await with_backoff(
                lambda: self.queue.complete(job, event, list(turns), self.history.max_turns, self.history.ttl_seconds, usage),
                "complete",
                give_up=self.stopping.is_set,
            )
        except REDIS_DOWN:
            log.warning("answer not recorded before shutdown; the job will be delivered again", extra={"job": job.id})
            return
        except RedisError:
            # Only this job fails (Redis refused the write: OOM, READONLY, MISCONF, a damaged key); it stays
            # leased to this worker until the lease expires, then is delivered again.
            log.exception("redis refused the answer", extra={"job": job.id})
            return
        if not answered:
            log.info("job was answered before; reply not repeated", extra={"job": job.id})
        else:
            JOBS.labels(job.pool, "answered" if kind == "final" else "failed").inc()
            if usage:
                TOKENS.labels(job.platform, job.pool, "in").inc(usage.prompt_tokens)
                TOKENS.labels(job.platform, job.pool, "out").inc(usage.output_tokens)

    async def stopped_before_answer(self, job: Job, usage: Usage | None = None, restore: str | None = None) -> None:
        """Stopped before any answer text: said so, and a regeneration leaves the answer it was to replace."""
        if job.replaces:
            await self.answer(job, "error", REGENERATION_STOPPED, usage=usage, restore=restore)
        else:
            await self.answer(job, "final", STOPPED_BEFORE_ANSWER, usage=usage)

    async def partial(self, answer: Answer, text: str) -> bool:
        """Stream the answer so far; False once the job is no longer this worker's (answered or taken over)."""
        try:
            return await self.queue.publish_partial(answer.job, text, self.owner)
        except REDIS_DOWN:
            return True  # a partial is only a preview: the final reply carries the whole text
        except RedisError as error:
            if not answer.partial_failed:
                log.error("could not stream a partial answer", extra={"job": answer.job.id, "error": str(error)})
                answer.partial_failed = True
            return True

    async def hand_back(self, jobs: list[Job], reason: str, server_fault: bool = False) -> None:
        """Jobs go back to the front of the queue, uncharged, for any worker to answer (counted as a `server_fault`)."""
        if not jobs:
            return
        try:
            await with_backoff(
                lambda: self.queue.release(self.owner, jobs, server_fault), "release", give_up=after(RELEASE_PATIENCE_S)
            )
            log.info(f"handed jobs back: {reason}", extra={"jobs": [job.id for job in jobs]})
        except REDIS_DOWN:
            log.warning("could not hand jobs back; their leases expire instead", extra={"jobs": [job.id for job in jobs]})


class Worker:
    def __init__(self, redis: Redis, engine: Engine, settings: Settings, owner: str):
        self.redis = redis
        self.engine = engine
        self.settings = settings
        self.owner = owner
        self.pool = settings.pools.served
        self.queue = WorkQueue(
            redis,
            settings.queue.visibility_timeout_s,
            settings.queue.reply_stream_maxlen,
            settings.queue.affinity_wait_s,
            self.pool,
        )
        self.builder = PromptBuilder.for_settings(engine.tokenizer, settings)
        self.personas = Personas(redis, settings)
        self._builders: dict[str, PromptBuilder] = {}  # by system prompt: each persona's builder
        self.scheduler: Scheduler[Answer] = Scheduler(
            engine, settings.generation.max_new_tokens, settings.model.admission, settings.model.prefills_per_step
        )
        self.stopping = asyncio.Event()
        self.publisher = Publisher(self.queue, owner, settings.history, self.stopping)
        self._heartbeat_at = 0.0
        self._server_down = False  # waiting for the model server: the pool is not served meanwhile
        self._turn_at = time.monotonic()  # when the serving loop last came round
        room = engine.sequence_length - settings.model.max_prompt_tokens
        if room < settings.generation.max_new_tokens:
            log.warning(
                f"a full prompt ({settings.model.max_prompt_tokens} tokens) leaves answers {room} tokens, not "
                f"generation.max_new_tokens ({settings.generation.max_new_tokens}): prompt + answer never exceed "
                f"sequence_length ({engine.sequence_length})",
                extra={"answer_tokens_at_full_prompt": room},
            )

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        self._turn_at = time.monotonic()
        with HEALTH.checking("worker", self._loop_check, {"pool": self.pool}), HEALTH.checking("engine", self._server_problem):
            await self._serve()

    async def _loop_check(self) -> str | None:
        # A turn takes at most one model step (bounded by step_timeout_s) or one idle wait.
        late = time.monotonic() - self._turn_at - self.settings.queue.step_timeout_s - IDLE_WAIT_S
        return f"the serving loop has not come round for {late:.0f} s past its limit" if late > 5 else None

    async def _serve(self) -> None:
        try:
            try:
                await with_backoff(self._say_alive, "register", give_up=self.stopping.is_set)
            except REDIS_DOWN:
                return  # stopped before Redis ever answered
            self._heartbeat_at = time.monotonic()
            await self._wait_for_server()
            log.info("worker ready", extra={"owner": self.owner, "pool": self.pool, "slots": self.engine.batch_size})
            claims: list[Claim] = []
            while not self.stopping.is_set():
                self._turn_at = time.monotonic()
                ACTIVE_SLOTS.labels(self.pool).set(len(self.scheduler.live))
                if not self.scheduler.live and not claims:  # claims made during the last step are served first
                    claims = await self._claim(self.scheduler.room())
                    if not claims:
                        await self._idle()
                        continue
                await self._start(claims)
                claims = []
                if self.scheduler.live:
                    # The next claim travels to Redis while the model computes this step.
                    claims, (ended, failure) = await asyncio.gather(
                        self._claim(self.scheduler.room_after_step()), self._step()
                    )
                    if failure and await self._requests_failed([(failure, None)], [claim.job for claim in claims]):
                        claims = []
                        continue
                    await self._after_step(ended)
            await self._hand_back_all([claim.job for claim in claims], "the worker is stopping")
        finally:
            for slot in self.scheduler.live:
                self.scheduler.free(slot)
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.queue.gone(self.owner), RELEASE_PATIENCE_S)  # what it still holds is due now
            log.info("worker stopped", extra={"owner": self.owner})

    # --- admission ------------------------------------------------------------------------

    async def _claim(self, room: int) -> list[Claim]:
        live = self.scheduler.live
        if not room or any(slot.payload.suspect for slot in live):
            return []  # nothing joins a suspect: it is served alone (contract/work.py)
        try:
            return await self.queue.claim(self.owner, room, busy=bool(live), keeps_context=self.engine.reuses_context)
        except REDIS_DOWN as error:
            log.warning("redis unavailable", extra={"error": str(error)})
            await asyncio.sleep(0 if live else 0.5)
            return []

    async def _start(self, claims: list[Claim]) -> None:
        """Admit the claimed jobs into slots together (or answer them at once)."""
        try:
            stopped = await stops_requested(self.redis, [claim.job.id for claim in claims])
        except REDIS_FAILED:
            stopped = set()  # the first step looks again
        answers = [answer for claim in claims if (answer := await self._prepare(claim, claim.job.id in stopped))]
        if not answers:
            return
        admitted = await self._model_call(self.scheduler.admit_many, [(answer.prompt.ids, answer) for answer in answers])
        failed: list[tuple[EngineRequestFailed, Job | None]] = []
        for answer, slot in zip(answers, admitted):
            if isinstance(slot, EngineRequestFailed):
                failed.append((slot, answer.job))
            elif isinstance(slot, Exception):
                log.error("could not start generating", exc_info=slot, extra={"job": answer.job.id})
                await self.publisher.answer(answer.job, "error", MODEL_FAILED)
            else:
                await self._started(slot)
        if failed:
            await self._requests_failed(failed, [])

    async def _prepare(self, claim: Claim, stopped: bool) -> Answer | None:
        """The job's prompt, or None when the job was answered at once (stopped while queued, given up, empty,
        unbuildable)."""
        job = claim.job
        claimed_at = time.time()
        TIME_IN_QUEUE.observe(max(0.0, claimed_at - job.submitted_at))
        if claim.suspect:
            JOBS.labels(job.pool, "redelivered").inc()
        if stopped:  # nothing was written and nothing is spent
            await self.publisher.stopped_before_answer(job)
            return None
        if job.attempts > MAX_ATTEMPTS:
            log.error("job failed too often", extra={"job": job.id, "attempts": job.attempts})
            await self.publisher.answer(job, "error", GAVE_UP)
            return None
        if is_blank(job.text):
            await self.publisher.answer(job, "error", EMPTY_MESSAGE)
            return None
        try:
            builder = await self._builder_for(job)
        except PromptTooSmall as error:
            log.error("the channel's persona leaves no room for a message", extra={"job": job.id, "error": str(error)})
            await self.publisher.answer(job, "error", PERSONA_TOO_LONG)
            return None
        history, replaced_text = claim.history, None
        if job.replaces:  # a regeneration: asked again without the answer it replaces
            if not history or history[-1].assistant.job != job.replaces:
                await self.publisher.answer(job, "error", ONLY_THE_LATEST)  # reset, or replaced by another meanwhile
                return None
            history, replaced_text = history[:-1], history[-1].assistant.text
        try:
            # A regeneration's text is its question as stored, the author's name already in it.
            name = None if job.replaces else job.author
            prompt = builder.build(history, job.text, name)
            thinks_first = prompt.text.rstrip().endswith(OPEN)
            return Answer(
                job, prompt, claim.suspect, claimed_at=claimed_at, thinks_first=thinks_first, thinking_open=thinks_first,
                replaced_text=replaced_text,
            )
        except Exception:
            log.exception("could not build the prompt", extra={"job": job.id})
            await self.publisher.answer(job, "error", MODEL_FAILED)
            return None

    async def _builder_for(self, job: Job) -> PromptBuilder:
        """The prompt builder with the system prompt of the job's channel (its persona)."""
        try:
            system_prompt = (await self.personas.system_prompt(job.scope)).text
        except REDIS_FAILED as error:  # the configured persona is the best there is until Redis answers
            log.warning("run-time persona not read; config.yaml's used", extra={"job": job.id, "error": str(error)})
            system_prompt = configured(self.settings, job.scope).text
        if system_prompt not in self._builders:
            if len(self._builders) >= MAX_PERSONA_BUILDERS:
                self._builders.clear()
            self._builders[system_prompt] = self.builder.with_system_prompt(system_prompt)
        return self._builders[system_prompt]

    async def _started(self, slot: Slot[Answer]) -> None:
        answer = slot.payload
        answer.first_token_at = time.time()
        answer.cached_tokens = self.engine.cached_tokens(slot.index)
        PREFILLED_TOKENS.labels("cached").inc(answer.cached_tokens)
        PREFILLED_TOKENS.labels("computed").inc(len(answer.prompt.ids) - answer.cached_tokens)
        if self.engine.reuses_context:
            PREFIX_CACHE_LOOKUPS.labels("hit" if answer.cached_tokens else "miss").inc()
        if slot.ended:
            await self._finish(slot)
        else:  # the first text goes out as soon as it exists: the time to first token a user sees
            await self._publish_partial(slot, time.monotonic())

    async def _idle(self) -> None:
        await self._heartbeat()
        try:
            await self.queue.wait_for_work(self.owner, IDLE_WAIT_S)
        except REDIS_DOWN:
            pass  # _claim has said so, and waited

    async def _say_alive(self) -> None:
        """This worker's liveness and its jobs' leases; its pool counts as served unless the model server is down."""
        serving_for_s = None if self._server_down else self.settings.pools.absent_after_s
        await self.queue.heartbeat(self.owner, [slot.payload.job for slot in self.scheduler.live], serving_for_s)

    async def _heartbeat(self) -> None:
        """Keep this worker's liveness and its jobs' leases, every quarter of the visibility timeout, and
        tell the people whose messages wait for a pool nobody serves.

        Called between model steps and while idle, never from a timer: a stuck loop lets both expire.
        """
        now = time.monotonic()
        if now - self._heartbeat_at < self.settings.queue.visibility_timeout_s / 4:
            return
        try:
            await self._say_alive()
            self._heartbeat_at = now
            queued, waiting = await self.queue.depth()
            QUEUED_JOBS.labels(self.pool).set(queued)
            WAITING_CONVERSATIONS.labels(self.pool).set(waiting)
            await answer_unserved(self.queue, self.owner, self.settings.pools)
        except REDIS_DOWN:
            pass  # the next turn tries again; leases outlive two steps (config.py)
        except RedisError as error:
            log.error("could not extend the leases", extra={"error": str(error)})

    # --- model ----------------------------------------------------------------------------

    async def _step(self) -> tuple[list[Slot[Answer]], EngineRequestFailed | None]:
        """One decode step; a failed request to a model server is returned, not raised, so that claims
        made during the step are never dropped."""
        try:
            return await self._model_call(self.scheduler.step), None
        except EngineRequestFailed as failure:
            return [], failure

    async def _server_problem(self) -> str | None:
        # Not on the model thread: a health check must answer while a step waits on the server.
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.engine.health), HEALTH_CHECK_TIMEOUT_S)
        except Exception as error:  # a check that cannot answer is a failing check
            return f"health check failed: {error!r}"

    async def _requests_failed(self, failed: list[tuple[EngineRequestFailed, Job | None]], unstarted: list[Job]) -> bool:
        """Tell a server outage from the jobs' fault; True when it was an outage and every job was handed back.

        Each failure names its job, or the slot whose job it was. While the server is down
        (`health()`), no job is at fault: all go back to the queue uncharged, and this worker claims
        nothing until the server answers again (a restart costs waiting, not failed answers). While
        it answers its health check, each failure says whose fault it is (EngineRequestFailed): the
        server's (busy, 5xx, a stream cut) hands that job back uncharged, up to MAX_SERVER_FAULTS
        times; the request's (a 4xx) answers it with an error, as with any engine.
        """
        problem = await self._server_problem()
        if problem is None:
            for failure, job in failed:
                restore = None
                if job is None:
                    slot = self.scheduler.slots[failure.slot]
                    if slot is None:
                        continue
                    self.scheduler.free(slot)
                    job, restore = slot.payload.job, slot.payload.replaced_text  # its partials may have replaced the old answer
                if failure.server_fault and job.server_faults < MAX_SERVER_FAULTS:
                    log.warning("model server failed this request; the job is handed back", extra={"job": job.id, "error": str(failure)})
                    await self.publisher.hand_back([job], "the model server failed its request", server_fault=True)
                    continue
                log.error("model server failed this job", extra={"job": job.id, "error": str(failure)})
                await self.publisher.answer(
                    job, "error", SERVER_KEPT_FAILING if failure.server_fault else MODEL_FAILED, restore=restore
                )
            return False
        log.warning("model server unavailable", extra={"problem": problem, "error": str(failed[0][0])})
        await self._hand_back_all([job for _, job in failed if job] + unstarted, "the model server is unavailable")
        await self._wait_for_server()
        return True

    async def _hand_back_all(self, unstarted: list[Job], reason: str) -> None:
        """Every job this worker holds goes back to the queue; closing the slots first stops a server generating for them."""
        jobs = [slot.payload.job for slot in self.scheduler.live] + unstarted
        for slot in self.scheduler.live:
            self.scheduler.free(slot)
        await self.publisher.hand_back(jobs, reason)

    async def _wait_for_server(self) -> None:
        """Claim nothing while the model server is unavailable: its jobs would only fail. In-process engines never wait."""
        announced = False
        while not self.stopping.is_set():
            problem = await self._server_problem()
            self._server_down = problem is not None
            if problem is None:
                if announced:
                    log.info("model server available again; claiming resumes")
                return
            if not announced:
                log.warning("model server unavailable; claiming nothing until it answers", extra={"problem": problem})
                announced = True
            await self._heartbeat()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.settings.openai.health_interval_s)
            self._turn_at = time.monotonic()

    async def _model_call(self, function: Callable[..., T], *args) -> T:
        timeout = self.settings.queue.step_timeout_s
        try:
            return await asyncio.wait_for(on_model_thread(function, *args), timeout)
        except TimeoutError:
            raise StepTimedOut(
                f"a model step took longer than queue.step_timeout_s ({timeout:g} s): the worker stops so that it "
                "can be restarted, and its jobs are delivered again when their leases expire"
            ) from None

    # --- after each step --------------------------------------------------------------------

    async def _after_step(self, ended: list[Slot[Answer]]) -> None:
        for slot in ended:
            await self._finish(slot)
        await self._stop_requested()
        await self._heartbeat()
        now = time.monotonic()
        interval = self.settings.queue.partial_interval_s
        due = [
            slot for slot in self.scheduler.live
            if slot.payload.published_at is None or now - slot.payload.published_at >= interval
        ]
        if due:
            await asyncio.gather(*(self._publish_partial(slot, now) for slot in due))

    async def _stop_requested(self) -> None:
        """End the answers someone asked to stop, keeping what was written; their slots are free for the next jobs."""
        live = {slot.payload.job.id: slot for slot in self.scheduler.live}
        try:
            stopped = await stops_requested(self.redis, list(live))
        except REDIS_FAILED:
            return  # the next step looks again
        for job_id in stopped:
            slot = live[job_id]
            self.scheduler.free(slot)
            await self._finish(slot, stopped=True)

    async def _publish_partial(self, slot: Slot[Answer], now: float) -> None:
        text = answer_so_far(self.engine.tokenizer, slot).answer
        if not text:
            return  # nothing to show yet (thinking, or half a character): the next step looks again
        slot.payload.published_at = now
        if not await self.publisher.partial(slot.payload, text):
            log.warning("job answered or taken over elsewhere; generation dropped", extra={"job": slot.payload.job.id})
            self.scheduler.free(slot)

    async def _finish(self, slot: Slot[Answer], stopped: bool = False) -> None:
        answer = slot.payload
        usage = Usage(len(answer.prompt.ids), len(slot.tokens))  # spent whether or not an answer came of it
        try:
            split = answer_so_far(self.engine.tokenizer, slot, done=True)
            text = split.answer if split.state != "thinking" else ""  # only the answer is shown and kept
            if not text:
                # No answer came of it: a regeneration leaves the one it was to replace (restored if need be).
                restore = answer.replaced_text
                if stopped:
                    await self.publisher.stopped_before_answer(answer.job, usage, restore)
                elif split.state == "thinking":  # the slot ended inside the think block: no answer, no turns
                    log.warning(
                        "the model was still thinking when its answer ended",
                        extra={"job": answer.job.id, "thinking_tokens": answer.thinking_tokens, "limit": slot.limit},
                    )
                    await self.publisher.answer(answer.job, "error", THOUGHT_TOO_LONG, usage=usage, restore=restore)
                else:
                    await self.publisher.answer(answer.job, "error", EMPTY_ANSWER, usage=usage, restore=restore)
                return
            # The new exchange starts where the history it was prompted with ends (the prompt computed it from there).
            prompt = answer.prompt
            turns = list(self.builder.exchange_turns(prompt.user_content, text, answer.job.author, prompt.next_offset))
            shown = shown_text(answer, text)
            await self.publisher.answer(answer.job, "final", f"{shown}\n\n{STOPPED_NOTE}" if stopped else shown, turns, usage)
            record_answered(slot, time.time(), stopped)
        except Exception:
            # Only this job fails; it stays leased to this worker until the lease expires, then is delivered again.
            log.exception("could not finish the answer", extra={"job": answer.job.id})
