"""The background pass's chunks on real Redis and rq queues: one job goes on from chunk to chunk
with the models it loaded while nothing else waits, and yields to a waiting job after its chunk.
The Label Studio side of a chunk (`run_chunk`) is replaced; test_e2e_preannotate runs it for real."""
import pytest
import redis
from rq import Queue

import training.preannotate as preannotate_module
from backend.runtime import Runtime
from conftest import QUEUE

PREANNOTATE_QUEUE = f"{QUEUE}-preannotate"


@pytest.fixture
def chunk_job(redis_url, tmp_path, monkeypatch):
    """A pass's job enqueued on real Redis (not run by a worker: the test calls its function) and the
    chunks it runs, each as (runtime, limit)."""
    for name, value in {"REDIS_URL": redis_url, "TRAIN_QUEUE": QUEUE, "PREANNOTATE_QUEUE": PREANNOTATE_QUEUE,
                        "MODEL_DIR": str(tmp_path), "PREANNOTATE_CHUNK": "5"}.items():
        monkeypatch.setenv(name, value)
    conn = redis.Redis.from_url(redis_url)
    from backend.settings import Settings

    job_id = preannotate_module.enqueue_preannotation(conn, Settings.from_env(), "3", "v1")
    job = Queue(PREANNOTATE_QUEUE, connection=conn).dequeue_any([Queue(PREANNOTATE_QUEUE, connection=conn)], None,
                                                               connection=conn)[0]
    assert job.id == job_id
    monkeypatch.setattr(preannotate_module, "get_current_job", lambda: job)
    chunks, statuses = [], []

    def fake_chunk(project, version, settings, limit, report, conn_, runtime):
        assert isinstance(runtime, Runtime) and conn_ is not None
        chunks.append((runtime, limit))
        return {"status": statuses.pop(0), "predicted": limit}

    monkeypatch.setattr(preannotate_module, "run_chunk", fake_chunk)
    # the job renices its process and session (WORKER_NICE); here that process is pytest's
    monkeypatch.setattr(preannotate_module, "lower_priority", lambda nice: None)
    return conn, job, chunks, statuses


def test_a_pass_goes_on_with_its_models_while_nothing_waits(chunk_job):
    conn, job, chunks, statuses = chunk_job
    statuses += ["continue", "continue", "done"]
    assert preannotate_module.preannotate("3", "v1")["status"] == "done"
    assert len(chunks) == 3 and all(runtime is chunks[0][0] for runtime, _ in chunks) and {n for _, n in chunks} == {5}
    assert Queue(PREANNOTATE_QUEUE, connection=conn).count == 0  # no next-chunk job: the pass is done
    assert not conn.exists("toothseg:project:3:preannotate")


def test_a_pass_yields_to_a_waiting_retrain_after_its_chunk(chunk_job):
    conn, job, chunks, statuses = chunk_job
    statuses += ["continue", "continue", "done"]
    Queue(QUEUE, connection=conn).enqueue("jobs_for_tests.slow_job", "9")  # a retrain waits
    assert preannotate_module.preannotate("3", "v1")["status"] == "continue"
    assert len(chunks) == 1
    waiting = Queue(PREANNOTATE_QUEUE, connection=conn).job_ids
    assert len(waiting) == 1 and waiting[0] != job.id  # the next chunk queues behind the retrain
    assert conn.get("toothseg:project:3:preannotate").decode() == f"v1 {waiting[0]}"
