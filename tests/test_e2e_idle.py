"""Idle training on the native stack (real Label Studio, Redis, rq worker, training): after the first
model the worker trains it again on the same annotations (IDLE_TRAINING_ROUNDS), *Start training*
pressed during such a round stops it without storing anything and retrains at once, and the
retrain's own chain then runs its round."""
import redis
import pytest
from rq.job import Job

from backend.queues import project_redis_key
from backend.registry import Registry
from conftest import import_seeds, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "e2e-idle-token-0123456789"


def test_idle_round_after_the_first_model_and_start_training_during_one(make_stack):
    from label_studio_sdk import LabelStudio

    # GATE_TOLERANCE 1: every warm candidate is promoted (the gate itself: tests/test_training.py)
    stack = make_stack(seeds=6, pool=2, token=TOKEN, GATE_TOLERANCE=1.0, IDLE_TRAINING_ROUNDS=1,
                       PREANNOTATE_AFTER_PROMOTION="false")
    try:
        boot = stack.up()
        client = LabelStudio(base_url=stack.label_studio_url, api_key=TOKEN)
        project = boot["project"]
        import_seeds(client, project, stack)
        registry = Registry(stack.data / "models")
        conn = redis.Redis.from_url(stack.redis_url)
        ml = client.ml.list(project=project)[0]

        def job_of(version: str) -> str:
            return registry.get(project, version).meta["job_id"]

        def running_round() -> str | None:  # the round's job runs and holds the project's retrain lock
            raw = conn.get(project_redis_key(project, "idle"))
            return raw.decode() if raw and conn.get(project_redis_key(project, "active")) == raw else None

        client.ml.train(id=ml.id)
        v1 = wait_for("the first model", lambda: registry.current_version(project), 300, 1)
        assert job_of(v1).startswith("retrain-")

        # round 1 starts on its own once the worker is idle; Start training stops it
        stopped = wait_for("idle round 1 to run", running_round, 120, 0.2)
        client.ml.train(id=ml.id)
        wait_for("the round to stop", lambda: Job.fetch(stopped, connection=conn).get_status() == "finished", 60, 0.5)
        assert Job.fetch(stopped, connection=conn).return_value()["status"] == "interrupted"
        v2 = wait_for("the retrain", lambda: (registry.current_version(project) or v1) != v1 and
                      registry.current_version(project), 300, 1)
        assert job_of(v2).startswith("retrain-") and registry.get(project, v2).meta["parent"] == v1

        # the retrain queued round 1 again: the same annotations, warm-started from v2
        v3 = wait_for("the idle round's model", lambda: (registry.current_version(project) or v2) != v2 and
                      registry.current_version(project), 300, 1)
        meta = registry.get(project, v3).meta
        assert meta["job_id"].startswith(f"idle-{project}-1-") and meta["parent"] == v2
        assert meta["manifest_hash"] == registry.get(project, v2).meta["manifest_hash"]
        assert stopped not in {v.meta.get("job_id") for v in registry.versions(project)}  # it stored nothing
        wait_for("the chain to end", lambda: conn.get(project_redis_key(project, "idle")) is None, 60, 0.5)
        assert [v.version for v in registry.versions(project)] == [v1, v2, v3]  # IDLE_TRAINING_ROUNDS=1
    except BaseException:
        print(stack.log_tails(80))
        raise
