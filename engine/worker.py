"""The model worker: claims jobs, builds prompts from history, generates, answers.

One process, one model. Generation runs in a thread so the event loop stays free to stream
partial replies and keep the jobs' leases alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from engine.backends.base import Backend
from engine.config import Settings
from engine.jobs import EMPTY_MESSAGE, Job, ReplyEvent
from engine.prompts import Prompt, PromptBuilder
from engine.queue import Claim, JobQueue
from engine.redis_client import REDIS_DOWN, after, with_backoff

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job that took the worker down this often is answered with an error instead
IDLE_WAIT_S = 1.0
RELEASE_PATIENCE_S = 5.0  # on shutdown, don't wait longer than this for Redis: the lease expires anyway  # how often an idle worker looks for expired leases
MODEL_FAILED = "Sorry, something went wrong while writing the answer. Please try again."
GAVE_UP = "Sorry, this message could not be answered: it failed several times."
EMPTY_ANSWER = "The model returned an empty answer. Please rephrase your message."


class PromptTooSmall(ValueError):
    pass


@dataclass
class Task:
    """One job in a batch, with what the worker learns about it while generating."""

    job: Job
    prompt: Prompt
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    published_at: float = 0.0


class Worker:
    def __init__(self, redis: Redis, backend: Backend, settings: Settings, owner: str):
        self.redis = redis
        self.backend = backend
        self.settings = settings
        self.owner = owner
        self.queue = JobQueue(redis, settings.queue.visibility_timeout_s, settings.queue.reply_stream_maxlen)
        self.builder = PromptBuilder(backend.tokenizer, settings.system_prompt, settings.model.max_prompt_tokens)
        self.stopping = asyncio.Event()
        self._partials: asyncio.Queue[tuple[Job, str]] = asyncio.Queue()
        floor = self.builder.count(self.builder.render([], "ok"))
        if floor >= settings.model.max_prompt_tokens:
            raise PromptTooSmall(
                f"model.max_prompt_tokens ({settings.model.max_prompt_tokens}) leaves no room for a message: "
                f"the system prompt alone takes {floor} tokens"
            )

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        publisher = asyncio.create_task(self._publish_partials())
        try:
            try:
                recovered = await with_backoff(lambda: self.queue.recover(self.owner), "recover", give_up=self.stopping.is_set)
            except REDIS_DOWN:
                return  # stopped before Redis ever answered
            if recovered:
                log.info("re-queued jobs a previous run left unanswered", extra={"jobs": recovered})
            log.info("worker ready", extra={"owner": self.owner, "batch_size": self.backend.batch_size})
            while not self.stopping.is_set():
                try:
                    claims = await self.queue.claim(self.owner, self.backend.batch_size)
                    if claims:
                        await self.process(claims)
                    else:
                        await self.queue.wait_for_work(IDLE_WAIT_S)
                except REDIS_DOWN as error:
                    log.warning("redis unavailable", extra={"error": str(error)})
                    await asyncio.sleep(0.5)
        finally:
            publisher.cancel()
            log.info("worker stopped", extra={"owner": self.owner})

    async def process(self, claims: list[Claim]) -> None:
        tasks = []
        for claim in claims:
            job = claim.job
            if job.attempts > MAX_ATTEMPTS:
                log.error("job failed too often", extra={"job": job.id, "attempts": job.attempts})
                await self._answer(job, "error", GAVE_UP)
                continue
            if not job.text.strip():
                await self._answer(job, "error", EMPTY_MESSAGE)
                continue
            tasks.append(Task(job, self.builder.build(claim.history, job.text, job.author)))
        if not tasks:
            return
        heartbeat = asyncio.create_task(self._keep_leases([t.job for t in tasks]))
        started = time.monotonic()
        for task in tasks:
            task.published_at = started  # an answer faster than partial_interval_s is not streamed
        try:
            rows = await asyncio.to_thread(
                self.backend.generate, [t.prompt.ids for t in tasks], self.settings.generation, self._on_step_from(tasks)
            )
        except Exception:
            log.exception("generation failed", extra={"jobs": [t.job.id for t in tasks]})
            for task in tasks:
                await self._answer(task.job, "error", MODEL_FAILED)
            return
        finally:
            heartbeat.cancel()
        if self.stopping.is_set():
            await self._hand_back([t.job for t in tasks])
            return
        await self._partials.join()
        for task, tokens in zip(tasks, rows):
            task.tokens = tokens  # what generate returned is final; the hook only saw steps
            await self._finish(task, started)

    async def _hand_back(self, jobs: list[Job]) -> None:
        try:
            await with_backoff(lambda: self.queue.release(jobs), "release", give_up=after(RELEASE_PATIENCE_S))
            log.info("handed jobs back on shutdown", extra={"jobs": [job.id for job in jobs]})
        except REDIS_DOWN:
            log.warning("could not hand jobs back; their leases expire instead", extra={"jobs": [job.id for job in jobs]})

    def _on_step_from(self, tasks: list[Task]):
        """The per-step hook, called in the generation thread."""
        loop = asyncio.get_running_loop()
        interval = self.settings.queue.partial_interval_s

        def on_step(rows: list[list[int]]) -> bool:
            now = time.monotonic()
            for task, tokens in zip(tasks, rows):
                task.tokens = tokens
                if tokens and task.first_token_at is None:
                    task.first_token_at = now
                if tokens and now - task.published_at >= interval:
                    task.published_at = now
                    text = self.backend.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    loop.call_soon_threadsafe(self._partials.put_nowait, (task.job, text))
            return self.stopping.is_set()

        return on_step

    async def _publish_partials(self) -> None:
        # One publisher keeps each job's partials in order and ahead of its final reply.
        while True:
            job, text = await self._partials.get()
            try:
                if text:
                    await self.queue.publish_partial(job, text)
            except REDIS_DOWN:
                pass  # a partial is only a preview: the final reply carries the whole text
            finally:
                self._partials.task_done()

    async def _keep_leases(self, jobs: list[Job]) -> None:
        while True:
            await asyncio.sleep(self.settings.queue.visibility_timeout_s / 3)
            try:
                await self.queue.heartbeat(jobs)
            except REDIS_DOWN:
                pass

    async def _finish(self, task: Task, started: float) -> None:
        text = self.backend.tokenizer.decode(task.tokens, skip_special_tokens=True).strip()
        if not text:
            await self._answer(task.job, "error", EMPTY_ANSWER)
            return
        turns = list(self.builder.exchange_turns(task.prompt.user_content, text, task.job.author))
        shown = f"{task.prompt.cut.notice()}\n\n{text}" if task.prompt.cut else text
        await self._answer(task.job, "final", shown, turns)
        elapsed = time.monotonic() - started
        first = (task.first_token_at or time.monotonic()) - started
        log.info(
            "job answered",
            extra={
                "job": task.job.id,
                "conversation": task.job.conversation,
                "prompt_tokens": len(task.prompt.ids),
                "dropped_turns": 2 * task.prompt.dropped_exchanges,
                "cut": bool(task.prompt.cut),
                "new_tokens": len(task.tokens),
                "ttft_s": round(first, 3),
                "tokens_per_s": round(len(task.tokens) / elapsed, 1) if elapsed > 0 else None,
                "attempt": task.job.attempts,
            },
        )

    async def _answer(self, job: Job, kind: str, text: str, turns=()) -> None:
        event = ReplyEvent(job_id=job.id, conversation=job.conversation, kind=kind, text=text, reply_to=job.reply_to)
        history = self.settings.history
        try:
            # Keep trying while serving: the answer is worth the wait. Once stopping, the lease
            # runs out instead and the job is answered again by the next worker.
            answered = await with_backoff(
                lambda: self.queue.complete(job, event, list(turns), history.max_turns, history.ttl_seconds),
                "complete",
                give_up=self.stopping.is_set,
            )
        except REDIS_DOWN:
            log.warning("answer not recorded before shutdown; the job will be delivered again", extra={"job": job.id})
            return
        if not answered:
            log.info("job was answered before; reply not repeated", extra={"job": job.id})
