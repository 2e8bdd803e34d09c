"""Label Studio webhooks -> coalesced retrain jobs.

START_TRAINING (sent by "Start training" / `ml.train`, and after N annotations when the project's
"start training after" setting is on) always asks for a run; ANNOTATION_CREATED, _UPDATED and
_DELETED count towards RETRAIN_MIN_NEW_ANNOTATIONS and each queue a measurement of the annotator's
work (`training.annotator_work.record_annotation`, run by the worker off the request path). Other
actions are acknowledged and ignored.
Answers are immediate (a few Redis round trips); Redis down is a 503 with the reason.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any

import redis

from backend.queues import FAILURE_TTL_S, RETRY
from backend.registry import project_key
from backend.retrain_queue import RetrainQueue
from backend.settings import Settings

logger = logging.getLogger(__name__)

TRAIN_ACTION = "START_TRAINING"
WORK_JOB = "training.annotator_work.record_annotation"
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "ANNOTATIONS_DELETED")

_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def redis_client(url: str) -> redis.Redis:
    """One connection pool per Redis URL per process; short timeouts so a dead Redis fails fast."""
    with _clients_lock:
        if url not in _clients:
            _clients[url] = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2.0)
        return _clients[url]


def _annotations(data: dict[str, Any], deleted: bool) -> list[tuple[int, Any]]:
    """(id, updated_at) of the annotations an event is about (Label Studio's ids are integers: others
    are skipped); updated_at None for deletions."""
    found = []
    for ann in [data.get("annotation"), *(data.get("annotations") or [])]:
        if isinstance(ann, dict) and re.fullmatch(r"\d{1,18}", str(ann.get("id"))):
            found.append((int(ann["id"]), None if deleted else ann.get("updated_at") or ann.get("created_at")))
    return found


def _project_of(data: dict[str, Any]) -> str | None:
    for candidate in (data.get("project"), (data.get("annotation") or {}).get("project"),
                      (data.get("task") or {}).get("project")):
        try:
            return project_key(candidate)
        except (ValueError, AttributeError):
            continue
    return None


def handle_webhook(data: dict[str, Any], settings: Settings | None = None) -> tuple[dict[str, Any], int]:
    """A webhook payload -> (JSON body, HTTP status)."""
    action = data.get("action")
    if not isinstance(action, str):
        return {"error": "webhook payload has no 'action'"}, 400
    if action != TRAIN_ACTION and action not in ANNOTATION_ACTIONS:
        return {"status": "ignored", "action": action}, 200
    project = _project_of(data)
    if project is None:
        return {"error": f"{action} webhook without a project id"}, 400
    settings = settings or Settings.from_env()
    try:
        queue = RetrainQueue.from_settings(redis_client(settings.redis_url), settings)
        if action == TRAIN_ACTION:
            queue.record_training_request(project)
        else:
            annotations = _annotations(data, deleted=action.endswith("DELETED"))
            if not annotations:
                return {"error": f"{action} webhook without annotation ids"}, 400
            for annotation_id, updated_at in annotations:
                queue.record_annotation(project, annotation_id, updated_at)
                queue.queue.enqueue(WORK_JOB, project, annotation_id, retry=RETRY, job_timeout=300,
                                    result_ttl=3600, failure_ttl=FAILURE_TTL_S,
                                    description=f"annotator work: project {project} annotation {annotation_id}")
        decision = queue.maybe_enqueue(project)
    except redis.RedisError as exc:
        logger.error("webhook %s for project %s: Redis unavailable (%s)", action, project, exc)
        return {"error": f"the job queue (Redis at REDIS_URL) is unavailable: {exc.__class__.__name__}; "
                         f"the event was not recorded, retry later"}, 503
    logger.info("webhook %s project %s: %s", action, project, decision.status)
    return {"action": action, "project": project, **decision.as_dict()}, 201 if decision.status == "enqueued" else 200
