"""Background pre-annotation: after each promotion the worker predicts every unannotated task
with the current model and saves the predictions through label-studio-sdk (the paper's loop:
the model predicts the unlabeled pool, SAM refines, the oracle verifies).

- Order: tasks without annotations, by task id. A task that already has a prediction of the
  current version is skipped, so a pass is resumable: a killed worker's job (rq retries it) or
  a rerun continues where it stopped and never saves two predictions of one version for a task.
- Replacement: when a task gets the new version's prediction, its predictions from older
  toothseg versions are deleted, so Label Studio shows one current pre-annotation per task.
- Fairness: the pass runs on its own queue (PREANNOTATE_QUEUE, listed after the training queue
  by `rq worker`, so a queued retrain goes first), in chunks of PREANNOTATE_CHUNK tasks, at nice
  level WORKER_NICE, so the backend's interactive requests keep the CPU when both run (see
  backend.process.lower_priority). After a chunk the job goes on with the next one, with the
  models it has loaded, while no other job waits on either queue (for at most JOB_SLICE_S, 30
  min); otherwise it queues the next chunk as a new job behind the waiting ones and ends.
- A newer promotion supersedes a running pass: it stops at its next task and the new version's
  pass takes over. SAM embeddings come from the shared disk cache (EMBEDDING_CACHE_DIR), so after
  a retrain a pass costs the detector and prompt decoding only.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from typing import Any

import redis
from rq import Queue, get_current_job
from rq.job import Job

from backend.formats import find_target, instances_to_results, task_score
from backend.images import ImageError, ImageLoader, task_image_url
from backend.process import lower_priority
from backend.queues import FAILURE_TTL_S, LIVE_STATUSES, RESULT_TTL_S, RETRY, others_waiting, project_redis_key
from backend.registry import Registry, project_key
from backend.runtime import Runtime
from backend.settings import Settings

logger = logging.getLogger("toothseg.preannotate")

JOB_FUNCTION = "training.preannotate.preannotate"
JOB_SLICE_S = 1800
"""After this many seconds a pass's job queues its next chunk as a new job even when nothing waits, so
no job nears its rq timeout on a large pool."""


def _chain_key(project: str) -> str:
    return project_redis_key(project, "preannotate")


def enqueue_preannotation(conn: redis.Redis, settings: Settings, project: Any, version: str,
                          reason: str = "promotion") -> str | None:
    """Queue the pass of `version` for `project` unless that pass is already queued or running;
    returns the job id (None if one is live)."""
    project = project_key(project)
    key = _chain_key(project)
    raw = conn.get(key)
    if raw:
        running_version, running_job = raw.decode().split(" ", 1)
        try:
            live = Job.fetch(running_job, connection=conn).get_status() in LIVE_STATUSES
        except Exception:
            live = False
        if live and running_version == version:
            return None
    job_id = f"preannotate-{project}-{uuid.uuid4().hex[:12]}"
    conn.set(key, f"{version} {job_id}")
    Queue(settings.preannotate_queue, connection=conn).enqueue(
        JOB_FUNCTION, project, version, job_id=job_id, job_timeout=settings.train_job_timeout,
        result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S, retry=RETRY,
        description=f"pre-annotate project {project} with {version} ({reason})",
        meta={"project": project, "version": version, "stage": "queued"})
    logger.info("project %s: pre-annotation with %s queued as %s (%s)", project, version, job_id, reason)
    return job_id


def _client(settings: Settings):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key, timeout=60)


def plan(client, project: str, version: str, own_versions: set[str],
         failed: set[int] = frozenset()) -> tuple[list, dict[int, list], dict[int, list]]:
    """(tasks without annotations that lack a `version` prediction, in id order, except those whose
    image failed in this pass; task id -> that task's predictions from other toothseg versions;
    the same for tasks that already have their `version` prediction: left over by a pass killed
    between saving a task's new prediction and deleting its old ones)."""
    tasks = sorted((t for t in client.tasks.list(project=int(project)) if not t.total_annotations),
                   key=lambda t: t.id)
    by_task: dict[int, list] = {}
    for p in client.predictions.list(project=int(project)):
        by_task.setdefault(p.task, []).append(p)
    done = {t.id for t in tasks if any(p.model_version == version for p in by_task.get(t.id, []))}
    todo = [t for t in tasks if t.id not in failed and t.id not in done]
    stale = {tid: [p for p in preds if p.model_version in own_versions and p.model_version != version]
             for tid, preds in by_task.items()}
    leftovers = {tid: stale[tid] for tid in done if stale.get(tid)}
    return todo, stale, leftovers


def _failed_key(project: str, version: str) -> str:
    return project_redis_key(project, "preannotate", version, "failed")


def run_chunk(project: str, version: str, settings: Settings, limit: int, report=None,
              conn: redis.Redis | None = None, runtime: Runtime | None = None) -> dict[str, Any]:
    """Pre-annotate up to `limit` tasks with `runtime`'s models (a new Runtime when None); returns
    counts and whether work remains. Tasks whose image cannot be loaded are remembered (in Redis,
    per version) and not retried by later chunks."""
    registry = Registry(settings.model_dir)
    client = _client(settings)
    target = find_target(client.projects.get(id=int(project)).label_config)
    own = {v.version for v in registry.versions(project)}
    failed_ids = {int(x) for x in conn.smembers(_failed_key(project, version))} if conn else set()
    todo, stale, leftovers = plan(client, project, version, own, failed_ids)
    runtime = runtime or Runtime(settings)
    served = runtime.serve(project)
    if served.version != version:
        return {"status": "superseded", "by": served.version, "remaining": len(todo)}
    for task_id, olds in leftovers.items():  # a killed pass's half-done task: finish its replacement
        logger.info("project %s task %s: removing %d prediction(s) of older versions left by an interrupted pass",
                    project, task_id, len(olds))
        for old in olds:
            client.predictions.delete(id=old.id)
    loader = ImageLoader(settings)
    done = failed = 0
    started = time.perf_counter()
    for task in todo[:limit]:
        if registry.current_version(project) != version:
            return {"status": "superseded", "predicted": done, "remaining": len(todo) - done}
        try:
            image = loader.load(task_image_url({"data": task.data}, target.value_key))
        except ImageError as exc:
            logger.warning("project %s task %s: no pre-annotation: %s", project, task.id, exc.reason)
            failed += 1
            if conn is not None:
                conn.sadd(_failed_key(project, version), task.id)
                conn.expire(_failed_key(project, version), 30 * 86400)
            continue
        result = instances_to_results(served.pipeline.run(image), target)
        client.predictions.create(task=task.id, result=result, score=task_score(result), model_version=version)
        for old in stale.get(task.id, []):
            client.predictions.delete(id=old.id)
        done += 1
        if report:
            report(done, min(limit, len(todo)), len(todo))
    remaining = len(todo) - done - failed
    rate = done / max(time.perf_counter() - started, 1e-9) * 60
    return {"status": "continue" if remaining > 0 and len(todo) > limit else "done", "predicted": done,
            "failed": failed, "remaining": max(remaining, 0), "tasks_per_minute": round(rate, 2)}


def preannotate(project: str, version: str) -> dict[str, Any]:
    """rq entry point: chunks of the pass while no other job waits, then the next chunk is queued
    if tasks remain."""
    settings = Settings.from_env()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.preannotate_threads:
        settings = replace(settings, torch_threads=settings.preannotate_threads)  # the Runtime applies it
    job = get_current_job()
    lower_priority(settings.worker_nice)

    def report(done: int, chunk: int, total: int) -> None:
        logger.info("project %s [pre-annotate %s] %d of %d in this chunk (%d left in the pass)",
                    project, version, done, chunk, total - done)
        if job is not None:
            job.meta.update(stage="pre-annotate", progress=round(done / max(chunk, 1), 3),
                            detail=f"{done}/{chunk} tasks of this chunk, {total - done} left")
            job.save_meta()

    conn = job.connection if job is not None else None
    runtime = Runtime(settings)  # SAM and the detector load once for all the chunks of this job
    started = time.monotonic()
    while True:
        summary = run_chunk(project, version, settings, settings.preannotate_chunk, report, conn, runtime)
        logger.info("project %s: pre-annotation chunk with %s: %s", project, version, summary)
        if (summary["status"] != "continue" or conn is None or others_waiting(conn, settings)
                or time.monotonic() - started > JOB_SLICE_S):
            break
    if job is not None:
        mine = (conn.get(_chain_key(project)) or b"").decode() == f"{version} {job.id}"
        if mine:
            conn.delete(_chain_key(project))
            if summary["status"] == "continue":
                enqueue_preannotation(conn, settings, project, version, "next chunk")
    return summary
