"""Coalesced retraining jobs on Redis with rq: at most one job queued or running per project.

Redis keys per project (`backend.queues.project_redis_key`):
- `active`    the id of the project's queued or running retrain job (set NX: the coalescing lock)
- `changed`   the annotations created, updated or deleted since the last export ("<id>@<updated_at>")
- `requested` set when START_TRAINING arrived and no run has started on it yet

An event first records itself (`changed` or `requested`), then tries to enqueue: nothing happens
while `active` names a live job (the event is folded into the run, or into its one follow-up), or
while fewer than RETRAIN_MIN_NEW_ANNOTATIONS annotations changed and no START_TRAINING is pending.
The job (`training.jobs.retrain`) runs its work through `RetrainQueue.run`: `snapshot` when it
starts, right before it exports (what was recorded until then is in its export); after a
success the snapshot is consumed and one follow-up job is enqueued if events arrived since and
warrant a run, otherwise `active` is released. After the final failure (rq retries export
failures with backoff first) `active` is released. A job whose worker died is found by rq's
StartedJobRegistry cleanup (abandoned -> failed, which runs the failure callback) when the next
event looks at the project.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, TypeVar

from redis import Redis
from rq import Callback, Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import StartedJobRegistry

from backend.queues import FAILURE_TTL_S, LIVE_STATUSES, RESULT_TTL_S, RETRY, project_redis_key

logger = logging.getLogger(__name__)

JOB_FUNCTION = "training.jobs.retrain"
LOCAL_JOB_PREFIX = "local-"
"""Active ids of runs outside rq (`toothseg train --now`): live while the key exists (they expire
after TRAIN_JOB_TIMEOUT if their process dies)."""
ENQUEUE_GRACE_S = 60.0
"""How long `active` may name a job rq does not know yet: it is being enqueued (set, then enqueued)."""
# Compare-and-delete and compare-and-set of the `active` key, atomic in Redis: a stale job id is
# released only if it is still the one read, so an event that enqueued a new job in between keeps it.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_HAND_OVER = "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2]) return 1 end return 0"
T = TypeVar("T")


def new_job_id(project: str) -> str:
    """retrain-<project>-<creation time, ms, hex>-<random>: its age tells a job being enqueued from a
    stale entry."""
    return f"retrain-{project}-{time.time_ns() // 1_000_000:x}-{uuid.uuid4().hex[:8]}"


def _age_s(job_id: str) -> float:
    """Seconds since `new_job_id` made `job_id`; infinite for ids of another form."""
    try:
        return time.time() - int(job_id.rsplit("-", 2)[1], 16) / 1000
    except (IndexError, ValueError):
        return float("inf")


def annotation_key(annotation_id: Any, updated_at: Any = None) -> str:
    """"<id>@<updated_at>" for a created/updated annotation ("<id>@deleted" without a time), with the
    time normalised so a webhook's and an export's renderings of one instant compare equal."""
    if not updated_at:
        return f"{annotation_id}@deleted"
    text = str(updated_at)
    try:
        text = datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc).isoformat()
    except ValueError:
        pass
    return f"{annotation_id}@{text}"


@dataclass(frozen=True)
class Decision:
    """What an event did: status is 'enqueued', 'coalesced' or 'waiting'."""

    status: str
    job_id: str | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "job_id": self.job_id, "detail": self.detail}


class RetrainQueue:
    """The per-project coalescing logic over one rq queue."""

    def __init__(self, redis: Redis, queue_name: str = "toothseg-train", min_new_annotations: int = 10,
                 job_timeout: int = 86400, job_function: str = JOB_FUNCTION):
        self.redis = redis
        self.queue = Queue(queue_name, connection=redis)
        self.min_new = max(1, int(min_new_annotations))
        self.job_timeout = job_timeout
        self.job_function = job_function
        self._release_script = redis.register_script(_RELEASE)
        self._hand_over_script = redis.register_script(_HAND_OVER)

    @classmethod
    def from_settings(cls, redis: Redis, settings) -> "RetrainQueue":
        return cls(redis, settings.train_queue, settings.retrain_min_new_annotations, settings.train_job_timeout)

    # --- events --------------------------------------------------------------------------
    def record_annotation(self, project: str, annotation_id: Any, updated_at: Any = None) -> None:
        """Record a created/updated (`updated_at` given) or deleted (None) annotation."""
        self.redis.sadd(project_redis_key(project, "changed"), annotation_key(annotation_id, updated_at))

    def record_training_request(self, project: str) -> None:
        self.redis.set(project_redis_key(project, "requested"), "1")

    def pending(self, project: str) -> tuple[bool, int]:
        """(START_TRAINING pending, number of changed annotations) since the last snapshot."""
        requested = self.redis.exists(project_redis_key(project, "requested"))
        return bool(requested), int(self.redis.scard(project_redis_key(project, "changed")))

    def maybe_enqueue(self, project: str) -> Decision:
        """Enqueue a retrain job for `project` if one is warranted and none is queued or running."""
        active = self.active_job(project)
        if active is not None:
            return Decision("coalesced", active, "a retrain job for this project is already queued or running; "
                                                 "this event is folded into it or into its one follow-up")
        requested, changed = self.pending(project)
        if not requested and changed < self.min_new:
            return Decision("waiting", None, f"{changed} of {self.min_new} changed annotations needed to retrain "
                                             f"(RETRAIN_MIN_NEW_ANNOTATIONS)")
        job_id = new_job_id(project)
        if not self.redis.set(project_redis_key(project, "active"), job_id, nx=True):
            return Decision("coalesced", None, "a simultaneous event enqueued the job")
        try:
            self._enqueue(project, job_id, "START_TRAINING" if requested else f"{changed} changed annotations")
        except Exception:
            self.redis.delete(project_redis_key(project, "active"))
            raise
        return Decision("enqueued", job_id, "retrain job queued")

    def _enqueue(self, project: str, job_id: str, reason: str, function: str | None = None) -> Job:
        logger.info("project %s: enqueue retrain job %s (%s)", project, job_id, reason)
        return self.queue.enqueue(
            function or self.job_function, project, reason, job_id=job_id, job_timeout=self.job_timeout,
            result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S, retry=RETRY, on_failure=Callback(on_job_failure),
            description=f"retrain project {project} ({reason})", meta={"project": project, "stage": "queued"},
        )

    # --- the job's side ------------------------------------------------------------------
    def snapshot(self, project: str) -> set[str]:
        """Called when a job starts, right before its export: clears START_TRAINING and returns the
        changed annotation ids recorded so far (all of them are in the export that follows)."""
        self.redis.delete(project_redis_key(project, "requested"))
        return {m.decode() for m in self.redis.smembers(project_redis_key(project, "changed"))}

    def consume(self, project: str, snapshot: set[str]) -> None:
        """Called after a successful run: the snapshot's changes are now trained on."""
        if snapshot:
            self.redis.srem(project_redis_key(project, "changed"), *snapshot)

    def finish(self, project: str, job: Job, failed: bool = False, function: str | None = None) -> Decision | None:
        """Called when a job ends. After a success, enqueue the one follow-up if events since its
        snapshot warrant it (`function`, default the job's own), else release the project. After a final failure
        just release it: the next event starts afresh (no retry storm while Label Studio is down)."""
        requested, changed = self.pending(project)
        if not failed and (requested or changed >= self.min_new):
            follow = new_job_id(project)
            if not self._hand_over_script(keys=[project_redis_key(project, "active")], args=[job.id, follow]):
                return None  # the project is no longer this job's
            self._enqueue(project, follow, "follow-up: events during the previous run", function or job.func_name)
            return Decision("enqueued", follow, "follow-up")
        self.release(project, job.id)
        return None

    def release(self, project: str, job_id: str) -> bool:
        """Release the project if `job_id` is still its active job (atomically); True if it was."""
        return bool(self._release_script(keys=[project_redis_key(project, "active")], args=[job_id]))

    def claim(self, project: str, job_id: str) -> str | None:
        """Make `job_id` the project's active job unless one is live: None on success, else the
        live job's id (the lock `toothseg train --now` takes, as a queued job does)."""
        active = self.active_job(project)
        if active is not None:
            return active
        if not self.redis.set(project_redis_key(project, "active"), job_id, nx=True, ex=self.job_timeout):
            return (self.redis.get(project_redis_key(project, "active")) or b"?").decode()
        return None

    def run(self, project: str, job: Job, work: Callable[[Callable[[Iterable[str]], None]], T]) -> T:
        """Run `work(covered)` as the project's active job `job`: snapshot, work, consume, finish.

        `work` reports the `annotation_key`s its export contained through `covered`; their events
        are consumed too, even when they arrived after the snapshot (the START_TRAINING +
        ANNOTATION_CREATED pair of one annotation thus stays one job). An exception propagates to
        rq (retry with backoff; the final failure reaches `on_job_failure`)."""
        snapshot = self.snapshot(project)
        covered: set[str] = set()
        result = work(covered.update)
        self.consume(project, snapshot | covered)
        self.finish(project, job)
        return result

    # --- state ---------------------------------------------------------------------------
    def active_job(self, project: str) -> str | None:
        """The project's live queued/running job id; a stale entry (job gone, ended, or abandoned by a
        dead worker) is released."""
        raw = self.redis.get(project_redis_key(project, "active"))
        if raw is None:
            return None
        job_id = raw.decode()
        if job_id.startswith(LOCAL_JOB_PREFIX):
            return job_id
        StartedJobRegistry(self.queue.name, connection=self.redis).cleanup()  # abandoned jobs -> failed
        try:
            job = Job.fetch(job_id, connection=self.redis)
            if job.origin != self.queue.name:  # an idle round (training.idle) holds the project
                StartedJobRegistry(job.origin, connection=self.redis).cleanup()
            status = job.get_status()
        except NoSuchJobError:
            status = None
        if status in LIVE_STATUSES or (status is None and _age_s(job_id) < ENQUEUE_GRACE_S):
            return job_id  # live, or set by an event that is enqueueing it right now
        if self.release(project, job_id):
            logger.warning("project %s: released stale retrain job %s (status %s)", project, job_id, status)
            return None
        return self.active_job(project)  # another event replaced it in the meantime


def on_job_failure(job: Job, connection: Redis, exc_type, exc_value, traceback) -> None:
    """rq failure callback: on the final failure (no retry left) release the project or enqueue its
    follow-up. Also runs for jobs rq finds abandoned by a dead worker."""
    if job.should_retry:
        return
    project = (job.meta or {}).get("project")
    if project:
        job.meta.update(stage="failed", error=f"{getattr(exc_type, '__name__', 'Error')}: {exc_value}")
        job.save_meta()
        from backend.settings import Settings

        RetrainQueue.from_settings(connection, Settings.from_env()).finish(project, job, failed=True)
