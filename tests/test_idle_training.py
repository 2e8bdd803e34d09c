"""Idle training (`training.idle`): rounds on the same annotations while nothing else waits, run by
a real `rq worker` on real Redis (the round's work a stand-in, `jobs_for_tests.slow_idle_round`),
and a real round's training stopped by an interrupt, storing nothing."""
import json
import time
from dataclasses import replace

import pytest
import redis
from rq import Queue
from rq.job import Job

from backend.queues import project_redis_key
from backend.registry import Registry
from backend.retrain_queue import JOB_FUNCTION as RETRAIN_FUNCTION, RetrainQueue
from backend.settings import Settings
from conftest import QUEUE, register_model, wait_for, worker_env
from training.idle import enqueue_idle_round

IDLE = "toothseg-idle-test"
OTHER = "toothseg-preannotate-test"
STAND_IN = "jobs_for_tests.slow_idle_round"


def _setup(redis_url: str, **extra):
    env = worker_env(redis_url, IDLE_QUEUE=IDLE, PREANNOTATE_QUEUE=OTHER, IDLE_TRAINING_ROUNDS=3, **extra)
    return redis.Redis.from_url(redis_url), Settings.from_env(env), env


def _ends(conn) -> list[dict]:
    return [json.loads(x) for x in conn.lrange("test:idle-ends", 0, -1)]


def test_idle_rounds_chain_while_promoted_up_to_the_setting_and_end_at_the_first_rejection(redis_url, start_worker):
    conn, settings, env = _setup(redis_url, SLOW_JOB_SECONDS=0.3)
    stale = enqueue_idle_round(conn, settings, "5", 1, STAND_IN)
    enqueue_idle_round(conn, settings, "5", 1, STAND_IN)  # a newer chain (a retrain ended again)
    assert enqueue_idle_round(conn, settings, "5", 4, STAND_IN) is None  # IDLE_TRAINING_ROUNDS=3
    start_worker(redis_url, queues=(IDLE,), **{k: env[k] for k in ("IDLE_QUEUE", "PREANNOTATE_QUEUE",
                                                                   "IDLE_TRAINING_ROUNDS", "SLOW_JOB_SECONDS")})
    ends = wait_for("three rounds", lambda: (e := _ends(conn)) and e[-1].get("round") == 3 and e, 60, 0.2)
    assert ends[0] == {"status": "superseded", "round": 1}
    assert [e["status"] for e in ends[1:]] == ["promoted"] * 3 and [e["round"] for e in ends[1:]] == [1, 2, 3]
    assert ends[-1]["next"] is None  # round 3 of 3: no fourth
    assert Job.fetch(stale, connection=conn).get_status() == "finished"
    assert conn.get(project_redis_key("5", "active")) is None and conn.get(project_redis_key("5", "idle")) is None

    conn.delete("test:idle-ends")
    conn.set("test:idle-status", "rejected")  # the round's model was not better: the chain ends
    enqueue_idle_round(conn, settings, "5", 1, STAND_IN)
    ends = wait_for("a rejected round", lambda: _ends(conn), 30, 0.2)
    assert ends == [{"status": "rejected", "round": 1}]
    assert Queue(IDLE, connection=conn).count == 0 and conn.get(project_redis_key("5", "idle")) is None


def test_a_retrain_request_stops_a_running_round_at_once_and_the_retrain_takes_the_project(redis_url, start_worker):
    conn, settings, env = _setup(redis_url, SLOW_JOB_SECONDS=120)
    enqueue_idle_round(conn, settings, "5", 2, STAND_IN)
    start_worker(redis_url, queues=(IDLE,), **{k: env[k] for k in ("IDLE_QUEUE", "PREANNOTATE_QUEUE",
                                                                   "IDLE_TRAINING_ROUNDS", "SLOW_JOB_SECONDS")})
    wait_for("the round to run", lambda: conn.llen("test:order"), 30, 0.1)
    queue = RetrainQueue.from_settings(conn, settings)
    queue.record_training_request("5")
    asked = time.monotonic()
    decision = queue.maybe_enqueue("5")
    assert decision.status == "coalesced" and decision.job_id.startswith("idle-5-2-")  # the round holds the lock
    ends = wait_for("the round to stop", lambda: _ends(conn), 20, 0.1)
    assert time.monotonic() - asked < 10
    assert ends == [{"status": "interrupted", "stage": "training", "round": 2}]  # no next round: the retrain's
    follow = conn.get(project_redis_key("5", "active")).decode()
    job = Job.fetch(follow, connection=conn)
    assert job.origin == QUEUE and job.func_name == RETRAIN_FUNCTION and job.get_status() == "queued"
    assert Queue(IDLE, connection=conn).count == 0


@pytest.mark.parametrize("waiting_on", [QUEUE, OTHER])  # another project's retrain, a pre-annotation pass
def test_a_waiting_job_goes_first_and_the_stopped_round_runs_again_after_it(redis_url, start_worker, waiting_on):
    conn, settings, env = _setup(redis_url, SLOW_JOB_SECONDS=120)
    enqueue_idle_round(conn, settings, "5", 2, STAND_IN)
    start_worker(redis_url, queues=(QUEUE, OTHER, IDLE), **{k: env[k] for k in (
        "IDLE_QUEUE", "PREANNOTATE_QUEUE", "IDLE_TRAINING_ROUNDS", "SLOW_JOB_SECONDS")})
    wait_for("the round to run", lambda: conn.llen("test:order"), 30, 0.1)
    Queue(waiting_on, connection=conn).enqueue("jobs_for_tests.other_job", "the other job")
    order = wait_for("the round to run again", lambda: (o := conn.lrange("test:order", 0, -1)) and len(o) >= 3 and o,
                     30, 0.1)
    assert [x.decode() for x in order] == ["idle 5 2", "the other job", "idle 5 2"]
    first = _ends(conn)[0]
    assert first["status"] == "interrupted" and first["round"] == 2 and first["next"].startswith("idle-5-2-")
    assert conn.get(project_redis_key("5", "active")).decode() == first["next"]  # the round again holds it


def _tiny_training(tmp_path, **kw):
    from training.data.synth import generate
    from training.dataset import write_yolo_dataset
    from training.train import TrainConfig, train_model

    items = [generate(2100 + i, (320, 160)).item(f"s{i}") for i in range(14)]
    data = write_yolo_dataset(items[:12], items[12:], tmp_path / "ds")
    config = TrainConfig(steps=200, batch=2, imgsz=160, warmup_steps=0, time_budget=0, val_steps=1000,
                         refiner_steps=0)
    return train_model(data, tmp_path / "run", config, 0.4, 0.2, **kw)


def test_train_model_stops_between_batches_when_interrupted(tmp_path):
    result = _tiny_training(tmp_path, interrupt=lambda: True)  # 6 batches an epoch: stopped in the first
    assert result.stopped_by == "interrupted" and result.epochs_run == 1 and result.epochs_planned == 34
    assert result.weights.exists()


def test_an_interrupted_round_stops_its_training_and_stores_nothing(tmp_path):
    from training.jobs import Progress, run_round
    from training.simulate import SimProject, preset

    sim = SimProject(preset("smoke"), 0, tmp_path, log=lambda line: None)
    current = register_model(sim.settings.model_dir, "101", _tiny_training(tmp_path, interrupt=lambda: True).weights)
    config = replace(sim.config_for({}), steps=100_000, warm_steps=100_000, time_budget=0)  # an hour, uninterrupted
    calls = []

    def interrupt() -> bool:  # asked after the download, then between batches about once a second
        calls.append(time.monotonic())
        return len(calls) >= 3

    started = time.monotonic()
    summary = run_round("101", sim.settings, sim.exported(sim.keys["lab"]), "idle-test", config, Progress("101", 0),
                        interrupt=interrupt)
    assert summary["status"] == "interrupted" and summary["stage"] == "training"
    assert time.monotonic() - started < 120 and len(calls) == 3
    registry = Registry(sim.settings.model_dir)
    assert [v.version for v in registry.versions("101")] == [current] and registry.current_version("101") == current
    assert not (sim.settings.model_dir / ".work" / "101" / "idle-test").exists()


def test_a_round_whose_project_is_being_retrained_is_skipped_and_an_event_during_one_gets_its_retrain(redis_url):
    from training.idle import IdleRound

    conn, settings, _ = _setup(redis_url)
    queue = RetrainQueue.from_settings(conn, settings)
    queue.record_training_request("5")
    retrain = queue.maybe_enqueue("5")  # queued (no worker here)
    round_id = enqueue_idle_round(conn, settings, "5", 1, STAND_IN)
    round_job = Job.fetch(round_id, connection=conn)
    ran = []
    summary = IdleRound(conn, settings).run("5", 1, round_job, lambda interrupt: ran.append(1) or {"status": "x"})
    assert summary["status"] == "skipped" and retrain.job_id in summary["reason"] and not ran
    assert conn.get(project_redis_key("5", "idle")) is None  # the retrain queues round 1 when it ends
    assert conn.get(project_redis_key("5", "active")).decode() == retrain.job_id

    # a round that runs: Start training after its last check (folded into it) gets its retrain at its end
    Job.fetch(retrain.job_id, connection=conn).cancel()
    queue.release("5", retrain.job_id)
    conn.delete(project_redis_key("5", "requested"))
    round_job = Job.fetch(enqueue_idle_round(conn, settings, "5", 1, STAND_IN), connection=conn)

    def work(interrupt):
        queue.record_training_request("5")  # arrives as the round ends, after its last check
        return {"status": "rejected"}

    assert IdleRound(conn, settings).run("5", 1, round_job, work)["status"] == "rejected"
    follow = conn.get(project_redis_key("5", "active")).decode()
    assert follow != round_job.id and Job.fetch(follow, connection=conn).func_name == RETRAIN_FUNCTION
