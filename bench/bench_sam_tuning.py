"""SAM tuned in the retrain job (TRAIN_SAM_STEPS) against toothseg's own masks on held-out real radiographs.

    .venv/bin/python bench/bench_sam_tuning.py --real-work bench/.cache/real-idle20 --data DIR \\
        [--sizes 8 20] [--steps 30] [--gate-images 6] [--models N] [--images N] \\
        --out bench/results/sam-tuning.md

Tuning, as the retrain job does it (`training.sam_training`): LiteMedSAM's prompt encoder and mask
decoder tuned for `--steps` steps (TRAIN_SAM_STEPS; the rest the product's defaults) on the first N
images of UFBA-425's pool annotation split (`bench_real.selection_split`) for each N in `--sizes`,
every image encoded once (a fresh embedding cache per size, as in a job whose images were never
encoded); then `gate_sam` against the shipped SAM on the first `--gate-images` pool validation
images, from the first model's boxes, which also chooses the version's SAM_MIN_IOU /
SAM_MIN_AGREEMENT. The stage's seconds (tuning and gate) and the process's peak memory (ru_maxrss)
before and after it are reported.

Scoring: on UFBA-425's held-out test images (`bench_real.split_names`; nothing was chosen on them),
with each model of `--real-work` (each project's last version of a `bench_real.py` run: detectors
trained on pool images). The product's pipeline numbers the detector's candidates
(`Pipeline.propose`); every source draws the same numbered teeth: the detector's own masks, the
learned refiner's (served without SAM), SAM's from the detector's boxes (shipped and tuned), and the
pipeline's choice between SAM's and the refiner's mask (`backend.sam.choose`; shipped SAM at the
settings' thresholds, a tuned one at the thresholds its gate chose). Per source: the STS instance
Dice, instance NSD and image NSD (numbers as served; per model the mean over images, median
(min-max) over models), Dice per tooth matched one to one to an expert's tooth (IoU >= 0.3, all
models pooled), and the images on which a source's instance Dice is below the learned refiner's by
more than 0.02.
"""
from __future__ import annotations

import argparse
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_predict import machine, write_report  # noqa: E402
from bench_sam import Model, _Region, models_of, spread  # noqa: E402

WORSE_BY = 0.02
"""An image counts as worse than the learned refiner's when its instance Dice is lower by more than this."""


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tune_stage(base, items, gate_items, detector, steps: int, settings):
    """One retrain's SAM stage on `items`: (tuned refiner with the gate's thresholds, gate, tuning
    result, seconds, peak MB before, peak MB after)."""
    from backend.pipeline import PipelineOptions
    from backend.sam import EmbeddingCache, SamRefiner
    from training.sam_training import gate_sam, tune_sam

    fresh = SamRefiner(base.predictor.model, base.checkpoint_id, EmbeddingCache(len(items) + len(gate_items) + 4),
                       base.batch_size, base.min_iou, base.min_agreement)
    before = peak_mb()
    start = time.monotonic()
    result, state = tune_sam(fresh, items, steps)
    decision = gate_sam(detector, fresh, fresh.with_decoder(state), gate_items,
                        PipelineOptions.from_settings(settings, use_sam=False))
    seconds = time.monotonic() - start
    tuned = base.with_decoder(state, *decision.thresholds)
    return tuned, decision, result, seconds, before, peak_mb()


def score(model: Model, images, sams, settings) -> dict[str, dict[str, list[float]]]:
    """source -> metric -> values (per image: instance_dice, instance_nsd, image_nsd; per matched
    tooth: tooth_dice) for `model` on `images` [(name, pixels, truth)]; `sams`: [(name, refiner)]."""
    from bench_real import match

    from backend.detector import Detector
    from backend.images import XrayImage
    from backend.pipeline import Pipeline, PipelineOptions
    from backend.sam import choose
    from training.metrics import dice, score_image

    detector = Detector.load(model.weights, conf=settings.detector_conf)
    served = Pipeline(detector, None, PipelineOptions.from_settings(settings, use_sam=False))
    own = Pipeline(detector, None, PipelineOptions.from_settings(settings, use_sam=False, refine_masks=False))
    out: dict[str, dict[str, list[float]]] = {}
    for name, pixels, truth in images:
        image = XrayImage.of(pixels, name)
        proposal = served.propose(image)
        sources = {"detector's own masks": own.propose(image).masks, "learned refiner (served)": proposal.masks}
        for sam_name, refiner in sams:
            masks, ious = refiner.sam_masks(pixels, image.sha1, proposal.boxes)
            sources[f"{sam_name} from the detector's boxes"] = masks
            sources[f"choice, {sam_name} ({refiner.min_iou:g} / {refiner.min_agreement:g})"] = choose(
                masks, ious, proposal.masks, refiner.min_iou, refiner.min_agreement).masks
        matches = match([_Region(m) for m in proposal.masks], truth)
        for source, masks in sources.items():
            s = score_image({a.label: m for a, m in zip(proposal.numbered, masks) if m.any()}, truth)
            values = out.setdefault(source, {})
            for metric in ("instance_dice", "instance_nsd", "image_nsd"):
                values.setdefault(metric, []).append(getattr(s, metric))
            values.setdefault("tooth_dice", []).extend(dice(masks[i], truth[label]) for i, label, _ in matches)
    return out


def table(per_model: dict[str, dict[str, dict[str, list[float]]]]) -> list[str]:
    sources = list(next(iter(per_model.values())))
    refiner = "learned refiner (served)"
    lines = ["| masks | tooth Dice | instance Dice | instance NSD | image NSD | images worse than the refiner "
             f"by > {WORSE_BY} (instance Dice) |", "|---|---|---|---|---|---|"]
    for source in sources:
        runs = [m[source] for m in per_model.values()]
        cells = [f"{np.mean([d for r in runs for d in r['tooth_dice']]):.3f}"]
        for metric in ("instance_dice", "instance_nsd", "image_nsd"):
            cells.append(spread([float(np.mean(r[metric])) for r in runs]))
        worse = sum(int(np.sum(np.array(m[source]["instance_dice"]) < np.array(m[refiner]["instance_dice"]) - WORSE_BY))
                    for m in per_model.values())
        images = sum(len(m[source]["instance_dice"]) for m in per_model.values())
        cells.append("-" if source == refiner else f"{worse} of {images}")
        lines.append(f"| {source} | {' | '.join(cells)} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-work", type=Path, action="append", required=True,
                        help="a bench_real.py --work folder whose models were trained on pool images")
    parser.add_argument("--data", type=Path, required=True, help="UFBA-425 checkout")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 20], help="pool images SAM is tuned on")
    parser.add_argument("--steps", type=int, default=30, help="TRAIN_SAM_STEPS")
    parser.add_argument("--gate-images", type=int, default=6, help="pool validation images of the gate")
    parser.add_argument("--models", type=int, default=0, help="the first N models (0: all)")
    parser.add_argument("--images", type=int, default=0, help="the first N held-out images (0: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sam-tuning.md")
    args = parser.parse_args()

    import bench_real

    from backend.detector import Detector
    from backend.process import set_torch_threads
    from backend.sam import EmbeddingCache, SamRefiner
    from backend.settings import Settings

    settings = Settings.from_env()
    set_torch_threads(settings.torch_threads)
    real = bench_real.RealData(args.data)
    names = sorted(real.loaders)
    annotate, validation = bench_real.selection_split(names)
    _, test = bench_real.split_names(names)
    models = [m for work in args.real_work for m in models_of(work)][:args.models or None]
    if not models:
        raise SystemExit("no models in " + ", ".join(map(str, args.real_work)))
    base = SamRefiner.load("lite_medsam", None, cache=EmbeddingCache(len(test) + 8), batch_size=settings.sam_batch_size,
                           min_iou=settings.sam_min_iou, min_agreement=settings.sam_min_agreement)
    gate_items = [item for name in validation[:args.gate_images] if (item := real.get(name)) is not None]
    first = Detector.load(models[0].weights, conf=settings.detector_conf)
    sams, stage_lines = [("LiteMedSAM shipped", base)], []
    for n in args.sizes:
        items = [item for name in annotate[:n] if (item := real.get(name)) is not None]
        tuned, decision, result, seconds, before, after = tune_stage(base, items, gate_items, first, args.steps,
                                                                     settings)
        sams.append((f"LiteMedSAM tuned on {n} images", tuned))
        stage_lines.append(f"| {n} | {result.teeth} | {result.steps_run} | {seconds:.0f} | {before:.0f} -> "
                           f"{after:.0f} | {decision.reason} | {decision.thresholds[0]:g} / "
                           f"{decision.thresholds[1]:g} |")
        print(f"tuned on {n}: {result}; {seconds:.0f} s; {decision.reason}", flush=True)
    images = [(name, item.pixels(), item.masks) for name in test[:args.images or None]
              if (item := real.get(name)) is not None]
    per_model = {}
    for model in models:
        per_model[model.name] = score(model, images, sams, settings)
        print(f"{model.name}: done", flush=True)

    command = shlex.join([".venv/bin/python", "bench/bench_sam_tuning.py", *sys.argv[1:]])
    lines = ["# SAM tuned on annotated teeth, on held-out real radiographs (issue 44)", "",
             f"Command: `{command}`", f"Machine: {machine()}", "",
             f"Data: UFBA-425 held-out test images ({len(images)}; nothing was chosen on them); "
             f"{len(models)} model(s) trained on pool images ({', '.join(per_model)}). SAM's input: the whole "
             "image. Numbers as served; instance Dice, NSD and image NSD: per model the mean over images, median "
             "(min-max) over models; tooth Dice: teeth matched one to one to an expert's (IoU >= 0.3), all "
             "models pooled.", "", *table(per_model), "",
             f"The SAM stage of a retrain (`training.sam_training.tune_sam`, {args.steps} steps, then `gate_sam` "
             f"on {len(gate_items)} pool validation images from {models[0].name}'s boxes; each image encoded "
             "once): tuned on the first N images of the pool's annotation split.", "",
             "| N | teeth | steps | seconds (encoding, tuning, gate) | process peak MB before -> after | gate "
             "(against the shipped SAM) | thresholds chosen (SAM_MIN_IOU / SAM_MIN_AGREEMENT) |",
             "|---|---|---|---|---|---|---|", *stage_lines]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
