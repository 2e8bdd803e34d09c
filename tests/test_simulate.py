"""The simulation: the oracle's counting, the pick orders, and a tiny cold start and loop end to end."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from backend.images import XrayImage
from backend.instance import Instance
from backend.registry import Registry
from training.ops.cli import main
from training.oracle import OracleCount, oracle_count
from training.simulate import (CONTROL, COLD_VARIANTS, PREDICTION_VARIANTS, REFERENCE_SHARE, STRATEGIES, RoundRecord,
                               SeedResult, TestResult, actions_to_reach, cold_projects, config_from_args, format_report,
                               SimProject, image_score, order_pool, preset, rescore_seed, run_seed, spread)

H, W = 20, 100


def box(x1: int, x2: int, y1: int = 0, y2: int = H) -> np.ndarray:
    """A (H, W) mask filling columns x1..x2-1 of rows y1..y2-1."""
    mask = np.zeros((H, W), bool)
    mask[y1:y2, x1:x2] = True
    return mask


def region(label: str, mask: np.ndarray) -> Instance:
    return Instance(mask=mask, label=label, score=0.5)


def test_oracle_counts_each_kind_of_action():
    gt = {"11": box(0, 10), "12": box(12, 22), "13": box(24, 34), "14": box(36, 46), "21": box(48, 58),
          "22": np.zeros((H, W), bool)}  # an empty ground-truth mask is no tooth
    regions = [
        region("11", box(0, 10)),    # exact, right label: accepted
        region("21", box(12, 22)),   # exact, wrong label: relabeled
        region("13", box(24, 29)),   # IoU 0.5: redrawn
        region("31", box(70, 80)),   # on no tooth: deleted
        region("22", box(57, 65)),   # IoU 1/17 <= 0.1 with "21": not a match, deleted; "21" added
    ]                                # "14" has no region: added
    count = oracle_count(regions, gt)
    assert (count.accepted, count.relabeled, count.redrawn, count.added, count.deleted) == (1, 1, 1, 2, 2)
    assert count.actions == 6
    assert count.mean_match_iou == pytest.approx((1.0 + 1.0 + 0.5) / 3)


def test_oracle_accept_threshold_is_inclusive():
    gt = {"11": box(0, 10)}
    assert oracle_count([region("11", box(0, 10, 0, 18))], gt) == OracleCount(accepted=1, matched_iou=0.9)
    redrawn = oracle_count([region("11", box(0, 10, 0, 17))], gt)  # IoU 0.85
    assert (redrawn.accepted, redrawn.redrawn, redrawn.actions) == (0, 1, 1)


def test_oracle_matches_one_to_one_by_total_iou():
    # Greedy matching would give R1 to "11" (IoU 8/14) and leave R2 and "12" unmatched; the
    # assignment maximising the summed IoU matches R1-"12" (4/18) and R2-"11" (4/10).
    gt = {"11": box(0, 10), "12": box(10, 20)}
    count = oracle_count([region("11", box(2, 14)), region("11", box(0, 4))], gt)
    assert (count.accepted, count.relabeled, count.redrawn, count.added, count.deleted) == (0, 0, 2, 0, 0)
    assert count.matched_iou == pytest.approx(4 / 18 + 4 / 10)


def test_oracle_pairs_below_the_match_threshold_do_not_steer_the_assignment():
    # With R1-"12" (IoU 2/30 <= 0.1) allowed, R1-"12" + R2-"11" (0.07 + 0.8) would beat R1-"11"
    # (0.83) and leave "11" to R2; as no candidate, R1 keeps "11".
    gt = {"11": box(0, 10), "12": box(10, 30)}
    count = oracle_count([region("11", box(0, 12)), region("11", box(1, 9))], gt)
    assert (count.accepted, count.redrawn, count.added, count.deleted) == (0, 1, 1, 1)
    assert count.matched_iou == pytest.approx(10 / 12)


def test_oracle_without_regions_or_teeth():
    gt = {"11": box(0, 10), "12": box(10, 20)}
    assert oracle_count([], gt) == OracleCount(added=2)
    assert oracle_count([region("11", box(0, 10)), region("11", box(0, 10))], {}) == OracleCount(deleted=2)
    duplicate = oracle_count([region("11", box(0, 10)), region("11", box(0, 10))], {"11": box(0, 10)})
    assert (duplicate.accepted, duplicate.deleted, duplicate.actions) == (1, 1, 1)


def test_task_score_is_the_mean_tooth_confidence():
    assert image_score([]) == 0.0
    teeth = [Instance(box(0, 10), "11", 0.2), Instance(box(10, 20), "12", 0.6)]
    assert image_score(teeth) == pytest.approx(0.4)


def test_pick_orders():
    scores = {"d": 0.5, "b": 0.9, "c": 0.1, "a": 0.5}
    rng = np.random.default_rng(0)
    assert order_pool(scores, "most-confident", rng) == ["b", "a", "d", "c"]  # ties by key
    assert order_pool(scores, "least-confident", rng) == ["c", "a", "d", "b"]
    first = order_pool(scores, "random", np.random.default_rng([3, 1]))
    assert sorted(first) == ["a", "b", "c", "d"]
    assert order_pool(dict(reversed(scores.items())), "random", np.random.default_rng([3, 1])) == first
    orders = {tuple(order_pool(scores, "random", np.random.default_rng([3, r]))) for r in range(8)}
    assert len(orders) > 1
    with pytest.raises(ValueError, match="unknown strategy"):
        order_pool(scores, "newest", rng)


def test_config_refuses_a_pool_too_small():
    with pytest.raises(ValueError, match="pool of at least 6"):
        replace(preset("smoke"), rounds=3)
    assert main(["simulate", "--smoke", "--rounds", "3"]) == 2


def test_defaults_only_trains_the_defaults_under_their_usual_project_numbers():
    """--defaults-only: the cold-start table trains only the product's defaults, each size under the
    project number the full table gives it (so one work folder is read the same way by both)."""
    import argparse

    from training.simulate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    full = list(cold_projects(config_from_args(parser.parse_args(["--no-loop"]))))
    only = list(cold_projects(config_from_args(parser.parse_args(["--no-loop", "--defaults-only"]))))
    assert len(full) == 2 * len(COLD_VARIANTS) and len(only) == 2
    assert only == [p for p in full if not p[3]]
    assert [(n, variant) for _, n, variant, _ in only] == [(8, "toothseg defaults"), (20, "toothseg defaults")]
    assert config_from_args(parser.parse_args([])).trained_variants


def test_spread():
    assert spread([0.5, 0.7, 0.6]) == "0.600 (0.500-0.700)"
    assert spread([3.0], "{:.0f}") == "3"
    assert spread([None, 2.0, 4.0], "{:.0f}") == "3 (2-4), 1 of 3 not reached"
    assert spread([None]) == "not reached"


@pytest.mark.slow
def test_tiny_cold_start_and_loop_end_to_end(tmp_path):
    """The smoke preset: 4 labeled images, a pool of 4, one round of 2, a few training steps (about a minute)."""
    config = preset("smoke")
    lines: list[str] = []
    result = run_seed(config, 0, tmp_path / "seed-0", log=lines.append)

    # cold start: each training variant, then the prediction-time variants of the default model
    names = [c.name for c in result.cold]
    assert names == ["4 images, " + v for v in COLD_VARIANTS][:1] + ["4 images, " + v for v in PREDICTION_VARIANTS] \
        + ["4 images, " + v for v in list(COLD_VARIANTS)[1:]]
    default = result.cold[0]
    assert default.steps == 4 and default.seconds > 0 and default.labeled == 4
    # every job went through the product's registry: one version per training
    registry = Registry(tmp_path / "seed-0" / "models")
    assert len(registry.versions(101)) == 1 and registry.versions(101)[0].meta["steps_run"] == 4

    # the loop: round 0 is the default cold-start model, then one round per strategy and the control
    assert [(r.round, r.strategy) for r in result.rounds] == [(0, "seed")] + [(1, s) for s in (*STRATEGIES, CONTROL)]
    assert result.rounds[0].train == default
    for r in result.rounds[1:]:
        if r.strategy == CONTROL:
            assert r.picked == [] and r.train.labeled == 4
            strategy_steps = [x.train.steps for x in result.rounds if x.round == 1 and x.strategy != CONTROL]
            assert r.train.steps == round(sum(strategy_steps) / len(strategy_steps))  # as many steps
        else:
            assert len(r.picked) == 2 and r.train.labeled == 6
    # round 1's actions counted again here: the round-0 model (current in the first cold-start project,
    # 101, if the gate promoted it; else there is none and the oracle draws every tooth) predicts each
    # strategy's picks, and the oracle compares them with the ground truth
    sim = SimProject(config, 0, tmp_path / "seed-0", log=lambda line: None)
    round0 = sim.pipeline(101)
    for r in result.rounds[1:]:
        if r.strategy != CONTROL:
            recount = sum((oracle_count(round0.run(XrayImage.of(sim.samples[key].image, key)) if round0 else [],
                                        sim.samples[key].masks()) for key in r.picked), OracleCount())
            assert r.cumulative_actions == recount.actions, r.strategy
    assert result.reference.labeled == 4 + config.pool
    assert result.pool_teeth > 0

    saved = SeedResult.from_json(result.to_json())
    assert saved == result
    report = format_report(config, [saved], "toothseg simulate --smoke", "test machine", plot="loop.png")
    assert "NOT the product's defaults" in report and "Machine: test machine" in report
    cold = report.split("## Cold start")[1].split("## Loop")[0]
    assert sum(line.startswith("| 4 | ") for line in cold.splitlines()) == len(names)  # one row per variant
    assert all(f"| {s} |" in report for s in STRATEGIES)


def test_rescoring_measures_the_kept_models_again_and_keeps_the_training_figures(tmp_path):
    """--rescore: the test figures come from the models in the work folder, not from the saved results."""
    config = replace(preset("smoke"), loop=False)
    work = tmp_path / "seed-0"
    result = run_seed(config, 0, work, log=lambda line: None)
    wrong = {"ia": -1.0, "instance_dice": -1.0, "instance_nsd": -1.0, "image_dice": -1.0,
             "oracle": {k: -1.0 for k in ("accepted", "relabeled", "redrawn", "added", "deleted", "actions")}}
    saved = replace(result, cold=[replace(r, served=TestResult(**wrong), candidate=TestResult(**wrong), seconds=7.0)
                                  for r in result.cold])
    rescored = rescore_seed(config, saved, work, log=lambda line: None)
    assert rescored.rescored and not result.rescored
    assert [r.name for r in rescored.cold] == [r.name for r in result.cold]
    for new, old in zip(rescored.cold, result.cold):
        assert (new.served, new.candidate) == (old.served, old.candidate), new.name  # measured again, the same
        assert new.seconds == 7.0 and new.steps == old.steps  # the training figures are the saved run's
    report = format_report(config, [SeedResult.from_json(rescored.to_json())], "toothseg simulate --rescore")
    assert "Seed(s) 0: test figures measured again (`--rescore`)" in report

    shutil.rmtree(work / "models" / "projects" / "101")
    with pytest.raises(ValueError, match="no trained model"):
        rescore_seed(config, saved, work, log=lambda line: None)
    with pytest.raises(ValueError, match="cold-start table only"):
        rescore_seed(config, replace(saved, rounds=[RoundRecord(0, "seed", [], {}, 0.0, saved.cold[0])]), work)


def test_actions_to_reach_the_reference():
    def record(ia, dice, actions=0.0, rnd=0, strategy="seed"):
        served = {"ia": ia, "instance_dice": dice, "instance_nsd": 0.0, "image_dice": 0.0, "oracle": {"actions": 1.0}}
        train = {"name": "x", "labeled": 1, "promoted": True, "seconds": 1.0, "steps": 1, "stopped_by": "steps",
                 "served": served, "candidate": served, "reason": ""}
        return {"round": rnd, "strategy": strategy, "picked": [], "oracle": {}, "cumulative_actions": actions,
                "train": train}

    raw = {"seed": 0, "pool_teeth": 400, "cold": [], "seconds": 1.0,
           "rounds": [record(0.80, 0.80), record(0.90, 0.97, 50, 1, "random"), record(0.99, 0.99, 90, 2, "random")],
           "reference": record(1.0, 1.0)["train"]}
    seed = SeedResult.from_json(json.dumps(raw))
    assert REFERENCE_SHARE == 0.98
    assert actions_to_reach(seed, "random") == 90  # round 1 has the IA but not the Dice
    assert actions_to_reach(seed, "most-confident") is None


@pytest.mark.slow
def test_simulate_command_writes_report_and_plot(tmp_path):
    out = tmp_path / "results" / "loop.md"
    work = tmp_path / "work"
    args = ["simulate", "--smoke", "--no-cold-start", "--work", str(work), "--out", str(out)]
    assert main(args) == 0
    text = out.read_text()
    assert text.startswith("# Cold start and label efficiency")
    assert f"Command: `toothseg simulate --smoke --no-cold-start --work {work} --out {out}`" in text
    assert "| 1 | most-confident | 6 |" in text and "no tooth super-class" not in text
    assert out.with_suffix(".png").stat().st_size > 0
    assert (work / "seed-0.json").exists()
    assert main(args) == 0  # a rerun reuses the seed's results
