"""Dataset formats (training.data.dataset_io) and the `toothseg predict` / `evaluate` commands.

No Label Studio here: round trips per format, label maps, malformed files (one error per bad
file, the good ones still read), and predict + evaluate as subprocesses with the tiny detector
trained on synthetic X-rays (conftest's `trained_weights`)."""
from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from scipy import ndimage

from backend import fdi
from training.data import dataset_cli
from training.data.dataset_io import (READERS, WRITERS, DatasetError, DatasetItem, ItemError, open_writer,
                                 read_dataset)
from training.data.labelme import polygons_to_labelme, write_labelme
from training.metrics import iou
from training.data.synth import generate, write_dataset

from conftest import REPO, SYNTH_SIZE

SIZE = (640, 320)


@pytest.fixture(scope="module")
def items() -> list[DatasetItem]:
    """Three synthetic X-rays (touching and overlapping teeth, mixed dentition in one)."""
    samples = [generate(seed, SIZE) for seed in (0, 1, 3)]
    assert any(s.child for s in samples) and not all(s.child for s in samples)
    return [DatasetItem(f"xray_{i}", s.image, s.masks()) for i, s in enumerate(samples)]


def read_all(src, fmt) -> tuple[dict[str, DatasetItem], list[ItemError]]:
    good, bad = {}, []
    for entry in read_dataset(src, fmt):
        if isinstance(entry, ItemError):
            bad.append(entry)
        else:
            good[entry.name] = entry
    return good, bad


def resolve_overlaps(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the masks format keeps: each pixel belongs to the tooth latest in FDI class order."""
    owner = np.zeros(next(iter(masks.values())).shape, dtype=np.int64)
    for label in sorted(masks, key=fdi.CLASS_INDEX.__getitem__):
        owner[masks[label]] = int(label)
    return {label: owner == int(label) for label in masks if (owner == int(label)).any()}


def test_cli_formats_are_the_io_formats():
    assert set(dataset_cli.FORMATS) == set(WRITERS) and set(dataset_cli.READ_FORMATS) == set(READERS)


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["labelme", "masks", "yolo", "coco"])
def test_round_trip(fmt, items, tmp_path):
    with open_writer(fmt, tmp_path) as writer:
        for item in items:
            writer.add(item)
    got, errors = read_all(tmp_path, fmt)
    assert errors == []
    assert sorted(got) == [item.name for item in items]
    overlaps = sum(int((a & b).sum()) for item in items for i, a in enumerate(item.masks.values())
                   for b in list(item.masks.values())[i + 1:])
    assert overlaps > 0  # the masks format has something to resolve
    for item in items:
        back = got[item.name]
        assert np.array_equal(back.pixels(), item.image)
        if fmt == "labelme":  # outlines of integer polygons: exact, holes filled
            expected = {label: ndimage.binary_fill_holes(m) for label, m in item.masks.items()}
        elif fmt == "masks":  # one value per pixel: exact after overlaps went to the later tooth
            expected = resolve_overlaps(item.masks)
        else:
            expected = item.masks
        assert sorted(back.masks) == sorted(expected)
        for label, mask in expected.items():
            if fmt in ("labelme", "masks"):
                assert np.array_equal(back.masks[label], mask), (item.name, label)
            else:
                assert iou(back.masks[label], mask) >= 0.98, (item.name, label, iou(back.masks[label], mask))


def test_written_files_follow_each_format(items, tmp_path):
    item = items[0]
    for fmt in WRITERS:
        with open_writer(fmt, tmp_path / fmt) as writer:
            writer.add(item)
    doc = json.loads((tmp_path / "labelme" / "xray_0.json").read_text())
    assert doc["imagePath"] == "xray_0.png" and (doc["imageHeight"], doc["imageWidth"]) == (SIZE[1], SIZE[0])
    assert {s["label"] for s in doc["shapes"]} == set(item.masks)
    values = cv2.imread(str(tmp_path / "masks" / "masks" / "xray_0.png"), cv2.IMREAD_UNCHANGED)
    assert values.dtype == np.uint8 and values.ndim == 2
    assert {str(v) for v in np.unique(values) if v} == set(resolve_overlaps(item.masks))
    assert json.loads((tmp_path / "masks" / "label_map.json").read_text())["48"] == "48"
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(fdi.FDI_LABELS)) and data["train"] == data["val"] == "images"
    lines = (tmp_path / "yolo" / "labels" / "xray_0.txt").read_text().splitlines()
    assert sorted(fdi.FDI_LABELS[int(line.split()[0])] for line in lines) == sorted(item.masks)
    assert all(0.0 <= float(v) <= 1.0 for line in lines for v in line.split()[1:])
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(names[a["category_id"]] for a in coco["annotations"]) == sorted(item.masks)
    assert coco["images"] == [{"id": 1, "file_name": "xray_0.png", "height": SIZE[1], "width": SIZE[0]}]
    assert (tmp_path / "coco" / "images" / "xray_0.png").exists()


def test_splits(items, tmp_path):
    for fmt in WRITERS:
        with open_writer(fmt, tmp_path / fmt) as writer:
            writer.add(items[0], "train")
            writer.add(items[1], "train")
            writer.add(items[2], "val")
        assert writer.counts == {"train": 2, "val": 1}
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert (data["train"], data["val"]) == ("images/train", "images/val")
    assert (tmp_path / "yolo" / "labels" / "val" / "xray_2.txt").exists()
    got, errors = read_all(tmp_path / "yolo", "yolo")  # the reader walks both splits
    assert errors == [] and sorted(got) == ["xray_0", "xray_1", "xray_2"]
    for fmt in ("labelme", "masks", "coco"):  # one complete dataset per split folder
        train, _ = read_all(tmp_path / fmt / "train", fmt)
        val, _ = read_all(tmp_path / fmt / "val", fmt)
        assert (sorted(train), sorted(val)) == (["xray_0", "xray_1"], ["xray_2"])


def test_writer_refuses_a_name_twice_and_masks_of_another_size(items, tmp_path):
    with open_writer("labelme", tmp_path) as writer:
        writer.add(items[0])
        with pytest.raises(DatasetError, match="two images named 'xray_0'"):
            writer.add(items[0])
        small = DatasetItem("small", items[0].image[:100], items[0].masks)
        with pytest.raises(DatasetError, match="the image is 640x100"):
            writer.add(small)


def test_image_files_are_referenced_or_copied(items, tmp_path):
    image = tmp_path / "src" / "scan.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), items[0].image)
    item = DatasetItem("scan", image, items[0].masks)
    with open_writer("labelme", tmp_path / "labelme") as writer:
        writer.add(item)
    doc = json.loads((tmp_path / "labelme" / "scan.json").read_text())
    assert doc["imagePath"] == "../src/scan.png" and not (tmp_path / "labelme" / "scan.png").exists()
    with open_writer("masks", tmp_path / "masks") as writer:
        writer.add(item)
    assert (tmp_path / "masks" / "images" / "scan.png").read_bytes() == image.read_bytes()
    got, errors = read_all(tmp_path / "labelme", "labelme")
    assert errors == [] and got["scan"].image.resolve() == image.resolve()


def test_reads_the_synth_labelme_layout_exactly(tmp_path):
    write_dataset(tmp_path, n=2, seed=3, size=SIZE, progress=False)
    got, errors = read_all(tmp_path / "labelme", "labelme")
    assert errors == [] and len(got) == 2
    for name, item in got.items():
        assert item.image.resolve() == (tmp_path / "images" / f"{name}.png").resolve()
        doc = json.loads((tmp_path / "labelme" / f"{name}.json").read_text())
        by_label = {s["label"] for s in doc["shapes"]}
        assert set(item.masks) == by_label
        pixels = cv2.imread(str(tmp_path / "images" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(item.pixels(), pixels)


def test_labelme_embedded_image_data(items, tmp_path):
    item = items[0]
    ok, png = cv2.imencode(".png", item.image)
    polygons = {"11": [np.array([[10, 10], [60, 10], [60, 90], [10, 90]], float)]}
    doc = polygons_to_labelme(polygons, "elsewhere/missing.png", SIZE[1], SIZE[0])
    doc["imageData"] = base64.b64encode(png.tobytes()).decode()
    write_labelme(tmp_path / "embedded.json", doc)
    got, errors = read_all(tmp_path, "labelme")
    assert errors == []
    assert np.array_equal(got["embedded"].pixels(), item.image)
    assert got["embedded"].masks["11"].sum() == 51 * 81


# --- masks: label maps -----------------------------------------------------------------------------

def write_masks_item(root: Path, name: str, values: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "images" / f"{name}.png"), np.full(values.shape, 90, np.uint8))
    cv2.imwrite(str(root / "masks" / f"{name}.png"), values)


def test_masks_default_label_map_is_the_fdi_number(tmp_path):
    values = np.zeros((40, 60), np.uint8)
    values[5:10, 5:10] = 11
    values[20:30, 30:50] = 85
    write_masks_item(tmp_path, "a", values)
    got, errors = read_all(tmp_path, "masks")
    assert errors == []
    assert sorted(got["a"].masks) == ["11", "85"]
    assert got["a"].masks["11"].sum() == 25 and got["a"].masks["85"].sum() == 200


def test_masks_with_a_label_map(tmp_path):
    values = np.zeros((40, 60), np.uint8)
    values[5:10, 5:10] = 1
    values[20:30, 30:50] = 2
    values[30:35, 0:4] = 3
    write_masks_item(tmp_path, "a", values)
    (tmp_path / "label_map.json").write_text(json.dumps({"1": "36", "2": "21", "3": 36}))
    got, errors = read_all(tmp_path, "masks")
    assert errors == []
    assert sorted(got["a"].masks) == ["21", "36"]
    assert got["a"].masks["36"].sum() == 25 + 20  # two values of one tooth are unioned
    assert np.array_equal(got["a"].masks["21"], values == 2)


def test_masks_unmapped_values_fail_that_file_only(tmp_path):
    ok = np.zeros((40, 60), np.uint8)
    ok[5:10, 5:10] = 11
    unknown = ok.copy()
    unknown[30:35, 30:35] = 9  # not an FDI number
    write_masks_item(tmp_path, "good", ok)
    write_masks_item(tmp_path, "bad", unknown)
    cv2.imwrite(str(tmp_path / "images" / "lonely.png"), np.zeros((40, 60), np.uint8))  # no mask
    cv2.imwrite(str(tmp_path / "masks" / "rgb.png"), np.zeros((40, 60, 3), np.uint8))  # no image, 3 channels
    got, errors = read_all(tmp_path, "masks")
    assert sorted(got) == ["good"]
    reasons = {Path(e.source).stem: e.reason for e in errors}
    assert set(reasons) == {"bad", "lonely", "rgb"}
    assert "pixel value 9 is not an FDI number" in reasons["bad"]
    assert "no mask file masks/lonely.png" in reasons["lonely"]
    assert "no image" in reasons["rgb"]
    (tmp_path / "label_map.json").write_text(json.dumps({"11": "11"}))
    _, errors = read_all(tmp_path, "masks")
    assert any("pixel value 9 has no label in label_map.json" in str(e) for e in errors)


@pytest.mark.parametrize("content,message", [
    ("{not json", "cannot read JSON"),
    ('{"1": "19"}', "maps to '19', not an FDI tooth"),
    ('{"one": "11"}', "key 'one' is not a pixel value"),
    ('["11"]', "expected an object"),
])
def test_a_bad_label_map_is_a_dataset_error(tmp_path, content, message):
    write_masks_item(tmp_path, "a", np.zeros((8, 8), np.uint8))
    (tmp_path / "label_map.json").write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        read_dataset(tmp_path, "masks")
    assert str(tmp_path / "label_map.json") in str(err.value)


# --- yolo: class names in any order ----------------------------------------------------------------

def test_yolo_class_names_in_any_order(items, tmp_path):
    item = items[0]
    labels = sorted(item.masks, key=fdi.CLASS_INDEX.__getitem__)
    order = labels[::-1] + ["caries"]  # reversed, and one class that is not a tooth
    with open_writer("yolo", tmp_path) as writer:
        writer.add(item)
    # renumber the written lines to the new class order
    path = tmp_path / "labels" / "xray_0.txt"
    lines = []
    for line in path.read_text().splitlines():
        cls, rest = line.split(" ", 1)
        lines.append(f"{order.index(fdi.FDI_LABELS[int(cls)])} {rest}")
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"names": order}))
    got, errors = read_all(tmp_path, "yolo")
    assert errors == []
    assert sorted(got["xray_0"].masks) == sorted(item.masks)
    for label in labels:
        assert iou(got["xray_0"].masks[label], item.masks[label]) >= 0.98
    # a line of the non-tooth class fails that file with the reason
    path.write_text(path.read_text() + f"{len(order) - 1} 0.1 0.1 0.2 0.1 0.2 0.2\n")
    got, errors = read_all(tmp_path, "yolo")
    assert got == {} and len(errors) == 1
    assert errors[0].source == str(path) and f"class {len(order) - 1} is not an FDI tooth" in errors[0].reason


def test_yolo_malformed_label_files(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"names": {0: "11", 1: "21"}}))
    for name, text in {"good": "1 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n", "box": "0 0.5 0.5 0.2 0.2\n",
                       "words": "0 a b c d e f\n", "unknown": "7 0.1 0.1 0.5 0.1 0.5 0.5\n", "empty": ""}.items():
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), np.zeros((50, 100), np.uint8))
        (tmp_path / "labels" / f"{name}.txt").write_text(text)
    (tmp_path / "labels" / "orphan.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    got, errors = read_all(tmp_path, "yolo")
    assert sorted(got) == ["empty", "good"]
    assert got["empty"].masks == {} and list(got["good"].masks) == ["21"]
    rows, cols = np.nonzero(got["good"].masks["21"])  # corners (10, 5) and (50, 25) minus half a pixel
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 24, 10, 50)
    assert got["good"].masks["21"].sum() == 21 * 41
    reasons = {Path(e.source).stem: e.reason for e in errors}
    assert "at least 3 x y pairs" in reasons["box"]
    assert "not numbers" in reasons["words"]
    assert "class 7 is not in data.yaml's names" in reasons["unknown"]
    assert "no image for this label file" in reasons["orphan"]
    (tmp_path / "data.yaml").unlink()
    with pytest.raises(DatasetError, match="data.yaml: missing"):
        read_dataset(tmp_path, "yolo")


# --- coco --------------------------------------------------------------------------------------------

def test_coco_bad_annotations_fail_their_image_only(items, tmp_path):
    with open_writer("coco", tmp_path) as writer:
        for item in items:
            writer.add(item)
    path = tmp_path / "annotations.json"
    doc = json.loads(path.read_text())
    first = [a for a in doc["annotations"] if a["image_id"] == 1]
    first[0]["segmentation"] = {"size": [SIZE[1], SIZE[0]], "counts": "abc"}
    second = [a for a in doc["annotations"] if a["image_id"] == 2]
    second[0]["segmentation"] = [[1, 2, 3, 4]]
    doc["categories"].append({"id": 99, "name": "caries"})
    doc["annotations"].append({"id": 999, "image_id": 3, "category_id": 99, "segmentation": [[1, 1, 9, 1, 9, 9]]})
    doc["images"].append({"id": 4, "file_name": "missing.png", "height": 10, "width": 10})
    path.write_text(json.dumps(doc))
    got, errors = read_all(tmp_path, "coco")
    assert got == {}
    assert [e.source for e in errors] == [f"{path}[xray_0.png]", f"{path}[xray_1.png]", f"{path}[xray_2.png]",
                                          f"{path}[missing.png]"]
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        assert "RLE segmentation needs pycocotools" in errors[0].reason
    assert "at least 3 x y pairs" in errors[1].reason
    assert "category 99 is not an FDI tooth" in errors[2].reason
    assert "image file not found" in errors[3].reason
    path.write_text('{"images": []')
    with pytest.raises(DatasetError, match="annotations.json: cannot read JSON"):
        read_dataset(tmp_path, "coco")


# --- labelme: malformed files ------------------------------------------------------------------------

def test_malformed_labelme_files_give_one_error_each(items, tmp_path):
    with open_writer("labelme", tmp_path) as writer:
        for item in items[:2]:
            writer.add(item)
    good = json.loads((tmp_path / "xray_0.json").read_text())
    (tmp_path / "truncated.json").write_text((tmp_path / "xray_0.json").read_text()[:500])
    (tmp_path / "caries.json").write_text(json.dumps({**good, "shapes": [
        {**good["shapes"][0], "label": "caries"}]}))
    (tmp_path / "noimage.json").write_text(json.dumps({**good, "imagePath": "gone.png"}))
    (tmp_path / "size.json").write_text(json.dumps({**good, "imageWidth": 100}))
    (tmp_path / "list.json").write_text("[]")
    got, errors = read_all(tmp_path, "labelme")
    assert sorted(got) == ["xray_0", "xray_1"]
    reasons = {Path(e.source).name: e.reason for e in errors}
    assert set(reasons) == {"truncated.json", "caries.json", "noimage.json", "size.json", "list.json"}
    assert reasons["truncated.json"].startswith("invalid JSON")
    assert "label 'caries', not an FDI tooth" in reasons["caries.json"]
    assert "image not found (imagePath 'gone.png'" in reasons["noimage.json"]
    assert "imageHeight x imageWidth is 320x100, the image is 320x640" in reasons["size.json"]
    assert "not a Labelme document" in reasons["list.json"]
    assert all("\n" not in str(e) and str(e).startswith(str(tmp_path)) for e in errors)


@pytest.mark.parametrize("fmt", ["labelme", "masks", "yolo", "coco"])
def test_an_empty_folder_is_a_dataset_error(fmt, tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path)):
        read_dataset(tmp_path, fmt)


# --- the commands, as subprocesses --------------------------------------------------------------------

def toothseg(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "SAM_CHECKPOINT", "YOLO_WEIGHTS")}
    return subprocess.run([sys.executable, "-m", "training.ops.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**clean, **(env or {})}, timeout=300)


def test_import_needs_label_studio_settings_and_a_readable_source(tmp_path):
    write_dataset(tmp_path, n=1, seed=3, size=SIZE, progress=False)
    out = toothseg("import", tmp_path / "labelme", "--new", "--format", "labelme")
    assert out.returncode == 2
    assert out.stderr.strip() == ("toothseg import: error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                                  "(Label Studio's address and an API token)")
    unused = {"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "not-used"}  # nothing is sent
    out = toothseg("import", tmp_path / "nothing", "--project", "1", "--format", "yolo", env=unused)
    assert out.returncode == 2
    assert out.stderr.strip() == f"toothseg import: error: {tmp_path / 'nothing'}: no such file or folder"


@pytest.fixture(scope="module")
def synth_gt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gt")
    write_dataset(out, n=3, seed=11, size=SYNTH_SIZE, progress=False)
    return out


@pytest.mark.slow  # `toothseg predict` and `evaluate` processes with the trained detector: about 11 s
def test_predict_and_evaluate(synth_gt, trained_weights, tmp_path):
    images = sorted((synth_gt / "images").glob("*.png"))
    env = {"MODEL_DIR": str(tmp_path / "models")}
    out = toothseg("predict", synth_gt / "images", tmp_path / "pred", "--model", trained_weights, env=env)
    assert out.returncode == 0, out.stderr
    assert "predicted 3 images" in out.stdout and "0 failed" in out.stdout
    assert "without SAM" in out.stderr
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"{p.stem}.json" for p in images]
    teeth = 0
    for image in images:
        doc = json.loads((tmp_path / "pred" / f"{image.stem}.json").read_text())
        assert (tmp_path / "pred" / doc["imagePath"]).resolve() == image.resolve()
        assert (doc["imageHeight"], doc["imageWidth"]) == (SYNTH_SIZE[1], SYNTH_SIZE[0])
        assert all(fdi.is_fdi(s["label"]) for s in doc["shapes"])
        teeth += len({s["label"] for s in doc["shapes"]})
    assert teeth >= 3 * 10

    # the same predictions as a COCO dataset
    out = toothseg("predict", synth_gt / "images", tmp_path / "coco", "--model", trained_weights,
                   "--format", "coco", env=env)
    assert out.returncode == 0, out.stderr
    coco, errors = read_all(tmp_path / "coco", "coco")
    labelme, _ = read_all(tmp_path / "pred", "labelme")
    assert errors == [] and sorted(coco) == sorted(labelme)
    for name, item in labelme.items():
        assert sorted(coco[name].masks) == sorted(item.masks)

    # evaluate: both NSD variants, a per-image CSV next to PRED by default
    out = toothseg("evaluate", tmp_path / "pred", synth_gt / "labelme")
    assert out.returncode == 0, out.stderr
    table = {line.rsplit(None, 1)[0]: float(line.rsplit(None, 1)[1]) for line in out.stdout.splitlines()[2:-1]}
    assert set(table) >= {"image NSD (sts)", "image NSD (contour)", "instance NSD (sts)", "instance NSD (contour)",
                          "image Dice", "instance Dice", "IA (identification accuracy)"}
    assert table["image Dice"] > 0.5 and 0.0 <= table["instance NSD (contour)"] <= 1.0
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [p.stem for p in images]
    for row in rows:
        for key in dataset_cli.CSV_COLUMNS[1:-1]:
            assert 0.0 <= float(row[key]) <= 1.0, (key, row[key])
        assert row["missing_prediction"] == "False"
    assert table["image NSD (sts)"] == pytest.approx(np.mean([float(r["image_nsd_sts"]) for r in rows]), abs=1e-4)
    assert table["instance NSD (contour)"] == pytest.approx(
        np.mean([float(r["instance_nsd_contour"]) for r in rows]), abs=1e-4)
    assert any(r["instance_nsd_sts"] != r["instance_nsd_contour"] for r in rows)


def test_evaluate_ground_truth_against_itself(synth_gt, tmp_path):
    out = toothseg("evaluate", synth_gt / "labelme", synth_gt / "labelme", "--csv", tmp_path / "self.csv")
    assert out.returncode == 0, out.stderr
    values = [line.rsplit(None, 1)[1] for line in out.stdout.splitlines()[2:-1]]
    assert len(values) == 10 and set(values) == {"1.0000"}
    with open(tmp_path / "self.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert {row[key] for row in rows for key in dataset_cli.CSV_COLUMNS[1:-1]} == {"1.000000"}


def test_evaluate_lists_unreadable_files(synth_gt, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    names = sorted(p.name for p in (synth_gt / "labelme").glob("*.json"))
    (pred / names[0]).write_text("{")
    (pred / names[1]).write_text(json.dumps({"shapes": [], "imageHeight": 1}))
    out = toothseg("evaluate", pred, synth_gt / "labelme")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{pred / names[0]}: cannot read JSON")
    assert lines[1].startswith(f"{pred / names[1]}: not a Labelme document")
    assert lines[2] == "toothseg evaluate: error: 2 unreadable Labelme file(s) (listed above): nothing scored"


def test_predict_refuses_missing_weights(synth_gt, tmp_path):
    out = toothseg("predict", synth_gt / "images", tmp_path / "pred", "--model", tmp_path / "nope.pt")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"toothseg predict: error: --model {tmp_path / 'nope.pt'}: no such file"
