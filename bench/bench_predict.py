"""Pre-annotation latency per image, by stage, cold and warm, against ultralytics' own YOLO -> SAM path.

    .venv/bin/python bench/bench_predict.py [--images 5] [--size 2000x1000] [--weights best.pt]
                                            [--sams lite_medsam vit_b] [--runtimes openvino torch]
                                            [--out bench/results/predict_latency.md]

Images are synthetic panoramics (about 28 teeth). toothseg's pipeline with each SAM it offers:
LiteMedSAM with its packaged weights, ViT-B with random weights (the same cost as the official
checkpoint), both loaded through the production checkpoint path, and each image-encoder runtime
(SAM_RUNTIME; OpenVINO's conversion, done once per machine, is timed apart and its fidelity to torch
fp32 given: embedding cosine, mask IoU for the same boxes). ultralytics' path as a user writes
it: `YOLO(weights)` and `SAM("sam_b.pt")` (the same ViT-B weights) loaded once, then per image the
detector and SAM prompted with the boxes toothseg decodes. Both sides load their models once and
are warmed on another image first; same images, same threads. Without --weights a detector is
trained first on synthetic X-rays (about 5 min, cached in bench/.cache). Median (min-max) over the
images; every number is measured in this run.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import shlex
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
from backend.sam import SAM_BUILDERS, EmbeddingCache, SamRefiner, build_sam, packaged_checkpoint  # noqa: E402
from backend.sam_runtime import RUNTIMES, use_runtime  # noqa: E402
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


def spread(values: list[float], scale: float = 1000) -> str:
    """median (min-max) of seconds, in ms."""
    if not values:
        return "-"
    return f"{median(values) * scale:.0f} ({min(values) * scale:.0f}-{max(values) * scale:.0f})"


def toothseg_rows(detector: Detector, sam, checkpoint_id: str, files: list[Path], warm_up: Path, target):
    """toothseg's pipeline (SAM on, mask refinement as served) on each file: per phase ("cold": the
    image's first request, the encoder runs; "warm": its embedding cached) the stage seconds, the
    teeth kept, and the boxes SAM was prompted with. Models loaded once and warmed on `warm_up`."""
    def run(path: Path, pipeline: Pipeline) -> tuple[dict, list]:
        timer = StageTimer()
        start = time.perf_counter()
        with timer.stage("load"):
            pixels = decode_image(path.read_bytes(), 10**9)
            image = XrayImage.of(pixels, path.name)
        instances = pipeline.run(image, timer)
        with timer.stage("encoding"):
            instances_to_results(instances, target)
        timer.seconds["total"] = time.perf_counter() - start
        return dict(timer.seconds), instances

    run(warm_up, Pipeline(detector, SamRefiner(sam, checkpoint_id, EmbeddingCache(4), batch_size=4),
                          PipelineOptions(min_score=0.25)))
    rows: dict[str, list[dict]] = {"cold": [], "warm": []}
    teeth, boxes = [], []
    for path in files:
        pipeline = Pipeline(detector, SamRefiner(sam, checkpoint_id, EmbeddingCache(4), batch_size=4),
                            PipelineOptions(min_score=0.25))
        for phase in ("cold", "warm"):
            seconds, instances = run(path, pipeline)
            rows[phase].append(seconds)
        teeth.append(len(instances))
        pixels = decode_image(path.read_bytes(), 10**9)
        boxes.append(pipeline.propose(XrayImage.of(pixels, path.name)).boxes)
    return rows, teeth, boxes


def embedding_fidelity(reference, sam, path: Path, boxes) -> tuple[float, float]:
    """`sam`'s image embedding and masks against `reference`'s (the same weights in torch fp32) on
    the image at `path`, for `boxes`: (embedding cosine, mean mask IoU); 1.0 when no box."""
    pixels = decode_image(path.read_bytes(), 10**9)
    out = []
    for model in (reference, sam):
        refiner = SamRefiner(model, "fidelity", EmbeddingCache(1))
        masks, _ = refiner.sam_masks(pixels, "fidelity", boxes)
        out.append((refiner.cache.get(refiner.key("fidelity")).features, masks))
    (ref_features, ref_masks), (features, masks) = out
    cosine = float(torch.nn.functional.cosine_similarity(features.flatten(), ref_features.flatten(), dim=0))
    ious = [(a & b).sum() / max((a | b).sum(), 1) for a, b in zip(masks, ref_masks)]
    return cosine, float(statistics.mean(ious)) if ious else 1.0


def ultralytics_rows(weights: Path, sam_path: Path, files: list[Path], boxes: list, warm_up: Path) -> list[dict]:
    """ultralytics' own path as a user writes it: `YOLO(weights)` and `SAM(checkpoint)` loaded once and
    warmed on `warm_up`, then per image the detector and SAM prompted with toothseg's boxes for it."""
    from ultralytics import SAM, YOLO

    yolo, sam = YOLO(str(weights)), SAM(str(sam_path))

    def run(path: Path, image_boxes) -> dict:
        out = {}
        start = time.perf_counter()
        image = cv2.imread(str(path))
        yolo(image, conf=0.25, device="cpu", verbose=False)
        out["detector"] = time.perf_counter() - start
        t = time.perf_counter()
        if len(image_boxes):
            sam(image, bboxes=image_boxes.tolist(), device="cpu", verbose=False, save=False)
        out["sam"] = time.perf_counter() - t
        out["total"] = time.perf_counter() - start
        return out

    run(warm_up, boxes[0])
    return [run(path, image_boxes) for path, image_boxes in zip(files, boxes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--size", default="2000x1000")
    parser.add_argument("--weights")
    parser.add_argument("--sams", nargs="+", default=["lite_medsam", "vit_b"], choices=sorted(SAM_BUILDERS),
                        help="toothseg's SAMs to time (lite_medsam: its packaged weights; others: random weights)")
    parser.add_argument("--runtimes", nargs="+", default=["openvino", "torch"], choices=RUNTIMES,
                        help="SAM_RUNTIME values to time each SAM with (openvino: the default)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "predict_latency.md"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    set_torch_threads(0)  # all cores, for both paths
    work = Path(tempfile.mkdtemp(prefix="toothseg-bench-"))
    weights = detector_weights(args)
    detector = Detector.load(weights)
    target = find_target(render_label_config())
    image_dir = work / "images"
    image_dir.mkdir()
    files = []
    for i in range(-1, args.images):  # -1: the warm-up image
        path = image_dir / f"pano_{i}.png"
        cv2.imwrite(str(path), generate(500 + i, (width, height)).image)
        files.append(path)
    warm_up, files = files[0], files[1:]

    # ViT-B with random weights (the official checkpoint's cost), saved as ultralytics names it
    torch.manual_seed(0)
    vit_b = work / "sam_b.pt"
    torch.save(SAM_BUILDERS["vit_b"](checkpoint=None).state_dict(), vit_b)
    results, sams, converted = {}, {}, {}
    for name in args.sams:
        if name == "lite_medsam":
            checkpoint = packaged_checkpoint("lite_medsam")
        elif name == "vit_b":
            checkpoint = vit_b
        else:
            checkpoint = work / f"sam_{name}.pth"
            torch.save(SAM_BUILDERS[name](checkpoint=None).state_dict(), checkpoint)
        for runtime in args.runtimes:
            sam = build_sam(name, checkpoint)  # the production checkpoint path
            t = time.perf_counter()
            served = use_runtime(sam, runtime, f"{name}-bench", work / "openvino")
            converted[name, runtime] = time.perf_counter() - t
            if served != runtime:
                raise SystemExit(f"SAM_RUNTIME={runtime} cannot serve {name} here (see the log above)")
            sams[name, runtime] = sam
            results[name, runtime] = toothseg_rows(detector, sam, f"{name}-{runtime}-bench", files, warm_up, target)
            print(f"toothseg {name} {runtime}: done", flush=True)
    boxes = next(iter(results.values()))[2]
    fidelity = {key: embedding_fidelity(sams[key[0], "torch"], sam, files[0], boxes[0])
                for key, sam in sams.items() if key[1] != "torch" and (key[0], "torch") in sams}
    ultra = ultralytics_rows(weights, vit_b, files, boxes, warm_up)
    print("ultralytics: done", flush=True)

    # ---- SAM decoder batch size, on one cached embedding (the first SAM) ----
    batch_sam = args.sams[0], args.runtimes[0]
    refiner = SamRefiner(sams[batch_sam], "bench", EmbeddingCache(4))
    pixels = decode_image(files[0].read_bytes(), 10**9)
    first_boxes = boxes[0][:28]
    batch_rows = []
    with refiner.lock:
        refiner.set_image(pixels, pixel_hash(pixels))
        for bs in sorted({1, 2, 4, 8, len(first_boxes)}):
            refiner.batch_size = bs
            times = []
            for _ in range(2):
                t = time.perf_counter()
                refiner.decode_boxes(first_boxes)
                times.append(time.perf_counter() - t)
            batch_rows.append((bs, median(times)))

    # ---- tables ----
    ul_total = median([r["total"] for r in ultra])
    command = shlex.join([".venv/bin/python", "bench/bench_predict.py", *sys.argv[1:]])
    lines = [
        "# Pre-annotation latency per image",
        "",
        f"Command: `{command}`",
        f"Machine: {machine()}",
        f"Images: {args.images} synthetic panoramics {width}x{height} (seeds 500-{499 + args.images}); detector "
        f"{weights.name} (imgsz {detector.imgsz}); SAM: lite_medsam with its packaged weights, ViT-B with random "
        "weights (the official checkpoint's cost); image encoder runtimes (SAM_RUNTIME): "
        f"{', '.join(args.runtimes)}, OpenVINO's converted on this run's first start. Both paths load their "
        "models once and are warmed on another image first; ultralytics' SAM gets the boxes toothseg prompts with. "
        "Each cell: median (min-max) over the images, ms.",
        "",
        "| path | " + " | ".join(STAGES) + " | total |",
        "|---|" + "---|" * (len(STAGES) + 1),
    ]
    for (name, runtime), (rows, _, _) in results.items():
        for phase in ("cold", "warm"):
            cells = [spread([r.get(stage, 0.0) for r in rows[phase]]) for stage in STAGES + ["total"]]
            lines.append(f"| toothseg {name} {runtime} {phase} | {' | '.join(cells)} |")
    ul_stage = {"detector": "detector", "sam_encoder": "sam", "total": "total"}
    cells = [spread([r[ul_stage[stage]] for r in ultra]) if stage in ul_stage else "-" for stage in STAGES + ["total"]]
    lines += [f"| ultralytics YOLO + SAM ViT-B (warmed; sam_encoder: encoder and decoder) | {' | '.join(cells)} |",
              "", f"Teeth kept per image: median {median(next(iter(results.values()))[1]):.0f}.", "",
              "| toothseg SAM | encoder runtime | first start: convert + compile s | cold | warm | cold / ultralytics' "
              "warmed ViT-B path | warm / cold | time outside model forward passes / cold | embedding cosine to "
              "torch | mask IoU to torch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, runtime), (rows, _, _) in results.items():
        cold = median([r["total"] for r in rows["cold"]])
        warm = median([r["total"] for r in rows["warm"]])
        outside = median([sum(v for k, v in r.items() if k not in FORWARD and k != "total") for r in rows["cold"]])
        cosine, iou = ("1 (the reference)", "1") if runtime == "torch" else (
            (f"{fidelity[name, runtime][0]:.6f}", f"{fidelity[name, runtime][1]:.3f}")
            if (name, runtime) in fidelity else ("- (no torch run)", "-"))
        first = f"{converted[name, runtime]:.0f}" if runtime != "torch" else "-"
        lines.append(f"| {name} | {runtime} | {first} | {cold:.2f} s | {warm:.2f} s | {cold / ul_total:.2f}x | "
                     f"{warm / cold:.2f}x | {outside / cold * 100:.1f}% | {cosine} | {iou} |")
    lines += [
        "",
        f"SAM decoder ({batch_sam[0]}, encoder on {batch_sam[1]}), {len(first_boxes)} box prompts on one "
        "embedding, by prompts per call (median of 2):",
        "",
        "| prompts per call | decoder (ms) |",
        "|---|---|",
    ] + [f"| {bs} | {t * 1000:.0f} |" for bs, t in batch_rows]
    write_report(lines, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
