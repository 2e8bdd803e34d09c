"""Stand-ins for the retraining work, run by a real `rq worker` through the real wrappers: the
coalescing of retrain jobs (`RetrainQueue.run`) and the idle round (`training.idle.IdleRound.run`).
They sleep instead of exporting and training; `slow_job` reports as "exported" the annotation
keys the test stored in Redis (what Label Studio's export would hold)."""
import json
import os
import time

from rq import get_current_job

from backend.retrain_queue import RetrainQueue
from backend.settings import Settings
from training.idle import IdleRound


def slow_job(project: str, reason: str = "") -> dict:
    job = get_current_job()
    queue = RetrainQueue.from_settings(job.connection, Settings.from_env())

    def work(covered):
        start = time.time()
        job.connection.rpush("test:runs", f"{job.id}|{reason}")
        covered(m.decode() for m in job.connection.smembers("test:exported"))
        time.sleep(float(os.environ.get("SLOW_JOB_SECONDS", "2")))
        job.connection.rpush("test:spans", f"{start} {time.time()}")
        if job.connection.get("test:fail"):
            raise RuntimeError("Label Studio is unreachable (simulated)")
        return {"reason": reason}

    return queue.run(project, job, work)


def slow_idle_round(project: str, round_: int) -> dict:
    """An idle round whose work sleeps for SLOW_JOB_SECONDS, asking `interrupt()` every 0.1 s as the
    training does between batches, and ends with the status in test:idle-status (default promoted)."""
    job = get_current_job()
    conn = job.connection

    def work(interrupt):
        conn.rpush("test:order", f"idle {project} {round_}")
        end = time.time() + float(os.environ.get("SLOW_JOB_SECONDS", "2"))
        while time.time() < end:
            if interrupt():
                return {"status": "interrupted", "stage": "training"}
            time.sleep(0.1)
        return {"status": (conn.get("test:idle-status") or b"promoted").decode()}

    summary = IdleRound(conn, Settings.from_env()).run(project, round_, job, work)
    conn.rpush("test:idle-ends", json.dumps(summary))
    return summary


def other_job(name: str) -> None:
    """A job of another kind (another project's retrain, a pre-annotation pass)."""
    get_current_job().connection.rpush("test:order", name)
