"""What people do to an answer besides asking: stop it while it streams (regenerating it is Intake.regenerate).

A stop is a flag in Redis (`stop:<job>`) that any adapter process may set and the worker
holding the job reads after every model step: the answer ends there, keeping what was written.
Only the person who asked, or an admin, may stop or regenerate an answer.
"""

from __future__ import annotations

from redis.asyncio import Redis

from contract import keys
from contract.jobs import Job, RejectedMessage

STOP_TTL_S = 3600  # longer than any answer streams
ONLY_THE_LATEST = "Only the latest answer of a conversation can be regenerated."
WAIT_FOR_QUEUED = "This conversation has messages waiting for an answer: regenerate once they are answered."
REGENERATION_STOPPED = "Regeneration stopped: the previous answer stays."
NOT_YOURS = "Only the person who asked (or an admin) can do that."
STOPPING = "Stopping the answer."
ALREADY_FINISHED = "That answer is already finished."


async def request_stop(redis: Redis, job_id: str, by: str | None, admin: bool = False) -> str:
    """Ask the worker to end job `job_id`'s answer at its next step; a sentence for the person who asked.

    RejectedMessage when `by` (a platform user id) is neither the asker nor an admin.
    """
    data = await redis.hget(keys.job(job_id), "data")
    if data is None:
        return ALREADY_FINISHED  # answered (a job is deleted with its answer), or never known
    if not admin and Job.model_validate_json(data).author_id != by:
        raise RejectedMessage(NOT_YOURS)
    await redis.set(keys.stop(job_id), 1, ex=STOP_TTL_S)
    return STOPPING


async def stops_requested(redis: Redis, job_ids: list[str]) -> set[str]:
    """Which of these jobs someone asked to stop."""
    if not job_ids:
        return set()
    flags = await redis.mget([keys.stop(job_id) for job_id in job_ids])
    return {job_id for job_id, flag in zip(job_ids, flags) if flag}
