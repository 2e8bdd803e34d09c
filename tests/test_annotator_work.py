"""Work per annotation (training/annotator_work.py): known edits of a prediction give known counts,
the export path and the record path agree, the per-version table and the webhook's job."""
import json

import numpy as np
import redis
from rq import Queue

from backend.formats import find_target, instances_to_results
from backend.instance import Instance
from backend.settings import Settings
from backend.webhooks import WORK_JOB, handle_webhook
from conftest import QUEUE, REPO, register_model
from training.annotator_work import (FROM_SCRATCH, AnnotationWork, WorkStore, format_rows, from_export, measure,
                                     summarize)

H, W = 120, 300
TARGET = find_target((REPO / "label_studio_config.xml").read_text())


def box(x: int, y: int = 30, w: int = 30, h: int = 60) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y:y + h, x:x + w] = True
    return mask


def regions(*teeth: tuple[str, np.ndarray]) -> list[dict]:
    return instances_to_results([Instance(mask, label, 0.9) for label, mask in teeth], TARGET)


PREDICTED = [("11", box(10)), ("12", box(50)), ("13", box(90)), ("14", box(130)), ("15", box(170))]


def edited() -> list[dict]:
    """The annotator's result from PREDICTED: 11 and 15 kept, 12 renumbered 16, 13 redrawn (its top
    half), 14 deleted, 21 added."""
    return regions(("11", box(10)), ("16", box(50)), ("13", box(90, h=30)), ("15", box(170)), ("21", box(230)))


def annotation(ann_id, task, result, parent=None, lead_time=None, **extra) -> dict:
    return {"id": ann_id, "task": task, "result": result, "parent_prediction": parent, "lead_time": lead_time,
            "was_cancelled": False, **extra}


def test_known_edits_give_known_counts():
    prediction = {"id": 7, "model_version": "v1-x", "result": regions(*PREDICTED)}
    record = measure("3", annotation(40, 5, edited(), parent=7, lead_time=61.5), prediction)
    assert (record.accepted, record.relabeled, record.redrawn, record.added, record.deleted) == (2, 1, 1, 1, 1)
    assert record.actions == 4 and record.teeth == 5
    assert (record.project, record.task, record.annotation, record.version, record.lead_time) == ("3", 5, 40, "v1-x",
                                                                                                   61.5)
    # accepted as it came: nothing to do
    same = measure("3", annotation(41, 6, regions(*PREDICTED), parent=7), prediction)
    assert (same.accepted, same.actions, same.lead_time) == (5, 0, None)
    # drawn from scratch: every tooth added
    scratch = measure("3", annotation(42, 8, regions(*PREDICTED[:3]), lead_time=300), None)
    assert (scratch.version, scratch.added, scratch.actions) == (None, 3, 3)
    # skipped tasks are no work on teeth; imported annotations (no prediction, no lead_time) were not made here
    assert measure("3", annotation(43, 9, [], was_cancelled=True), None) is None
    assert measure("3", annotation(44, 10, regions(*PREDICTED)), None) is None


def test_export_path_matches_the_records_and_the_table(tmp_path):
    predictions = [{"id": 7, "task": 5, "model_version": "v1-a", "result": regions(*PREDICTED)},
                   {"id": 8, "task": 6, "model_version": "v2-b", "result": regions(*PREDICTED)},
                   {"id": 9, "task": 9, "model_version": "v2-b", "result": regions(*PREDICTED)}]
    export = [
        {"id": 5, "annotations": [annotation(40, 5, edited(), parent=7, lead_time=60)], "predictions": [7]},
        {"id": 6, "annotations": [annotation(41, 6, regions(*PREDICTED), parent=8, lead_time=20)], "predictions": [8]},
        {"id": 9, "annotations": [annotation(44, 9, edited(), parent=9, lead_time=40)], "predictions": [9]},
        {"id": 8, "annotations": [annotation(42, 8, regions(*PREDICTED[:3]), lead_time=300),
                                  annotation(43, 8, [], was_cancelled=True)], "predictions": []},
        {"id": 10, "annotations": [annotation(45, 10, regions(*PREDICTED), ground_truth=True)], "predictions": []},
    ]
    records = from_export("3", export, predictions)
    assert [(r.annotation, r.version, r.actions) for r in records] == [(40, "v1-a", 4), (41, "v2-b", 0),
                                                                       (42, None, 3), (44, "v2-b", 4)]
    # what the worker's job keeps is what the export gives: the same function on the same inputs
    store = WorkStore(tmp_path / "models")
    for ann, pred in [(export[0]["annotations"][0], predictions[0]), (export[1]["annotations"][0], predictions[1]),
                      (export[3]["annotations"][0], None), (export[2]["annotations"][0], predictions[2])]:
        store.put(measure("3", ann, pred))
    assert store.records("3") == records
    assert store.remove("3", 44) and not store.remove("3", 44) and len(store.records("3")) == 3
    store.put(records[-1])

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    register_model(tmp_path / "models", "3", weights)  # an unrelated version of the registry, no annotations
    rows = summarize(records, store.registry)
    assert [r["version"] for r in rows] == [FROM_SCRATCH, "v1-a", "v2-b"]
    scratch, v1, v2 = rows
    assert (scratch["annotations"], scratch["added_median"], scratch["lead_time_median"], scratch["accepted_share"]) \
        == (1, 3, 300, 0)
    assert (v1["actions_median"], v1["accepted_share"], v1["lead_time_median"]) == (4, 2 / 5, 60)
    assert (v2["annotations"], v2["actions_median"], v2["actions_mean"], v2["accepted_median"]) == (2, 2, 2, 3.5)
    assert (v2["lead_time_median"], v2["accepted_share"], v2["deleted_mean"]) == (30, 7 / 10, 0.5)
    table = format_rows(rows)
    assert "v2-b" in table and "2 / 2.00" in table and "70.0%" in table


def test_report_command_prints_the_records_table(tmp_path, capsys, monkeypatch):
    from training.ops.cli import main

    store = WorkStore(tmp_path / "models")
    store.put(AnnotationWork("4", 1, 10, "v1-a", 12.0, 3, 1, 0, 2, 0))
    store.put(AnnotationWork("4", 2, 11, None, 90.0, 0, 0, 0, 6, 0))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    assert main(["report", "--project", "4", "--json", "--plot", str(tmp_path / "work.png")]) == 0
    out = capsys.readouterr().out
    data = json.loads(out[:out.rindex("}") + 1])
    assert [(r["version"], r["actions_median"], r["lead_time_median"]) for r in data["rows"]] == [
        (FROM_SCRATCH, 6, 90), ("v1-a", 3, 12)]
    assert (tmp_path / "work.png").stat().st_size > 10_000


def test_an_annotation_webhook_queues_the_work_measurement(redis_url):
    settings = Settings.from_env({"REDIS_URL": redis_url, "TRAIN_QUEUE": QUEUE, "RETRAIN_MIN_NEW_ANNOTATIONS": "5"})
    body, status = handle_webhook({"action": "ANNOTATION_CREATED", "project": {"id": 8},
                                   "annotation": {"id": 31, "updated_at": "2026-11-27T10:00:00Z"}}, settings)
    assert status == 200 and body["status"] == "waiting"
    jobs = Queue(QUEUE, connection=redis.Redis.from_url(redis_url)).get_jobs()
    assert [(j.func_name, j.args) for j in jobs] == [(WORK_JOB, ("8", 31))]
    assert jobs[0].retries_left == 3


def test_other_webhooks_and_odd_ids_queue_no_measurement(redis_url):
    settings = Settings.from_env({"REDIS_URL": redis_url, "TRAIN_QUEUE": QUEUE})
    handle_webhook({"action": "PROJECT_UPDATED", "project": {"id": 8}}, settings)
    body, status = handle_webhook({"action": "ANNOTATION_CREATED", "project": {"id": 8},
                                   "annotation": {"id": "../../etc/passwd"}}, settings)
    assert status == 400 and "without annotation ids" in body["error"]
    assert Queue(QUEUE, connection=redis.Redis.from_url(redis_url)).count == 0
