"""Coalescing of retrain jobs on real Redis with a real `rq worker` process."""
import os
import signal
import subprocess
import time

import httpx
import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.scheduler import RQScheduler

from backend.retrain_queue import RetrainQueue, annotation_key
from backend.settings import Settings
from training.idle import enqueue_idle_round
from backend.webhooks import handle_webhook
from conftest import QUEUE, REPO, VENV_BIN, stop, wait_for  # noqa: F401  (start_worker is a conftest fixture)
from training.ops.stack import _descendants

JOB = "jobs_for_tests.slow_job"


def queue_for(redis_url, min_new=1):
    return RetrainQueue(redis.Redis.from_url(redis_url), QUEUE, min_new, job_timeout=600, job_function=JOB)


def event(q, project, annotation_id=None, start_training=False):
    """What backend.webhooks does for one event."""
    if start_training:
        q.record_training_request(project)
    else:
        q.record_annotation(project, annotation_id, "2026-11-27T10:00:00.000000Z")
    return q.maybe_enqueue(project)


def runs(redis_url):
    return [r.decode() for r in redis.Redis.from_url(redis_url).lrange("test:runs", 0, -1)]


def wait_idle(q, project, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if q.active_job(project) is None:
            return
        time.sleep(0.2)
    raise TimeoutError("jobs still active")


def test_burst_gives_one_or_two_jobs_never_n(redis_url, start_worker):
    start_worker(redis_url, SLOW_JOB_SECONDS=1)
    q = queue_for(redis_url)
    decisions = [event(q, "7", annotation_id=i).status for i in range(20)]
    assert decisions.count("enqueued") == 1 and decisions.count("coalesced") == 19
    wait_idle(q, "7")
    assert 1 <= len(runs(redis_url)) <= 2


def test_burst_during_a_run_gives_exactly_one_follow_up(redis_url, start_worker):
    start_worker(redis_url, SLOW_JOB_SECONDS=3)
    q = queue_for(redis_url)
    assert event(q, "7", start_training=True).status == "enqueued"
    deadline = time.monotonic() + 30
    while not runs(redis_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(runs(redis_url)) == 1  # the first run has started
    for i in range(10):
        assert event(q, "7", annotation_id=100 + i).status == "coalesced"
    wait_idle(q, "7")
    assert len(runs(redis_url)) == 2
    assert "follow-up" in runs(redis_url)[1]
    assert q.pending("7") == (False, 0)


def test_start_training_and_annotation_created_pair_is_one_job(redis_url, start_worker):
    r = redis.Redis.from_url(redis_url)
    # the run's export holds the annotation, even if its event arrives after the job started
    r.sadd("test:exported", annotation_key(55, "2026-11-27T10:00:00.000000Z"))
    start_worker(redis_url, SLOW_JOB_SECONDS=1)
    q = queue_for(redis_url)
    assert event(q, "9", start_training=True).status == "enqueued"
    wait_for("the job to start", lambda: runs(redis_url), 60, 0.05)  # its snapshot is taken
    assert event(q, "9", annotation_id=55).status == "coalesced"
    wait_idle(q, "9")
    assert len(runs(redis_url)) == 1


def test_threshold_and_projects_are_independent(redis_url):
    q = queue_for(redis_url, min_new=3)
    assert event(q, "1", annotation_id=1).status == "waiting"
    assert event(q, "1", annotation_id=1).status == "waiting"  # the same annotation again
    assert event(q, "1", annotation_id=2).status == "waiting"
    assert event(q, "2", annotation_id=1).status == "waiting"
    assert event(q, "1", annotation_id=3).status == "enqueued"
    assert event(q, "2", start_training=True).status == "enqueued"
    assert len(Queue(QUEUE, connection=q.redis)) == 2


def test_failed_job_is_retried_then_releases_the_project(redis_url, start_worker, monkeypatch):
    import backend.retrain_queue as rq_module
    from rq import Retry

    monkeypatch.setattr(rq_module, "RETRY", Retry(max=2, interval=[1, 1]))
    r = redis.Redis.from_url(redis_url)
    r.set("test:fail", "1")
    start_worker(redis_url, SLOW_JOB_SECONDS=0.1)
    q = queue_for(redis_url)
    decision = event(q, "3", start_training=True)
    wait_idle(q, "3", timeout=90)
    assert len(runs(redis_url)) == 3  # first try + 2 retries
    job = Job.fetch(decision.job_id, connection=r)
    assert job.get_status() == "failed"
    assert "Label Studio is unreachable" in job.meta["error"]
    r.delete("test:fail")
    assert event(q, "3", start_training=True).status == "enqueued"  # the project is free again
    wait_idle(q, "3", timeout=60)  # and that job ends before the worker is stopped


@pytest.mark.scenario("An rq worker SIGKILLed in the middle of a retrain job",
                      "rq finds the job abandoned once its heartbeat lapses, retries it on the next worker, and the project is free again")
@pytest.mark.slow
def test_killed_worker_job_is_cleaned_and_the_next_one_runs(redis_url, start_worker, tmp_path):
    r = redis.Redis.from_url(redis_url)
    worker = start_worker(redis_url, SLOW_JOB_SECONDS=300)
    q = queue_for(redis_url)
    first = event(q, "4", start_training=True)

    def logs():
        """The workers' logs and what rq and the process table say (for a failure's message)."""
        import psutil
        from rq import Worker

        job = Job.fetch(first.job_id, connection=r)
        queue = Queue(QUEUE, connection=r)
        workers = [(w.name, w.pid, w.get_state(), w.get_current_job_id()) for w in Worker.all(queue=queue)]
        procs = [(p.pid, p.ppid(), p.status(), " ".join(p.cmdline())[:120]) for p in psutil.process_iter()
                 if "rq" in " ".join(p.cmdline()) or "jobs_for_tests" in " ".join(p.cmdline())]
        state = (f"decision {first}; queue {queue.job_ids}; intermediate {r.lrange(f'{queue.key}:intermediate', 0, -1)}; "
                 f"started {StartedJobRegistry(QUEUE, connection=r).get_job_ids()}; job {job.get_status()} on "
                 f"{job.worker_name}; workers {workers}; processes {procs}")
        return state + "\n" + "\n".join(f"--- {log.name}\n{log.read_text()}"
                                        for log in sorted(tmp_path.glob("worker-*.log")))

    # the job is running (its work horse has recorded the run) before the worker is killed; a slow
    # machine may take a while to fork it, so wait for the event, and fail here if it never comes
    try:
        wait_for("the first run to start", lambda: runs(redis_url), 120, 0.1)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{logs()}") from None
    horses = _descendants(worker.pid)  # the work horse running the job, found by its parent's pid
    worker.kill()  # SIGKILL mid-run: no cleanup code of the worker runs
    worker.wait()
    for pid in horses:
        os.kill(pid, signal.SIGKILL)
    assert event(q, "4", start_training=True).status == "coalesced"  # still looks alive to rq
    # a replacement worker comes up once the dead one's scheduler lock has lapsed (it holds it for 60 s)
    lock = RQScheduler.get_locking_key(QUEUE)
    wait_for("the dead worker's scheduler lock to lapse", lambda: not r.exists(lock), 120, 0.5)
    start_worker(redis_url, SLOW_JOB_SECONDS=0.1)
    # rq finds the job abandoned once its heartbeat lapses (job monitoring interval + 60 s) and
    # retries it; the retry's fresh export covers the START_TRAINING recorded meanwhile
    wait_idle(q, "4", timeout=120)
    job = Job.fetch(first.job_id, connection=r)
    latest = job.latest_result()
    seen = (f"job {job.get_status()}, {job.retries_left} retries left, latest result "
            f"{latest and (latest.type, latest.exc_string)}\n{logs()}")
    assert runs(redis_url) == [f"{first.job_id}|START_TRAINING"] * 2, seen
    assert job.get_status() == "finished", seen  # its retry finished
    assert event(q, "4", start_training=True).status == "enqueued"
    wait_idle(q, "4", timeout=60)  # that job ends before the worker is stopped


def test_webhook_endpoint_answers_fast_and_503_without_redis(start_backend, redis_url, tmp_path):
    server = start_backend(REDIS_URL=redis_url, TRAIN_QUEUE=QUEUE, RETRAIN_MIN_NEW_ANNOTATIONS=2)
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": 5, "title": "x"},
               "annotation": {"id": 1, "task": 3, "result": [], "was_cancelled": False,
                              "updated_at": "2026-11-27T10:00:00.000000Z"}}
    times = []
    for i, expected in ((1, "waiting"), (2, "enqueued"), (3, "coalesced")):
        payload["annotation"]["id"] = i
        t = time.perf_counter()
        r = httpx.post(f"{server.url}/webhook", json=payload)
        times.append(time.perf_counter() - t)
        assert r.json()["status"] == expected
    assert r.status_code == 200 and sorted(times)[1] < 0.1, times
    ignored = httpx.post(f"{server.url}/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 5}})
    assert ignored.status_code == 200 and ignored.json()["status"] == "ignored"
    bad = httpx.post(f"{server.url}/webhook", content=b"{", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert httpx.post(f"{server.url}/webhook", json={"project": {"id": 5}}).status_code == 400

    dead = start_backend(REDIS_URL="redis://127.0.0.1:1/0")
    r = httpx.post(f"{dead.url}/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
    assert r.status_code == 503 and "unavailable" in r.json()["error"]
    # predictions are still served without Redis
    schema = (REPO / "label_studio_config.xml").read_text()
    assert httpx.post(f"{dead.url}/setup", json={"project": "5.1", "schema": schema}).status_code == 200


def test_handle_webhook_records_annotation_times(redis_url):
    settings = Settings.from_env({"REDIS_URL": redis_url, "TRAIN_QUEUE": QUEUE, "RETRAIN_MIN_NEW_ANNOTATIONS": "5"})
    body, status = handle_webhook({"action": "ANNOTATION_UPDATED", "project": {"id": 8},
                                   "annotation": {"id": 3, "updated_at": "2026-11-27T10:00:00Z"}}, settings)
    assert status == 200 and body["status"] == "waiting" and "1 of 5" in body["detail"]
    body, _ = handle_webhook({"action": "ANNOTATIONS_DELETED", "project": {"id": 8},
                              "annotations": [{"id": 3}, {"id": 4}]}, settings)
    members = {m.decode() for m in redis.Redis.from_url(redis_url).smembers("toothseg:project:8:changed")}
    assert members == {"3@2026-11-27T10:00:00+00:00", "3@deleted", "4@deleted"}


def test_status_command_shows_queues_jobs_and_projects(redis_url, tmp_path):
    import subprocess
    import sys

    q = queue_for(redis_url)
    decision = event(q, "12", start_training=True)
    job = Job.fetch(decision.job_id, connection=q.redis)
    job.meta.update(stage="train", progress=0.25, detail="epoch 25/100")
    job.save_meta()
    env = {**__import__("os").environ, "REDIS_URL": redis_url, "TRAIN_QUEUE": QUEUE, "MODEL_DIR": str(tmp_path),
           "IDLE_QUEUE": "toothseg-idle-test", "IDLE_TRAINING_ROUNDS": "2"}
    idle = enqueue_idle_round(q.redis, Settings.from_env(env), "12", 1)
    out = subprocess.run([sys.executable, "-m", "training.ops.cli", "status"], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert f"queue {QUEUE}: 1 queued" in out.stdout
    assert "queue toothseg-idle-test: 1 queued" in out.stdout and f"{idle} queued" in out.stdout, out.stdout
    assert f"{decision.job_id} queued [train 25%] epoch 25/100" in out.stdout, out.stdout
    assert "project 12: current model - (0 stored)" in out.stdout and f"active job {decision.job_id}" in out.stdout
    down = subprocess.run([sys.executable, "-m", "training.ops.cli", "status"], cwd=REPO, capture_output=True, text=True,
                          env={**env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert down.returncode == 2 and down.stderr.count("\n") == 1 and "unavailable" in down.stderr


def test_lower_priority_nices_the_process_and_its_session_autogroup():
    import subprocess
    import sys

    code = ("import os; from backend.process import lower_priority; lower_priority(7); "
            "print(os.nice(0)); p = '/proc/self/autogroup'; "
            "print(open(p).read().split('nice')[-1].strip() if os.path.exists(p) else 'none')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, start_new_session=True)
    assert out.returncode == 0, out.stderr
    nice, autogroup = out.stdout.split()
    assert nice == "7" and autogroup in ("7", "none")  # "none": a kernel without autogroup scheduling


def test_a_stale_entry_is_released_atomically(redis_url):
    """Two events find the same finished job in `active`; the first releases it and enqueues a new
    job; the second's release of the old id must leave the new job in place (get-then-delete would not)."""
    r = redis.Redis.from_url(redis_url)
    first, second = queue_for(redis_url), queue_for(redis_url)
    r.set("toothseg:project:9:active", "retrain-9-finished")  # a job id rq no longer knows: stale
    assert first.active_job("9") is None
    assert event(first, "9", start_training=True).status == "enqueued"
    new = r.get("toothseg:project:9:active").decode()
    assert not second.release("9", "retrain-9-finished")  # the second event's late release of the stale id
    assert r.get("toothseg:project:9:active").decode() == new
    assert second.active_job("9") == new and event(second, "9", start_training=True).status == "coalesced"


def test_an_entry_being_enqueued_is_not_taken_for_stale(redis_url):
    """An event has set `active` and not yet enqueued its job (the gap between the two): another
    event must not release the entry and enqueue a second job; an entry that stays unknown to rq
    past the grace (its event died in the gap) is released."""
    from backend.retrain_queue import ENQUEUE_GRACE_S, new_job_id

    r = redis.Redis.from_url(redis_url)
    q = queue_for(redis_url)
    fresh = new_job_id("21")
    r.set("toothseg:project:21:active", fresh)
    assert q.active_job("21") == fresh and event(q, "21", start_training=True).status == "coalesced"
    old = fresh.rsplit("-", 2)
    old[1] = f"{int(old[1], 16) - int(ENQUEUE_GRACE_S * 1000) - 1000:x}"
    r.set("toothseg:project:21:active", "-".join(old))
    assert q.active_job("21") is None and event(q, "21", start_training=True).status == "enqueued"


@pytest.mark.slow  # three `toothseg train --now` processes, the last retrying an unreachable export: about 25 s
def test_train_now_takes_the_project_lock(redis_url, tmp_path):
    import sys

    q = queue_for(redis_url)
    busy = event(q, "11", start_training=True)  # a queued retrain holds project 11
    env = {**os.environ, "REDIS_URL": redis_url, "TRAIN_QUEUE": QUEUE, "MODEL_DIR": str(tmp_path),
           "LABEL_STUDIO_URL": "http://127.0.0.1:1"}
    out = subprocess.run([sys.executable, "-m", "training.ops.cli", "train", "--project", "11", "--now"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"being retrained already (job {busy.job_id})" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1
    # an idle training round (training.idle) holds project 13: the message says what stops it
    idle = enqueue_idle_round(q.redis, Settings.from_env({**env, "IDLE_TRAINING_ROUNDS": "1"}), "13", 1)
    assert q.claim("13", idle) is None
    out = subprocess.run([sys.executable, "-m", "training.ops.cli", "train", "--project", "13", "--now"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"idle training round (job {idle})" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1
    # free project: --now runs (here it fails at the export: Label Studio is down) and releases the lock
    out = subprocess.run([sys.executable, "-m", "training.ops.cli", "train", "--project", "12", "--now"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unreachable" in out.stderr, out.stderr
    assert q.active_job("12") is None
