"""SAM's masks against toothseg's own on real and synthetic radiographs, and SAM's acceptance thresholds.

    .venv/bin/python bench/bench_sam.py --real-work bench/.cache/real-pool-idle20 --data DIR \\
        [--synthetic 12] [--sam-model-type lite_medsam] [--sam-checkpoint PTH] [--images N] \\
        --out bench/results/sam.md

Real: for each model a `bench_real.py --on pool` run in `--real-work` trained (each project's last
version), on the pool's validation images (never the held-out test images, so the thresholds can be
chosen here). Synthetic (`--synthetic N`): N generated 2000x1000 panoramics (seeds 9000...) and a
detector trained on other synthetic images (bench_predict's, cached in bench/.cache). The product's
pipeline numbers the detector's candidates (`Pipeline.propose`, the served settings); each numbered
tooth is matched one to one to a true tooth (bench_real.match, IoU >= 0.3, on the learned refiner's
masks). Mask sources, on the same teeth: the detector's own masks, the learned mask refiner's (what
is served without SAM), SAM's from the detector's boxes, and the product's choice between SAM's and
the refiner's mask (`backend.sam.choose`) at each SAM_MIN_IOU / SAM_MIN_AGREEMENT pair. Per source:
Dice and NSD (2 px) per matched tooth (mean), the STS instance Dice per image (numbers as served;
mean over images, median (min-max) over models, or over images with one model), and how many
regions took SAM's mask. SAM's input (`--tiles`, `--synthetic-tiles`: the SAM_TILE setting): the
whole image, or tiles over the teeth. Time: SAM's encoder (every embedding computed) and decoder per
image, on this machine.

Interactive (real images): each tooth the first model missed gets a box drawn around it (exact, and
10% looser), sent to the backend's `/predict` (`backend.app.create_app`, Flask's test client) with
Label Studio's interactive context; Dice of the returned brush mask against the expert's, and the
seconds per request, cold (a new image: the encoder runs) and cached.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_VERBOSE", "False")

from bench_predict import machine, write_report  # noqa: E402

MIN_IOUS = (0.0, 0.75, 0.85, 0.9)
MIN_AGREEMENTS = (0.0, 0.5, 0.8)


@dataclass
class SourceScores:
    """One mask source on one model: per matched tooth Dice and NSD, per image instance Dice, teeth
    that took SAM's mask."""

    dice: list[float] = field(default_factory=list)
    nsd: list[float] = field(default_factory=list)
    instance_dice: list[float] = field(default_factory=list)
    took_sam: int = 0
    regions: int = 0


@dataclass
class Model:
    """A trained version to score: its name, weights, and where the backend finds it."""

    name: str
    weights: Path
    model_dir: Path | None = None
    project: int | None = None


def models_of(work: Path):
    """Each project's last version in a bench_real --work folder."""
    from backend.registry import Registry

    registry = Registry(work / "models")
    for project_dir in sorted((work / "models" / "projects").iterdir(), key=lambda p: int(p.name)):
        versions = registry.versions(int(project_dir.name))
        if versions:
            yield Model(f"{work.name} project {project_dir.name} {versions[-1].version.split('-')[0]}",
                        versions[-1].weights, work / "models", int(project_dir.name))


def input_name(tile: int) -> str:
    return "whole image" if not tile else f"tiles of {tile} px"


def score_model(weights: Path, images, refiners, settings, timing: dict | None) -> dict[str, SourceScores]:
    """Every source's scores for one model on `images` [(name, pixels, truth)]; SAM's masks from
    each (name, refiner, timed) in `refiners` (one per SAM input and decoder); `timing` (input ->
    stage -> seconds per image) gets the timed refiners' SAM times when given (the first model:
    every embedding computed, none cached)."""
    from bench_real import match

    from backend.detector import Detector
    from backend.images import XrayImage
    from backend.pipeline import Pipeline, PipelineOptions
    from backend.sam import choose
    from backend.timing import StageTimer
    from training.metrics import dice, nsd, score_image

    detector = Detector.load(weights, conf=settings.detector_conf)
    served = Pipeline(detector, None, PipelineOptions.from_settings(settings, use_sam=False))
    own = Pipeline(detector, None, PipelineOptions.from_settings(settings, use_sam=False, refine_masks=False))
    out: dict[str, SourceScores] = {}
    for name, pixels, truth in images:
        image = XrayImage.of(pixels, name)
        proposal = served.propose(image)
        sources = {"detector's own masks": (own.propose(image).masks, None),
                   "learned refiner (served without SAM)": (proposal.masks, None)}
        for sam_name, refiner, timed in refiners:
            timer = StageTimer()
            sam_masks, sam_iou = refiner.sam_masks(pixels, image.sha1, proposal.boxes, timer)
            if timing is not None and timed:
                for stage, seconds in timer.seconds.items():
                    timing.setdefault(input_name(refiner.tile), {}).setdefault(stage, []).append(seconds)
            sources[f"{sam_name} from the detector's boxes"] = (sam_masks, None)
            for min_iou in MIN_IOUS:
                for agreement in MIN_AGREEMENTS:
                    if min_iou or agreement:
                        chosen = choose(sam_masks, sam_iou, proposal.masks, min_iou, agreement)
                        sources[f"choice, {sam_name}: SAM_MIN_IOU {min_iou:g}, "
                                f"SAM_MIN_AGREEMENT {agreement:g}"] = (chosen.masks, chosen.used_sam)
        matches = match([_Region(m) for m in proposal.masks], truth)
        for source, (masks, used) in sources.items():
            scores = out.setdefault(source, SourceScores())
            for i, label, _ in matches:
                scores.dice.append(dice(masks[i], truth[label]))
                scores.nsd.append(nsd(masks[i], truth[label]))
            served_masks = {a.label: m for a, m in zip(proposal.numbered, masks) if m.any()}
            scores.instance_dice.append(score_image(served_masks, truth).instance_dice)
            scores.took_sam += int(used.sum()) if used is not None else 0
            scores.regions += len(masks)
    return out


@dataclass
class _Region:
    """What bench_real.match reads of a region."""

    mask: np.ndarray


def interactive(model: Model, images, settings) -> dict[str, list[float]]:
    """The interactive mode on the teeth `model` missed (no region matched): a box drawn around each
    (exact: the expert mask's box; loose: 10% of its size wider on every side), sent to the
    backend's /predict with Label Studio's interactive context (the backend serving `model`'s
    project, a fresh embedding cache); Dice of the returned mask against the expert's, and the filled
    exact box's. Seconds per request: the first on an image (cold: the encoder runs) and later ones
    (the cached embedding)."""
    import tempfile

    import cv2
    from bench_real import match

    from backend.detector import Detector
    from backend.formats import result_to_masks
    from backend.images import XrayImage
    from backend.pipeline import Pipeline, PipelineOptions
    from training.metrics import dice

    served = Pipeline(Detector.load(model.weights, conf=settings.detector_conf), None,
                      PipelineOptions.from_settings(settings, use_sam=False))
    files = Path(tempfile.mkdtemp(prefix="toothseg-bench-sam-"))
    (files / "images").mkdir()
    os.environ.update(MODEL_DIR=str(model.model_dir), LOCAL_FILES_DOCUMENT_ROOT=str(files),
                      EMBEDDING_CACHE_DIR=str(files / "embeddings"), SAM_PREANNOTATE="false")
    from backend.app import create_app
    from backend.label_config import render_label_config

    client = create_app().test_client()
    config = render_label_config()

    def ask(n: int, drawn: dict):
        body = {"tasks": [{"id": n, "data": {"image": f"/data/local-files/?d=images/{n}.png"}}],
                "project": f"{model.project}.0", "label_config": config, "params": {"context": {"result": [drawn]}}}
        answer = client.post("/predict", json=body)
        if answer.status_code != 200:
            raise SystemExit(f"/predict answered {answer.status_code}: {answer.get_data(as_text=True)}")
        return result_to_masks(answer.get_json()["results"][0]["result"])

    def rectangle(box, label: str, w: int, h: int) -> dict:
        x0, y0, x1, y1 = box
        return {"type": "rectanglelabels", "from_name": "tooth_box", "to_name": "image", "original_width": w,
                "original_height": h, "image_rotation": 0, "origin": "manual",
                "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                          "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [label]}}

    # warm-up (the models load on the first request): the first image mirrored, its own embedding
    warm = np.ascontiguousarray(images[0][1][:, ::-1])
    cv2.imwrite(str(files / "images" / "-1.png"), warm)
    ask(-1, rectangle((10, 10, warm.shape[1] // 4, warm.shape[0] // 4), "11", warm.shape[1], warm.shape[0]))
    out: dict[str, list[float]] = {}
    for n, (name, pixels, truth) in enumerate(images):
        proposal = served.propose(XrayImage.of(pixels, name))
        found = {label for _, label, _ in match([_Region(m) for m in proposal.masks], truth)}
        cv2.imwrite(str(files / "images" / f"{n}.png"), pixels)
        h, w = pixels.shape
        for k, label in enumerate(sorted(set(truth) - found)):
            ys, xs = np.nonzero(truth[label])
            exact = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)
            dx, dy = 0.1 * (exact[2] - exact[0]), 0.1 * (exact[3] - exact[1])
            loose = np.clip(exact + np.array([-dx, -dy, dx, dy]), 0, [w - 1, h - 1, w - 1, h - 1])
            for kind, box in (("exact box", exact), ("loose box (+10% a side)", loose)):
                t = time.perf_counter()
                masks = ask(n, rectangle(box, label, w, h))
                seconds = time.perf_counter() - t
                out.setdefault(kind, []).append(dice(masks.get(label, np.zeros_like(truth[label])), truth[label]))
                out.setdefault("cold s" if k == 0 and kind == "exact box" else "cached s", []).append(seconds)
            filled = np.zeros_like(truth[label])
            x0, y0, x1, y1 = exact.astype(int)
            filled[y0:y1 + 1, x0:x1 + 1] = True
            out.setdefault("the exact box filled (no SAM)", []).append(dice(filled, truth[label]))
    return out


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def evaluate(models: list[Model], images, tiles: list[int], base, settings, tuned: dict[str, dict] | None = None):
    """(per model: source -> scores, SAM input -> stage -> seconds per image of the first model).
    SAM: `base` at each input in `tiles`, and each tuned decoder in `tuned` (name -> state) too."""
    from backend.sam import SamRefiner

    refiners = []
    for tile in tiles:
        refiner = SamRefiner(base.predictor.model, base.checkpoint_id, base.cache, settings.sam_batch_size, tile=tile)
        refiners.append((f"SAM ({input_name(tile)})", refiner, True))
        refiners += [(f"SAM {name} ({input_name(tile)})", refiner.with_decoder(state), False)
                     for name, state in (tuned or {}).items()]
    timing: dict[str, dict[str, list[float]]] = {}
    per_model: dict[str, dict[str, SourceScores]] = {}
    for model in models:
        per_model[model.name] = score_model(model.weights, images, refiners, settings, None if per_model else timing)
        print(f"{model.name}: done", flush=True)
    return per_model, timing


def tune(base, items, sizes: list[int], steps: int) -> tuple[dict[str, dict], list[str]]:
    """A decoder tuned on the first N of `items` for each N in `sizes` (training.sam_training),
    and a table of what each took."""
    from training.sam_training import tune_sam

    tuned, lines = {}, ["| tuned on | teeth | steps | seconds (encoding the images included) |", "|---|---|---|---|"]
    for n in sizes:
        result, state = tune_sam(base, items[:n], steps)
        if state is not None:
            tuned[f"tuned on {n} images"] = state
        lines.append(f"| {n} images | {result.teeth} | {result.steps_run} | {result.seconds:.0f} |")
        print(f"tuned on {n}: {result}", flush=True)
    return tuned, lines


def section(title: str, data: str, per_model, timing, tiles: list[int], settings) -> list[str]:
    """One data set's tables: the sources, then SAM's time per image."""
    sources = list(next(iter(per_model.values())))
    teeth = sum(len(m[sources[0]].dice) for m in per_model.values())
    over = "models of the mean over images" if len(per_model) > 1 else "images"
    lines = [f"## {title}", "", f"Data: {data}; {len(per_model)} model{'s' * (len(per_model) > 1)} "
             f"({', '.join(per_model)}), {teeth} matched teeth in all.", "",
             "Per source, on the same matched teeth: mean Dice and NSD per tooth (all models pooled), the STS "
             f"instance Dice (numbers as served; median (min-max) over {over}), regions "
             "that took SAM's mask. Choices: SAM's mask where its predicted IoU >= SAM_MIN_IOU and it overlaps "
             "the learned refiner's mask by IoU >= SAM_MIN_AGREEMENT, else the refiner's (shipped: "
             f"{settings.sam_min_iou:g} / {settings.sam_min_agreement:g}).", "",
             "| masks | tooth Dice | tooth NSD | instance Dice | regions that took SAM's mask (all, matched or not) |",
             "|---|---|---|---|---|"]
    for source in sources:
        pooled = [m[source] for m in per_model.values()]
        took = sum(s.took_sam for s in pooled)
        took_text = f"{took} of {sum(s.regions for s in pooled)}" if source.startswith("choice") else "-"
        instance = ([float(np.mean(s.instance_dice)) for s in pooled] if len(pooled) > 1
                    else pooled[0].instance_dice)
        lines.append(f"| {source} | {np.mean([d for s in pooled for d in s.dice]):.3f} | "
                     f"{np.mean([d for s in pooled for d in s.nsd]):.3f} | {spread(instance)} | {took_text} |")
    lines += ["", "Time per image (this machine; the first model's pass: every embedding computed):", "",
              "| SAM input | encoder s/image | decoder s/image |", "|---|---|---|"]
    for tile in tiles:
        stages = timing.get(input_name(tile), {})
        lines.append(f"| {input_name(tile)} | {spread(stages.get('sam_encoder', [0.0]))} | "
                     f"{spread(stages.get('sam_decoder', [0.0]))} |")
    return lines + [""]


def synthetic_images(n: int, size: tuple[int, int]):
    from training.data.synth import generate

    return [(f"synthetic-{seed}", (s := generate(seed, size)).image, s.masks()) for seed in range(9000, 9000 + n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-work", type=Path, action="append", default=[],
                        help="a bench_real.py --on pool --work folder (repeatable)")
    parser.add_argument("--data", type=Path, help="UFBA-425 checkout (with --real-work)")
    parser.add_argument("--sam-model-type", default="lite_medsam")
    parser.add_argument("--sam-checkpoint", type=Path, help="default: the packaged weights (lite_medsam)")
    parser.add_argument("--images", type=int, default=0, help="the first N validation images (0: all)")
    parser.add_argument("--models", type=int, default=0, help="the first N models of --real-work (0: all)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[0, 256, 384],
                        help="SAM inputs to compare on real images (SAM_TILE values; 0: the whole image)")
    parser.add_argument("--synthetic", type=int, default=0, help="generated panoramics to score (0: none)")
    parser.add_argument("--synthetic-size", default="2000x1000")
    parser.add_argument("--synthetic-tiles", type=int, nargs="+", default=[0, 512, 768])
    parser.add_argument("--weights", help="the synthetic images' detector (default: bench_predict's, trained once)")
    parser.add_argument("--tune", type=int, nargs="*", default=[],
                        help="also SAM with its decoder tuned on the first N images of the pool's annotation split")
    parser.add_argument("--tune-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sam.md")
    args = parser.parse_args()
    if not (args.real_work and args.data) and not args.synthetic:
        parser.error("give --real-work with --data, or --synthetic N")

    from backend.process import set_torch_threads
    from backend.sam import EmbeddingCache, SamRefiner
    from backend.settings import Settings

    settings = Settings.from_env()
    set_torch_threads(settings.torch_threads)
    cache = EmbeddingCache(50 * (args.synthetic + 60 * bool(args.real_work)))  # every image's embeddings, kept
    base = SamRefiner.load(args.sam_model_type, args.sam_checkpoint, cache=cache, batch_size=settings.sam_batch_size)
    if base is None:
        raise SystemExit(f"no weights for SAM {args.sam_model_type}: give --sam-checkpoint")
    command = shlex.join([".venv/bin/python", "bench/bench_sam.py", *sys.argv[1:]])
    lines = [f"# SAM ({args.sam_model_type}) against toothseg's own masks", "", f"Command: `{command}`",
             f"Machine: {machine()}", "",
             "SAM's input (`SAM_TILE`): the whole image, or tiles of N x N pixels over the teeth overlapping by "
             "half, each box on the tile that holds it best; either way resized to the encoder's input.", ""]
    clicks, first = {}, None
    if args.real_work and args.data:
        import bench_real

        real = bench_real.RealData(args.data)
        annotate, validation = bench_real.selection_split(sorted(real.loaders))
        images = [(name, item.pixels(), item.masks) for name in validation[:args.images or None]
                  if (item := real.get(name)) is not None]
        models = [model for work in args.real_work for model in models_of(work)][:args.models or None]
        if not models:
            raise SystemExit("no models in " + ", ".join(map(str, args.real_work)))
        tuned, tune_lines = tune(base, [item for name in annotate[:max(args.tune, default=0)]
                                       if (item := real.get(name)) is not None],
                                 args.tune, args.tune_steps)
        per_model, timing = evaluate(models, images, args.tiles, base, settings, tuned)
        lines += section("Real radiographs", f"UFBA-425 pool validation images ({len(images)}; never the held-out "
                         "test images)", per_model, timing, args.tiles, settings)
        if tuned:
            lines += [f"SAM's prompt encoder and mask decoder tuned (`training.sam_training.tune_sam`, "
                      f"{args.tune_steps} steps) on the pool's annotation split, never on these images:", "",
                      *tune_lines, ""]
        first = models[0]
        clicks = interactive(first, images, settings)
        print("interactive: done", flush=True)
    if args.synthetic:
        from bench_predict import detector_weights

        size = tuple(int(v) for v in args.synthetic_size.split("x"))
        images = synthetic_images(args.synthetic, size)
        weights = detector_weights(args)
        per_model, timing = evaluate([Model(f"synthetic detector {weights.name}", weights)], images,
                                     args.synthetic_tiles, base, settings)
        lines += section(f"Synthetic {args.synthetic_size} panoramics",
                         f"{len(images)} generated images (seeds 9000-{8999 + len(images)}), a detector trained on "
                         "24 others (`training.data.synth.train_synthetic_detector`)", per_model, timing,
                         args.synthetic_tiles, settings)
    if first is not None:
        lines += interactive_lines(clicks, first)
    write_report(lines, args.out)
    return 0


def interactive_lines(clicks: dict[str, list[float]], model: Model) -> list[str]:
    lines = [f"## Interactive: a box around a tooth the model missed ({len(clicks.get('exact box', []))} teeth, "
             f"{model.name})", "",
             "The box sent to the backend's `/predict` with Label Studio's interactive context (a rectangle "
             "with the tooth's label; the whole image is SAM's input); Dice of the returned mask against the "
             "expert's, mean and median over teeth.", "",
             "| prompt | mean Dice | median Dice |", "|---|---|---|"]
    for kind in ("exact box", "loose box (+10% a side)", "the exact box filled (no SAM)"):
        if values := clicks.get(kind):
            lines.append(f"| {kind} | {np.mean(values):.3f} | {np.median(values):.3f} |")
    return lines + ["", "| /predict request | seconds |", "|---|---|",
                    f"| first box on an image (the encoder runs) | {spread(clicks.get('cold s', [0.0]))} |",
                    f"| later boxes (cached embedding) | {spread(clicks.get('cached s', [0.0]))} |"]


if __name__ == "__main__":
    sys.exit(main())
