"""Background pre-annotation on the native stack with a real Label Studio: after a promotion every
unannotated task gets a prediction of the new version without any /predict call; the next
promotion replaces them; a worker killed mid-pass is resumed with no duplicates. Annotations
submitted from those predictions with known edits give exactly those counts in `toothseg report`,
from the worker's records (webhook path) and from an export."""
import json
import os
import signal
import statistics
import subprocess
import sys
from collections import Counter

import pytest
import redis
from rq.scheduler import RQScheduler

import browser
from backend.registry import Registry
from training.annotator_work import WorkStore
from conftest import REPO, gt_result, import_seeds, predict_seconds, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "e2e-preannotate-token-42"


def toothseg_predictions(client, project, registry):
    ours = {v.version for v in registry.versions(project)}
    return [p for p in client.predictions.list(project=project) if p.model_version in ours]


def separate_regions(prediction):
    """(regions, their labels, their pairwise IoU, the separate ones) of a prediction: a region is
    separate with a label of its own and (nearly) no overlap, so that an edit of it has one reading."""
    import numpy as np

    from backend.formats import result_image_size, tooth_regions
    from training.oracle import iou_matrix

    teeth = tooth_regions(prediction.result, *result_image_size(prediction.result))
    labels = [label for label, _ in teeth]
    overlap = iou_matrix([m for _, m in teeth], [m for _, m in teeth])
    np.fill_diagonal(overlap, 0)
    clean = [teeth[i] for i in range(len(teeth)) if labels.count(labels[i]) == 1 and overlap[i].max() <= 0.02]
    return teeth, labels, overlap, clean


def annotate_with_known_edits(client, project: int, prediction, lead_time: float) -> dict:
    """Submit an annotation of `prediction`'s task that starts from it, with known edits: of the
    regions with a label of their own that overlap no other region, the first is redrawn (its top
    half), the second renumbered, the third deleted, the rest kept; the other regions are deleted
    and one tooth is added where no region is. Returns the counts these edits make."""
    import numpy as np

    from backend import fdi
    from backend.formats import find_target, instances_to_results
    from backend.instance import Instance

    teeth, labels, overlap, clean = separate_regions(prediction)
    assert len(clean) >= 4, (f"task {prediction.task}: {len(clean)} separate regions to edit of {len(teeth)} "
                             f"(labels {labels}, largest overlaps {np.round(overlap.max(axis=1), 2)})")
    free = [label for label in fdi.FDI_LABELS if label not in labels]
    (redraw_label, redraw), (_, renumber), *kept = clean[0], clean[1], *clean[3:]
    half = redraw.copy()
    rows = np.flatnonzero(redraw.any(axis=1))
    half[(rows[0] + rows[-1] + 1) // 2:] = False
    assert 0.2 < half.sum() / redraw.sum() < 0.8  # a redraw, not a match kept (IoU >= 0.9) or lost (<= 0.1)
    union = np.logical_or.reduce([mask for _, mask in teeth])
    spot = next((y, x) for y in range(0, union.shape[0] - 12, 12) for x in range(0, union.shape[1] - 12, 12)
                if not union[y:y + 12, x:x + 12].any())
    added = np.zeros_like(union)
    added[spot[0]:spot[0] + 12, spot[1]:spot[1] + 12] = True
    result = [Instance(half, redraw_label), Instance(renumber, free[0]), *(Instance(m, lab) for lab, m in kept),
              Instance(added, free[1])]
    target = find_target(client.projects.get(id=project).label_config)
    client.annotations.create(id=prediction.task, result=instances_to_results(result, target), lead_time=lead_time,
                              parent_prediction=prediction.id, project=project)
    return {"version": prediction.model_version, "lead_time": lead_time, "accepted": len(kept), "relabeled": 1,
            "redrawn": 1, "added": 1, "deleted": len(teeth) - len(clean) + 1}


def expected_rows(edits: list[dict]) -> dict[str, dict]:
    """The report's figures per version, worked out from the edits made."""
    rows = {}
    for version in dict.fromkeys(e["version"] for e in edits):
        group = [e for e in edits if e["version"] == version]
        actions = [e["relabeled"] + e["redrawn"] + e["added"] + e["deleted"] for e in group]
        teeth = sum(e["accepted"] + e["relabeled"] + e["redrawn"] + e["added"] for e in group)
        rows[version] = {"annotations": len(group), "actions_median": statistics.median(actions),
                         "actions_mean": statistics.fmean(actions),
                         **{f"{k}_median": statistics.median(e[k] for e in group) for k in
                            ("accepted", "relabeled", "redrawn", "added", "deleted")},
                         "lead_time_median": statistics.median(e["lead_time"] for e in group),
                         "accepted_share": sum(e["accepted"] for e in group) / teeth}
    return rows


def report(stack, project: int, *args: str) -> dict:
    """`toothseg report --json` run as an annotation lead would, with the stack's settings."""
    _, env = stack.services()["worker"]
    out = subprocess.run([sys.executable, "-m", "training.ops.cli", "report", "--project", str(project), "--json",
                          *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return {row["version"]: row for row in json.loads(out.stdout[:out.stdout.rindex("}") + 1])["rows"]}


def most_separate_regions(preds, version, n):
    """The `n` predictions of `version` with the most separate regions (`separate_regions`) to edit."""
    return sorted((p for p in preds if p.model_version == version),
                  key=lambda p: (-len(separate_regions(p)[3]), p.task))[:n]


@pytest.mark.scenario("A worker SIGKILLed during a background pre-annotation pass",
                      "the pass resumes on a new worker; every unannotated task ends with exactly one prediction of the version")
def test_background_preannotation(make_stack):
    from label_studio_sdk import LabelStudio

    stack = make_stack(seeds=12, pool=24, token=TOKEN, GATE_TOLERANCE=1.0, PREANNOTATE_CHUNK=8,
                       RETRAIN_MIN_NEW_ANNOTATIONS=100)
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
        # annotators start from two of them with known edits (their tasks leave the pool)
        edits = [annotate_with_known_edits(client, project, p, lead_time)
                 for p, lead_time in zip(most_separate_regions(preds, v1, 2), (45.0, 75.0))]
        pool_ids = sorted(t.id for t in client.tasks.list(project=project) if not t.total_annotations)
        assert len(pool_ids) == 22

        def pool_predictions():  # annotated tasks keep the prediction they started from
            return [p for p in toothseg_predictions(client, project, registry) if p.task in pool_ids]

        # promotion 2 -> the new version's predictions replace the old ones
        client.ml.train(id=ml.id)
        v2 = wait_for("the second model", lambda: (registry.current_version(project) or v1) != v1 and
                      registry.current_version(project), 300, 2)
        wait_for("the background pass of v2", lambda: covered(v2) and not any(
            p.model_version == v1 for p in pool_predictions()), 300, 3)
        preds = pool_predictions()
        assert Counter(p.task for p in preds) == Counter(pool_ids)
        assert {p.model_version for p in preds} == {v2}
        edits += [annotate_with_known_edits(client, project, p, lead_time)
                  for p, lead_time in zip(most_separate_regions(preds, v2, 2), (30.0, 50.0))]
        pool_ids = sorted(t.id for t in client.tasks.list(project=project) if not t.total_annotations)
        assert len(pool_ids) == 20

        # a worker killed mid-pass (promotion 3) resumes and finishes without duplicates
        client.ml.train(id=ml.id)
        v3 = wait_for("the third model", lambda: (registry.current_version(project) or v2) != v2 and
                      registry.current_version(project), 300, 2)
        wait_for("the pass of v3 to be under way", lambda: 2 <= sum(
            p.model_version == v3 for p in pool_predictions()) < 12, 120, 0.5)
        os.killpg(stack.pids()["worker"], signal.SIGKILL)
        done = [p for p in pool_predictions() if p.model_version == v3]
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
                p.model_version != v3 for p in pool_predictions()), 300, 3)
            preds = pool_predictions()
            assert Counter(p.task for p in preds) == Counter(pool_ids), "no task predicted twice"
            assert {p.model_version for p in preds} == {v3}
            # one task drawn from scratch, without its prediction: every tooth is added
            scratch = client.tasks.get(id=pool_ids[0])
            sample = stack.samples[scratch.data["image"].rsplit("/", 1)[-1]]
            client.annotations.create(id=scratch.id, result=gt_result(sample), lead_time=200.0, project=project)
            edits.append({"version": "from scratch", "lead_time": 200.0, "accepted": 0, "relabeled": 0, "redrawn": 0,
                          "added": sum(m.any() for m in sample.masks().values()), "deleted": 0})

            # the report, from the worker's records (the webhooks) and from an export: exactly those figures
            store = WorkStore(stack.data / "models")
            wait_for("the worker's records of the 5 annotations", lambda: len(store.records(project)) == 5, 300, 2)
            expected = expected_rows(edits)
            for rows in (report(stack, project), report(stack, project, "--export")):
                assert set(rows) == set(expected)
                for version, figures in expected.items():
                    assert {k: rows[version][k] for k in figures} == pytest.approx(figures), version
            shown = subprocess.run([sys.executable, "-m", "training.ops.cli", "models", "show", v1, "--project",
                                    str(project)], cwd=REPO, env=stack.services()["worker"][1], capture_output=True,
                                   text=True, timeout=120)
            assert "annotator work: 2 annotations started from its predictions" in shown.stdout, shown.stderr
        finally:
            os.killpg(replacement.pid, signal.SIGTERM)
            try:
                replacement.wait(30)
            except subprocess.TimeoutExpired:  # rq's warm shutdown once hung after "unsubscribing"
                os.killpg(replacement.pid, signal.SIGKILL)
                replacement.wait(30)
        # nothing annotated is lost
        export = client.projects.exports.as_json(project)
        assert sum(len(t.get("annotations") or []) for t in export) == 17
    except BaseException:
        print(stack.log_tails(60))
        raise
