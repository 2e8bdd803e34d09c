"""A stand-in for the retraining work, run by a real `rq worker` through the real coalescing
wrapper (`RetrainQueue.run`): it sleeps instead of exporting and training, and reports as
"exported" the annotation keys the test stored in Redis (what Label Studio's export would hold)."""
import os
import time

from rq import get_current_job

from backend.retrain_queue import RetrainQueue
from backend.settings import Settings


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
