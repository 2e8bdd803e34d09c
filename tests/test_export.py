"""Export conversion on an export recorded from a real Label Studio 1.23.2 server
(tests/data/record_ls_export.py wrote tests/data/ls_export_1.23.2.json), and the annotation keys of
a live server's webhook and export."""
import json
from pathlib import Path

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest
import redis

from backend.formats import result_to_masks
from backend.label_config import render_label_config
from backend.images import ImageLoader
from backend.retrain_queue import annotation_key
from backend.settings import Settings
from backend.webhooks import handle_webhook
from conftest import LS_TOKEN, QUEUE, SYNTH_SIZE, gt_result, wait_for
from export_shapes import H, W, expected_brush_masks
from training.data.synth import generate
from training.export import annotated_tasks, choose_annotation, export_annotation_keys, export_project, \
    load_labeled_images, manifest_for

EXPORT = json.loads((Path(__file__).parent / "data" / "ls_export_1.23.2.json").read_text())


def test_one_annotation_per_task_ground_truth_first_then_latest_cancelled_skipped():
    annotated, unlabeled = annotated_tasks(EXPORT)
    assert unlabeled == []
    chosen = {t.task_id: t.annotation_id for t in annotated}
    assert chosen == {1: 1, 2: 2, 3: 4}  # task 2: the later annotation was cancelled; task 3: ground truth wins
    assert annotated[2].ground_truth and not annotated[1].ground_truth
    assert choose_annotation([{"id": 9, "was_cancelled": True}]) is None


def test_brush_regions_decode_to_one_mask_per_tooth():
    task = next(t for t in EXPORT if t["id"] == 1)
    masks = result_to_masks(task["annotations"][0]["result"])
    assert set(masks) == {"11", "21"}  # "Caries" is not a tooth
    for label, mask in expected_brush_masks().items():
        assert np.array_equal(masks[label], mask), label


def test_polygon_regions_decode_at_the_original_size():
    task = next(t for t in EXPORT if t["id"] == 2)
    masks = result_to_masks(task["annotations"][0]["result"])
    assert set(masks) == {"11", "21"} and masks["11"].shape == (H, W)
    ys, xs = np.nonzero(masks["11"])  # 10-20 % of 200 px wide, 20-60 % of 100 px high
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20, 40, 20, 60)
    # tooth 21 in two polygon parts: one mask with two connected components
    n, _ = cv2.connectedComponents(masks["21"].astype(np.uint8))
    assert n - 1 == 2


def test_images_are_downloaded_and_mismatched_sizes_skipped(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        size = (H, W) if i != 1 else (H * 2, W * 2)  # x1.png is not the size its regions were drawn on
        cv2.imwrite(str(images / f"x{i}.png"), np.zeros(size, np.uint8))
    annotated, _ = annotated_tasks(EXPORT)
    loader = ImageLoader(Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path)}))
    got, skipped = load_labeled_images(annotated, loader, "image")
    assert [g.name for g in got] == ["task_1", "task_3"]
    assert len(skipped) == 1 and "task 2" in skipped[0] and "200x100 image, the image is 400x200" in skipped[0]
    assert set(got[0].masks) == {"11", "21"} and got[0].pixels().shape == (H, W)


def test_manifest_records_what_was_trained_on():
    annotated, _ = annotated_tasks(EXPORT)
    m1 = manifest_for("7", annotated[:2], annotated[2:])
    m2 = manifest_for("7", annotated[:2], annotated[2:])
    assert m1["hash"] == m2["hash"] and m1["counts"] == {"train": 2, "val": 1, "pseudo": 0}
    assert m1["tasks"][0] == {"task_id": 1, "annotation_id": 1, "updated_at": annotated[0].updated_at,
                              "ground_truth": False, "split": "train"}
    assert manifest_for("7", annotated[:1], annotated[1:])["hash"] != m1["hash"]


def test_annotation_key_normalises_the_time():
    assert annotation_key(7, "2026-11-27T10:00:00.123456Z") == annotation_key("7", "2026-11-27T11:00:00.123456+01:00")
    assert annotation_key(7, "2026-11-27T10:00:00Z") != annotation_key(7, "2026-11-27T10:00:01Z")
    assert annotation_key(1, None) == "1@deleted"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_real_webhook_and_the_export_give_the_same_annotation_key(label_studio, ls_client, redis_url):
    """Label Studio's own ANNOTATION_UPDATED payload, recorded by `backend.webhooks`, names the key
    that the export of the same annotation gives (`training.export.export_annotation_keys`): that is
    how a retrain knows an event that arrived during its export is already trained on."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        project = ls_client.projects.create(title="webhook keys", label_config=render_label_config())
        ls_client.webhooks.create(url=f"http://127.0.0.1:{server.server_port}/webhook", project=project.id,
                                  send_payload=True, send_for_all_actions=False,
                                  actions=["ANNOTATION_CREATED", "ANNOTATION_UPDATED"])
        task = ls_client.tasks.create(project=project.id, data={"image": "https://images.invalid/x.png"})
        sample = generate(5, SYNTH_SIZE)
        annotation = ls_client.annotations.create(id=task.id, result=gt_result(sample)[:2])
        ls_client.annotations.update(id=annotation.id, result=gt_result(sample)[:3])
        wait_for("the ANNOTATION_CREATED and ANNOTATION_UPDATED webhooks",
                 lambda: {p.get("action") for p in received} >= {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}, 60, 0.2)
        settings = Settings.from_env({"REDIS_URL": redis_url, "TRAIN_QUEUE": QUEUE, "RETRAIN_MIN_NEW_ANNOTATIONS": "100"})
        for payload in received:
            body, status = handle_webhook(payload, settings)
            assert status == 200 and body["status"] == "waiting", body
        recorded = {m.decode() for m in redis.Redis.from_url(redis_url).smembers(f"toothseg:project:{project.id}:changed")}
        exported = export_annotation_keys(export_project(label_studio, LS_TOKEN, project.id))
        assert len(recorded) == 2 and len(exported) == 1, (recorded, exported)
        assert exported[0] in recorded  # the update's key; the creation's is an older state of the annotation
    finally:
        server.shutdown()
