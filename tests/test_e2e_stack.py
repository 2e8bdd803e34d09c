"""The whole loop on the native stack: redis-server, Label Studio 1.23.2 (its own venv, fresh data
dir, 127.0.0.1), the backend under gunicorn, a separate `rq worker`, and the bootstrap."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from backend.formats import find_target, result_to_masks
from backend.label_config import render_label_config
from backend.queues import project_redis_key
from backend.registry import Registry
from conftest import REPO, gt_result, import_seeds, predict_seconds, wait_for
from training.ops.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "e2e-token-0123456789"
LONG = {"timeout_in_seconds": 900}
LS_PREDICT_TIMEOUT_S = 30  # retrieve_tasks_predictions answers when every /predict is done


@pytest.fixture
def stack(make_stack):
    # pre-annotation after promotion off: here Label Studio itself asks for every prediction.
    # Label Studio waits ML_TIMEOUT_PREDICT s for one /predict (its own setting, default 100). With the
    # tiny SAM (about 2 s per image here) 50 tasks in one request would take about 100 s: a timeout of
    # 30 s puts this test where a user with SAM ViT-B (9.6 s per image, bench/results/throughput.md)
    # is at Label Studio's default after 11 tasks.
    # GATE_TOLERANCE 1: every candidate is promoted, so the second round always redeploys (the gate's
    # rejection of a worse model is test_training.py's test_worse_candidate_is_not_promoted)
    return make_stack(seeds=20, pool=30, token=TOKEN, PREANNOTATE_AFTER_PROMOTION="false",
                      ML_TIMEOUT_PREDICT=LS_PREDICT_TIMEOUT_S, GATE_TOLERANCE=1.0)


def test_the_loop_end_to_end(stack, request):
    from label_studio_sdk import LabelStudio

    started = time.monotonic()
    try:
        boot = stack.up()
        client = LabelStudio(base_url=stack.label_studio_url, api_key=TOKEN)
        project = boot["project"]
        assert boot["tasks"] == 30 and "ml_backend" in boot["created"]
        # bootstrap is idempotent: a second run creates nothing
        again = Stack(data=stack.data, images=stack.images, env=stack.env, ls_venv=stack.ls_venv)
        out = subprocess.run([str(Path(sys.executable).parent / "toothseg"), "bootstrap", "--json"],
                             env=again.bootstrap_env(), capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0 and json.loads(out.stdout.splitlines()[-1])["created"] == []

        # seed: 20 images with ground-truth annotations, imported (served through a second storage)
        import_seeds(client, project, stack)
        registry = Registry(stack.data / "models")
        assert registry.current_version(project) is None

        # 1. training triggered through Label Studio
        ml = client.ml.list(project=project)[0]
        client.ml.train(id=ml.id)
        v1 = wait_for("the first promoted model", lambda: registry.current_version(project), 600, 2)
        assert registry.get(project, v1).meta["counts"]["train"] + registry.get(project, v1).meta["counts"]["val"] == 20
        wait_for("Label Studio's ML backend to show the new version",
                 lambda: client.ml.get(id=ml.id).model_version == v1, 60, 2)

        # 2. retrieve_tasks_predictions over all 50 tasks in one action: it arrives as ONE /predict of
        # 50 tasks, which would take longer than Label Studio waits; answered with Label Studio's
        # one-at-a-time fallback (PREDICT_BATCH_LIMIT), so every task gets its prediction
        tasks = {t.data["image"].rsplit("/", 1)[-1].split("?")[0]: t for t in client.tasks.list(project=project)}
        pool = {n: t for n, t in tasks.items() if n.startswith("pool_")}
        assert len(pool) == 30 and len(tasks) == 50, list(tasks)[:5]
        client.actions.create(id="retrieve_tasks_predictions", project=project,
                              selected_items={"all": True, "excluded": []}, request_options=LONG)
        preds = [p for p in client.predictions.list(project=project) if p.model_version == v1]
        by_task = {p.task: p for p in preds}
        assert len(by_task) == 50 and len(preds) == 50
        labels = {r["value"]["brushlabels"][0] for p in preds for r in p.result}
        assert labels and labels <= {str(v) for v in find_target(render_label_config()).fdi_to_value}
        seconds = predict_seconds(stack)
        assert len(seconds) == 50 and sum(seconds) > LS_PREDICT_TIMEOUT_S, \
            f"{sum(seconds):.0f} s of predictions: one 50-task request would exceed Label Studio's " \
            f"{LS_PREDICT_TIMEOUT_S} s"

        # 3. the oracle accepts or corrects 6 predicted tasks -> webhooks coalesce into one retrain
        corrected = sorted(pool)[:6]
        for name in corrected:
            client.annotations.create(id=pool[name].id, result=gt_result(stack.samples[name]))
        v2 = wait_for("the second training round", lambda: len(registry.versions(project)) >= 2 and
                      registry.versions(project)[-1].version, 600, 2)
        # a follow-up retrain would hold the project's slot until it ends: wait for the slot to be free
        queue = redis.Redis.from_url(stack.redis_url)
        wait_for("the project's retrain slot to be released", lambda: not queue.exists(
            project_redis_key(project, "active")), 900, 2)
        assert len(registry.versions(project)) == 2, "6 annotation webhooks must coalesce into one retrain"
        last = registry.history(project)[-1]
        assert last["event"] == "promoted" and registry.current_version(project) == v2 != v1, last
        # the redeployed model answers Label Studio: the remaining pool gets v2's predictions
        wait_for("Label Studio's ML backend to show the second version",
                 lambda: client.ml.get(id=ml.id).model_version == v2, 60, 2)
        remaining = [pool[n].id for n in sorted(pool)[6:]]
        client.actions.create(id="retrieve_tasks_predictions", project=project,
                              selected_items={"all": False, "included": remaining}, request_options=LONG)
        assert len({p.task for p in client.predictions.list(project=project)
                    if p.model_version == v2}) == len(remaining)

        # 4. nothing annotated is lost
        export = client.projects.exports.as_json(project)
        annotations = [a for t in export for a in t.get("annotations") or []]
        assert len(annotations) == 20 + len(corrected)
        for t in export:
            name = t["data"]["image"].rsplit("/", 1)[-1]
            for a in t.get("annotations") or []:
                masks = result_to_masks(a["result"])
                assert set(masks) == set(stack.samples[name].masks())
        elapsed = time.monotonic() - started
        print(f"\nend-to-end loop: {elapsed:.0f} s; versions {[v.version for v in registry.versions(project)]}")
    except BaseException:
        print(stack.log_tails(60))
        raise
    finally:
        from training.ops.stack import _alive, _descendants

        pids = [p for pid in stack.pids().values() for p in (pid, *_descendants(pid))]
        stack.down()
        assert pids and not [p for p in pids if _alive(p)], "every service and its children are stopped"
