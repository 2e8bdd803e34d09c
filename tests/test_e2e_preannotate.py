"""Background pre-annotation on the native stack with a real Label Studio: after a promotion every
unannotated task gets a prediction of the new version without any /predict call; the next
promotion replaces them; a worker killed mid-pass is resumed with no duplicates."""
import os
import signal
import subprocess
from collections import Counter

import pytest
import redis
from rq.scheduler import RQScheduler

import browser
from backend.registry import Registry
from conftest import REPO, import_seeds, predict_seconds, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "e2e-preannotate-token-42"


def toothseg_predictions(client, project, registry):
    ours = {v.version for v in registry.versions(project)}
    return [p for p in client.predictions.list(project=project) if p.model_version in ours]


@pytest.mark.scenario("A worker SIGKILLed during a background pre-annotation pass",
                      "the pass resumes on a new worker; every unannotated task ends with exactly one prediction of the version")
def test_background_preannotation(make_stack):
    from label_studio_sdk import LabelStudio

    stack = make_stack(seeds=12, pool=24, token=TOKEN, GATE_TOLERANCE=1.0, PREANNOTATE_CHUNK=8)
    try:
        boot = stack.up()
        client = LabelStudio(base_url=stack.label_studio_url, api_key=TOKEN)
        project = boot["project"]
        import_seeds(client, project, stack)
        registry = Registry(stack.data / "models")
        pool_ids = sorted(t.id for t in client.tasks.list(project=project) if not t.total_annotations)
        assert len(pool_ids) == 24
        ml = client.ml.list(project=project)[0]

        # promotion 1 -> every unannotated task is pre-annotated in the background
        client.ml.train(id=ml.id)
        v1 = wait_for("the first model", lambda: registry.current_version(project), 300, 2)

        def covered(version):
            preds = toothseg_predictions(client, project, registry)
            return {p.task for p in preds if p.model_version == version} >= set(pool_ids)

        wait_for("the background pass of v1", lambda: covered(v1), 300, 3)
        preds = toothseg_predictions(client, project, registry)
        assert Counter(p.task for p in preds) == Counter(pool_ids), "one prediction per task"
        assert predict_seconds(stack) == [], "no /predict call was needed"
        assert any(p.result for p in preds)
        # the annotator's view of one of them in a real browser
        shown = max(preds, key=lambda p: len(p.result))
        view = browser.open_task(stack.label_studio_url, stack.setting("LABEL_STUDIO_USERNAME"),
                                 stack.setting("LABEL_STUDIO_PASSWORD"), project, shown.task,
                                 REPO / "bench" / "results" / "editor-native.png")
        browser.assert_editor_shows(view, shown.result)
        browser.assert_dental_chart(view)

        # promotion 2 -> the new version's predictions replace the old ones
        client.ml.train(id=ml.id)
        v2 = wait_for("the second model", lambda: (registry.current_version(project) or v1) != v1 and
                      registry.current_version(project), 300, 2)
        wait_for("the background pass of v2", lambda: covered(v2) and not any(
            p.model_version == v1 for p in toothseg_predictions(client, project, registry)), 300, 3)
        preds = toothseg_predictions(client, project, registry)
        assert Counter(p.task for p in preds) == Counter(pool_ids)
        assert {p.model_version for p in preds} == {v2}

        # a worker killed mid-pass (promotion 3) resumes and finishes without duplicates
        client.ml.train(id=ml.id)
        v3 = wait_for("the third model", lambda: (registry.current_version(project) or v2) != v2 and
                      registry.current_version(project), 300, 2)
        wait_for("the pass of v3 to be under way", lambda: 2 <= sum(
            p.model_version == v3 for p in toothseg_predictions(client, project, registry)) < 12, 120, 0.5)
        os.killpg(stack.pids()["worker"], signal.SIGKILL)
        done = [p for p in toothseg_predictions(client, project, registry) if p.model_version == v3]
        assert len(done) < len(pool_ids)
        # a kill between saving a task's new prediction and deleting its old one leaves both: make one such task
        client.predictions.create(task=done[0].task, result=done[0].result, score=0.5, model_version=v2)
        # the replacement worker comes up once the dead one's scheduler locks have lapsed (60 s)
        conn = redis.Redis.from_url(stack.redis_url)
        locks = [RQScheduler.get_locking_key(q) for q in (stack.setting("TRAIN_QUEUE"), stack.setting("PREANNOTATE_QUEUE"))]
        wait_for("the dead worker's scheduler locks to lapse", lambda: not conn.exists(*locks), 120, 0.5)
        argv, env = stack.services()["worker"]
        log = open(stack.data / "logs" / "worker-2.log", "ab")
        replacement = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            # rq finds the job abandoned and retries it; the retry skips what was saved and finishes the
            # half-replaced task
            wait_for("the resumed pass of v3", lambda: covered(v3) and not any(
                p.model_version != v3 for p in toothseg_predictions(client, project, registry)), 300, 3)
            preds = toothseg_predictions(client, project, registry)
            assert Counter(p.task for p in preds) == Counter(pool_ids), "no task predicted twice"
            assert {p.model_version for p in preds} == {v3}
        finally:
            os.killpg(replacement.pid, signal.SIGTERM)
            replacement.wait(30)
        # nothing annotated is lost
        export = client.projects.exports.as_json(project)
        assert sum(len(t.get("annotations") or []) for t in export) == 12
    except BaseException:
        print(stack.log_tails(60))
        raise
