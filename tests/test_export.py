"""Export conversion on an export recorded from a real Label Studio 1.23.2 server
(tests/data/record_ls_export.py wrote tests/data/ls_export_1.23.2.json)."""
import json
from pathlib import Path

import cv2
import numpy as np

from backend.formats import result_to_masks
from backend.images import ImageLoader
from backend.retrain_queue import annotation_key
from backend.settings import Settings
from export_shapes import H, W, expected_brush_masks
from training.export import annotated_tasks, choose_annotation, load_labeled_images, manifest_for

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
    assert [g.key for g in got] == ["task_1", "task_3"]
    assert len(skipped) == 1 and "task 2" in skipped[0] and "200x100 image, the image is 400x200" in skipped[0]
    assert set(got[0].masks) == {"11", "21"} and got[0].pixels.shape == (H, W)


def test_manifest_records_what_was_trained_on():
    annotated, _ = annotated_tasks(EXPORT)
    m1 = manifest_for("7", annotated[:2], annotated[2:])
    m2 = manifest_for("7", annotated[:2], annotated[2:])
    assert m1["hash"] == m2["hash"] and m1["counts"] == {"train": 2, "val": 1, "pseudo": 0}
    assert m1["tasks"][0] == {"task_id": 1, "annotation_id": 1, "updated_at": annotated[0].updated_at,
                              "ground_truth": False, "split": "train"}
    assert manifest_for("7", annotated[:1], annotated[1:])["hash"] != m1["hash"]


def test_export_and_webhook_times_give_the_same_annotation_key():
    ann = EXPORT[0]["annotations"][0]
    webhook_time = ann["updated_at"]  # the webhook payload serialises the same field
    assert annotation_key(ann["id"], webhook_time) == annotation_key(1, ann["updated_at"].replace("Z", "+00:00"))
    assert annotation_key(1, None) == "1@deleted"
