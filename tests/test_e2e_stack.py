"""The whole loop on the native stack: redis-server, Label Studio 1.23.2 (its own venv, fresh data
dir, 127.0.0.1), the backend under gunicorn, a separate `rq worker`, and the bootstrap."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from backend.formats import find_target, mask_to_regions, result_to_masks
from backend.label_config import render_label_config
from backend.registry import Registry
from conftest import REPO, free_port
from training.stack import Stack
from training.synth import generate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LS_VENV = Path(os.environ.get("TOOTHSEG_LS_VENV", REPO / ".venv-ls"))
SIZE = (640, 320)
TOKEN = "e2e-token-0123456789"
LONG = {"timeout_in_seconds": 600}  # retrieve_tasks_predictions answers when every /predict is done


def wait_for(what, predicate, timeout, interval=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def gt_result(sample):
    target = find_target(render_label_config())
    out = []
    for label, mask in sample.masks().items():
        out += mask_to_regions(mask, target.value_for(label), target)
    return out


@pytest.fixture
def stack(tmp_path, trained_weights, sam_checkpoint):
    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.skip(f"no Label Studio venv at {LS_VENV} (scripts/setup creates it)")
    files = tmp_path / "files"
    images, seed = files / "images", files / "seed"
    images.mkdir(parents=True)
    seed.mkdir()
    samples = {}
    for i in range(50):
        sample = generate(9000 + i, SIZE)
        name = f"{'seed' if i < 20 else 'pool'}_{i:02d}.png"
        cv2.imwrite(str((seed if i < 20 else images) / name), sample.image)
        samples[name] = sample
    env = {
        "LABEL_STUDIO_PORT": free_port(), "BACKEND_PORT": free_port(), "REDIS_PORT": free_port(),
        "LABEL_STUDIO_USER_TOKEN": TOKEN, "YOLO_WEIGHTS": trained_weights, "SAM_CHECKPOINT": sam_checkpoint,
        "SAM_MODEL_TYPE": "vit_tiny", "RETRAIN_MIN_NEW_ANNOTATIONS": 5, "TRAIN_AFTER_ANNOTATIONS": 0,
        "TRAIN_EPOCHS": 6, "TRAIN_IMGSZ": 320, "TRAIN_BATCH": 4, "TRAIN_LR0": 0.01, "TRAIN_MOSAIC": 0,
        "TRAIN_WARMUP_EPOCHS": 0, "SCORE_THRESHOLD": 0.1, "YOLO_VERBOSE": "False",
    }
    s = Stack(data=tmp_path / "stack", images=images, env={k: str(v) for k, v in env.items()}, ls_venv=LS_VENV)
    s.samples = samples
    s.seed_dir = seed
    yield s
    s.down()


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
        client.import_storage.local.create(project=project, path=str(stack.seed_dir), use_blob_urls=True, title="seed")
        seeds = sorted(n for n in stack.samples if n.startswith("seed"))
        client.projects.import_tasks(id=project, request=[
            {"data": {"image": f"/data/local-files/?d=seed/{n}"},
             "annotations": [{"result": gt_result(stack.samples[n]), "ground_truth": True}]} for n in seeds])
        registry = Registry(stack.data / "models")
        assert registry.current_version(project) is None

        # 1. training triggered through Label Studio
        ml = client.ml.list(project=project)[0]
        client.ml.train(id=ml.id)
        v1 = wait_for("the first promoted model", lambda: registry.current_version(project), 300, 2)
        assert registry.get(project, v1).meta["counts"]["train"] + registry.get(project, v1).meta["counts"]["val"] == 20
        wait_for("Label Studio's ML backend to show the new version",
                 lambda: client.ml.get(id=ml.id).model_version == v1, 60, 2)

        # 2. predictions for the unlabeled tasks, through retrieve_tasks_predictions
        tasks = {t.data["image"].rsplit("/", 1)[-1].split("?")[0]: t for t in client.tasks.list(project=project)}
        pool = {n: t for n, t in tasks.items() if n.startswith("pool_")}
        assert len(pool) == 30, list(tasks)[:5]
        client.actions.create(id="retrieve_tasks_predictions", project=project,
                              selected_items={"all": False, "included": [t.id for t in pool.values()]},
                              request_options=LONG)
        preds = wait_for("predictions", lambda: [p for p in client.predictions.list(project=project)
                                                  if p.model_version == v1] or None, 120, 2)
        by_task = {p.task: p for p in preds}
        assert len(by_task) == 30
        labels = {r["value"]["brushlabels"][0] for p in preds for r in p.result}
        assert labels and labels <= {str(v) for v in find_target(render_label_config()).fdi_to_value}

        # 3. the oracle accepts or corrects 6 predicted tasks -> webhooks coalesce into one retrain
        corrected = sorted(pool)[:6]
        for name in corrected:
            client.annotations.create(id=pool[name].id, result=gt_result(stack.samples[name]))
        v2 = wait_for("the second training round", lambda: len(registry.versions(project)) >= 2 and
                      registry.versions(project)[-1].version, 300, 2)
        time.sleep(3)
        assert len(registry.versions(project)) == 2, "6 annotation webhooks must coalesce into one retrain"
        last = registry.history(project)[-1]
        if last["event"] == "promoted":
            assert registry.current_version(project) == v2
            remaining = [pool[n].id for n in sorted(pool)[6:]]
            client.actions.create(id="retrieve_tasks_predictions", project=project,
                                  selected_items={"all": False, "included": remaining}, request_options=LONG)
            wait_for("predictions of the second version", lambda: len(
                {p.task for p in client.predictions.list(project=project) if p.model_version == v2}) == len(remaining),
                120, 2)
        else:
            assert last["event"] == "rejected" and "worse than current" in last["reason"]
            assert registry.current_version(project) == v1

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
        pids = stack.pids()
        stack.down()
        from training.stack import _alive

        assert not any(_alive(pid) for pid in pids.values()), "every service is stopped"
