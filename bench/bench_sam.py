"""SAM's masks against toothseg's own on real radiographs, and SAM's acceptance thresholds.

    .venv/bin/python bench/bench_sam.py --real-work bench/.cache/real-pool-idle20 --data DIR \\
        [--sam-model-type lite_medsam] [--sam-checkpoint PTH] [--images N] --out bench/results/sam.md

For each model a `bench_real.py --on pool` run in `--real-work` trained (each project's last
version), on the pool's validation images (never the held-out test images, so the thresholds can be
chosen here): the product's pipeline numbers the detector's candidates (`Pipeline.propose`, the
served settings); each numbered tooth is matched one to one to an expert's tooth (bench_real.match,
IoU >= 0.3, on the learned refiner's masks). Mask sources, on the same teeth: the detector's own
masks, the learned mask refiner's (what is served without SAM), SAM's from the detector's boxes
(one embedding of the whole image), and the product's choice between SAM's and the refiner's mask
(`backend.sam.choose`) at each SAM_MIN_IOU / SAM_MIN_AGREEMENT pair. Per source: Dice and NSD
(2 px) per matched tooth (mean, and median over models), the STS instance Dice per image (numbers
as served; mean over images, median (min-max) over models), and how many teeth took SAM's mask.
SAM's input (`--tiles`, the SAM_TILE setting): the whole image, or tiles over the teeth. Time:
SAM's encoder (every embedding computed) and decoder per image, on this machine.
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


def models_of(work: Path):
    """(name, weights) of each project's last version in a bench_real --work folder."""
    from backend.registry import Registry

    registry = Registry(work / "models")
    for project_dir in sorted((work / "models" / "projects").iterdir(), key=lambda p: int(p.name)):
        versions = registry.versions(int(project_dir.name))
        if versions:
            yield f"{work.name} project {project_dir.name} {versions[-1].version.split('-')[0]}", versions[-1].weights


def input_name(tile: int) -> str:
    return "whole image" if not tile else f"tiles of {tile} px"


def score_model(weights: Path, images, refiners, settings, timing: dict | None) -> dict[str, SourceScores]:
    """Every source's scores for one model on `images` [(name, pixels, truth)]; SAM's masks from
    each refiner in `refiners` (one per SAM input); `timing` (input -> stage -> seconds per image)
    gets this model's SAM times when given (the first model: every embedding computed, none cached)."""
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
        for refiner in refiners:
            timer = StageTimer()
            sam_masks, sam_iou = refiner.sam_masks(pixels, image.sha1, proposal.boxes, timer)
            if timing is not None:
                for stage, seconds in timer.seconds.items():
                    timing.setdefault(input_name(refiner.tile), {}).setdefault(stage, []).append(seconds)
            sources[f"SAM ({input_name(refiner.tile)}) from the detector's boxes"] = (sam_masks, None)
            for min_iou in MIN_IOUS:
                for agreement in MIN_AGREEMENTS:
                    if min_iou or agreement:
                        chosen = choose(sam_masks, sam_iou, proposal.masks, min_iou, agreement)
                        sources[f"choice, SAM {input_name(refiner.tile)}: SAM_MIN_IOU {min_iou:g}, "
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


def interactive(weights: Path, images, refiner, settings) -> dict[str, list[float]]:
    """The interactive mode on the teeth the model missed (no region matched): SAM's mask from a
    box drawn around each (exact: the expert mask's box; loose: 10% of its size wider on every
    side), prompted as `/predict` with Label Studio's interactive context does
    (`SamRefiner.prompt`, the whole image); Dice against the expert's mask, and the filled exact
    box's. Time per prompt: the first on an image (cold: the encoder runs) and a second one (the
    cached embedding), with a fresh embedding cache."""
    from bench_real import match

    from backend.detector import Detector
    from backend.images import XrayImage
    from backend.pipeline import Pipeline, PipelineOptions
    from backend.sam import EmbeddingCache, SamRefiner
    from training.metrics import dice

    served = Pipeline(Detector.load(weights, conf=settings.detector_conf), None,
                      PipelineOptions.from_settings(settings, use_sam=False))
    fresh = SamRefiner(refiner.predictor.model, refiner.checkpoint_id, EmbeddingCache(2))
    out: dict[str, list[float]] = {}
    for name, pixels, truth in images:
        image = XrayImage.of(pixels, name)
        proposal = served.propose(image)
        found = {label for _, label, _ in match([_Region(m) for m in proposal.masks], truth)}
        h, w = pixels.shape
        for k, label in enumerate(sorted(set(truth) - found)):
            ys, xs = np.nonzero(truth[label])
            exact = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)
            dx, dy = 0.1 * (exact[2] - exact[0]), 0.1 * (exact[3] - exact[1])
            loose = np.clip(exact + np.array([-dx, -dy, dx, dy]), 0, [w - 1, h - 1, w - 1, h - 1])
            for kind, box in (("exact box", exact), ("loose box (+10% a side)", loose)):
                t = time.perf_counter()
                mask, _ = fresh.prompt(pixels, image.sha1, box=box)
                seconds = time.perf_counter() - t
                out.setdefault(kind, []).append(dice(mask, truth[label]))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-work", type=Path, action="append", required=True,
                        help="a bench_real.py --on pool --work folder (repeatable)")
    parser.add_argument("--data", type=Path, required=True, help="UFBA-425 checkout")
    parser.add_argument("--sam-model-type", default="lite_medsam")
    parser.add_argument("--sam-checkpoint", type=Path, help="default: the packaged weights (lite_medsam)")
    parser.add_argument("--images", type=int, default=0, help="the first N validation images (0: all)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[0, 256, 384],
                        help="SAM inputs to compare (SAM_TILE values; 0: the whole image)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sam.md")
    args = parser.parse_args()

    import bench_real

    from backend.process import set_torch_threads
    from backend.sam import EmbeddingCache, SamRefiner
    from backend.settings import Settings

    settings = Settings.from_env()
    set_torch_threads(settings.torch_threads)
    real = bench_real.RealData(args.data)
    _, validation = bench_real.selection_split(sorted(real.loaders))
    if args.images:
        validation = validation[:args.images]
    images = [(name, item.pixels(), item.masks) for name in validation if (item := real.get(name)) is not None]
    base = SamRefiner.load(args.sam_model_type, args.sam_checkpoint, cache=EmbeddingCache(50 * len(images)),
                           batch_size=settings.sam_batch_size)
    if base is None:
        raise SystemExit(f"no weights for SAM {args.sam_model_type}: give --sam-checkpoint")
    refiners = [SamRefiner(base.predictor.model, base.checkpoint_id, base.cache, settings.sam_batch_size, tile=tile)
                for tile in args.tiles]
    timing: dict[str, dict[str, list[float]]] = {}
    per_model: dict[str, dict[str, SourceScores]] = {}
    for work in args.real_work:
        for name, weights in models_of(work):
            per_model[name] = score_model(weights, images, refiners, settings, None if per_model else timing)
            print(f"{name}: done", flush=True)
    if not per_model:
        raise SystemExit("no models in " + ", ".join(map(str, args.real_work)))

    first_weights = next(weights for work in args.real_work for _, weights in models_of(work))
    clicks = interactive(first_weights, images, base, settings)
    print("interactive: done", flush=True)

    sources = list(next(iter(per_model.values())))
    command = shlex.join([".venv/bin/python", "bench/bench_sam.py", *sys.argv[1:]])
    teeth = sum(len(s.dice) for s in (m[sources[0]] for m in per_model.values()))
    lines = [f"# SAM ({args.sam_model_type}) against toothseg's own masks on real radiographs", "",
             f"Command: `{command}`", f"Machine: {machine()}",
             f"Data: UFBA-425 pool validation images ({len(images)}; never the held-out test images), "
             f"{len(per_model)} models ({', '.join(per_model)}), {teeth} matched teeth in all. "
             "SAM's input (`SAM_TILE`): the whole image, or tiles of N x N pixels over the teeth overlapping by "
             "half, each box on the tile that holds it best; either way resized to the encoder's input.", "",
             "Per source, on the same matched teeth: mean Dice and NSD per tooth (all models pooled), the STS "
             "instance Dice (numbers as served; mean over images, median (min-max) over models), teeth that took "
             "SAM's mask. Choices: SAM's mask where its predicted IoU >= SAM_MIN_IOU and it overlaps the learned "
             "refiner's mask by IoU >= SAM_MIN_AGREEMENT, else the refiner's (shipped: "
             f"{settings.sam_min_iou:g} / {settings.sam_min_agreement:g}).", "",
             "| masks | tooth Dice | tooth NSD | instance Dice | regions that took SAM's mask (all, matched or not) |",
             "|---|---|---|---|---|"]
    for source in sources:
        pooled = [m[source] for m in per_model.values()]
        dices = [d for s in pooled for d in s.dice]
        nsds = [d for s in pooled for d in s.nsd]
        took = sum(s.took_sam for s in pooled)
        regions = sum(s.regions for s in pooled)
        took_text = f"{took} of {regions}" if source.startswith("choice") else "-"
        lines.append(f"| {source} | {np.mean(dices):.3f} | {np.mean(nsds):.3f} | "
                     f"{spread([float(np.mean(s.instance_dice)) for s in pooled])} | {took_text} |")
    lines += ["", "## Time per image (this machine; the first model's pass: every embedding computed)", "",
              "| SAM input | encoder s/image | decoder s/image |", "|---|---|---|"]
    for tile in args.tiles:
        stages = timing.get(input_name(tile), {})
        lines.append(f"| {input_name(tile)} | {spread(stages.get('sam_encoder', [0.0]))} | "
                     f"{spread(stages.get('sam_decoder', [0.0]))} |")
    missed = len(clicks.get("exact box", []))
    lines += ["", f"## Interactive: a box around a tooth the model missed ({missed} teeth, "
              f"{next(iter(per_model))})", "",
              "The box prompted as `/predict` does with Label Studio's interactive context (`SamRefiner.prompt`, "
              "whole image); Dice against the expert's mask, mean and median over teeth.", "",
              "| prompt | mean Dice | median Dice |", "|---|---|---|"]
    for kind in ("exact box", "loose box (+10% a side)", "the exact box filled (no SAM)"):
        values = clicks.get(kind, [])
        if values:
            lines.append(f"| {kind} | {np.mean(values):.3f} | {np.median(values):.3f} |")
    lines += ["", "| request | seconds per prompt (SAM) |", "|---|---|",
              f"| first prompt on an image (encoder + decoder) | {spread(clicks.get('cold s', [0.0]))} |",
              f"| later prompts (cached embedding) | {spread(clicks.get('cached s', [0.0]))} |"]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
