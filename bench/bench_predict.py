"""Pre-annotation latency per image, by stage, cold and warm, against ultralytics' own
YOLO-boxes-to-SAM path (`ultralytics.data.annotator.auto_annotate`) with the same weights.

    .venv/bin/python bench/bench_predict.py [--images 3] [--size 2000x1000] [--weights best.pt]
                                            [--sam vit_b] [--out bench/results/predict_latency.md]

Images are synthetic panoramics (about 28 teeth). SAM is the real architecture with random
weights (the same cost as the official checkpoint), saved and loaded through the production
checkpoint path. Without --weights a detector is trained first on synthetic X-rays (about 5 min,
cached in bench/.cache). Medians over the images; every number is measured in this run.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import backend  # noqa: E402,F401  (offline ultralytics)
import torch  # noqa: E402

from backend.detector import Detector  # noqa: E402
from backend.formats import find_target, instances_to_results  # noqa: E402
from backend.images import XrayImage, decode_image, pixel_hash  # noqa: E402
from backend.label_config import render_label_config  # noqa: E402
from backend.pipeline import Pipeline, PipelineOptions  # noqa: E402
from backend.process import set_torch_threads  # noqa: E402
from backend.sam import SAM_BUILDERS, EmbeddingCache, SamRefiner, build_sam  # noqa: E402
from backend.timing import StageTimer  # noqa: E402
from training.data.synth import generate, train_synthetic_detector  # noqa: E402

STAGES = ["load", "preprocess", "detector", "numbering", "masks", "sam_encoder", "sam_decoder", "encoding"]
FORWARD = {"detector", "sam_encoder", "sam_decoder"}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{platform.node()}: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def write_report(lines: list[str], out: str | Path) -> None:
    """Print a bench's markdown report and write it to `out` (bench/results/*.md)."""
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)


def detector_weights(args) -> Path:
    if args.weights:
        return Path(args.weights)
    cache = REPO / "bench" / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1((REPO / "training" / "data" / "synth.py").read_bytes()).hexdigest()[:12]
    path = cache / f"synthetic-detector-{key}.pt"
    if not path.exists():
        print("training a detector on synthetic X-rays (about 5 minutes)...", flush=True)
        shutil.copyfile(train_synthetic_detector(Path(tempfile.mkdtemp())), path)
    return path


def median(values):
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--size", default="2000x1000")
    parser.add_argument("--weights")
    parser.add_argument("--sam", default="vit_b", choices=sorted(SAM_BUILDERS))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "predict_latency.md"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    set_torch_threads(0)  # all cores, for both paths
    work = Path(tempfile.mkdtemp(prefix="toothseg-bench-"))
    weights = detector_weights(args)

    torch.manual_seed(0)
    sam_path = work / ("sam_b.pt" if args.sam == "vit_b" else f"sam_{args.sam}.pth")
    torch.save(SAM_BUILDERS[args.sam](checkpoint=None).state_dict(), sam_path)
    sam = build_sam(args.sam, sam_path)  # the production checkpoint path
    detector = Detector.load(weights)
    target = find_target(render_label_config())
    image_dir = work / "images"
    image_dir.mkdir()
    files = []
    for i in range(args.images):
        sample = generate(500 + i, (width, height))
        path = image_dir / f"pano_{i}.png"
        cv2.imwrite(str(path), sample.image)
        files.append(path)

    # ---- toothseg: cold (empty embedding cache) and warm (embedding cached) ----
    rows = {"cold": [], "warm": []}
    teeth = []
    for path in files:
        refiner = SamRefiner(sam, "bench", EmbeddingCache(4), batch_size=4)
        pipeline = Pipeline(detector, refiner, PipelineOptions(min_score=0.25))
        for phase in ("cold", "warm"):
            timer = StageTimer()
            start = time.perf_counter()
            with timer.stage("load"):
                pixels = decode_image(path.read_bytes(), 10**9)
                image = XrayImage.of(pixels, path.name)
            instances = pipeline.run(image, timer)
            with timer.stage("encoding"):
                instances_to_results(instances, target)
            timer.seconds["total"] = time.perf_counter() - start
            rows[phase].append(dict(timer.seconds))
        teeth.append(len(instances))

    # ---- SAM decoder batch size, on one cached embedding ----
    refiner = SamRefiner(sam, "bench", EmbeddingCache(4))
    pixels = decode_image(files[0].read_bytes(), 10**9)
    candidates = detector.detect(pixels)
    boxes = candidates.boxes[:28]
    batch_rows = []
    with refiner.lock:
        refiner.set_image(pixels, pixel_hash(pixels))
        for bs in (1, 2, 4, 8, len(boxes)):
            refiner.batch_size = bs
            times = []
            for _ in range(2):
                t = time.perf_counter()
                refiner.decode_boxes(boxes)
                times.append(time.perf_counter() - t)
            batch_rows.append((bs, median(times)))

    # ---- ultralytics: YOLO boxes -> ultralytics SAM, same weights ----
    from ultralytics.data.annotator import auto_annotate

    ul_times = []
    for path in files:
        one = work / f"ul_{path.stem}"
        one.mkdir()
        shutil.copy(path, one / path.name)
        t = time.perf_counter()
        auto_annotate(data=str(one), det_model=str(weights), sam_model=str(sam_path), device="cpu",
                      output_dir=str(work / "ul_labels"), conf=0.25)
        ul_times.append(time.perf_counter() - t)

    # ---- table ----
    cold_total = median([r["total"] for r in rows["cold"]])
    warm_total = median([r["total"] for r in rows["warm"]])
    ul_total = median(ul_times)
    outside = median([sum(v for k, v in r.items() if k not in FORWARD and k != "total") for r in rows["cold"]])
    lines = [
        "# Pre-annotation latency per image",
        "",
        f"Command: `.venv/bin/python bench/bench_predict.py --images {args.images} --size {args.size} "
        f"--sam {args.sam}`",
        f"Machine: {machine()}",
        f"Images: {args.images} synthetic panoramics {width}x{height}, median {median(teeth):.0f} teeth kept; "
        f"detector {weights.name} (imgsz {detector.imgsz}); SAM {args.sam}, random weights.",
        "",
        "| stage | cold (ms) | warm (ms) |",
        "|---|---|---|",
    ]
    for stage in STAGES + ["total"]:
        lines.append(f"| {stage} | {median([r.get(stage, 0.0) for r in rows['cold']]) * 1000:.0f} | "
                     f"{median([r.get(stage, 0.0) for r in rows['warm']]) * 1000:.0f} |")
    lines += [
        f"| ultralytics auto_annotate (YOLO boxes -> SAM, same weights) | {ul_total * 1000:.0f} | - |",
        "",
        "| ratio | measured | target |",
        "|---|---|---|",
        f"| cold total / ultralytics path | {cold_total / ul_total:.2f}x | <= 1.0x |",
        f"| warm total / cold total | {warm_total / cold_total:.2f}x | <= 0.25x |",
        f"| time outside model forward passes / cold total | {outside / cold_total * 100:.1f}% | <= 10% |",
        "",
        f"SAM decoder, {len(boxes)} box prompts on one embedding, by prompts per call (median of 2):",
        "",
        "| prompts per call | decoder (ms) |",
        "|---|---|",
    ] + [f"| {bs} | {t * 1000:.0f} |" for bs, t in batch_rows]
    write_report(lines, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
