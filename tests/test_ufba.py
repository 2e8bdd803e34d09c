"""UFBA-425's layout (a JPEG per radiograph, one LZW OME-TIFF mask per tooth) read as a toothseg
dataset: `read_dataset(src, "ufba")`, `toothseg convert --from ufba` and `toothseg import --format ufba`'s
reader. The masks here are generated, written as the real set's are (tifffile, LZW, OME)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from training.data import dataset_cli
from training.data.dataset_io import READERS, WRITERS, DatasetError, ItemError, read_dataset, ufba_category
from training.data.synth import generate
from training.metrics import iou

from conftest import REPO
from test_dataset_io import resolve_overlaps

SIZE = (512, 256)
FOLDERS = {"cate1": "cate1 - export", "cate4": "cate4-export", "cate10": "cat 10 - export"}  # as in the real set


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, mask.astype(np.uint32) * 255, compression="lzw", ome=True)


def write_ufba(root: Path, samples: dict[str, object]) -> dict[str, dict[str, np.ndarray]]:
    """`samples` {image name: synth sample} as UFBA-425 lays them out below `root`; returns the masks."""
    truth = {}
    for name, sample in samples.items():
        (root / "panoramic_x_rays").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "panoramic_x_rays" / f"{name}.jpg"), cv2.cvtColor(sample.image, cv2.COLOR_GRAY2BGR))
        folder = root / "labels" / FOLDERS[ufba_category(name)]
        masks = sample.masks()
        for label, mask in masks.items():
            write_mask(folder / f"{name}_{label}.ome.tiff", mask)
        write_mask(folder / f"{name}_background.ome.tiff", ~np.any(list(masks.values()), axis=0))
        truth[name] = masks
    return truth


@pytest.fixture(scope="module")
def samples():
    return {"cate1-00002": generate(0, SIZE), "cate10-00005": generate(3, SIZE)}


def read_all(src: Path) -> tuple[dict, list[ItemError]]:
    good, bad = {}, []
    for entry in read_dataset(src, "ufba"):
        (bad.append(entry) if isinstance(entry, ItemError) else good.__setitem__(entry.name, entry))
    return good, bad


def test_the_cli_reads_ufba_and_writes_the_other_formats():
    assert set(dataset_cli.READ_FORMATS) == set(READERS) and set(dataset_cli.FORMATS) == set(WRITERS)
    assert "ufba" in READERS and "ufba" not in WRITERS


@pytest.mark.parametrize("layout", ["bb_u_net_dataset", "repository"])
def test_reads_every_tooth_exactly(layout, samples, tmp_path):
    root = tmp_path / "Dataset" / "bb_u_net_dataset" if layout == "repository" else tmp_path
    truth = write_ufba(root, samples)
    good, bad = read_all(tmp_path)
    assert bad == []
    assert sorted(good) == sorted(truth)
    for name, item in good.items():
        assert item.image == root / "panoramic_x_rays" / f"{name}.jpg"
        assert item.size == (SIZE[1], SIZE[0])
        assert sorted(item.masks) == sorted(truth[name])  # the background file is not a tooth
        for label, mask in item.masks.items():
            assert mask.dtype == bool and np.array_equal(mask, truth[name][label]), (name, label)


def test_a_bad_file_fails_its_image_only(samples, tmp_path):
    write_ufba(tmp_path, samples)
    labels = tmp_path / "labels"
    write_mask(labels / "cate1 - export" / "cate1-00002_99.ome.tiff", np.ones((SIZE[1], SIZE[0]), bool))
    write_mask(labels / "cate4-export" / "cate4-00001_11.ome.tiff", np.ones((SIZE[1], SIZE[0]), bool))
    write_mask(labels / "cate4-export" / "cate4-00003_11.ome.tiff", np.ones((10, 10), bool))
    cv2.imwrite(str(tmp_path / "panoramic_x_rays" / "cate4-00003.jpg"), np.zeros((SIZE[1], SIZE[0]), np.uint8))
    cv2.imwrite(str(tmp_path / "panoramic_x_rays" / "cate4-00004.jpg"), np.zeros((SIZE[1], SIZE[0]), np.uint8))
    (labels / "cate4-export" / "cate4-00005_12.ome.tiff").write_bytes(b"not a tiff")
    cv2.imwrite(str(tmp_path / "panoramic_x_rays" / "cate4-00005.jpg"), np.zeros((SIZE[1], SIZE[0]), np.uint8))
    good, bad = read_all(tmp_path)
    assert sorted(good) == ["cate10-00005"]
    reasons = {Path(e.source).name: e.reason for e in bad}
    assert reasons == {
        "cate1-00002.jpg": "cate1-00002_99.ome.tiff: '99' is not an FDI tooth number",
        "cate4-00001_11.ome.tiff": "tooth masks without an image in panoramic_x_rays/",
        "cate4-00003.jpg": f"cate4-00003_11.ome.tiff: tooth 11 is 10x10, the image is {SIZE[0]}x{SIZE[1]}",
        "cate4-00004.jpg": "no tooth masks labels/<folder>/cate4-00004_<FDI>.ome.tiff for this image",
        "cate4-00005.jpg": reasons["cate4-00005.jpg"],
    }
    assert reasons["cate4-00005.jpg"].startswith("cate4-00005_12.ome.tiff: not a readable TIFF mask")
    assert all("\n" not in r for r in reasons.values())


def test_not_the_layout_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="no panoramic_x_rays/ and labels/ folders"):
        read_dataset(tmp_path, "ufba")


def toothseg(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
    return subprocess.run([sys.executable, "-m", "training.ops.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)


def test_convert_ufba_to_labelme_and_masks(samples, tmp_path):
    truth = write_ufba(tmp_path / "ufba", samples)
    for fmt in ("labelme", "masks"):
        out = toothseg("convert", tmp_path / "ufba", tmp_path / fmt, "--from", "ufba", "--format", fmt)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().startswith(f"converted 2 images ({sum(map(len, truth.values()))} teeth) from ufba")
        back = {e.name: e for e in read_dataset(tmp_path / fmt, fmt)}
        assert sorted(back) == sorted(truth)
        for name, masks in truth.items():
            if fmt == "masks":  # one owner per pixel: exactly the masks with their overlaps resolved
                expected = resolve_overlaps(masks)
                assert sorted(back[name].masks) == sorted(expected)
                assert all(np.array_equal(back[name].masks[label], expected[label]) for label in expected)
            else:  # outlines: exact pixel-centre contours, filled
                assert sorted(back[name].masks) == sorted(masks)
                assert min(iou(back[name].masks[label], masks[label]) for label in masks) > 0.9
    write_mask(tmp_path / "ufba" / "labels" / "cate1 - export" / "cate1-00002_11.ome.tiff", np.ones((3, 3), bool))
    out = toothseg("convert", tmp_path / "ufba", tmp_path / "again", "--from", "ufba", "--format", "labelme")
    assert out.returncode == 1
    assert "cate1-00002.jpg: cate1-00002_11.ome.tiff: tooth 11 is 3x3" in out.stderr
    assert "converted 1 images" in out.stdout and "1 failed" in out.stdout
    out = toothseg("convert", tmp_path / "nothing", tmp_path / "x", "--from", "ufba", "--format", "labelme")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.strip() == f"toothseg convert: error: {tmp_path / 'nothing'}: no such file or folder"
