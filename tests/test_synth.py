"""The synthetic panoramic X-ray generator: determinism, ground-truth consistency across the
three output formats, dentition and anatomy invariants, the CLI."""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend import fdi
from backend.formats import result_to_masks
from backend.label_config import render_label_config
from training.ops.cli import main
from training.data.labelme import read_labelme
from training.data.synth import SynthSample, generate, sample_seed, write_dataset

SEEDS = range(24)


@pytest.fixture(scope="module")
def samples() -> dict[int, SynthSample]:
    return {seed: generate(seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def adults(samples) -> list[SynthSample]:
    found = [s for s in samples.values() if not s.child]
    assert len(found) >= 10
    return found


@pytest.fixture(scope="module")
def children(samples) -> list[SynthSample]:
    found = [s for s in samples.values() if s.child]
    assert len(found) >= 2, "some images of 24 should show a mixed dentition"
    return found


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("synth")
    summary = write_dataset(out, n=4, seed=7, progress=False, url_prefix="/data/local-files/?d=synth/")
    return out, summary


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(cols.mean()), float(rows.mean())


# --- determinism ---------------------------------------------------------------------------

def test_same_seed_gives_identical_files(tmp_path):
    write_dataset(tmp_path / "a", n=2, seed=3, size=(512, 256), progress=False)
    write_dataset(tmp_path / "b", n=2, seed=3, size=(512, 256), progress=False)
    for sub, ext in (("images", "png"), ("labelme", "json"), ("tasks", "json")):
        for i in range(2):
            name = f"synth_3_{i:04d}.{ext}"
            assert (tmp_path / "a" / sub / name).read_bytes() == (tmp_path / "b" / sub / name).read_bytes(), name


def test_same_seed_same_sample_different_seed_different_image():
    a, b, c = generate(11, (512, 256)), generate(11, (512, 256)), generate(12, (512, 256))
    assert np.array_equal(a.image, b.image)
    assert a.polygons.keys() == b.polygons.keys()
    assert all(np.array_equal(a.polygons[k][0], b.polygons[k][0]) for k in a.polygons)
    assert not np.array_equal(a.image, c.image)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 5


def test_image_i_does_not_depend_on_n(tmp_path):
    write_dataset(tmp_path / "one", n=1, seed=5, size=(320, 160), progress=False)
    write_dataset(tmp_path / "three", n=3, seed=5, size=(320, 160), progress=False)
    first = "images/synth_5_0000.png"
    assert (tmp_path / "one" / first).read_bytes() == (tmp_path / "three" / first).read_bytes()
    third = cv2.imread(str(tmp_path / "three" / "images" / "synth_5_0002.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(third, generate(sample_seed(5, 2), (320, 160)).image)
    assert len({sample_seed(5, i) for i in range(100)}) == 100
    assert sample_seed(5, 1) != sample_seed(6, 1)


# --- ground truth formats ------------------------------------------------------------------

def test_labelme_and_brush_masks_are_identical(dataset):
    out, _ = dataset
    for i in range(4):
        name = f"synth_7_{i:04d}"
        labelme_masks, (height, width) = read_labelme(out / "labelme" / f"{name}.json")
        task = json.loads((out / "tasks" / f"{name}.json").read_text())
        brush_masks = result_to_masks(task["annotations"][0]["result"])
        assert labelme_masks.keys() == brush_masks.keys()
        assert len(labelme_masks) >= 20
        for label, mask in labelme_masks.items():
            assert mask.shape == (height, width) == (512, 1024)
            assert np.array_equal(mask, brush_masks[label]), (name, label)
        image = cv2.imread(str(out / "images" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert image.shape == (512, 1024) and image.dtype == np.uint8


def test_sample_masks_match_the_written_labelme(dataset):
    out, _ = dataset
    sample = generate(sample_seed(7, 1))
    masks, _ = read_labelme(out / "labelme" / "synth_7_0001.json")
    expected = sample.masks()
    assert masks.keys() == expected.keys()
    assert all(np.array_equal(masks[k], expected[k]) for k in masks)


def test_tasks_and_labelme_structure(dataset):
    out, summary = dataset
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == 4
    for i, task in enumerate(tasks):
        name = f"synth_7_{i:04d}"
        assert task == json.loads((out / "tasks" / f"{name}.json").read_text())
        assert task["data"] == {"image": f"/data/local-files/?d=synth/images/{name}.png"}
        (annotation,) = task["annotations"]
        assert annotation["ground_truth"] is True
        result = annotation["result"]
        assert all(r["type"] == "brushlabels" and r["from_name"] == "tooth" and r["to_name"] == "image"
                   for r in result)
        assert len({r["id"] for r in result}) == len(result)
        doc = json.loads((out / "labelme" / f"{name}.json").read_text())
        assert doc["imagePath"] == f"../images/{name}.png"
        assert (doc["imageWidth"], doc["imageHeight"]) == (1024, 512)
        labels = [shape["label"] for shape in doc["shapes"]]
        assert len(labels) == len(set(labels)) == len(result)
    teeth = sum(len(t["annotations"][0]["result"]) for t in tasks)
    assert summary.startswith("4 images (") and f"{teeth} teeth -> {out}" in summary


def test_brush_regions_validate_against_the_label_config(dataset):
    out, _ = dataset
    interface = LabelInterface(render_label_config())
    task = json.loads((out / "tasks" / "synth_7_0000.json").read_text())
    regions = task["annotations"][0]["result"]
    assert interface.validate_prediction({"result": regions}, return_errors=True) == []


def test_contact_sheet(dataset):
    out, _ = dataset
    sheet = cv2.imread(str(out / "contact_sheet.png"), cv2.IMREAD_COLOR)
    assert sheet is not None and sheet.ndim == 3
    assert sheet.shape[1] > 1000 and sheet.shape[0] > 500  # two columns, two rows of tiles
    # coloured masks: many pixels are far from grey
    spread = sheet.max(axis=2).astype(int) - sheet.min(axis=2).astype(int)
    assert (spread > 40).mean() > 0.05


def test_write_dataset_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="n must be at least 1"):
        write_dataset(tmp_path, n=0, seed=1, progress=False)


# --- dentition -----------------------------------------------------------------------------

def test_labels_are_valid_and_polygons_well_formed(samples):
    for sample in samples.values():
        width, height = sample.size
        assert sample.image.shape == (height, width) and sample.image.dtype == np.uint8
        for label, polys in sample.polygons.items():
            assert fdi.is_fdi(label)
            assert len(polys) == 1
            poly = polys[0]
            assert poly.ndim == 2 and poly.shape[1] == 2 and len(poly) >= 8
            assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= width - 1
            assert poly[:, 1].min() >= 0 and poly[:, 1].max() <= height - 1


def test_adults_have_only_permanent_teeth(adults):
    for sample in adults:
        assert all(fdi.is_permanent(label) for label in sample.polygons)
        assert 16 <= len(sample.polygons) <= 32


def test_children_have_deciduous_teeth_and_buds(children):
    for sample in children:
        deciduous = [label for label in sample.polygons if fdi.is_deciduous(label)]
        assert len(deciduous) >= 12
        # first permanent molars, and buds of the deciduous canines' successors
        assert {"16", "26", "36", "46"} <= set(sample.polygons)
        masks = sample.masks()
        for canine in ("53", "63", "73", "83"):
            bud = fdi.successor(canine)
            if canine in masks and bud in masks:  # the bud lies beyond the root tip, in the bone
                y_canine, y_bud = _centroid(masks[canine])[1], _centroid(masks[bud])[1]
                assert (y_bud < y_canine) if fdi.is_upper(canine) else (y_bud > y_canine)


def test_missing_teeth_occur(adults):
    missing = [set(fdi.PERMANENT) - set(s.polygons) for s in adults]
    assert sum(bool(m) for m in missing) >= len(adults) // 2
    third_molars = {"18", "28", "38", "48"}
    assert any(m & third_molars for m in missing)
    assert any(m - third_molars for m in missing)  # gaps inside the arch too


def test_upper_teeth_lie_above_lower_teeth(samples):
    for sample in samples.values():
        ys = {label: _centroid(mask)[1] for label, mask in sample.masks().items()}
        upper = [y for label, y in ys.items() if fdi.is_upper(label)]
        lower = [y for label, y in ys.items() if not fdi.is_upper(label)]
        assert max(upper) < min(lower)


def test_arch_order_left_to_right(samples):
    for seed, sample in samples.items():
        xs = {label: _centroid(mask)[0] for label, mask in sample.masks().items()}
        for arch, order in fdi.ARCHES.items():
            present = [label for label in order if label in xs]
            assert sorted(present, key=xs.__getitem__) == present, (seed, arch)


def test_teeth_have_plausible_sizes(samples):
    for sample in samples.values():
        width, height = sample.size
        for label, mask in sample.masks().items():
            fraction = mask.sum() / (width * height)
            assert 0.0008 < fraction < 0.02, (label, fraction)
            rows, cols = np.nonzero(mask)
            tall, wide = np.ptp(rows) + 1, np.ptp(cols) + 1
            assert 0.04 * height < tall < 0.35 * height
            assert 0.015 * width < wide < 0.08 * width


def test_molars_are_wider_than_incisors(adults):
    def width(mask: np.ndarray) -> int:
        return int(np.ptp(np.nonzero(mask)[1]) + 1)

    ratios = []
    for sample in adults:
        masks = sample.masks()
        for molar, incisor in (("36", "31"), ("46", "41"), ("16", "12"), ("26", "22")):
            if molar in masks and incisor in masks:
                ratios.append(width(masks[molar]) / width(masks[incisor]))
    assert len(ratios) > 20 and np.median(ratios) > 1.4


def test_crowns_are_brighter_than_roots(adults):
    """Per tooth: the half of the mask toward the occlusal plane (crown) against the half
    toward the apex (roots)."""
    differences = []
    for sample in adults:
        image = sample.image.astype(np.float64)
        for label, mask in sample.masks().items():
            rows = np.nonzero(mask)[0]
            middle = (rows.min() + rows.max()) / 2.0
            row_index = np.arange(mask.shape[0])[:, None]
            crown_half = mask & ((row_index > middle) if fdi.is_upper(label) else (row_index < middle))
            root_half = mask & ~crown_half
            differences.append(image[crown_half].mean() - image[root_half].mean())
    differences = np.array(differences)
    assert differences.mean() > 15
    assert (differences > 0).mean() > 0.9


def test_image_has_panoramic_structure(adults):
    """Teeth brighter than the dark gap between the arches; spine bands brighter than the
    soft tissue just inside them; a full grey range."""
    for sample in adults[:5]:
        image = sample.image.astype(np.float64)
        union = np.logical_or.reduce(list(sample.masks().values()))
        assert image[union].mean() > image[~union].mean() + 30
        width = sample.size[0]
        assert image[:, : width // 40].mean() > image[:, width // 16: width // 12].mean() + 5
        assert np.percentile(image, 99) - np.percentile(image, 1) > 120


def test_small_size_works():
    sample = generate(2, (320, 160))
    assert sample.size == (320, 160) and sample.image.shape == (160, 320)
    masks = sample.masks()
    assert len(masks) >= 16
    assert all(m.shape == (160, 320) and m.sum() >= 30 for m in masks.values())


def test_large_size_scales_geometry():
    small, large = generate(4, (512, 256)), generate(4, (2048, 1024))
    assert small.polygons.keys() == large.polygons.keys()
    small_masks, large_masks = small.masks(), large.masks()
    ratios = [large_masks[label].sum() / small_masks[label].sum() for label in small_masks]
    assert 14 < np.median(ratios) < 18  # areas scale with 4 x 4 = 16
    centre_small = np.concatenate([p[0] for p in small.polygons.values()]).mean(axis=0)
    centre_large = np.concatenate([p[0] for p in large.polygons.values()]).mean(axis=0)
    assert np.allclose(centre_large / 4, centre_small, atol=3)


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="too small"):
        generate(1, (32, 32))
    with pytest.raises(ValueError, match="seed"):
        generate(-1)


def test_generation_is_fast():
    start = time.perf_counter()
    for seed in range(5):
        generate(100 + seed)
    assert (time.perf_counter() - start) / 5 < 0.5


# --- CLI -----------------------------------------------------------------------------------

def test_cli_writes_all_formats(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--n", "3", "--out", str(out), "--seed", "1", "--size", "320x160", "--quiet",
                 "--url-prefix", "http://host/"]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("3 images (") and str(out) in summary
    names = [f"synth_1_{i:04d}" for i in range(3)]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{n}.png" for n in names]
    assert sorted(p.name for p in (out / "labelme").iterdir()) == [f"{n}.json" for n in names]
    assert sorted(p.name for p in (out / "tasks").iterdir()) == [f"{n}.json" for n in names]
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [f"http://host/images/{n}.png" for n in names]
    assert cv2.imread(str(out / "contact_sheet.png")) is not None


def test_cli_reports_bad_n(tmp_path, capsys):
    assert main(["synth", "--n", "0", "--out", str(tmp_path), "--quiet"]) == 2
    assert "n must be at least 1" in capsys.readouterr().err
