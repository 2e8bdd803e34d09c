"""`toothseg evaluate` on generated STS cases: its time, and the official STS 2024 scorer's in the same run.

    .venv/bin/python bench/bench_evaluate.py [--cases 30] [--size 2000x1000] [--runs 3]
        [--official DIR --official-python PY] [--out bench/results/evaluate.md]

Cases: synthetic panoramics (training.data.synth) with 4 to 30 of their teeth as the ground truth,
and a prediction made from them the way a model errs: most teeth shifted by a few pixels and grown
or shrunk by one or two, some missed, some numbered as a neighbour, some extra. Both written as
Labelme files (one polygon per connected part, as `toothseg export --format labelme` writes).

Timed: the `toothseg evaluate PRED GT` command as a user runs it (a new process each run; both NSD
variants, the CSV); and, with --official (the folder STS2024/evaluation/2d of
github.com/STS-challenge/STS) and --official-python (a Python with its requirements: numpy < 2,
scipy, SimpleITK, pandas, tqdm, opencv), the official `compute_metrics.py -num_workers 2` on the same
files. `--runs` runs each, median (min-max). Values: the largest difference, over the cases, between
toothseg's CSV and the official CSV (which rounds to 4 decimals) per metric.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_predict import machine, write_report  # noqa: E402
from training.data.labelme import masks_to_labelme  # noqa: E402
from training.data.synth import generate  # noqa: E402

# official CSV column -> toothseg CSV column
COLUMNS = {"image_DSC": "image_dice", "image_IoU": "image_iou", "image_NSD": "image_nsd_sts",
           "instance_DSC": "instance_dice", "instance_IoU": "instance_iou", "instance_NSD": "instance_nsd_sts",
           "IA": "ia"}
NEIGHBOUR = {"1": "2", "2": "1", "3": "4", "4": "3", "5": "6", "6": "5", "7": "8", "8": "7"}


def make_case(seed: int, size: tuple[int, int]) -> tuple[dict, dict]:
    """(ground truth, prediction) {FDI label: (H, W) bool mask} of one generated case."""
    rng = np.random.default_rng(seed)
    teeth = {label: m for label, m in generate(seed, size).masks().items() if m.sum() >= 50}
    labels = sorted(teeth)
    keep = rng.choice(len(labels), size=min(len(labels), int(rng.integers(4, 31))), replace=False)
    gt = {labels[i]: teeth[labels[i]] for i in sorted(keep)}
    kernel = np.ones((3, 3), np.uint8)
    pred: dict[str, np.ndarray] = {}
    for label, mask in gt.items():
        if rng.random() < 0.08:  # missed
            continue
        m = np.roll(mask, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1)).astype(np.uint8)
        grow = int(rng.integers(-2, 3))
        if grow:
            m = (cv2.dilate if grow > 0 else cv2.erode)(m, kernel, iterations=abs(grow))
        if not m.any():
            continue
        if rng.random() < 0.06:  # numbered as a neighbour (the other side's tooth of the same kind)
            label = NEIGHBOUR[label[0]] + label[1]
        pred[label] = pred.get(label, np.zeros_like(mask)) | m.astype(bool)
    for label in labels:  # a tooth the ground truth does not have
        if label not in gt and label not in pred and rng.random() < 0.1:
            pred[label] = teeth[label]
    return gt, pred


def write_cases(folder: Path, n: int, size: tuple[int, int]) -> tuple[Path, Path]:
    gt_dir, pred_dir = folder / "gts", folder / "segs"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    for i in range(n):
        gt, pred = make_case(900 + i, size)
        name = f"case_{i:03d}"
        (gt_dir / f"{name}.json").write_text(json.dumps(masks_to_labelme(gt, f"{name}.png")))
        if pred:
            (pred_dir / f"{name}.json").write_text(json.dumps(masks_to_labelme(pred, f"{name}.png")))
    return pred_dir, gt_dir


def timed(command: list[str], runs: int, cwd: Path | None = None) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - start)
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def read_csv(path: Path, key: str) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {Path(row[key]).stem: row for row in csv.DictReader(f)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--size", default="2000x1000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--official", type=Path, help="STS2024/evaluation/2d of github.com/STS-challenge/STS")
    parser.add_argument("--official-python", default=sys.executable)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "evaluate.md")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="toothseg-evaluate-"))
    pred_dir, gt_dir = write_cases(work, args.cases, (width, height))
    teeth = [len(json.loads(p.read_text())["shapes"]) for p in sorted(gt_dir.glob("*.json"))]
    # the official script scores a case only when both files exist: an empty prediction file where none
    for gt in gt_dir.glob("*.json"):
        if not (pred_dir / gt.name).exists():
            (pred_dir / gt.name).write_text(json.dumps({**json.loads(gt.read_text()), "shapes": []}))
    # the `toothseg` console script's own two lines, with this checkout's code first on the path
    entry = f"import sys; sys.path.insert(0, {str(REPO)!r}); from training.ops.cli import main; sys.exit(main())"
    toothseg = [sys.executable, "-c", entry, "evaluate", str(pred_dir), str(gt_dir),
                "--csv", str(work / "toothseg.csv")]
    rows = [("`toothseg evaluate` (both NSD variants, CSV)", spread(timed(toothseg, args.runs)))]
    differences = []
    if args.official:
        official = [args.official_python, "compute_metrics.py", "-s", str(pred_dir), "-g", str(gt_dir),
                    "-csv_dir", str(work / "official.csv"), "-num_workers", "2"]
        rows.append(("official STS 2024 `compute_metrics.py -num_workers 2`",
                     spread(timed(official, args.runs, cwd=args.official))))
        ours, theirs = read_csv(work / "toothseg.csv", "image"), read_csv(work / "official.csv", "case")
        for column, mine in COLUMNS.items():
            gaps = [abs(float(ours[case][mine]) - float(theirs[case][column])) for case in theirs]
            differences.append((column, mine, max(gaps), len(gaps)))
    command = shlex.join([".venv/bin/python", "bench/bench_evaluate.py", *sys.argv[1:]])
    lines = ["# `toothseg evaluate` against the official STS 2024 scorer", "", f"Command: `{command}`",
             f"Machine: {machine()}; {os.cpu_count()} CPUs", "",
             f"{args.cases} generated cases {width}x{height}, {min(teeth)}-{max(teeth)} ground-truth teeth each "
             f"({sum(teeth)} in all); {args.runs} runs each, a new process per run; seconds, median (min-max).", "",
             "| scorer | seconds for all cases |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]]
    if differences:
        lines += ["", "Largest difference per case, toothseg's CSV against the official CSV (rounded to 4 "
                  "decimals by the official script, so up to 5e-5 is rounding):", "",
                  "| official column | toothseg column | largest difference | cases |", "|---|---|---|---|",
                  *[f"| {a} | {b} | {c:.1e} | {d} |" for a, b, c, d in differences]]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
