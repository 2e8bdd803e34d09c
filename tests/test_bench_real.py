"""bench/bench_real.py's mechanics on generated data in UFBA-425's layout (CI never needs the real
images): the split is stratified, fixed and disjoint; a smoke run trains through the product's
retrain job, scores the held-out images and writes the report and its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from training.data.dataset_io import ufba_category
from training.data.synth import generate

from conftest import REPO
from test_ufba import write_ufba

sys.path.insert(0, str(REPO / "bench"))
import bench_real  # noqa: E402


def test_the_split_is_stratified_fixed_and_disjoint():
    names = [f"cate{c}-{i:05d}" for c, n in ((1, 24), (2, 72), (3, 15), (9, 7), (10, 35)) for i in range(n)]
    pool, test = bench_real.split_names(names)
    assert sorted(pool + test) == sorted(names) and not set(pool) & set(test)
    assert (pool, test) == bench_real.split_names(list(reversed(names)))  # the order given does not matter
    per_category = Counter(ufba_category(n) for n in test)
    assert per_category == {"cate1": 4, "cate2": 11, "cate3": 2, "cate9": 1, "cate10": 5}  # 15% rounded, at least 1
    assert bench_real.split_names(names, seed=1) != (pool, test)
    drawn = bench_real.draw_images(pool, 8, 0)
    assert len(set(drawn)) == 8 and set(drawn) <= set(pool) and drawn == bench_real.draw_images(pool, 8, 0)
    assert drawn != bench_real.draw_images(pool, 8, 1)
    annotate, validation = bench_real.selection_split(names)  # --on pool: the pool alone, split again
    assert sorted(annotate + validation) == pool and validation and annotate != pool


@pytest.mark.slow
def test_smoke_run_writes_the_report(tmp_path):
    samples = {f"cate{c}-{i:05d}": generate(10 * c + i, (512, 256)) for c in (1, 10) for i in range(6)}
    write_ufba(tmp_path / "ufba", samples)
    out = subprocess.run([sys.executable, "bench/bench_real.py", "--data", str(tmp_path / "ufba"), "--smoke",
                          "--work", str(tmp_path / "work"), "--commit", "test", "--idle-rounds", "1"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "work" / "real.md").read_text()
    for heading in ("## The first model", "## Per category", "## Where the first model loses",
                    "## Masks by source", "## The loop", "## Continued training on the same annotations"):
        assert heading in report
    assert "10 pool images, 2 held-out test images" in report
    summary = json.loads((tmp_path / "work" / "real.json").read_text())
    assert set(summary["first_model"]) == {"2", "4"}
    for figures in summary["first_model"].values():
        assert {"recall", "ia", "instance_dice", "union_dice", "train_minutes"} <= set(figures)
    runs = sorted(p.name for p in (tmp_path / "work" / "runs").iterdir())
    assert runs == ["first-02-draw0.json", "first-04-draw0.json", "idle1-02-draw0.json", "idle1-04-draw0.json",
                    "loop-round1.json"]
    idle = bench_real.load("idle1-04-draw0", tmp_path / "work")  # the same images, warm-started from the first model
    assert idle.annotated == bench_real.load("first-04-draw0", tmp_path / "work").annotated
    again = subprocess.run([sys.executable, "bench/bench_real.py", "--data", str(tmp_path / "ufba"), "--smoke",
                            "--work", str(tmp_path / "work"), "--commit", "test", "--idle-rounds", "1"], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "retrain job" not in again.stderr  # a rerun trains nothing it has
    rescored = subprocess.run([sys.executable, "bench/bench_real.py", "--data", str(tmp_path / "ufba"), "--smoke",
                               "--on", "pool", "--models-from", str(tmp_path / "work"), "--set", "SCORE_THRESHOLD=0.01",
                               "--work", str(tmp_path / "rescored"), "--commit", "test"], cwd=REPO,
                              capture_output=True, text=True, timeout=900)
    assert rescored.returncode == 0 and "retrain job" not in rescored.stderr, rescored.stderr[-3000:]
    for name in ("first-02-draw0", "first-04-draw0"):  # the same trainings, scored again on the pool's validation
        trained, scored = bench_real.load(name, tmp_path / "work"), bench_real.load(name, tmp_path / "rescored")
        assert (scored.seconds, scored.epochs, scored.annotated) == (trained.seconds, trained.epochs, trained.annotated)
        assert {r.name for r in scored.rows}.isdisjoint(r.name for r in trained.rows)
        assert trained.gate and scored.gate.startswith("first model")  # the gate decided again, as the job would
    selection = bench_real.selection_report([tmp_path / "rescored"], "cmd")
    assert any("SCORE_THRESHOLD=0.01" in line and "models of work" in line for line in selection)


def _record(name: str, found: int, seconds: float = 60.0) -> "bench_real.RunRecord":
    row = bench_real.ImageRow(name="cate1-00001", category="cate1", teeth=10, found=found, numbered_right=found,
                              extra=0, ia=found / 10, instance_dice=found / 10, instance_nsd=found / 10,
                              image_dice=found / 10, actions=10 - found)
    return bench_real.RunRecord(name=name, annotated=["a"], promoted=True, seconds=seconds, epochs=5, steps=20,
                                stopped_by="budget", rows=[row])


def test_selection_pairs_each_draw_with_the_baselines_same_draw(tmp_path):
    base, other = tmp_path / "base", tmp_path / "flip"
    for work, found in ((base, (5, 7)), (other, (6, 9))):
        for draw, n in enumerate(found):
            bench_real.save(_record(f"first-08-draw{draw}", n), work)
    (other / bench_real.SETTINGS_FILE).write_text(json.dumps([["TRAIN_FLIPLR", "0.5"]]))
    earlier = bench_real.load("first-08-draw1", base)  # trained before a default changed
    earlier.hyperparameters = {"fliplr": 0.25, "best_min_val_images": 3, "pretrained": True}
    earlier.promoted, earlier.gate = False, "first model not promoted: it would cost work"
    bench_real.save(earlier, base)
    lines = bench_real.selection_report([base, other], "cmd")
    rows = {(cells[0], cells[2]): cells for line in lines if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]] if len(cells) > 3}
    assert rows[("base", "first-08-draw0")][1] == "the defaults (trained with fliplr=0.25: not today's defaults)"
    assert rows[("flip", "first-08-draw0")][1] == "TRAIN_FLIPLR=0.5"
    assert rows[("flip", "first-08-draw0")][6] == "0.600 / +0.100"  # teeth found, paired with draw 0
    assert rows[("flip", "first-08-draw1")][6] == "0.900 / +0.200"
    assert rows[("**flip**", "**first-08, mean of 2**")][6] == "0.750 / +0.150"
    assert [rows[("base", f"first-08-draw{d}")][3] for d in (0, 1)] == ["yes", "no"]
    assert rows[("**base**", "**first-08, mean of 2**")][3] == "1 of 2"
    assert "- base first-08-draw1: not promoted: first model not promoted: it would cost work" in lines


def test_idle_rounds_report_what_each_draw_serves_after_each_round(tmp_path):
    import argparse

    firsts = {8: [_record("first-08-draw0", 5, 500.0), _record("first-08-draw1", 6, 500.0)]}
    rounds = [_record("idle1-08-draw0", 7, 300.0), _record("idle1-08-draw1", 4, 300.0)]
    rounds[1].promoted = False  # draw 1's round was worse: it keeps serving its first model
    for record in rounds:
        bench_real.save(record, tmp_path)
    args = argparse.Namespace(sizes=[8], draws=2, idle_rounds=1, work=tmp_path)
    lines = bench_real.idle_rounds(args, firsts)
    rows = {cells[1]: cells for line in lines if line.startswith("| 8 ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows["first model"][3:6] == ["2 of 2", "8.3 (8.3-8.3)", "0.550 (0.500-0.600)"]
    assert rows["1"][3:6] == ["1 of 2", "13.3 (13.3-13.3)", "0.550 (0.400-0.700)"]
    assert rows["1"][8] == "0.650 (0.600-0.700)"  # served: draw 0's round, draw 1's first model


def test_the_report_says_when_its_runs_did_not_train_with_todays_defaults():
    from training.train import TrainConfig

    today = TrainConfig.from_env({}).fitted(bench_real.UFBA_SIDE)  # UFBA's 512x512 images train at 512
    first = _record("first-08-draw0", 8)
    first.hyperparameters = today.as_dict()
    loop = _record("loop-round1", 9)
    loop.hyperparameters = today.warm().as_dict()  # a warm start trains with the warm lengths
    assert bench_real.not_todays_defaults([first], [loop]) == ""
    first.hyperparameters = {**today.as_dict(), "fliplr": 0.0 if today.fliplr else 0.5}
    assert bench_real.not_todays_defaults([first], [loop]) == (
        f"Note: the runs trained with fliplr={first.hyperparameters['fliplr']}, not today's defaults.")
    assert "1 run(s) kept no record" in bench_real.not_todays_defaults([first, _record("first-08-draw1", 7)], [])
    before = {k: v for k, v in today.as_dict().items() if k != "best_min_val_images"}  # recorded before it existed
    first.hyperparameters = before
    assert bench_real.not_todays_defaults([first], []) == (
        "Note: the runs trained with best_min_val_images=0, not today's defaults.")


def test_before_and_after_pairs_the_same_draws_and_names_what_the_before_run_trained_with(tmp_path):
    from training.train import TrainConfig

    today = TrainConfig.from_env({}).fitted(bench_real.UFBA_SIDE)
    before, after = tmp_path / "real", tmp_path / "real-v2"
    for work, found, hyperparameters in ((before, (5, 7), {**today.as_dict(), "fliplr": 0.0, "imgsz": 640,
                                                           "best_min_val_images": 0}),
                                         (after, (8, 6), today.as_dict())):
        for draw, n in enumerate(found):
            record = _record(f"first-08-draw{draw}", n)
            record.hyperparameters = hyperparameters
            bench_real.save(record, work)
    lines = bench_real.before_and_after(before, after)
    assert lines[0] == "## Before and after"
    rows = {(cells[0], cells[2]): cells for line in lines if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]] if len(cells) > 3}
    assert rows[("real", "first-08-draw0")][1] == "trained with best_min_val_images=0, fliplr=0.0, imgsz=640"
    assert rows[("real-v2", "first-08-draw0")][1] == "today's defaults"
    assert rows[("real-v2", "first-08-draw0")][6] == "0.800 / +0.300"
    assert rows[("real-v2", "first-08-draw1")][6] == "0.600 / -0.100"
    assert rows[("**real-v2**", "**first-08, mean of 2**")][6] == "0.700 / +0.100"
