"""Tooth segmentation datasets on disk: read and write items in four formats, and read a fifth.

An item is one image and its teeth: `DatasetItem(name, image, masks)` with `image` either an
(H, W) uint8 grey array or the path of an image file, and `masks` {FDI label: (H, W) bool mask}
at the image's size. Formats (`read_dataset(src, fmt)`, `open_writer(fmt, out)`):

- `labelme`: STS 2024 Labelme JSON per image (`<name>.json`: one polygon shape per tooth part,
  `label` = FDI string, `imagePath`, `imageHeight`, `imageWidth`; `training.data.labelme`). The image
  is `imageData` when embedded, else `imagePath` relative to the JSON, else `<name>.<ext>` next to
  the JSON or in a sibling `images/` folder. Written: the JSON, and the image as `<name>.png`
  next to it unless the item's image is a file (then `imagePath` points to that file).
- `masks`: `images/<name>.<ext>` + `masks/<name>.png`, one single-channel PNG per image whose
  pixel value v != 0 is a tooth; `label_map.json` maps values to FDI labels ({"1": "11", ...});
  without it a value is the FDI number itself (pixel 11 is tooth 11). Written: uint8 masks with
  value = FDI number and an identity label_map.json; where teeth overlap, the tooth later in
  FDI class order (`backend.fdi.FDI_LABELS`: 11 ... 48, 51 ... 85) keeps the pixel.
- `yolo`: ultralytics YOLO-seg (`images/[<split>/]<name>.<ext>`, `labels/[<split>/]<name>.txt`
  with "<class> x1 y1 x2 y2 ..." normalised to [0, 1], `data.yaml` whose `names` map class
  indices to FDI labels in any order). Written by `YoloWriter` (`yolo_label_lines`: one polygon
  per tooth, parts merged; exact outlines and all 52 FDI classes in class order unless told
  otherwise, as `training.dataset.write_yolo_dataset` does for the detector's training).
- `coco`: COCO instance segmentation (`annotations.json`: `images`, `annotations` with polygon
  `segmentation`, `categories` named by FDI label; images in `images/`). RLE segmentations are
  read through pycocotools when it is installed, else that image fails with the reason.

- `ufba` (read only): UFBA-425's layout, `panoramic_x_rays/<cat>-<n>.jpg` and one mask per tooth
  `labels/<any folder>/<cat>-<n>_<FDI>.ome.tiff` (value > 0; LZW through imagecodecs); the
  `<name>_background` masks are not teeth (`ufba_root`, `_read_ufba`).

Polygon formats (labelme, yolo, coco) store outlines: a hole inside a tooth mask is written
filled. Coordinate frames: Labelme points are pixel-centre (col, row) coordinates
(`training.data.labelme`); YOLO and COCO coordinates are continuous image coordinates whose pixel
(col, row) covers [col, col + 1) x [row, row + 1), so a pixel centre is at (col + 0.5, row + 0.5)
(normalised by W and H for YOLO).

Readers never stop at a bad file: iterating a `DatasetReader` yields a `DatasetItem` per good
file and an `ItemError` (the file and a one-line reason) per bad one. Only a dataset-level
problem (no files, an unreadable data.yaml, label_map.json or COCO JSON) raises `DatasetError`.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import cv2
import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from backend import fdi
from backend.formats import fdi_of_value, mask_to_polygons, polygons_to_mask
from backend.images import ImageError, decode_image
from backend.instance import mask_box
from backend.settings import DEFAULT_MAX_IMAGE_PIXELS
from training.data.labelme import labelme_to_masks, polygons_to_labelme, write_labelme

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LABEL_MAP = "label_map.json"
DATA_YAML = "data.yaml"
COCO_JSON = "annotations.json"
SPLITS = ("", "train", "val")
"""Where a writer puts an item: "" the dataset's root, or the train / val split."""

_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """A dataset, or one file of it, that cannot be read or written."""


@dataclass
class DatasetItem:
    """One image and its teeth, the record of every dataset in toothseg (files read and written
    here, a retrain's exported tasks, synthetic X-rays). `name`: its file stem (unique in a
    dataset); `image`: (H, W) uint8 grey, or the path of an image file; `masks`: {FDI label:
    (H, W) bool mask} at the image's size; `source`: where it came from (a file, a task)."""

    name: str
    image: np.ndarray | Path
    masks: dict[str, np.ndarray]
    source: str = ""

    @cached_property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image in pixels (read from the file's header for a path)."""
        if isinstance(self.image, Path):
            return image_size(self.image)
        return int(self.image.shape[0]), int(self.image.shape[1])

    def pixels(self, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
        """The image as (H, W) uint8 grey (a path is decoded by `backend.images.decode_image`,
        refusing more than `max_pixels` pixels)."""
        if isinstance(self.image, Path):
            return decode_image(self.image.read_bytes(), max_pixels, source=self.image.name)
        return self.image

    def image_file(self) -> tuple[str, bytes]:
        """(file name, bytes) of the image: the file itself, or a PNG encoding of the array."""
        if isinstance(self.image, Path):
            return self.image.name, self.image.read_bytes()
        return f"{self.name}.png", _png(self.image)


@dataclass(frozen=True)
class ItemError:
    """A file that could not be read as an item, with a one-line reason."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class DatasetReader:
    """The items of one dataset, read lazily: `len()` files; iteration yields a `DatasetItem` or
    an `ItemError` per file (by file name; coco: in the order of its `images`)."""

    fmt: str
    root: Path
    entries: list[tuple[str, Callable[[], DatasetItem]]]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[DatasetItem | ItemError]:
        for source, load in self.entries:
            try:
                yield load()
            except (ValueError, OSError, ImageError) as exc:
                yield ItemError(source, _reason(exc, source))


def _reason(exc: Exception, source: str) -> str:
    """The exception's message without a leading "<source>: " and on one line."""
    text = str(exc).replace("\n", " ").strip() or exc.__class__.__name__
    for prefix in (source, Path(source).name):
        if text.startswith(prefix + ": "):
            return text[len(prefix) + 2:]
    return text


# --- images --------------------------------------------------------------------------------

def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, after its EXIF orientation (as
    `backend.images.decode_image` applies it). DatasetError if it is not a readable image."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
    except (UnidentifiedImageError, ImportError, OSError, SyntaxError, ValueError):
        raise DatasetError(f"{path.name}: not a readable image") from None
    return height, width


def _png(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise DatasetError(f"cannot encode an image of shape {pixels.shape} as PNG")
    return data.tobytes()


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_image(stem: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        for suffix in IMAGE_SUFFIXES:
            for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _check_size(masks: Mapping[str, np.ndarray], size: tuple[int, int], what: str) -> None:
    for label, mask in masks.items():
        if mask.shape != size:
            raise DatasetError(f"{what} tooth {label} is {mask.shape[1]}x{mask.shape[0]}, "
                               f"the image is {size[1]}x{size[0]}")


def _ordered(masks: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(masks, key=fdi.CLASS_INDEX.__getitem__)


# --- labelme -------------------------------------------------------------------------------

def _labelme_item(path: Path, max_pixels: int) -> DatasetItem:
    try:
        doc = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise DatasetError("not a JSON text file") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"invalid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise DatasetError("not a Labelme document (a JSON object with shapes, imageHeight, imageWidth)")
    masks = labelme_to_masks(doc, source=str(path))
    size = int(doc["imageHeight"]), int(doc["imageWidth"])
    image: np.ndarray | Path
    if doc.get("imageData"):
        try:
            data = base64.b64decode(doc["imageData"], validate=True)
        except (ValueError, TypeError):
            raise DatasetError("imageData is not base64") from None
        image = decode_image(data, max_pixels, source="imageData")
        actual = image.shape[:2]
    else:
        image = _labelme_image_path(path, doc.get("imagePath"))
        actual = image_size(image)
    if actual != size:
        raise DatasetError(f"imageHeight x imageWidth is {size[0]}x{size[1]}, the image is {actual[0]}x{actual[1]}")
    return DatasetItem(path.stem, image, masks, str(path))


def _labelme_image_path(path: Path, image_path: Any) -> Path:
    """The image of a Labelme file: imagePath (relative to the JSON), else <stem>.<ext> next to it
    or in a sibling images/ folder."""
    candidates = []
    if isinstance(image_path, str) and image_path.strip():
        rel = Path(image_path.strip().replace("\\", "/"))
        candidates += [rel if rel.is_absolute() else path.parent / rel, path.parent / rel.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    found = _find_image(path.stem, [path.parent, path.parent.parent / "images"])
    if found is None:
        raise DatasetError(f"image not found (imagePath {image_path!r}, no {path.stem}.png/.jpg next to it "
                           f"or in ../images)")
    return found


def _read_labelme(root: Path, max_pixels: int) -> list[tuple[str, Callable[[], DatasetItem]]]:
    files = sorted(root.glob("*.json"))
    if not files:
        raise DatasetError(f"{root}: no Labelme .json files")
    return [(str(p), lambda p=p: _labelme_item(p, max_pixels)) for p in files]


# --- masks ---------------------------------------------------------------------------------

def read_label_map(path: Path) -> dict[int, str] | None:
    """label_map.json {"<pixel value>": "<FDI label>"} -> {value: label}; None if the file is absent."""
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected an object {{\"<pixel value>\": \"<FDI label>\"}}")
    mapping = {}
    for key, label in raw.items():
        try:
            value = int(key)
        except ValueError:
            raise DatasetError(f"{path}: key {key!r} is not a pixel value") from None
        if not 0 < value < 65536:
            raise DatasetError(f"{path}: pixel value {value} is outside 1..65535")
        if not fdi.is_fdi(label):
            raise DatasetError(f"{path}: value {key} maps to {label!r}, not an FDI tooth (11-48, 51-85)")
        mapping[value] = fdi.validate(label)
    return mapping


def _read_mask_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(f"mask must be a single-channel PNG (grey or palette), got mode {im.mode}")
            return np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, ImportError, OSError, SyntaxError):
        raise DatasetError("not a readable PNG mask") from None


def _masks_item(root: Path, stem: str, label_map: dict[int, str] | None) -> DatasetItem:
    image = _find_image(stem, [root / "images"])
    mask_path = root / "masks" / f"{stem}.png"
    if image is None:
        raise DatasetError(f"no image images/{stem}.png (or .jpg, ...) for this mask")
    if not mask_path.is_file():
        raise DatasetError(f"no mask file masks/{stem}.png for this image")
    values = _read_mask_png(mask_path)
    masks: dict[str, np.ndarray] = {}
    for value in np.unique(values):
        if value == 0:
            continue
        if label_map is not None:
            label = label_map.get(int(value))
            if label is None:
                raise DatasetError(f"{mask_path.name}: pixel value {value} has no label in {LABEL_MAP}")
        elif fdi.is_fdi(int(value)):
            label = str(int(value))
        else:
            raise DatasetError(f"{mask_path.name}: pixel value {value} is not an FDI number "
                               f"(add a {LABEL_MAP} to map values to teeth)")
        masks[label] = masks[label] | (values == value) if label in masks else values == value
    _check_size(masks, image_size(image), f"{mask_path.name}:")
    return DatasetItem(stem, image, masks, str(image))


def _read_masks(root: Path, max_pixels: int) -> list[tuple[str, Callable[[], DatasetItem]]]:
    label_map = read_label_map(root / LABEL_MAP)
    images = {p.stem: p for p in _image_files(root / "images")} if (root / "images").is_dir() else {}
    masks = {p.stem: p for p in (root / "masks").glob("*.png")} if (root / "masks").is_dir() else {}
    if not images and not masks:
        raise DatasetError(f"{root}: no images/ and masks/ files (expected images/<name>.png + masks/<name>.png)")
    return [(str(images.get(stem) or masks[stem]), lambda stem=stem: _masks_item(root, stem, label_map))
            for stem in sorted(set(images) | set(masks))]


# --- yolo ----------------------------------------------------------------------------------

def read_yolo_names(path: Path) -> dict[int, str | None]:
    """data.yaml's `names` (a list or {index: name}) -> {class index: FDI label, or None for a
    class that is not a tooth}. DatasetError if the file is missing, unreadable or names no tooth."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (a YOLO dataset needs a data.yaml with class names)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path}: cannot read YAML ({str(exc).splitlines()[0]})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"{path}: no `names` (class index -> FDI label)")
    try:
        mapping = {int(i): fdi_of_value(str(n)) for i, n in names.items()}
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: `names` keys must be class indices") from None
    if not any(mapping.values()):
        raise DatasetError(f"{path}: no class name is an FDI tooth label (11-48, 51-85)")
    return mapping


def _yolo_item(image: Path, label_path: Path, names: dict[int, str | None]) -> DatasetItem:
    height, width = image_size(image)
    polygons: dict[str, list[np.ndarray]] = {}
    lines = label_path.read_text().splitlines() if label_path.exists() else []  # no file: no teeth
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            cls, coords = int(tokens[0]), np.asarray(tokens[1:], dtype=np.float64)
        except ValueError:
            raise DatasetError(f"{label_path.name} line {number}: not numbers") from None
        if cls not in names:
            raise DatasetError(f"{label_path.name} line {number}: class {cls} is not in data.yaml's names")
        label = names[cls]
        if label is None:
            raise DatasetError(f"{label_path.name} line {number}: class {cls} is not an FDI tooth")
        if len(coords) < 6 or len(coords) % 2:
            raise DatasetError(f"{label_path.name} line {number}: expected a class and at least 3 x y pairs "
                               f"(a segmentation polygon), got {len(coords)} numbers")
        points = coords.reshape(-1, 2) * (width, height) - 0.5
        polygons.setdefault(label, []).append(points)
    masks = {label: polygons_to_mask(polys, height, width) for label, polys in polygons.items()}
    return DatasetItem(image.stem, image, masks, str(label_path if label_path.exists() else image))


def _read_yolo(root: Path, max_pixels: int) -> list[tuple[str, Callable[[], DatasetItem]]]:
    names = read_yolo_names(root / DATA_YAML)
    image_dir, label_dir = root / "images", root / "labels"
    images = _image_files(image_dir, recursive=True) if image_dir.is_dir() else []
    if not images:
        raise DatasetError(f"{root}: no images under images/")
    entries, seen = [], {}
    for image in images:
        rel = image.relative_to(image_dir)
        label_path = (label_dir / rel).with_suffix(".txt")
        if image.stem in seen:
            first = seen[image.stem]
            entries.append((str(image), lambda first=first: _fail(f"another image has the same name: {first}")))
            continue
        seen[image.stem] = image
        entries.append((str(label_path), lambda i=image, lp=label_path: _yolo_item(i, lp, names)))
    with_image = {(label_dir / p.relative_to(image_dir)).with_suffix(".txt") for p in images}
    orphans = sorted(set(label_dir.rglob("*.txt")) - with_image) if label_dir.is_dir() else []
    entries += [(str(p), lambda: _fail("no image for this label file")) for p in orphans]
    return entries


def _fail(reason: str) -> DatasetItem:
    raise DatasetError(reason)


# --- coco ----------------------------------------------------------------------------------

def _coco_json(src: Path) -> Path:
    if src.is_file():
        return src
    if (src / COCO_JSON).is_file():
        return src / COCO_JSON
    found = sorted(src.glob("*.json"))
    if len(found) != 1:
        raise DatasetError(f"{src}: expected {COCO_JSON} (or exactly one .json file), found "
                           f"{', '.join(p.name for p in found) or 'none'}")
    return found[0]


def _coco_polygons(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons or RLE) -> (H, W) bool mask."""
    if isinstance(segmentation, dict):
        try:
            from pycocotools import mask as rle_mask
        except ImportError:
            raise DatasetError("RLE segmentation needs pycocotools, which is not installed "
                               "(install it, or export polygons)") from None
        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = rle_mask.frPyObjects(rle, height, width)
        return rle_mask.decode(rle).astype(bool)
    if not isinstance(segmentation, list) or not segmentation:
        raise DatasetError("segmentation is neither a list of polygons nor RLE")
    polygons = []
    for poly in segmentation:
        try:
            coords = np.asarray(poly, dtype=np.float64)
        except (TypeError, ValueError):
            raise DatasetError("a polygon holds something other than numbers") from None
        if coords.ndim != 1 or len(coords) < 6 or len(coords) % 2:
            raise DatasetError(f"a polygon needs at least 3 x y pairs, got {coords.size} numbers")
        polygons.append(coords.reshape(-1, 2) - 0.5)
    return polygons_to_mask(polygons, height, width)


def _coco_item(record: Mapping[str, Any], annotations: list[Mapping[str, Any]], categories: dict[Any, str | None],
               folders: list[Path]) -> DatasetItem:
    file_name = str(record.get("file_name") or "")
    if not file_name:
        raise DatasetError(f"image id {record.get('id')} has no file_name")
    image = next((f / file_name for f in folders if (f / file_name).is_file()), None)
    if image is None:
        raise DatasetError(f"image file not found in {', '.join(str(f) for f in folders)}")
    height, width = image_size(image)
    declared = record.get("height"), record.get("width")
    if all(declared) and (int(declared[0]), int(declared[1])) != (height, width):
        raise DatasetError(f"declared {declared[1]}x{declared[0]}, the image is {width}x{height}")
    masks: dict[str, np.ndarray] = {}
    for ann in annotations:
        category = ann.get("category_id")
        if category not in categories:
            raise DatasetError(f"annotation {ann.get('id')}: unknown category_id {category}")
        label = categories[category]
        if label is None:
            raise DatasetError(f"annotation {ann.get('id')}: category {category} is not an FDI tooth")
        try:
            mask = _coco_polygons(ann.get("segmentation"), height, width)
        except DatasetError as exc:
            raise DatasetError(f"annotation {ann.get('id')} (tooth {label}): {exc}") from None
        masks[label] = masks[label] | mask if label in masks else mask
    return DatasetItem(Path(file_name).stem, image, masks, str(image))


def _read_coco(src: Path, max_pixels: int) -> list[tuple[str, Callable[[], DatasetItem]]]:
    path = _coco_json(src)
    try:
        doc = json.loads(path.read_text())
        images = list(doc["images"])
        annotations = list(doc.get("annotations") or [])
        categories = {c["id"]: fdi_of_value(str(c.get("name", ""))) for c in doc["categories"]}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read JSON ({exc})") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path}: not a COCO document (needs images, annotations, categories with id "
                           f"and name): {exc!r}") from None
    if not images:
        raise DatasetError(f"{path}: no images")
    by_image: dict[Any, list] = {}
    for ann in annotations:
        by_image.setdefault(ann.get("image_id") if isinstance(ann, dict) else None, []).append(ann)
    folders = [path.parent / "images", path.parent]
    entries = []
    for record in images:
        if not isinstance(record, dict):
            entries.append((str(path), lambda: _fail("an entry of `images` is not an object")))
            continue
        source = f"{path}[{record.get('file_name') or record.get('id')}]"
        entries.append((source, lambda r=record: _coco_item(r, by_image.get(r.get("id"), []), categories, folders)))
    return entries


# --- ufba (UFBA-425: a JPEG per radiograph, an OME-TIFF mask per tooth) ----------------------

UFBA_IMAGES = "panoramic_x_rays"
UFBA_LABELS = "labels"
_UFBA_MASK = re.compile(r"^(?P<stem>.+)_(?P<tooth>[^_]+)\.ome\.tiff?$", re.IGNORECASE)


def ufba_root(src: Path) -> Path:
    """The folder holding `panoramic_x_rays/` and `labels/`: `src` itself, or
    `src/Dataset/bb_u_net_dataset` (a checkout of the UFBA-425 repository). DatasetError if neither."""
    for root in (src, src / "Dataset" / "bb_u_net_dataset"):
        if (root / UFBA_IMAGES).is_dir() and (root / UFBA_LABELS).is_dir():
            return root
    raise DatasetError(f"{src}: no {UFBA_IMAGES}/ and {UFBA_LABELS}/ folders (expected the UFBA-425 layout: "
                       f"{UFBA_IMAGES}/<cat>-<n>.jpg and {UFBA_LABELS}/<any folder>/<cat>-<n>_<FDI>.ome.tiff)")


def ufba_category(name: str) -> str:
    """The UFBA-425 image category of an image name ("cate10-00005" -> "cate10")."""
    return name.split("-", 1)[0]


def _read_tiff_mask(path: Path) -> np.ndarray:
    import tifffile

    try:
        values = np.squeeze(tifffile.imread(path))
    except (ValueError, OSError, tifffile.TiffFileError) as exc:
        raise DatasetError(f"{path.name}: not a readable TIFF mask ({exc.__class__.__name__}: {exc})") from None
    if values.ndim != 2:
        raise DatasetError(f"{path.name}: a tooth mask must be one 2-D plane, got shape {values.shape}")
    return values > 0


def _ufba_item(image: Path, masks: list[tuple[str, Path]]) -> DatasetItem:
    if not masks:
        raise DatasetError(f"no tooth masks {UFBA_LABELS}/<folder>/{image.stem}_<FDI>.ome.tiff for this image")
    size = image_size(image)
    teeth: dict[str, np.ndarray] = {}
    for tooth, path in masks:
        if not fdi.is_fdi(tooth):
            raise DatasetError(f"{path.name}: '{tooth}' is not an FDI tooth number")
        label = fdi.validate(tooth)
        mask = _read_tiff_mask(path)
        _check_size({label: mask}, size, f"{path.name}:")
        teeth[label] = teeth[label] | mask if label in teeth else mask
    return DatasetItem(image.stem, image, {label: teeth[label] for label in _ordered(teeth)}, str(image))


def _read_ufba(src: Path, max_pixels: int) -> list[tuple[str, Callable[[], DatasetItem]]]:
    """UFBA-425's layout (`ufba_root`): every image with its teeth; `<name>_background.ome.tiff`
    files are not teeth and are left out; masks without an image fail."""
    root = ufba_root(src)
    images = {p.stem: p for p in _image_files(root / UFBA_IMAGES)}
    masks: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted((root / UFBA_LABELS).rglob("*")):
        match = _UFBA_MASK.match(path.name) if path.is_file() else None
        if match and match["tooth"].lower() != "background":
            masks.setdefault(match["stem"], []).append((match["tooth"], path))
    if not images:
        raise DatasetError(f"{root / UFBA_IMAGES}: no images")
    entries = [(str(image), lambda i=image: _ufba_item(i, masks.get(i.stem, []))) for image in images.values()]
    entries += [(str(files[0][1]), lambda: _fail("tooth masks without an image in " + UFBA_IMAGES + "/"))
                for stem, files in sorted(masks.items()) if stem not in images]
    return entries


# --- reading -------------------------------------------------------------------------------

READERS: dict[str, Callable[[Path, int], list[tuple[str, Callable[[], DatasetItem]]]]] = {
    "labelme": _read_labelme, "masks": _read_masks, "yolo": _read_yolo, "coco": _read_coco, "ufba": _read_ufba,
}
"""Readable formats: the writable ones (`WRITERS`) and "ufba", the UFBA-425 layout (read only)."""


def read_dataset(src: str | Path, fmt: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DatasetReader:
    """Open the dataset at `src` (a folder; for coco also the JSON file) in format `fmt`. An image
    embedded in a file (Labelme's imageData) with more than `max_pixels` pixels is refused
    (MAX_IMAGE_PIXELS; images in their own files are decoded by whoever reads their pixels).

    Raises DatasetError for a dataset-level problem (no files, unreadable data.yaml, label map or
    COCO JSON); problems of single files come out of the iteration as ItemError."""
    if fmt not in READERS:
        raise DatasetError(f"unknown dataset format {fmt!r}: expected one of {', '.join(READERS)}")
    root = Path(src)
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder")
    if not root.is_dir() and fmt != "coco":
        raise DatasetError(f"{root}: not a folder")
    return DatasetReader(fmt, root, READERS[fmt](root, max_pixels))


# --- writing -------------------------------------------------------------------------------

class DatasetWriter:
    """Writes items of one format below `out`, each at the dataset's root (split "") or in the
    train / val split; `close()` writes the dataset-level files. Use as a context manager."""

    fmt = ""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.counts: dict[str, int] = {}
        self._names: set[tuple[str, str]] = set()

    def add(self, item: DatasetItem, split: str = "") -> None:
        """Write one item; DatasetError for a name already written to the split or a bad split."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}: expected one of {SPLITS}")
        if (split, item.name) in self._names:
            raise DatasetError(f"two images named {item.name!r} in one dataset")
        _check_size(item.masks, item.size, f"{item.name}:")
        self._write(item, split)
        self._names.add((split, item.name))
        self.counts[split] = self.counts.get(split, 0) + 1

    def _write(self, item: DatasetItem, split: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Write what spans the dataset (label map, data.yaml, COCO JSON)."""

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_image(self, item: DatasetItem, folder: Path) -> Path:
        """The item's image into `folder` as <name><suffix> (the file copied, or a PNG of the array)."""
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(item.image, Path):
            target = folder / f"{item.name}{item.image.suffix.lower()}"
            shutil.copyfile(item.image, target)
        else:
            target = folder / f"{item.name}.png"
            target.write_bytes(_png(item.image))
        return target


class LabelmeWriter(DatasetWriter):
    """<split>/<name>.json (STS Labelme, exact pixel-centre contours) and <name>.png next to it,
    or an imagePath relative to the JSON when the item's image is a file."""

    fmt = "labelme"

    def _write(self, item: DatasetItem, split: str) -> None:
        folder = self.out / split
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(item.image, Path):
            image_path = os.path.relpath(item.image.resolve(), folder.resolve())
        else:
            image_path = self._write_image(item, folder).name
        polygons = {label: parts for label in _ordered(item.masks) if (parts := mask_to_polygons(item.masks[label]))}
        write_labelme(folder / f"{item.name}.json", polygons_to_labelme(polygons, image_path, *item.size))


class MasksWriter(DatasetWriter):
    """<split>/images/<name>.png, <split>/masks/<name>.png (value = FDI number; overlaps go to the
    tooth later in FDI class order) and <split>/label_map.json."""

    fmt = "masks"

    def _write(self, item: DatasetItem, split: str) -> None:
        folder = self.out / split
        self._write_image(item, folder / "images")
        values = np.zeros(item.size, dtype=np.uint8)
        for label in _ordered(item.masks):
            values[item.masks[label]] = int(label)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        (folder / "masks" / f"{item.name}.png").write_bytes(_png(values))

    def close(self) -> None:
        identity = {label: label for label in fdi.FDI_LABELS}
        for split in self.counts:
            (self.out / split / LABEL_MAP).write_text(json.dumps(identity, indent=1) + "\n")


def mask_polygon(mask: np.ndarray, epsilon: float = 0.0) -> np.ndarray | None:
    """One (N, 2) pixel polygon for a tooth mask (parts joined at their closest points by
    ultralytics' `merge_multi_segment`, as its COCO converter does), or None if the mask is empty.
    `epsilon`: Douglas-Peucker tolerance in pixels (0: the exact outline)."""
    parts = mask_to_polygons(mask, epsilon=epsilon)
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    from ultralytics.data.converter import merge_multi_segment  # here: ultralytics loads torch (2.5 s a CLI call)

    parts.sort(key=lambda p: p[:, 0].min())  # left to right, so the bridges stay short
    return np.concatenate(merge_multi_segment([p.reshape(-1).tolist() for p in parts]), axis=0)


def yolo_label_lines(masks: Mapping[str, np.ndarray], epsilon: float = 0.0) -> list[str]:
    """{FDI label: (H, W) mask} -> YOLO-seg label lines "<class> x1 y1 ..." (class: index in
    `backend.fdi.FDI_LABELS`; the `mask_polygon`, normalised to [0, 1]), in class order."""
    lines = []
    for label in _ordered(masks):
        mask = masks[label]
        h, w = mask.shape
        poly = mask_polygon(mask, epsilon)
        if poly is None:
            continue
        norm = np.clip((poly + 0.5) / np.array([w, h]), 0.0, 1.0)
        coords = " ".join(f"{v:.6f}" for v in norm.reshape(-1))
        lines.append(f"{fdi.CLASS_INDEX[label]} {coords}")
    return lines


class YoloWriter(DatasetWriter):
    """images/[<split>/]<name>.png, labels/[<split>/]<name>.txt (`yolo_label_lines`) and data.yaml
    (train and val point to the splits, or both to images/). `names`: data.yaml's classes
    {index: name}, by default the 52 FDI labels in class order; `epsilon`: the polygons'
    simplification in pixels (0, the default: exact outlines)."""

    fmt = "yolo"

    def __init__(self, out: str | Path, names: Mapping[int, str] | None = None, epsilon: float = 0.0):
        super().__init__(out)
        self.names = dict(names if names is not None else enumerate(fdi.FDI_LABELS))
        self.epsilon = epsilon

    def _write(self, item: DatasetItem, split: str) -> None:
        self._write_image(item, self.out / "images" / split)
        labels = self.out / "labels" / split
        labels.mkdir(parents=True, exist_ok=True)
        lines = yolo_label_lines(item.masks, epsilon=self.epsilon)
        (labels / f"{item.name}.txt").write_text("\n".join(lines) + "\n" if lines else "")

    def close(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        split = "train" in self.counts or "val" in self.counts
        data = {"path": str(self.out.resolve()), "train": "images/train" if split else "images",
                "val": "images/val" if split else "images", "names": self.names, "channels": 3}
        (self.out / DATA_YAML).write_text(yaml.safe_dump(data, sort_keys=False))


class CocoWriter(DatasetWriter):
    """<split>/images/<name>.png and <split>/annotations.json: one annotation per tooth (its parts
    as polygons), categories 1..52 named by FDI label in class order."""

    fmt = "coco"

    def __init__(self, out: str | Path):
        super().__init__(out)
        self._docs: dict[str, dict[str, list]] = {}

    def _write(self, item: DatasetItem, split: str) -> None:
        image = self._write_image(item, self.out / split / "images")
        doc = self._docs.setdefault(split, {"images": [], "annotations": []})
        height, width = item.size
        image_id = len(doc["images"]) + 1
        doc["images"].append({"id": image_id, "file_name": image.name, "height": height, "width": width})
        for label in _ordered(item.masks):
            mask = item.masks[label]
            parts = mask_to_polygons(mask)
            if not parts:
                continue
            x1, y1, x2, y2 = mask_box(mask)
            doc["annotations"].append({
                "id": len(doc["annotations"]) + 1, "image_id": image_id, "category_id": fdi.CLASS_INDEX[label] + 1,
                "segmentation": [(p + 0.5).round(2).reshape(-1).tolist() for p in parts],
                "area": int(mask.sum()), "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0,
            })

    def close(self) -> None:
        categories = [{"id": i + 1, "name": label, "supercategory": "tooth"} for i, label in enumerate(fdi.FDI_LABELS)]
        for split, doc in self._docs.items():
            (self.out / split).mkdir(parents=True, exist_ok=True)
            (self.out / split / COCO_JSON).write_text(json.dumps({**doc, "categories": categories}))


WRITERS: dict[str, type[DatasetWriter]] = {w.fmt: w for w in (LabelmeWriter, MasksWriter, YoloWriter, CocoWriter)}


def open_writer(fmt: str, out: str | Path) -> DatasetWriter:
    """A writer of format `fmt` below `out` (created as needed)."""
    if fmt not in WRITERS:
        raise DatasetError(f"unknown dataset format {fmt!r}: expected one of {', '.join(WRITERS)}")
    return WRITERS[fmt](out)
