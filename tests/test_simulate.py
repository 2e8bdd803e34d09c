"""The label-efficiency simulation: the oracle's counting, the pick orders, and a tiny loop end to end."""
from dataclasses import replace

import numpy as np
import pytest

from backend.instance import Instance
from training.cli import main
from training.simulate import (CONTROL, SEED_ROUND, STRATEGIES, LoopData, OracleCount, format_report,
                               image_score, oracle_count, order_pool, planned_work, plot_loop, preset, run_loop)

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


@pytest.mark.slow
def test_tiny_loop_end_to_end(tmp_path):
    """2 rounds of 2 images from a pool of 4, 1-epoch trainings, vit_tiny SAM (about 15 s)."""
    config = preset("smoke")
    lines: list[str] = []
    result = run_loop(config, tmp_path / "work", log=lines.append, show_bars=False)

    assert [(r.round, r.strategy) for r in result.rounds] == [(0, SEED_ROUND)] + [
        (r, name) for r in (1, 2) for name in (*STRATEGIES, CONTROL)]
    for name in STRATEGIES:
        curve = result.curve(name)
        assert [r.labeled for r in curve] == [4, 6, 8]
        picked = [key for r in curve for key in r.picked]
        assert len(picked) == 4 and set(picked) == {"pool000", "pool001", "pool002", "pool003"}
        assert [r.cumulative_actions for r in curve] == list(np.cumsum([r.oracle.actions for r in curve]))
    assert [r.labeled for r in result.curve(CONTROL)] == [4, 4, 4]
    assert all(r.picked == () and r.oracle == OracleCount() for r in result.curve(CONTROL))

    data = LoopData(config)
    for r in result.rounds:
        teeth = sum(len(data.samples[key].polygons) for key in r.picked)
        o = r.oracle
        assert o.accepted + o.relabeled + o.redrawn + o.added == teeth  # every tooth matched or added
        assert 0.0 <= r.scores.ia <= 1.0 and r.train_seconds > 0

    assert [(a.proto_stride, a.large_box_alpha, a.hungarian, a.use_sam) for a in result.ablations] == [
        (2, 4.0, True, True), (2, 4.0, False, True), (2, 4.0, True, False), (4, 4.0, True, True),
        (2, 0.0, True, True)]
    assert result.ablations[0].scores == result.baseline.scores
    assert [a.train_seconds is None for a in result.ablations] == [True, True, True, False, False]
    assert result.work == planned_work(config)
    assert any("estimate for the whole run" in line for line in lines)

    report = format_report(result, "bench/bench_loop.py --smoke", "test machine", plot="loop.png")
    assert report.count("\n| ") == 1 + len(result.rounds) + 1 + len(result.ablations)  # header and rows
    assert "Machine: test machine" in report and "random weights: checks the mechanics only" in report
    assert sum(line.startswith("- ") and "baseline" in line for line in report.splitlines()) == len(STRATEGIES)
    png = plot_loop(result, tmp_path / "loop.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_simulate_command_writes_report_and_plot(tmp_path):
    out = tmp_path / "results" / "loop.md"
    assert main(["simulate", "--smoke", "--rounds", "1", "--pool", "2", "--test", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Label efficiency") and "Command: `toothseg simulate --smoke --rounds 1 --pool 2 --test 1 --out " in text
    assert "| 1 | most-confident | 6 |" in text
    assert out.with_suffix(".png").stat().st_size > 0

