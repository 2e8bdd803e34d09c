"""Peak memory of the worker's jobs: a retrain (detector and mask refiner) and a pre-annotation pass.

    .venv/bin/python bench/bench_memory.py [--images 8 40] [--size 2000x1000] [--steps 30]
                                           [--sam vit_b] [--out bench/results/memory.md]

Each measurement runs in a fresh process (as rq runs each job in a fresh work horse) and reports
its peak resident set size (`ru_maxrss`):
- retrain: `--images` synthetic panoramics of `--size` written as the retrain writes its dataset
  (`training.dataset.write_yolo_dataset`, 1 in 8 to the validation split), then the detector trained
  by `training.train.train_model` with the product's defaults (`TrainConfig.from_env()`: imgsz 640,
  batch 2, ultralytics' RAM image cache, STS-metric validation on the val split) and the mask
  refiner by `training.refiner_training.train_refiner`, both for `--steps` steps instead of the
  defaults' 1500 and 200 (the memory of a step does not grow with their number; the image cache
  and the dataset grow with `--images`);
- pre-annotation: the trained detector and SAM (`--sam`, the real architecture with random weights:
  the size of the official checkpoint's model) predict 3 of the images through the product's
  pipeline, as a pass's chunk does.
Both run with the environment the product gives the worker (MALLOC_ARENA_MAX=2, Dockerfile and
`training.ops.stack.PROCESS_ENV`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_retrain(work: Path, images: int, size: tuple[int, int], steps: int) -> dict:
    from backend.preprocess import pixel_statistics
    from training.data.synth import generate
    from training.dataset import write_yolo_dataset
    from training.refiner_training import train_refiner
    from training.train import TrainConfig, train_model

    items = [generate(9000 + i, size).item(f"s{i}") for i in range(images)]
    val = items[::8]
    train = [item for i, item in enumerate(items) if i % 8]
    config = TrainConfig.from_env({}, steps=steps, val_steps=steps, time_budget=0.0, refiner_steps=steps)
    data = write_yolo_dataset(train, val, work / "dataset", tooth_class=config.tooth_class)
    mean, std = pixel_statistics([item.pixels() for item in train])
    before = peak_mb()
    result = train_model(data, work / "run", config, mean, std, val_items=val)
    detector = peak_mb()
    train_refiner(result.weights, train, config.refiner_steps, config.device)
    (work / "weights.txt").write_text(str(result.weights))
    return {"before training": before, "detector": detector, "refiner": peak_mb()}


def stage_preannotate(work: Path, size: tuple[int, int], sam: str) -> dict:
    import torch

    from backend.detector import Detector
    from backend.images import XrayImage
    from backend.pipeline import Pipeline, PipelineOptions
    from backend.sam import SAM_BUILDERS, EmbeddingCache, SamRefiner
    from training.data.synth import generate

    torch.manual_seed(0)
    model = SAM_BUILDERS[sam](checkpoint=None).eval()
    refiner = SamRefiner(model, f"{sam}-random", EmbeddingCache(16), batch_size=4)
    detector = Detector.load(Path((work / "weights.txt").read_text()))
    pipeline = Pipeline(detector, refiner, PipelineOptions())
    for i in range(3):
        pipeline.run(XrayImage.of(generate(9500 + i, size).image, f"p{i}"))
    return {"pre-annotation": peak_mb()}


def run_stage(args: list[str]) -> dict:
    """A stage in a fresh process with the environment the worker gets (PROCESS_ENV: MALLOC_ARENA_MAX=2)."""
    from training.ops.stack import PROCESS_ENV

    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, **PROCESS_ENV})
    if out.returncode != 0:
        raise SystemExit(f"stage {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[8, 40])
    parser.add_argument("--size", default="2000x1000")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sam", default="vit_b")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory.md"))
    parser.add_argument("--stage", choices=("retrain", "preannotate"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = _size(args.size)
    if args.stage == "retrain":
        print(json.dumps(stage_retrain(Path(args.work), args.images[0], size, args.steps)))
        return
    if args.stage == "preannotate":
        print(json.dumps(stage_preannotate(Path(args.work), size, args.sam)))
        return

    from bench.bench_predict import machine, write_report

    rows = []
    for n in args.images:
        with tempfile.TemporaryDirectory() as tmp:
            common = ["--work", tmp, "--size", args.size, "--steps", str(args.steps), "--sam", args.sam]
            retrain = run_stage(["--stage", "retrain", "--images", str(n), *common])
            pre = run_stage(["--stage", "preannotate", "--images", str(n), *common])
        rows.append((n, retrain["before training"], retrain["detector"], retrain["refiner"], pre["pre-annotation"]))
        print(rows[-1], flush=True)
    command = "`.venv/bin/python bench/bench_memory.py " + " ".join(
        ["--images", *map(str, args.images), "--size", args.size, "--steps", str(args.steps), "--sam", args.sam]) + "`"
    lines = ["# Peak memory of the worker's jobs", "", f"Command: {command}", f"Machine: {machine()}",
             f"Synthetic panoramics {args.size}; the product's training defaults except {args.steps} detector and "
             f"refiner steps; SAM {args.sam} with random weights; MALLOC_ARENA_MAX=2 as shipped. "
             "Peak RSS of a fresh process per job (MB), as each rq job runs in its own work horse.", "",
             "| annotated images | after writing the dataset | retrain: after the detector "
             "| retrain: after the refiner (the job's peak) | pre-annotation job (detector + SAM, 3 images) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {a:.0f} | {b:.0f} | {c:.0f} | {d:.0f} |" for n, a, b, c, d in rows]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
