"""`toothseg import | convert | export | predict | evaluate`: labeled datasets into and out of Label Studio,
STS submissions from a model, and the STS metrics of a submission.

- import: each image of a dataset (`training.data.dataset_io` formats) is uploaded to a project
  (multipart POST /api/projects/<id>/import), its task data gets `toothseg_source` = "<image
  file name>:<sha1 of its bytes>", and its teeth become brush (or polygon) regions of the
  project's labeling config, saved as a ground-truth annotation or as a prediction (model
  version "import"). A rerun skips images whose task already has them, and completes tasks a
  broken run left without them, so it never duplicates a task.
- convert: a dataset from one format to another (UFBA-425's layout, `--from ufba`, to any
  writable format), the images as they are.
- export: the chosen annotation per task (`training.export.annotated_tasks`), images downloaded
  with the backend's loader, written in a dataset format, optionally split into train/val by
  task id (`training.dataset.split_train_val`).
- predict: a folder of images through the backend's pipeline (detector, FDI numbering, mask
  refiner, SAM with SAM_PREANNOTATE=true), one file per image (Labelme: `<image stem>.json`, as STS expects).
- evaluate: STS metrics of a folder of Labelme predictions against Labelme ground truth, with
  both NSD variants, and a per-image CSV.

Building the parser imports nothing heavy; each command imports what it needs. Per-file
problems print one line each (stderr) and the command ends with a summary and exit code 1;
expected failures of the whole command raise CLIError (exit code 2, one line).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import mimetypes
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable
from training.ops import CLIError

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

    from backend.formats import Target
    from backend.pipeline import Pipeline
    from backend.settings import Settings
    from training.data.dataset_io import DatasetItem
    from training.export import AnnotatedTask
    from training.metrics import Scores

FORMATS = ("labelme", "masks", "yolo", "coco")
"""The dataset formats of `training.data.dataset_io` (named here so that building the parser stays light)."""
READ_FORMATS = (*FORMATS, "ufba")
"""Formats `import` and `convert` read: FORMATS and UFBA-425's layout (`dataset_io._read_ufba`)."""

SOURCE_KEY = "toothseg_source"
"""Task data key of an imported image: "<file name>:<sha1 of the file's bytes>"."""

IMPORT_MODEL_VERSION = "import"
_UPLOAD_TIMEOUT = 120.0


def _report(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _progress(iterable: Iterable, total: int, desc: str) -> Iterable:
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


# --- Label Studio connection -----------------------------------------------------------------

def _connect() -> tuple[Settings, LabelStudio]:
    """(Settings, LabelStudio client) from LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY."""
    from label_studio_sdk import LabelStudio

    from backend.settings import Settings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    settings = Settings.from_env()
    missing = [name for name, value in (("LABEL_STUDIO_URL", settings.label_studio_url),
                                        ("LABEL_STUDIO_API_KEY", settings.label_studio_api_key)) if not value]
    if missing:
        raise CLIError(f"set {' and '.join(missing)} (Label Studio's address and an API token)")
    return settings, LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key,
                                 timeout=_UPLOAD_TIMEOUT)


def _api_message(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and body.get("detail"):
        body = body["detail"]
    text = str(body if body is not None else exc).replace("\n", " ")
    return f"HTTP {status} {text[:300]}" if status else f"{exc.__class__.__name__}: {text[:300]}"


def _get_project(client: LabelStudio, project_id: int, base_url: str) -> Any:
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        return client.projects.get(id=project_id)
    except ApiError as exc:
        raise CLIError(f"Label Studio at {base_url}: project {project_id}: {_api_message(exc)}") from None
    except httpx.HTTPError as exc:
        raise CLIError(f"Label Studio at {base_url} is unreachable: {exc.__class__.__name__}: {exc}") from None


# --- import ----------------------------------------------------------------------------------

class ImportItemError(Exception):
    """One image that could not be imported (the others go on)."""


@dataclass
class ImportSummary:
    """Counts of an import run and the one-line reason of each failure."""

    imported: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.imported} imported, {self.skipped} skipped (already there), {len(self.failed)} failed"


class Importer:
    """Imports dataset items into one project as annotations or predictions (`kind`)."""

    def __init__(self, client: LabelStudio, settings: Settings, project_id: int, target: Target, kind: str):
        from backend.images import ImageLoader

        self.client = client
        self.settings = settings
        self.project_id = project_id
        self.target = target
        self.kind = kind
        self.loader = ImageLoader(settings)  # its auth headers refresh a personal access token
        self.loader.auth_headers()  # a rejected API key fails here, before any upload
        self.existing = self._existing_tasks()

    def _existing_tasks(self) -> dict[str, tuple[int, bool]]:
        """toothseg_source -> (task id, whether the task already has an annotation / an import prediction)."""
        with_import_prediction = set()
        if self.kind == "predictions":
            with_import_prediction = {p.task for p in self.client.predictions.list(project=self.project_id)
                                      if p.model_version == IMPORT_MODEL_VERSION}
        existing = {}
        for task in self.client.tasks.list(project=self.project_id, fields="all"):
            key = (task.data or {}).get(SOURCE_KEY)
            if key:
                done = task.id in with_import_prediction if self.kind == "predictions" else bool(task.total_annotations)
                existing[key] = (task.id, done)
        return existing

    def regions(self, item: DatasetItem) -> list[dict]:
        """The item's teeth as regions of the project's control tag (brush RLE or polygons)."""
        from backend.formats import mask_to_regions

        missing = [label for label in item.masks if self.target.value_for(label) is None]
        if missing:
            raise ImportItemError(f"teeth {', '.join(sorted(missing))} are not labels of the project's "
                                  f"'{self.target.from_name}' control")
        return [region for label, mask in item.masks.items() if mask.any()
                for region in mask_to_regions(mask, self.target.value_for(label), self.target)]

    def add(self, item: DatasetItem) -> bool:
        """Import one item; False if its task already had what this run adds (skipped)."""
        regions = self.regions(item)
        file_name, data = item.image_file()
        key = f"{file_name}:{hashlib.sha1(data).hexdigest()}"
        task_id, done = self.existing.get(key, (None, False))
        if done:
            return False
        if task_id is None:
            task_id = self._create_task(file_name, data, key)
        if self.kind == "predictions":
            self.client.predictions.create(task=task_id, result=regions, model_version=IMPORT_MODEL_VERSION)
        else:
            self.client.annotations.create(id=task_id, result=regions, ground_truth=True)
        self.existing[key] = (task_id, True)
        return True

    def _create_task(self, file_name: str, data: bytes, key: str) -> int:
        """Upload the image as a new task and tag its data with `key`; returns the task id."""
        import httpx

        mime = mimetypes.guess_type(file_name)[0] or "application/octet-stream"
        response = httpx.post(f"{self.settings.label_studio_url.rstrip('/')}/api/projects/{self.project_id}/import",
                              params={"commit_to_project": "true", "return_task_ids": "true"},
                              files={"file": (file_name, data, mime)}, headers=self.loader.auth_headers(),
                              timeout=_UPLOAD_TIMEOUT)
        if response.status_code != 201:
            raise ImportItemError(f"upload refused: HTTP {response.status_code} {response.text[:300]}")
        ids = response.json().get("task_ids") or []
        if len(ids) != 1:
            raise ImportItemError(f"upload created {len(ids)} tasks instead of one")
        task_id = int(ids[0])
        try:
            task_data = dict(self.client.tasks.get(id=str(task_id)).data or {})
            if self.target.value_key not in task_data:
                raise ImportItemError(f"Label Studio stored the image under {sorted(task_data)}, the labeling "
                                      f"config reads ${self.target.value_key}")
            self.client.tasks.update(id=str(task_id), data={**task_data, SOURCE_KEY: key})
        except Exception:
            self.client.tasks.delete(id=str(task_id))  # no untagged task: a rerun would duplicate it
            raise
        return task_id


def cmd_import(args: argparse.Namespace) -> int:
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    from backend.formats import find_target
    from backend.images import ImageError
    from backend.label_config import render_label_config
    from training.data.dataset_io import ItemError, read_dataset

    if args.title and not args.new:
        raise CLIError("--title names a project created with --new")
    settings, client = _connect()
    reader = read_dataset(args.src, args.format, settings.max_image_pixels)
    try:
        if args.new:
            title = args.title or f"toothseg import {Path(args.src).resolve().name}"
            project = client.projects.create(title=title, label_config=render_label_config())
            print(f"created project {project.id} ({title})")
        else:
            project = _get_project(client, args.project, settings.label_studio_url)
        target = find_target(project.label_config)
        importer = Importer(client, settings, project.id, target, args.kind)
    except ImageError as exc:
        raise CLIError(exc.reason) from None
    except ApiError as exc:
        raise CLIError(f"Label Studio at {settings.label_studio_url}: {_api_message(exc)}") from None
    except httpx.HTTPError as exc:
        raise CLIError(f"Label Studio at {settings.label_studio_url} is unreachable: {exc.__class__.__name__}: "
                     f"{exc}") from None
    summary = ImportSummary()
    for entry in _progress(reader, len(reader), "import"):
        if isinstance(entry, ItemError):
            summary.failed.append(str(entry))
            _report(str(entry))
            continue
        try:
            if importer.add(entry):
                summary.imported += 1
            else:
                summary.skipped += 1
        except httpx.TransportError as exc:
            raise CLIError(f"Label Studio at {settings.label_studio_url} is unreachable: "
                         f"{exc.__class__.__name__}: {exc} ({summary})") from None
        except (ImportItemError, ApiError, httpx.HTTPError, ValueError, OSError) as exc:
            line = f"{entry.source}: {_api_message(exc) if isinstance(exc, ApiError) else exc}"
            summary.failed.append(line)
            _report(line)
    print(f"import into project {project.id} as {args.kind}: {summary}")
    return 1 if summary.failed else 0


# --- export ----------------------------------------------------------------------------------

def _task_names(tasks: list[AnnotatedTask]) -> dict[int, str]:
    """task id -> file stem: the imported file's name (from toothseg_source), else task_<id>;
    a name taken by an earlier task gets _task<id> appended."""
    names: dict[int, str] = {}
    used: set[str] = set()
    for task in tasks:
        source = str(task.data.get(SOURCE_KEY) or "")
        name = Path(source.rsplit(":", 1)[0]).stem if source else f"task_{task.task_id}"
        if name in used:
            name = f"{name}_task{task.task_id}"
        used.add(name)
        names[task.task_id] = name
    return names


def cmd_export(args: argparse.Namespace) -> int:
    from backend.formats import find_target
    from backend.images import ImageLoader
    from training.dataset import split_train_val
    from training.data.dataset_io import open_writer
    from training.export import ExportError, annotated_tasks, export_project, load_labeled_images

    if not 0.0 <= args.val_fraction < 1.0:
        raise CLIError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    settings, client = _connect()
    project = _get_project(client, args.project, settings.label_studio_url)
    target = find_target(project.label_config)
    try:
        export = export_project(settings.label_studio_url, settings.label_studio_api_key, args.project)
    except ExportError as exc:
        raise CLIError(str(exc)) from None
    tasks, unlabeled = annotated_tasks(export)
    names = _task_names(tasks)
    val: set[int] = set()
    if args.val_fraction > 0:
        val = set(split_train_val([t.task_id for t in tasks], args.val_fraction)[1])
    loader = ImageLoader(settings)
    failed: list[str] = []
    with open_writer(args.format, args.out) as writer:
        for task in _progress(tasks, len(tasks), "export"):
            images, skipped = load_labeled_images([task], loader, target.value_key)
            for reason in skipped:
                failed.append(reason)
                _report(reason)
            for image in images:
                split = ("val" if task.task_id in val else "train") if args.val_fraction > 0 else ""
                writer.add(replace(image, name=names[task.task_id]), split)
    written = ", ".join(f"{n} {split}" for split, n in sorted(writer.counts.items()) if split) or \
        str(writer.counts.get("", 0))
    print(f"exported project {args.project} to {args.out} as {args.format}: {written} images; "
          f"{len(unlabeled)} tasks without annotations, {len(failed)} failed")
    return 1 if failed else 0


# --- predict ---------------------------------------------------------------------------------

def _pipeline(args: argparse.Namespace, settings: Settings) -> tuple[Pipeline, str]:
    """(pipeline, model version) for --model weights, else a project's current registry model."""
    from backend.detector import Detector
    from backend.pipeline import Pipeline, PipelineOptions
    from backend.registry import Registry, project_key
    from backend.runtime import Runtime

    runtime = Runtime(settings)
    if args.model:
        weights = Path(args.model)
        try:
            detector = Detector.load(weights, device=settings.device, conf=settings.detector_conf)
        except Exception as exc:  # torch / ultralytics raise many types for a file that is not their checkpoint
            raise CLIError(f"--model {weights}: cannot load YOLOv8-seg weights "
                               f"({exc.__class__.__name__}: {exc})") from None
        return Pipeline(detector, runtime.refiner() if settings.sam_preannotate else None,
                        PipelineOptions.from_settings(settings)), weights.name
    if args.project:
        project = project_key(args.project)
    else:
        projects = Registry(settings.model_dir).projects()
        if len(projects) != 1:
            raise CLIError(f"give --model WEIGHTS or --project ID (models in {settings.model_dir}: "
                         f"{', '.join(projects) or 'none'})")
        project = projects[0]
    served = runtime.serve(project)
    if served.pipeline is None:
        raise CLIError(f"project {project} has no model in {settings.model_dir} and YOLO_WEIGHTS is not set")
    return served.pipeline, served.version


def cmd_predict(args: argparse.Namespace) -> int:
    from backend.images import ImageError, XrayImage, decode_image
    from backend.settings import Settings
    from training.data.dataset_io import IMAGE_SUFFIXES, DatasetItem, open_writer

    folder = Path(args.images)
    if not folder.is_dir():
        raise CLIError(f"{folder}: not a folder")
    if args.model and not Path(args.model).is_file():
        raise CLIError(f"--model {args.model}: no such file")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CLIError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    settings = Settings.from_env()
    pipeline, version = _pipeline(args, settings)
    sam = "with SAM" if pipeline.refiner is not None else "without SAM (SAM_CHECKPOINT not set)"
    print(f"predicting {len(images)} images with {version} {sam}", file=sys.stderr)
    failed: list[str] = []
    teeth = 0
    with open_writer(args.format, args.out) as writer:
        for path in _progress(images, len(images), "predict"):
            try:
                pixels = decode_image(path.read_bytes(), settings.max_image_pixels, source=path.name)
                instances = pipeline.run(XrayImage.of(pixels, str(path)))
                writer.add(DatasetItem(path.stem, path, {i.label: i.mask for i in instances}, str(path)))
            except (ImageError, ValueError, OSError) as exc:
                failed.append(f"{path}: {exc}")
                _report(failed[-1])
                continue
            teeth += len(instances)
    print(f"predicted {len(images) - len(failed)} images ({teeth} teeth) with {version} -> {args.out} "
          f"as {args.format}; {len(failed)} failed")
    return 1 if failed else 0


# --- evaluate --------------------------------------------------------------------------------

_TABLE = (
    ("image Dice", "image_dice"), ("image IoU", "image_iou"),
    ("image NSD (sts)", "image_nsd_sts"), ("image NSD (contour)", "image_nsd_contour"),
    ("instance Dice", "instance_dice"), ("instance IoU", "instance_iou"),
    ("instance NSD (sts)", "instance_nsd_sts"), ("instance NSD (contour)", "instance_nsd_contour"),
    ("IA (identification accuracy)", "ia"), ("primary = (instance Dice + IA) / 2", "primary"),
)
CSV_COLUMNS = ("image", *(key for _, key in _TABLE), "missing_prediction")


def _merge_variants(results: dict[str, tuple[list[dict], Scores]]
                    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """evaluate_folder's rows and means per NSD variant -> per-image rows and means with
    image_nsd_<variant> and instance_nsd_<variant> columns, plus the primary score."""
    variants = list(results)
    first_rows, first_mean = results[variants[0]]
    rows = []
    for i, base in enumerate(first_rows):
        row = {k: v for k, v in base.items() if k not in ("image_nsd", "instance_nsd")}
        for variant in variants:
            other = results[variant][0][i]
            row[f"image_nsd_{variant}"] = other["image_nsd"]
            row[f"instance_nsd_{variant}"] = other["instance_nsd"]
        row["primary"] = (row["instance_dice"] + row["ia"]) / 2.0
        rows.append(row)
    means = {k: v for k, v in first_mean.as_dict().items() if k not in ("image_nsd", "instance_nsd")}
    for variant in variants:
        means[f"image_nsd_{variant}"] = results[variant][1].image_nsd
        means[f"instance_nsd_{variant}"] = results[variant][1].instance_nsd
    means["primary"] = first_mean.primary
    return rows, means


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.data.labelme import LabelmeError
    from training.metrics import DEFAULT_TOLERANCE, NSD_VARIANTS, evaluate_folders

    pred, gt = Path(args.pred), Path(args.gt)
    for folder in (pred, gt):
        if not folder.is_dir():
            raise CLIError(f"{folder}: not a folder")
    try:
        results = evaluate_folders(pred, gt, NSD_VARIANTS)
    except LabelmeError as exc:  # every unreadable file, one per line
        errors = str(exc).splitlines()
        for error in errors:
            _report(error)
        raise CLIError(f"{len(errors)} unreadable Labelme file(s) (listed above): nothing scored") from None
    rows, means = _merge_variants(results)
    csv_path = Path(args.csv) if args.csv else pred.resolve().parent / "metrics.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    missing = sum(r["missing_prediction"] for r in rows)
    width = max(len(name) for name, _ in _TABLE)
    print(f"STS 2024 metrics, mean over {len(rows)} images ({missing} without a prediction), "
          f"NSD at {DEFAULT_TOLERANCE:g} px:")
    print(f"{'metric':<{width}}  {'mean':>6}")
    for name, key in _TABLE:
        print(f"{name:<{width}}  {means[key]:.4f}")
    print(f"per-image scores: {csv_path}")
    return 0


# --- convert ---------------------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    from training.data.dataset_io import DatasetError, ItemError, open_writer, read_dataset

    if Path(args.out).resolve() == Path(args.src).resolve():
        raise CLIError("OUT must differ from SRC")
    reader = read_dataset(args.src, args.source_format)  # a DatasetError is the command's one-line error
    failed: list[str] = []
    teeth = 0
    with open_writer(args.format, args.out) as writer:
        for entry in _progress(reader, len(reader), "convert"):
            if isinstance(entry, ItemError):
                failed.append(str(entry))
                _report(failed[-1])
                continue
            try:
                writer.add(entry, "")
            except (DatasetError, ValueError, OSError) as exc:
                failed.append(f"{entry.source}: {exc}")
                _report(failed[-1])
                continue
            teeth += len(entry.masks)
    written = writer.counts.get("", 0)
    print(f"converted {written} images ({teeth} teeth) from {args.source_format} {args.src} to {args.format} "
          f"{args.out}; {len(failed)} failed")
    return 1 if failed else 0


# --- parser ----------------------------------------------------------------------------------

def register_dataset_commands(sub: argparse._SubParsersAction) -> None:
    """Add `import`, `convert`, `export`, `predict` and `evaluate` to the `toothseg` subcommands `sub`."""
    p = sub.add_parser("import", help="import a labeled dataset into Label Studio (annotations or predictions)")
    p.add_argument("src", help="dataset folder (coco: also the JSON file)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--project", type=int, help="existing Label Studio project id")
    where.add_argument("--new", action="store_true", help="create a project with toothseg's labeling config")
    p.add_argument("--title", help="--new: the project's title (default 'toothseg import <folder>')")
    p.add_argument("--format", required=True, choices=READ_FORMATS,
                   help="dataset format (ufba: UFBA-425's layout, read only)")
    p.add_argument("--as", dest="kind", choices=("annotations", "predictions"), default="annotations",
                   help="save the masks as ground-truth annotations (default) or as predictions (model version "
                        f"'{IMPORT_MODEL_VERSION}')")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("convert", help="convert a dataset between formats (e.g. UFBA-425 to labelme)")
    p.add_argument("src", help="dataset folder (coco: also the JSON file)")
    p.add_argument("out", help="output folder")
    p.add_argument("--from", dest="source_format", required=True, choices=READ_FORMATS,
                   help="format of SRC (ufba: UFBA-425's layout)")
    p.add_argument("--format", required=True, choices=FORMATS, help="format written to OUT")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export a project's annotations as a dataset")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="dataset format")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of tasks (chosen by task id, stable) written to a val split; 0 = no split (default)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="predict a folder of images (STS Labelme JSON per image, or a dataset)")
    p.add_argument("images", help="folder of images")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", default="labelme", choices=FORMATS, help="output format (default labelme)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="YOLOv8-seg weights (.pt) with FDI class names")
    model.add_argument("--project", help="use this project's current model from MODEL_DIR (default: the only one)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="STS metrics of Labelme predictions against Labelme ground truth")
    p.add_argument("pred", help="folder of predicted Labelme JSON files")
    p.add_argument("gt", help="folder of ground-truth Labelme JSON files (same file names)")
    p.add_argument("--csv", help="per-image CSV (default: metrics.csv next to PRED)")
    p.set_defaults(func=cmd_evaluate)
