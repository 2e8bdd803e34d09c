"""Idle training: while the worker has nothing else to do, it keeps training each project's current
model on the same annotations, so the model served improves between annotation rounds.

After a retrain job ends with a current model, `enqueue_idle_round` queues round 1 on IDLE_QUEUE,
which `rq worker` lists after the training and pre-annotation queues: a round starts only when
no retrain and no pre-annotation waits. A round is the retrain job's own work on the project's
annotations (export, warm start from the current model with the warm length, mask refiner, gate,
store, promote); a promoted round queues the pre-annotation pass of its version (as a retrain
does) and the next round, up to IDLE_TRAINING_ROUNDS; a rejected one ends the chain (the model
stopped improving on these annotations).

A round holds the project's retrain lock (`RetrainQueue.claim`), so no retrain of the project runs
beside it, and it stops at once (between two training batches, or between two steps), storing
nothing, when
- the project's annotations warrant a retrain (START_TRAINING, RETRAIN_MIN_NEW_ANNOTATIONS changes,
  which the lock folded into it): the lock goes to that retrain (`RetrainQueue.finish`), which
  queues round 1 again when it ends;
- another job waits on the training or pre-annotation queue (another project's retrain, a
  pre-annotation pass): the round is queued again, behind it (so a worker that serves IDLE_QUEUE
  serves those two queues first, as the compose file's and `toothseg stack`'s do).
The project's `idle` key (`project_redis_key(project, "idle")`) names the one round that may run:
a retrain's new chain supersedes a round still queued from before.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Callable

import redis
from rq import Queue, get_current_job
from rq.job import Job

from backend.queues import FAILURE_TTL_S, RESULT_TTL_S, RETRY, others_waiting, project_redis_key
from backend.registry import project_key
from backend.retrain_queue import RetrainQueue
from backend.settings import Settings

logger = logging.getLogger("toothseg.idle")

JOB_FUNCTION = "training.idle.idle_round"
# Compare-and-delete of the `idle` key: a round clears it only if it still names that round, so a
# newer chain a retrain queued in between keeps it.
_CLEAR = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _idle_key(project: str) -> str:
    return project_redis_key(project, "idle")


def enqueue_idle_round(conn: redis.Redis, settings: Settings, project: Any, round_: int,
                       function: str = JOB_FUNCTION) -> str | None:
    """Queue idle round `round_` of `project` (it supersedes any round queued before); None when
    IDLE_TRAINING_ROUNDS allows no such round."""
    if round_ > settings.idle_training_rounds:
        return None
    project = project_key(project)
    job_id = f"idle-{project}-{round_}-{uuid.uuid4().hex[:12]}"
    conn.set(_idle_key(project), job_id)
    Queue(settings.idle_queue, connection=conn).enqueue(
        function, project, round_, job_id=job_id, job_timeout=settings.train_job_timeout, result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S, retry=RETRY,
        description=f"idle training of project {project}, round {round_} of {settings.idle_training_rounds}",
        meta={"project": project, "round": round_, "stage": "queued"})
    logger.info("project %s: idle training round %d queued as %s", project, round_, job_id)
    return job_id


class IdleRound:
    """One idle round of a project, run by its rq job: lock, work, hand over, chain."""

    def __init__(self, conn: redis.Redis, settings: Settings,
                 on_promoted: Callable[[dict[str, Any]], None] | None = None):
        """`on_promoted(summary)`: called after a promoted round, before the next round is queued
        (the entry point queues the version's pre-annotation pass there)."""
        self.conn = conn
        self.settings = settings
        self.queue = RetrainQueue.from_settings(conn, settings)
        self.on_promoted = on_promoted
        self._clear = conn.register_script(_CLEAR)

    def clear(self, project: str, job_id: str) -> bool:
        """Clear the project's `idle` key if it still names `job_id` (atomically); True if it did."""
        return bool(self._clear(keys=[_idle_key(project)], args=[job_id]))

    def why_stop(self, project: str) -> str | None:
        """Why a running round must stop now ("retrain", "waiting job"), or None."""
        requested, changed = self.queue.pending(project)
        if requested or changed >= self.queue.min_new:
            return "retrain"
        if others_waiting(self.conn, self.settings):
            return "waiting job"
        return None

    def run(self, project: str, round_: int, job: Job, work: Callable[[Callable[[], bool]], dict[str, Any]]
            ) -> dict[str, Any]:
        """Run `work(interrupt)` (the retrain job's round, `training.jobs.run_retrain`) as idle round
        `round_` of `project`; `interrupt()` says whether it must stop."""
        if (self.conn.get(_idle_key(project)) or b"").decode() != job.id:
            return {"status": "superseded", "round": round_}
        held = self.queue.claim(project, job.id)
        if held is not None:  # a retrain is queued or running: it queues round 1 when it ends
            self.clear(project, job.id)
            return {"status": "skipped", "round": round_, "reason": f"retrain job {held} is queued or running"}
        stops: list[str] = []

        def interrupt() -> bool:
            why = self.why_stop(project)
            if why:
                stops.append(why)
            return why is not None

        try:
            summary = {"status": "interrupted", "stage": "start"} if interrupt() else work(interrupt)
        finally:
            self.queue.finish(project, job, function=self.queue.job_function)  # a retrain that waited goes first
            self.queue.maybe_enqueue(project)  # an event folded into the round as finish released it
        summary = {**summary, "round": round_}
        if not self.clear(project, job.id):  # a newer chain was queued meanwhile
            return summary
        if summary["status"] == "promoted" and self.on_promoted is not None:
            self.on_promoted(summary)
        if summary["status"] == "interrupted" and stops[-1:] == ["waiting job"]:
            summary["next"] = enqueue_idle_round(self.conn, self.settings, project, round_, job.func_name)
        elif summary["status"] == "promoted":
            summary["next"] = enqueue_idle_round(self.conn, self.settings, project, round_ + 1, job.func_name)
        logger.info("project %s: idle round %d: %s", project, round_, summary)
        return summary


def idle_round(project: str, round_: int) -> dict[str, Any]:
    """rq entry point (queued by `enqueue_idle_round`)."""
    from backend.process import lower_priority
    from training.jobs import run_retrain

    settings = Settings.from_env()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = get_current_job()
    lower_priority(settings.worker_nice)
    project = project_key(project)
    logger.info("project %s: idle training round %d (job %s)", project, round_, job.id)
    def preannotate(summary: dict[str, Any]) -> None:
        if settings.preannotate_after_promotion:
            from training.preannotate import enqueue_preannotation

            enqueue_preannotation(job.connection, settings, project, summary["version"])

    return IdleRound(job.connection, settings, on_promoted=preannotate).run(
        project, round_, job, lambda interrupt: run_retrain(project, settings, job.id, interrupt=interrupt))
