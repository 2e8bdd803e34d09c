"""toothseg's queue policy in one place: its Redis keys, which rq job statuses count as live, and
the retry and retention every enqueued job gets (as rq keeps its own in `rq.defaults`).

Redis keys per project, all under `toothseg:project:<id>:` (`project_redis_key`):
- `active`, `changed`, `requested`: the coalesced retrain (`backend.retrain_queue`);
- `preannotate`: "<version> <job id>" of the project's background pre-annotation pass, and
  `preannotate:<version>:failed`: the tasks whose image that pass could not load
  (`training.preannotate`).

Queue names are settings (`TRAIN_QUEUE`, `PREANNOTATE_QUEUE`), read by every process from the same
environment.
"""
from __future__ import annotations

from typing import Any

from rq import Queue, Retry
from rq.job import JobStatus

KEY_PREFIX = "toothseg:project:"
LIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED})
"""A job in one of these is queued or running (or will be): its project's slot is taken."""
RETRY = Retry(max=3, interval=[10, 30, 90])
"""rq's retry of a failed job (a dead worker, Label Studio unreachable): three more tries, backing off."""
RESULT_TTL_S = 7 * 86400
"""How long rq keeps a finished job (its result, meta and registry entry): `toothseg status` shows them."""
FAILURE_TTL_S = 7 * 86400
"""How long rq keeps a failed job, with its traceback."""


def project_redis_key(project: Any, *parts: str) -> str:
    """"toothseg:project:<project>:<part>:..." (`project` as Label Studio's project id)."""
    return ":".join([f"{KEY_PREFIX}{project}", *parts])


def project_of_key(key: bytes | str) -> str:
    """The project id of a `project_redis_key`."""
    text = key.decode() if isinstance(key, bytes) else key
    return text[len(KEY_PREFIX):].split(":", 1)[0]


def others_waiting(conn, settings) -> bool:
    """Whether a job waits on the training or the pre-annotation queue (a retrain, a project's
    pre-annotation pass): a running pass yields after its chunk, an idle round at once."""
    return any(Queue(name, connection=conn).count for name in (settings.train_queue, settings.preannotate_queue))
