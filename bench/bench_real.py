"""toothseg on real panoramic radiographs: the first model from a few annotated images, the loop
with the simulated oracle, and the masks by source, on UFBA-425 (expert per-tooth masks).

    .venv/bin/python bench/bench_real.py --data DIR --work bench/.cache/real   # hours on 2 CPU cores
    .venv/bin/python bench/bench_real.py --data DIR --work bench/.cache/real --report-only
    .venv/bin/python bench/bench_real.py --data DIR --smoke --work /tmp/real-smoke   # mechanics, minutes
    .venv/bin/python bench/bench_real.py --data DIR --on pool --set TRAIN_FLIPLR=0.5 --work bench/.cache/real-flip
    .venv/bin/python bench/bench_real.py --data DIR --selection bench/.cache/real-pool bench/.cache/real-flip
    .venv/bin/python bench/bench_real.py --data DIR --work bench/.cache/real-v2 --before bench/.cache/real
    .venv/bin/python bench/bench_real.py --data DIR --on pool --models-from bench/.cache/real-pool-v2 \\
        --set SCORE_THRESHOLD=0.4 --work bench/.cache/real-pool-score0.4   # scored again, no training

DIR is a checkout of github.com/devichand579/Instance_seg_teeth or its Dataset/bb_u_net_dataset
folder (`toothseg convert --from ufba` reads the same layout). The images are split once, by a
fixed seed and stratified by category, into a pool and a held-out test set; every training draws
its annotated images from the pool only, and every figure is measured on the held-out images.
Settings are chosen on the pool only: this bench runs the product's defaults (TRAIN_*, the
9-minute budget, SCORE_THRESHOLD, ...) and the retrain job itself (`training.jobs.run_round`, as
`toothseg simulate` runs it: only the export from Label Studio is replaced).

To choose a setting, `--on pool` scores on validation images split off the pool (the held-out
images are not touched) and `--set KEY=VALUE` changes settings over the defaults. `--selection
WORK...` puts such runs side by side (the first is the baseline; the same draws are the same
annotated images, so the per-draw differences are paired) in bench/results/real-selection.md.

Each training's figures are kept in `--work` (runs/<name>.json); a rerun trains only what is
missing, so a run stopped by a session's end goes on where it stopped. Writes
bench/results/real.md and real.json (`--out`); `--before WORK` (an earlier run's --work, e.g.
before a default changed) adds its first models to the report, draw by draw beside this run's.

- First model from 4, 8 and 20 annotated images (`--draws` draws each: different images):
  teeth found (a region matched one to one to the expert's tooth with IoU >= 0.3), extra regions,
  numbered right among the found, IA, instance Dice and NSD, image (union) Dice, per category and
  overall; the wrong numbers by position shift; training minutes and epochs.
- Masks by source on the teeth found: the detector's own masks, the learned refiner's (what is
  served), and SAM's where `--sam-checkpoint` is given: Dice against the expert's mask.
- `--models-from WORK`: the first models another run trained, scored and gated again with this
  run's settings (a setting used only when predicting needs no training).
- `--idle-rounds K`: after each first model, K more trainings on the same annotated images, each
  warm-started from the project's current model (the retrain job's warm start and warm length),
  gated and promoted as any version: what continued training while the worker is idle gives.
- Loop: from draw 0's 8-image model, each round pre-annotates `--loop-pool` pool images, the
  oracle corrects the `--per-round` most confident (`training.oracle`: actions per image) and the
  retrain job runs on all annotated images (warm start, the product's warm length).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_VERBOSE", "False")

from bench_predict import machine, write_report  # noqa: E402

from training.data.dataset_io import DatasetItem, read_dataset, ufba_category  # noqa: E402
from training.oracle import OracleCount, iou_matrix, oracle_count  # noqa: E402
from training.simulate import SimProject, per_image, spread  # noqa: E402

FOUND_IOU = 0.3
"""A region finds an expert's tooth when the two are matched one to one with IoU >= this."""
SIZES = (4, 8, 20)
SPLIT_SEED = 425
TEST_SHARE = 0.15


# --- the data ------------------------------------------------------------------------------

@dataclass
class Split:
    """UFBA-425 split once: names of the pool and the held-out test images."""

    pool: list[str]
    test: list[str]
    failed: list[str]


def split_names(names: list[str], share: float = TEST_SHARE, seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(pool, test): per category, `share` of its images (at least one) drawn by `seed` into the test set."""
    rng = np.random.default_rng(seed)
    pool, test = [], []
    for category in sorted({ufba_category(n) for n in names}):
        members = sorted(n for n in names if ufba_category(n) == category)
        k = max(1, round(share * len(members))) if len(members) > 1 else 0
        chosen = set(rng.choice(members, size=k, replace=False).tolist()) if k else set()
        test += [n for n in members if n in chosen]
        pool += [n for n in members if n not in chosen]
    return sorted(pool), sorted(test)


def selection_split(names: list[str]) -> tuple[list[str], list[str]]:
    """(to annotate, validation) of a selection run (`--on pool`): the pool images among `names`,
    split again by the next seed; the held-out test images are in neither."""
    pool, _ = split_names(names)
    return split_names(pool, seed=SPLIT_SEED + 1)


class RealData:
    """The data set's items by name, loaded on first use (about 8 MB of masks per image)."""

    def __init__(self, src: Path, max_images: int = 0):
        reader = read_dataset(src, "ufba")
        self.loaders = {}
        self.failed: list[str] = []
        for source, load in reader.entries:
            self.loaders[Path(source).stem] = (source, load)
        if max_images:
            self.loaders = dict(sorted(self.loaders.items())[:max_images])
        self.cache: dict[str, DatasetItem] = {}

    def get(self, name: str) -> DatasetItem | None:
        """The item, or None (its reason kept in `failed`) when its files cannot be read."""
        from backend.images import ImageError

        if name not in self.cache:
            source, load = self.loaders[name]
            try:
                self.cache[name] = load()
            except (ValueError, OSError, ImageError) as exc:
                self.failed.append(f"{source}: {exc}")
                return None
        return self.cache[name]


@dataclass
class RealSample:
    """What SimProject reads of a sample: the grey image and its masks."""

    image: np.ndarray
    truth: dict[str, np.ndarray]

    def masks(self) -> dict[str, np.ndarray]:
        return self.truth

    def item(self, key: str) -> DatasetItem:
        return DatasetItem(key, self.image, self.truth)


class RealProject(SimProject):
    """SimProject on real images: keys are the data set's image names; the task ids follow the
    order in which the bench first uses an image."""

    def __init__(self, data: RealData, test: list[str], work: Path, log, train_env: dict[str, str], device: str,
                 sam: str = "vit_b", sam_checkpoint: Path | None = None):
        import cv2

        from backend.formats import find_target
        from backend.label_config import render_label_config
        from backend.settings import Settings
        from training.data.synth import label_studio_result
        from training.simulate import SimConfig
        from training.train import TrainConfig

        self.config = SimConfig(size=(512, 512), cold_sizes=SIZES, test=len(test), seeds=(0,), loop=False,
                                device=device, sam=sam, sam_checkpoint=sam_checkpoint)
        self.seed, self.work, self.log, self.data = 0, work, log, data
        self.target = find_target(render_label_config())
        self.files = work / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self._cv2, self._result = cv2, label_studio_result
        self.samples, self.task_ids, self.results = {}, {}, {}
        env = {**os.environ, **train_env, "MODEL_DIR": str(work / "models"), "LOCAL_FILES_DOCUMENT_ROOT": str(work),
               "LABEL_STUDIO_URL": "", "DEVICE": device}
        self.settings = Settings.from_env(env)
        self.env = env
        self.config_for = lambda extra: TrainConfig.from_env({**env, **extra}, device=device)
        self.keys = {"test": [k for k in test if self.add(k)]}
        self.test_items = [self.item(key) for key in self.keys["test"]]
        self.refiner = self._refiner()

    def add(self, key: str) -> bool:
        """Load image `key` as a task (its PNG in the local files folder); False if it failed to read."""
        if key in self.samples:
            return True
        item = self.data.get(key)
        if item is None:
            return False
        pixels = item.pixels()
        self.samples[key] = RealSample(pixels, item.masks)
        self.task_ids[key] = len(self.task_ids) + 1
        self._cv2.imwrite(str(self.files / f"{key}.png"), pixels)
        self.results[key] = self._result(item.masks, self.target)
        return True

    def teeth(self, keys) -> int:
        return sum(len(self.samples[k].truth) for k in keys)


# --- scoring -------------------------------------------------------------------------------

@dataclass
class ImageRow:
    """One held-out image under one model."""

    name: str
    category: str
    teeth: int
    found: int
    numbered_right: int
    extra: int
    ia: float
    instance_dice: float
    instance_nsd: float
    image_dice: float
    actions: float
    missed: list[str] = field(default_factory=list)  # expert labels of the teeth not found
    shifts: list[int] = field(default_factory=list)  # predicted minus true position, same quadrant, wrong numbers
    other_quadrant: int = 0
    dice_by_source: dict[str, list[float]] = field(default_factory=dict)


def match(regions, truth: dict[str, np.ndarray], min_iou: float = FOUND_IOU) -> list[tuple[int, str, float]]:
    """(region index, expert label, IoU) of the one-to-one matches with IoU >= min_iou (Hungarian on IoU)."""
    from scipy.optimize import linear_sum_assignment

    labels = list(truth)
    ious = iou_matrix([r.mask for r in regions], [truth[label] for label in labels])
    if not ious.size:
        return []
    rows, cols = linear_sum_assignment(ious, maximize=True)
    return [(i, labels[j], float(ious[i, j])) for i, j in zip(rows, cols) if ious[i, j] >= min_iou]


def score_model(sim: RealProject, pipelines: dict[str, object]) -> list[ImageRow]:
    """Each held-out image through the served pipeline (`pipelines["served"]`) and, for the mask
    table, the same detections through the other sources' pipelines."""
    from backend.images import XrayImage
    from training.metrics import dice, score_image

    rows = []
    for item in sim.test_items:
        image = XrayImage.of(item.pixels(), item.name)
        regions = pipelines["served"].run(image)
        s = score_image({r.label: r.mask for r in regions}, item.masks)
        matches = match(regions, item.masks)
        row = ImageRow(item.name, ufba_category(item.name), len(item.masks), len(matches),
                       sum(1 for i, label, _ in matches if regions[i].label == label), len(regions) - len(matches),
                       s.ia, s.instance_dice, s.instance_nsd, s.image_dice,
                       float(oracle_count(regions, item.masks).actions))
        row.missed = sorted(set(item.masks) - {label for _, label, _ in matches})
        for i, label, _ in matches:
            got = regions[i].label
            if got != label:
                if got[0] == label[0]:
                    row.shifts.append(int(got[1]) - int(label[1]))
                else:
                    row.other_quadrant += 1
        row.dice_by_source["served"] = [dice(regions[i].mask, item.masks[label]) for i, label, _ in matches]
        for source, pipeline in pipelines.items():
            if source == "served":
                continue
            others = pipeline.run(image)
            row.dice_by_source[source] = [dice(others[i].mask, item.masks[label])
                                          for i, label, _ in match(others, item.masks)]
        rows.append(row)
    return rows


def pipelines_for(sim: RealProject, weights: Path) -> dict[str, object]:
    """The pipeline the product builds on `weights` (served) and the other mask sources of the mask
    table: the detector's own masks, and the learned refiner's when SAM serves."""
    from backend.detector import Detector
    from backend.pipeline import Pipeline, PipelineOptions

    detector = Detector.load(weights, device=sim.config.device, conf=sim.settings.detector_conf)
    options = {"served": {}, "detector": {"refine_masks": False, "use_sam": False}}
    if sim.refiner is not None:  # served is SAM's masks; the learned refiner's are measured apart
        options["refiner"] = {"use_sam": False}
    return {source: Pipeline(detector, sim.refiner,
                             PipelineOptions.from_settings(sim.settings, **{"use_sam": sim.refiner is not None, **o}))
            for source, o in options.items()}


@dataclass
class RunRecord:
    """One training and its held-out figures."""

    name: str
    annotated: list[str]
    promoted: bool
    seconds: float
    epochs: int
    steps: int
    stopped_by: str
    rows: list[ImageRow]
    picked_actions: dict[str, float] = field(default_factory=dict)  # loop: the oracle's work on the round's picks
    hyperparameters: dict = field(default_factory=dict)  # the TrainConfig the job trained with (registry meta)
    gate: str = ""  # the gate's reason (registry meta)


def train_and_score(sim: RealProject, project: int, name: str, keys: list[str]) -> RunRecord:
    from backend.registry import Registry
    from training.jobs import Progress, run_round

    for key in keys:
        sim.add(key)
    config = sim.config_for({})
    sim.log(f"{name}: retrain job on {len(keys)} annotated images (project {project})")
    report = Progress(str(project), config.time_budget * 60)
    summary = run_round(str(project), sim.settings, sim.exported(keys), f"real-{project}", config, report)
    registry = Registry(sim.settings.model_dir)
    meta = registry.get(project, summary["version"]).meta
    # a candidate the gate rejected is scored as trained (the project would serve its previous model)
    rows = score_model(sim, pipelines_for(sim, registry.get(project, summary["version"]).weights))
    record = RunRecord(name, list(keys), summary["status"] == "promoted", summary["seconds"],
                       int(meta.get("epochs_run") or 0), int(meta.get("steps_run") or 0),
                       str(meta.get("stopped_by") or ""), rows, hyperparameters=dict(meta.get("hyperparameters") or {}),
                       gate=str(meta.get("gate") or ""))
    sim.log(f"{name}: {summary['status']} after {record.seconds:.0f} s; held-out recall "
            f"{recall(rows):.3f}, IA {mean(rows, 'ia'):.3f}, instance Dice {mean(rows, 'instance_dice'):.3f}")
    return record


def rescore(sim: RealProject, models_from: Path, project: int, name: str) -> RunRecord:
    """`name`'s model as trained in `models_from` (another run's --work), scored with this run's
    settings: for settings used only when predicting; the record keeps that training's figures."""
    from dataclasses import replace

    from backend.registry import Registry

    trained = load(name, models_from)
    if trained is None:
        raise SystemExit(f"--models-from {models_from}: no run {name} there")
    versions = Registry(models_from / "models").versions(project)
    weights = versions[-1].weights  # a first model's project has the one version it trained
    decision = gate_again(sim, weights, trained.annotated)
    rows = score_model(sim, pipelines_for(sim, weights))
    sim.log(f"{name}: {weights} scored again; {decision.reason}; recall {recall(rows):.3f}, "
            f"IA {mean(rows, 'ia'):.3f}, instance Dice {mean(rows, 'instance_dice'):.3f}")
    return replace(trained, rows=rows, promoted=decision.promote, gate=decision.reason)


def gate_again(sim: RealProject, weights: Path, annotated: list[str]):
    """The first-model gate on `weights` with this run's settings, on the validation images the
    retrain job held out (`training.dataset.split_train_val` of the task ids, as the job splits them)."""
    from backend.pipeline import PipelineOptions
    from training.dataset import split_train_val
    from training.evaluate import gate_weights

    for key in annotated:
        sim.add(key)
    _, val_ids = split_train_val(sorted(sim.task_ids[k] for k in annotated), sim.settings.val_fraction)
    val = [sim.item(k) for k in annotated if sim.task_ids[k] in val_ids]
    train = [sim.item(k) for k in annotated if sim.task_ids[k] not in val_ids]
    return gate_weights(weights, None, val, train, PipelineOptions.from_settings(sim.settings, use_sam=False),
                        sim.config.device, sim.settings.gate_tolerance, annotated=len(annotated))


def recall(rows: list[ImageRow]) -> float:
    return sum(r.found for r in rows) / max(sum(r.teeth for r in rows), 1)


def mean(rows: list[ImageRow], key: str) -> float:
    return float(np.mean([getattr(r, key) for r in rows])) if rows else float("nan")


def headline(rows: list[ImageRow], minutes: float) -> dict[str, float]:
    found = sum(r.found for r in rows)
    return {"recall": recall(rows), "extra_per_image": sum(r.extra for r in rows) / max(len(rows), 1),
            "numbered_right": sum(r.numbered_right for r in rows) / max(found, 1), "ia": mean(rows, "ia"),
            "instance_dice": mean(rows, "instance_dice"), "instance_nsd": mean(rows, "instance_nsd"),
            "union_dice": mean(rows, "image_dice"), "actions_per_image": mean(rows, "actions"),
            "train_minutes": minutes}


# --- storage -------------------------------------------------------------------------------

SETTINGS_FILE = "settings.json"
"""In a selection run's --work: the --set pairs it ran with (and [MODELS_FROM, work] with --models-from)."""
MODELS_FROM = "--models-from"


def save(record: RunRecord, work: Path) -> None:
    path = work / "runs" / f"{record.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1))
    tmp.replace(path)


def load(name: str, work: Path) -> RunRecord | None:
    path = work / "runs" / f"{name}.json"
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return RunRecord(**{**raw, "rows": [ImageRow(**r) for r in raw["rows"]]})


def first_name(n: int, draw: int) -> str:
    return f"first-{n:02d}-draw{draw}"


def score_weights(args: argparse.Namespace, split: Split, data: RealData, log) -> str:
    """`--score-weights`: the weights' pre-annotations of the split's scored images, in one line."""
    from backend.process import set_torch_threads

    set_torch_threads(0)
    sim = RealProject(data, split.test, args.work, log, dict(args.train_env), args.device,
                      args.sam_model_type, args.sam_checkpoint)
    rows = score_model(sim, {"served": pipelines_for(sim, args.score_weights)["served"]})
    h = headline(rows, 0.0)
    return (f"{args.score_weights} on {len(rows)} {'pool validation' if args.on == 'pool' else 'held-out'} images: "
            f"teeth found {h['recall']:.3f}, numbered right {h['numbered_right']:.3f}, extra/img "
            f"{h['extra_per_image']:.2f}, IA {h['ia']:.3f}, instance Dice {h['instance_dice']:.3f}, actions/img "
            f"{h['actions_per_image']:.1f} (teeth/img {sum(r.teeth for r in rows) / len(rows):.1f})")


def idle_name(n: int, draw: int, k: int) -> str:
    return f"idle{k}-{n:02d}-draw{draw}"


def draw_images(pool: list[str], n: int, draw: int) -> list[str]:
    """Draw `draw` of `n` annotated images from the pool (the same for every rerun)."""
    rng = np.random.default_rng([SPLIT_SEED, n, draw])
    return sorted(rng.choice(sorted(pool), size=n, replace=False).tolist())


# --- the runs ------------------------------------------------------------------------------

def run(args: argparse.Namespace, split: Split, data: RealData, log) -> None:
    from backend.process import set_torch_threads

    set_torch_threads(0)
    sim = RealProject(data, split.test, args.work, log, dict(args.train_env), args.device,
                      args.sam_model_type, args.sam_checkpoint)
    pool = [n for n in split.pool if n in data.loaders]
    for draw in range(args.draws):  # all sizes of a draw before the next draw: a stopped run has each size
        for n in args.sizes:
            name = first_name(n, draw)
            if load(name, args.work) is None:
                project = 1000 + 10 * n + draw
                if args.models_from:
                    record = rescore(sim, args.models_from, project, name)
                else:
                    record = train_and_score(sim, project, name, draw_images(pool, n, draw))
                save(record, args.work)
            if args.models_from:
                continue
            annotated = load(name, args.work).annotated
            for k in range(1, args.idle_rounds + 1):  # the same annotations, warm-started from the current model
                if load(idle_name(n, draw, k), args.work) is None:
                    save(train_and_score(sim, 1000 + 10 * n + draw, idle_name(n, draw, k), annotated), args.work)
        if draw == 0 and args.rounds and not args.models_from:  # --models-from scores first models only
            run_loop(args, sim, pool, log)


def run_loop(args: argparse.Namespace, sim: RealProject, pool: list[str], log) -> None:
    from training.simulate import order_pool, image_score
    from backend.images import XrayImage

    start = load(first_name(args.loop_from, 0), args.work)
    project = 2000
    keys = list(start.annotated)
    rest = [k for k in pool if k not in keys]
    candidates = sorted(np.random.default_rng([SPLIT_SEED, 1]).choice(rest, size=min(args.loop_pool, len(rest)),
                                                                       replace=False).tolist())
    if load("loop-round1", args.work) is None:  # round 0 is the first model, trained again in the loop's project
        sim.copy_current(1000 + 10 * args.loop_from, project)
    for r in range(1, args.rounds + 1):
        name = f"loop-round{r}"
        done = load(name, args.work)
        if done is not None:
            keys = done.annotated
            candidates = [k for k in candidates if k not in keys]
            continue
        pipeline = sim.pipeline(project)
        predictions = {}
        log(f"{name}: pre-annotating {len(candidates)} pool images")
        for key in candidates:
            sim.add(key)
            predictions[key] = pipeline.run(XrayImage.of(sim.samples[key].image, key)) if pipeline else []
        scores = {k: image_score(v) for k, v in predictions.items()}
        picked = order_pool(scores, "most-confident", np.random.default_rng(r))[:args.per_round]
        count = OracleCount()
        for key in picked:
            count = count + oracle_count(predictions[key], sim.samples[key].truth)
        keys = keys + picked
        candidates = [k for k in candidates if k not in picked]
        record = train_and_score(sim, project, name, keys)
        record.picked_actions = per_image(count, len(picked))
        save(record, args.work)


# --- the report ----------------------------------------------------------------------------

def synthetic_rows() -> dict[int, str]:
    """The synthetic bench's default cold-start rows (bench/results/cold_start.md), by annotated images."""
    path = REPO / "bench" / "results" / "cold_start.md"
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 8 and cells[1] == "toothseg defaults" and cells[0].isdigit():
            out[int(cells[0])] = f"IA {cells[5]}, instance Dice {cells[6]}, actions/img {cells[8]}"
    return out


def avg(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" if values else "-"


def fmt_spread(values: list[float], digits: int = 3) -> str:
    return spread(values, "{:." + str(digits) + "f}")


UFBA_SIDE = 512
"""UFBA-425's radiographs are 512x512: today's defaults train them at `TrainConfig.fitted(512)`."""


def differences(records: list[RunRecord], warm: bool = False) -> list[str]:
    """KEY=VALUE for each training setting the runs kept that is not today's default (warm: runs
    warm-started from a current model, against the warm configuration)."""
    from training.train import TrainConfig, recorded

    today = TrainConfig.from_env({}).fitted(UFBA_SIDE)
    config = (today.warm() if warm else today).as_dict()
    return sorted({f"{k}={v}" for r in records for k, v in recorded(r.hyperparameters).items()
                   if k != "device" and config.get(k, v) != v})


def not_todays_defaults(firsts: list[RunRecord], warm: list[RunRecord]) -> str:
    """What the runs trained with that differs from today's defaults (TrainConfig without TRAIN_*
    settings, fitted to UFBA's image size): a report regenerated after a default changed says so."""
    differ = sorted(set(differences(firsts)) | set(differences(warm, warm=True)))
    unknown = sum(1 for r in firsts + warm if not r.hyperparameters)
    parts = ([f"the runs trained with {', '.join(differ)}, not today's defaults"] if differ else []) + (
        [f"{unknown} run(s) kept no record of their settings (made before runs recorded them)"] if unknown else [])
    return ("Note: " + "; ".join(parts) + ".") if parts else ""


def report(args: argparse.Namespace, split: Split, data_commit: str, command: str) -> tuple[list[str], dict]:
    firsts = {n: [r for d in range(args.draws) if (r := load(first_name(n, d), args.work))] for n in args.sizes}
    loop = [r for k in range(1, args.rounds + 1) if (r := load(f"loop-round{k}", args.work))]
    note = not_todays_defaults([r for records in firsts.values() for r in records], loop)
    lines = ["# toothseg on real panoramic radiographs (UFBA-425)", "",
             f"Command: {command}", f"Machine: {machine()}",
             f"Data: UFBA-425, `devichand579/Instance_seg_teeth` at commit {data_commit}, 512x512 panoramics with one "
             f"expert mask per tooth; split once (seed {SPLIT_SEED}, {TEST_SHARE:.0%} of each category held out): "
             f"{len(split.pool)} pool images, {len(split.test)} held-out test images "
             f"(images the runs used that could not be read: {len(split.failed)}). Annotated images are drawn "
             "from the pool only; every figure below is on the held-out images."
             if args.on == "test" else
             f"Data: UFBA-425, `devichand579/Instance_seg_teeth` at commit {data_commit}; SELECTION RUN (`--on pool`): "
             f"the pool alone, split again (seed {SPLIT_SEED + 1}) into {len(split.pool)} images to annotate and "
             f"{len(split.test)} validation images; the held-out test images are not used. Choose settings here.",
             "Training: the product's retrain job (`training.jobs.run_round`) with its defaults (TRAIN_* unset: the "
             "9-minute budget), the first training starting where the product's does (YOLO_WEIGHTS, else "
             "toothseg's detector pretrained on synthetic panoramics: `training.pretrain`; trainings recorded with "
             "pretrained=False or before the setting existed: from random weights); pre-annotation with the "
             "product's defaults. A first model the gate did not promote is scored as trained (promoted column)."
             + (f" The models are those `{args.models_from.name}`'s run trained (`--models-from`: training minutes and "
                "epochs are that run's), scored and gated again with this run's settings." if args.models_from else "")
             + (f" Settings over the defaults: {', '.join(f'{k}={v}' for k, v in args.train_env)}."
                if args.train_env else ""),
             "Found: a region matched one to one (Hungarian on IoU) to an expert's tooth with IoU >= 0.3; extra: "
             "regions matched to no tooth; numbered right: found teeth with the expert's FDI number. IA, instance "
             "Dice and NSD, image (union) Dice: the STS 2024 metrics (`training.metrics`), mean over images. "
             "Spread: median (min-max) over draws (different annotated images).", *([note] if note else []), ""]
    table = {}
    lines += ["## The first model", "",
              "| annotated | draws | promoted | train min | epochs | teeth found | extra/img | numbered right | IA "
              "| inst Dice | inst NSD | union Dice | actions/img | synthetic bench |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    synthetic = synthetic_rows()
    for n, records in firsts.items():
        if not records:
            continue
        heads = [headline(r.rows, r.seconds / 60) for r in records]
        table[str(n)] = {k: float(np.mean([h[k] for h in heads])) for k in heads[0]} | {"draws": len(records)}
        col = lambda key, d=3: fmt_spread([h[key] for h in heads], d)  # noqa: E731
        lines.append(f"| {n} | {len(records)} | {sum(r.promoted for r in records)} of {len(records)} "
                     f"| {col('train_minutes', 1)} | {fmt_spread([r.epochs for r in records], 0)} | {col('recall')} "
                     f"| {col('extra_per_image', 1)} | {col('numbered_right')} | {col('ia')} | {col('instance_dice')} "
                     f"| {col('instance_nsd')} | {col('union_dice')} | {col('actions_per_image', 1)} "
                     f"| {synthetic.get(n, '-')} |")
    lines += ["", "Synthetic bench: the defaults rows of `bench/results/cold_start.md` (2000x1000 synthetic "
              "panoramics, 3 seeds), trained with the defaults of that run (its header says which).", ""]
    if args.before:
        lines += before_and_after(args.before, args.work)
    lines += ["## Per category (teeth found / IA / instance Dice; all draws pooled)", "",
              "| category | test images | teeth | " + " | ".join(f"{n} annotated" for n in firsts if firsts[n]) + " |",
              "|---|---|---|" + "---|" * sum(1 for n in firsts if firsts[n])]
    categories = sorted({ufba_category(t) for t in split.test}, key=lambda c: int(c.replace("cate", "")))
    for category in categories:
        cells = []
        base = None
        for records in firsts.values():
            if not records:
                continue
            rows = [row for r in records for row in r.rows if row.category == category]
            base = base or [row for row in records[0].rows if row.category == category]
            cells.append(f"{recall(rows):.2f} / {mean(rows, 'ia'):.2f} / {mean(rows, 'instance_dice'):.2f}"
                         if rows else "-")
        if base:
            lines.append(f"| {category} | {len(base)} | {sum(r.teeth for r in base)} | " + " | ".join(cells) + " |")
    lines += ["", "## Where the first model loses", "",
              "| annotated | teeth missed | of them third molars | images without a region | wrong numbers | "
              "1 position off | 2 off | >2 off | other quadrant | towards the midline |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n, records in firsts.items():
        if not records:
            continue
        rows = [row for r in records for row in r.rows]
        shifts = [s for row in rows for s in row.shifts]
        missed = sum(row.teeth - row.found for row in rows)
        third = sum(1 for row in rows for label in row.missed if label[1] == "8")
        wrong = len(shifts) + sum(row.other_quadrant for row in rows)
        lines.append(f"| {n} | {missed} | {third} | {sum(1 for row in rows if row.found + row.extra == 0)} "
                     f"| {wrong} | {sum(abs(s) == 1 for s in shifts)} | {sum(abs(s) == 2 for s in shifts)} "
                     f"| {sum(abs(s) > 2 for s in shifts)} | {sum(row.other_quadrant for row in rows)} "
                     f"| {sum(s < 0 for s in shifts)} |")
    lines += ["", "## Masks by source, on the teeth found (Dice against the expert's mask, mean over teeth)", "",
              "| annotated | teeth | served | detector's own masks | learned refiner | SAM |",
              "|---|---|---|---|---|---|"]
    for n, records in firsts.items():
        if not records:
            continue
        by = {}
        for source in ("served", "detector", "refiner"):
            by[source] = [d for r in records for row in r.rows for d in row.dice_by_source.get(source, [])]
        if by["refiner"]:  # served = SAM
            refiner, sam = avg(by["refiner"]), avg(by["served"])
        else:
            refiner, sam = avg(by["served"]), "no SAM weights given (`--sam-checkpoint`)"
        lines.append(f"| {n} | {len(by['served'])} | {avg(by['served'])} | {avg(by['detector'])} | {refiner} | {sam} |")
    if loop:
        start = firsts[args.loop_from][0] if firsts.get(args.loop_from) else None
        lines += ["", f"## The loop (from draw 0's {args.loop_from}-image model; {args.per_round} most confident "
                  f"of {args.loop_pool} pool images per round)", "",
                  "| version | annotated | oracle actions/img on the picks (added / relabeled / redrawn / deleted) "
                  "| held-out teeth found | IA | inst Dice | held-out actions/img | train min |",
                  "|---|---|---|---|---|---|---|---|"]
        teeth = statistics.mean(row.teeth for row in (start or loop[0]).rows)
        lines.append(f"| from scratch | 0 | - | 0 | 0 | 0 | {teeth:.1f} | - |")
        for k, r in enumerate(([start] if start else []) + loop):
            h = headline(r.rows, r.seconds / 60)
            p = r.picked_actions
            picks = (f"{p['actions']:.1f} ({p['added']:.1f} / {p['relabeled']:.1f} / {p['redrawn']:.1f} / "
                     f"{p['deleted']:.1f})") if p else "-"
            lines.append(f"| v{k + 1} | {len(r.annotated)} | {picks} | {h['recall']:.3f} | {h['ia']:.3f} "
                         f"| {h['instance_dice']:.3f} | {h['actions_per_image']:.1f} | {h['train_minutes']:.1f} |")
    idle = idle_rounds(args, firsts)
    if idle:
        lines += ["", *idle]
    return lines, {"first_model": table, "data_commit": data_commit, "split_seed": SPLIT_SEED,
                   "pool_images": len(split.pool), "test_images": len(split.test), "command": command}


def idle_rounds(args: argparse.Namespace, firsts: dict[int, list[RunRecord]]) -> list[str]:
    """The idle-rounds section: each round's candidate, and the model each draw serves after it
    (its latest promoted version), median (min-max) over draws; minutes counted from the first
    model's start."""
    rounds = {n: [[r for d in range(args.draws) if (r := load(idle_name(n, d, k), args.work))]
                  for k in range(1, args.idle_rounds + 1)] for n in args.sizes}
    if not any(any(rs) for rs in rounds.values()):
        return []
    lines = ["## Continued training on the same annotations (`--idle-rounds`)", "",
             "Each round trains again on the first model's annotated images, warm-started from the project's "
             "current model (the retrain job's warm length), and the gate decides as for any version. Candidate: "
             "the round's model; served: what each draw serves after the round (its latest promoted version). "
             "Minutes: training time summed from the first model on.", "",
             "| annotated | round | draws | promoted | minutes | candidate found | candidate IA | candidate inst Dice "
             "| served found | served IA | served inst Dice |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, per_round in rounds.items():
        draws = {first_name(n, d): [r] for d in range(args.draws) for r in firsts.get(n, []) if r.name ==
                 first_name(n, d)}
        for k, records in enumerate([firsts.get(n, [])] + per_round):
            if not records:
                continue
            served, minutes = [], []
            for r in records:
                history = draws.setdefault(first_name(n, int(r.name.rsplit("draw", 1)[1])), [])
                if k:
                    history.append(r)
                minutes.append(sum(h.seconds for h in history) / 60)
                promoted = [h for h in history if h.promoted]
                if promoted:
                    served.append(headline(promoted[-1].rows, 0))
            heads = [headline(r.rows, 0) for r in records]
            cells = [fmt_spread([h[key] for h in hs]) if hs else "-" for hs in (heads, served)
                     for key in ("recall", "ia", "instance_dice")]
            lines.append(f"| {n} | {'first model' if k == 0 else k} | {len(records)} "
                         f"| {sum(r.promoted for r in records)} of {len(records)} | {fmt_spread(minutes, 1)} | "
                         + " | ".join(cells) + " |")
    return lines


# --- main ----------------------------------------------------------------------------------

def runs_in(work: Path) -> dict[str, RunRecord]:
    """The first-model runs kept in a --work folder, by name."""
    return {p.stem: r for p in sorted((work / "runs").glob("first-*.json")) if (r := load(p.stem, work))}


def side_by_side(works: list[Path], settings: dict[Path, str]) -> list[str]:
    """A table of the first-model runs of `works`, each draw with its difference (after the slash)
    from the first work's run on the same draw (the same annotated images), a mean row per size."""
    keys = ("recall", "extra_per_image", "numbered_right", "ia", "instance_dice", "union_dice", "actions_per_image")
    digits = {k: 2 if k.endswith("per_image") else 3 for k in keys}
    base = runs_in(works[0])
    lines = ["| work | settings | run | promoted | train min | epochs | teeth found | extra/img | numbered right | IA "
             "| inst Dice | union Dice | actions/img |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for work in works:
        by_size: dict[str, list[tuple[str, RunRecord]]] = {}
        for name, record in runs_in(work).items():
            by_size.setdefault(name.rsplit("-", 1)[0], []).append((name, record))
        for size, records in by_size.items():
            heads, diffs = [], []
            for name, record in records:
                h = headline(record.rows, record.seconds / 60)
                ref = base.get(name)
                b = headline(ref.rows, ref.seconds / 60) if ref and work != works[0] else None
                heads.append(h)
                diffs += [{k: h[k] - b[k] for k in keys}] if b else []
                cells = [f"{h[k]:.{digits[k]}f}" + (f" / {h[k] - b[k]:+.{digits[k]}f}" if b else "") for k in keys]
                lines.append(f"| {work.name} | {settings[work]} | {name} | {'yes' if record.promoted else 'no'} "
                             f"| {h['train_minutes']:.1f} "
                             f"| {record.epochs} | " + " | ".join(cells) + " |")
            if len(heads) > 1:
                cells = [f"{np.mean([h[k] for h in heads]):.{digits[k]}f}"
                         + (f" / {np.mean([d[k] for d in diffs]):+.{digits[k]}f}" if diffs else "") for k in keys]
                promoted = sum(record.promoted for _, record in records)
                lines.append(f"| **{work.name}** | | **{size}, mean of {len(heads)}** | {promoted} of {len(records)} "
                             f"| {np.mean([h['train_minutes'] for h in heads]):.1f} | | " + " | ".join(cells) + " |")
    return lines


def gate_decisions(works: list[Path]) -> list[str]:
    """Each first model's gate decision in `works`, as the registry (or `--models-from`) recorded it."""
    lines = ["## Gate decisions", ""]
    for work in works:
        for name, record in runs_in(work).items():
            lines.append(f"- {work.name} {name}: {'promoted' if record.promoted else 'not promoted'}"
                         + (f": {record.gate}" if record.gate else ""))
    return lines + [""]


def before_and_after(before: Path, after: Path) -> list[str]:
    """The report's before/after section: an earlier run of this bench (`--before`, its own --work)
    and this one, draw by draw (the same draws: the same annotated images)."""
    def label(work: Path) -> str:
        differ = differences(list(runs_in(work).values()))
        return f"trained with {', '.join(differ)}" if differ else "today's defaults"

    return ["## Before and after", "",
            f"The first models of `{before.name}` (before) and of this run (`{after.name}`), on the same held-out "
            "images; after the slash: the difference from the before run on the same draw (the same annotated "
            "images; which of them the retrain job holds out for validation follows the task ids, which follow the "
            "order a run adds images, so it can differ between the runs).", "",
            *side_by_side([before, after], {before: label(before), after: label(after)}), ""]


def selection_report(works: list[Path], command: str) -> list[str]:
    """Selection runs (`--on pool`) side by side: each run's settings, figures per draw and their
    difference from the first run's on the same draw (the same annotated images)."""
    def settings(work: Path) -> str:
        path = work / SETTINGS_FILE
        pairs = json.loads(path.read_text()) if path.exists() else []
        differ = differences(list(runs_in(work).values()))
        return (", ".join(f"models of {v}" if k == MODELS_FROM else f"{k}={v}" for k, v in pairs)
                or "the defaults") + (
            f" (trained with {', '.join(differ)}: not today's defaults)" if differ else "")

    return ["# Settings chosen on the pool (UFBA-425 selection runs, `--on pool`)", "", f"Command: {command}",
            f"Machine: {machine()}",
            f"Each run: the pool alone, split again (seed {SPLIT_SEED + 1}) into images to annotate and validation "
            "images; the held-out test images are not used. Figures on the validation images; the difference "
            f"(after the slash) is to the first row's run on the same draw (`{works[0].name}`).", "",
            *side_by_side(works, {work: settings(work) for work in works}), "", *gate_decisions(works)]


def data_commit(src: Path) -> str:
    """HEAD of the data set's own checkout; not that of a repository `src` merely lies inside."""
    import subprocess

    from training.data.dataset_io import ufba_root

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True).stdout.strip()

    top = git("rev-parse", "--show-toplevel")
    own = (Path(top).resolve(), Path(top).resolve() / "Dataset" / "bb_u_net_dataset") if top else ()
    if ufba_root(Path(src)).resolve() in own:
        return git("rev-parse", "HEAD")
    return "unknown (not a git checkout of the data set: give --commit)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="UFBA-425 checkout or its bb_u_net_dataset folder")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / ".cache" / "real")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="loop rounds (0: no loop)")
    parser.add_argument("--per-round", type=int, default=8)
    parser.add_argument("--loop-pool", type=int, default=40)
    parser.add_argument("--loop-from", type=int, default=8)
    parser.add_argument("--idle-rounds", type=int, default=0,
                        help="after each first model, this many trainings on the same annotations (warm start)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sam-checkpoint", type=Path)
    parser.add_argument("--sam-model-type", default="vit_b")
    parser.add_argument("--commit", help="the data's git commit, when --data is not a git checkout")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs in --work")
    parser.add_argument("--smoke", action="store_true", help="a mechanics check: 12 images, tiny trainings")
    parser.add_argument("--on", choices=("test", "pool"), default="test",
                        help="test: score on the held-out images (the report); pool: a selection run, scored on "
                             "validation images split off the pool (choose settings here, never on the test images)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting over the product's defaults (TRAIN_*, SCORE_THRESHOLD, ...), for --on pool; "
                             "use a --work folder per setting")
    parser.add_argument("--selection", type=Path, nargs="+", metavar="WORK",
                        help="write bench/results/real-selection.md from these selection runs' --work folders "
                             "(the first is the baseline) and stop")
    parser.add_argument("--before", type=Path, metavar="WORK",
                        help="an earlier run's --work folder (e.g. before a default changed): the report puts its "
                             "first models and this run's side by side, draw by draw")
    parser.add_argument("--models-from", type=Path, metavar="WORK",
                        help="score (and gate) the first models trained in WORK (another run of the same --on) "
                             "with this run's settings instead of training them: for settings used only when "
                             "predicting (SCORE_THRESHOLD, SCORE_FALLBACK, DETECTOR_CONF)")
    parser.add_argument("--score-weights", type=Path, metavar="WEIGHTS",
                        help="score these detector weights as they are, untrained on the data (e.g. toothseg's "
                             "pretrained start, training/weights/synthetic-pretrained.pt), on the --on split's "
                             "images with the product's pre-annotation, print one line and stop")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real.md")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    if args.selection:
        given = argv if argv is not None else sys.argv[1:]
        command = f"`{shlex.join(['.venv/bin/python', 'bench/bench_real.py', *given])}`"
        out = args.out if args.out != parser.get_default("out") else REPO / "bench" / "results" / "real-selection.md"
        write_report(selection_report(args.selection, command), out)
        return 0
    if any("=" not in kv for kv in args.set):
        parser.error("--set takes KEY=VALUE")
    if args.set and args.on != "pool":
        parser.error("--set is for selection runs (--on pool): the report on the test images uses the defaults")
    args.train_env = tuple(tuple(kv.split("=", 1)) for kv in args.set)
    if args.models_from:
        args.models_from = args.models_from.resolve()
        if trains := [k for k, _ in args.train_env if k.startswith("TRAIN_")]:
            parser.error(f"--models-from scores models already trained: {', '.join(trains)} would not apply")
    if args.smoke:
        args.sizes, args.draws, args.rounds, args.per_round, args.loop_pool, args.loop_from = [2, 4], 1, 1, 2, 4, 4
        args.idle_rounds = min(args.idle_rounds, 1)
        args.train_env += (("TRAIN_STEPS", "4"), ("TRAIN_WARM_STEPS", "2"), ("TRAIN_IMGSZ", "160"),
                          ("TRAIN_WARMUP_STEPS", "0"), ("TRAIN_TIME_BUDGET", "0"), ("TRAIN_VAL_STEPS", "2"),
                          ("TRAIN_REFINER_STEPS", "2"), ("TRAIN_REFINER_WARM_STEPS", "2"))
        if args.out == parser.get_default("out"):
            args.out = args.work / "real.md"
    if args.on == "pool" and args.out == parser.get_default("out"):  # a selection run never replaces the report
        args.out = args.work / "real-pool.md"
    if args.loop_from not in args.sizes:
        parser.error("--loop-from must be one of --sizes")
    log = lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)  # noqa: E731
    data = RealData(args.data, max_images=40 if args.smoke else 0)
    # --on pool: the test images are left out; the pool is split into annotated and validation images
    pool, test = (selection_split if args.on == "pool" else split_names)(sorted(data.loaders))
    split = Split(pool, test, data.failed)
    if args.score_weights:
        print(score_weights(args, split, data, log))
        return 0
    if args.on == "pool" and not args.report_only:
        args.work.mkdir(parents=True, exist_ok=True)
        pairs = [list(kv) for kv in args.train_env]
        pairs += [[MODELS_FROM, args.models_from.name]] if args.models_from else []
        (args.work / SETTINGS_FILE).write_text(json.dumps(pairs) + "\n")
    if not args.report_only:
        run(args, split, data, log)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = f"`{shlex.join(['.venv/bin/python', 'bench/bench_real.py', *given])}`"
    if args.report_only:
        command += " (this report: the same with `--report-only`, from the runs kept in `--work`)"
    lines, summary = report(args, split, args.commit or data_commit(args.data), command)
    write_report(lines, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
