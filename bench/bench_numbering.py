"""FDI numbering variants on the models a `bench_loop.py` run trained, at prediction time only.

    .venv/bin/python bench/bench_numbering.py --work bench/.cache/sim-cold-v2 --work bench/.cache/sim
    .venv/bin/python bench/bench_numbering.py --real-work bench/.cache/real-pool --data DIR --out /tmp/n.md

Each --work is a `bench_loop.py --work` folder. For every model its projects serve, the detector
runs once on the seed's held-out test images (regenerated from the seed, checked against the
files the run wrote) and its candidates are kept; then each numbering variant
(`backend.numbering.number_teeth` with other settings, or arg-max labels) numbers the same
candidates. A numbering error is a candidate matched to a ground-truth tooth (box IoU > 0.5, one to
one by `scipy.optimize.linear_sum_assignment`) with another FDI number: what the oracle relabels.
Prints a table of errors per test image, per model and summed, and writes
bench/results/numbering.md.

`--real-work` is a `bench_real.py --on pool` folder instead (real radiographs, `--data` the UFBA-425
checkout): its models number the pool's validation images (never the held-out test images), so
numbering settings can be chosen on real candidates.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_VERBOSE", "False")

from bench_predict import machine  # noqa: E402

from backend import numbering  # noqa: E402

VARIANTS: dict[str, dict] = {
    "toothseg defaults": {},
    "no occlusal-plane prior": {"occlusal_weight": 0.0},
    "arch lines fitted to the top labels (no search)": {"arch_search": False},
    "upper and lower midlines searched apart": {"midline_weight": 0.0},
    "neither (the numbering before, prior weight 3)": {"occlusal_weight": 0.0, "arch_search": False,
                                                       "prior_weight": 3.0},
    "no arch geometry (class probabilities only)": {"occlusal_weight": 0.0, "prior_weight": 0.0},
    "arg-max labels (no Hungarian assignment)": None,
    **{f"prior weight {w:g}, occlusal weight {o:g}": {"prior_weight": w, "occlusal_weight": o}
       for w in (5.0, 10.0, 40.0) for o in (5.0, 10.0, 20.0)},
}
"""Variant name -> number_teeth keyword arguments (None: arg-max labels)."""


def test_images(seed_dir: Path, seed: int):
    """The seed's test images as (key, pixels, {label: mask}), regenerated from the seed."""
    import cv2

    from training.data.synth import generate, sample_seed

    files = seed_dir / "files"
    offset = len(list(files.glob("lab*.png"))) + len(list(files.glob("pool*.png")))
    out = []
    for i, path in enumerate(sorted(files.glob("test*.png"))):
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        sample = generate(sample_seed(seed, offset + i), (pixels.shape[1], pixels.shape[0]))
        if not np.array_equal(sample.image, pixels):
            raise SystemExit(f"{path}: not the image seed {seed} gives (made by other synthetic-data code)")
        out.append((path.stem, pixels, sample.masks()))
    return out


def candidate_sets(work: Path):
    """(model name, [(candidates, gt masks)]) for each model served in `work`'s seeds."""
    from backend.registry import Registry

    for seed_dir in sorted(work.glob("seed-*/")):
        seed = int(seed_dir.name.split("-")[1])
        images = test_images(seed_dir, seed)
        registry = Registry(seed_dir / "models")
        for project_dir in sorted((seed_dir / "models" / "projects").iterdir(), key=lambda p: int(p.name)):
            current = registry.current(int(project_dir.name))
            if current is None:
                continue
            meta = current.meta
            counts = meta.get("counts") or {}
            tooth_class = (meta.get("model_changes") or {}).get("tooth_class", False)
            name = (f"{work.name} seed {seed} project {project_dir.name} {current.version.split('-')[0]}: "
                    f"{counts.get('train', 0) + counts.get('val', 0)} images"
                    + ("" if tooth_class else ", no tooth class"))
            yield name, detections(current.weights, images)


def detections(weights: Path, images) -> list:
    """[(candidates (boxes, probs, tooth scores or None), gt masks)] of the detector `weights` on
    `images` ((key, pixels, {label: mask}))."""
    from backend.detector import Detector

    detector = Detector.load(weights, device="cpu", conf=0.05)
    rows = []
    for _, pixels, masks in images:
        c = detector.detect(pixels)
        rows.append(((c.boxes, c.probs, c.tooth if detector.tooth_column is not None else None), masks))
    return rows


def real_candidate_sets(work: Path, data: Path):
    """(model name, [(candidates, gt masks)]) for each model a `bench_real.py --on pool` run in
    `work` trained (its last version, promoted or not), on the pool's validation images (the split
    that run scored on)."""
    import bench_real

    from backend.registry import Registry

    real = bench_real.RealData(data)
    _, validation = bench_real.selection_split(sorted(real.loaders))
    images = [(name, item.pixels(), item.masks) for name in validation if (item := real.get(name)) is not None]
    registry = Registry(work / "models")
    for project_dir in sorted((work / "models" / "projects").iterdir(), key=lambda p: int(p.name)):
        versions = registry.versions(int(project_dir.name))  # a first model's project: its one version,
        if not versions:  # promoted or not (bench_real scores it either way)
            continue
        last = versions[-1]
        counts = last.meta.get("counts") or {}
        yield (f"{work.name} project {project_dir.name} {last.version.split('-')[0]}: "
               f"{counts.get('train', 0) + counts.get('val', 0)} images, real"), detections(last.weights, images)


def numbering_errors(rows, kwargs: dict | None, min_score: float | None = None) -> float:
    """Numbering errors per image of one variant on one model's candidates (module docstring), of
    the candidates with a tooth score >= `min_score` (default: the product's SCORE_THRESHOLD), those
    from SCORE_ANCHOR up numbered first as the product does (unless `kwargs` says otherwise)."""
    import torch
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou

    from backend.instance import mask_box
    from backend.settings import Settings

    settings = Settings.from_env({})
    if min_score is None:
        min_score = settings.score_threshold
    if kwargs is not None:
        kwargs = {"anchor_score": settings.score_anchor, **kwargs}
    wrong = 0
    for (boxes, probs, tooth), masks in rows:
        if kwargs is None:
            numbered = numbering.argmax_labels(probs, min_score, tooth)
        else:
            numbered = numbering.number_teeth(boxes, probs, min_score=min_score, tooth=tooth, **kwargs)
        labels = [label for label, mask in masks.items() if mask.any()]
        if not numbered or not labels:
            continue
        gt = torch.tensor(np.array([mask_box(masks[label]) for label in labels], dtype=np.float64))
        iou = box_iou(torch.tensor(boxes[[a.index for a in numbered]], dtype=torch.float64), gt).numpy()
        for i, j in zip(*linear_sum_assignment(iou, maximize=True)):
            wrong += bool(iou[i, j] > 0.5 and numbered[i].label != labels[j])
    return wrong / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, action="append", default=[],
                        help="a bench_loop.py --work folder (repeatable)")
    parser.add_argument("--real-work", type=Path, action="append", default=[],
                        help="a bench_real.py --on pool --work folder (repeatable; needs --data)")
    parser.add_argument("--data", type=Path, help="UFBA-425 checkout, for --real-work")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "numbering.md")
    args = parser.parse_args()
    if not args.work and not args.real_work:
        parser.error("give --work or --real-work")
    if args.real_work and args.data is None:
        parser.error("--real-work needs --data")
    from backend.process import set_torch_threads
    from backend.settings import Settings

    set_torch_threads(0)
    start = time.perf_counter()
    models = [(name, rows) for work in args.work for name, rows in candidate_sets(work)]
    models += [(name, rows) for work in args.real_work for name, rows in real_candidate_sets(work, args.data)]
    if not models:
        raise SystemExit("no served models in " + ", ".join(map(str, args.work + args.real_work)))
    table = {variant: [numbering_errors(rows, kwargs) for _, rows in models] for variant, kwargs in VARIANTS.items()}
    command = shlex.join([".venv/bin/python", "bench/bench_numbering.py", *sys.argv[1:]])
    lines = ["# FDI numbering variants on trained models (prediction time)", "",
             f"Command: `{command}`", f"Machine: {machine()}",
             f"Run time: {(time.perf_counter() - start) / 60:.1f} min.", "",
             "Numbering errors per test image (a candidate with a tooth score >= "
             f"{Settings.from_env({}).score_threshold:g}, the default SCORE_THRESHOLD, matched to a ground-truth "
             "tooth, box IoU > 0.5, with another FDI number); models:", ""]
    lines += [f"- m{k}: {name}, {len(rows)} test images" for k, (name, rows) in enumerate(models)]
    lines += ["", "| variant | " + " | ".join(f"m{k}" for k in range(len(models))) + " | sum |",
              "|---|" + "---|" * (len(models) + 1)]
    for variant, values in table.items():
        lines.append(f"| {variant} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {sum(values):.1f} |")
    report = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
