"""The detector a project's first training starts from (`training.pretrain`): made by `toothseg
pretrain` on synthetic panoramics, shipped in the package, chosen unless YOLO_WEIGHTS or
TRAIN_PRETRAINED=false say otherwise or the training's architecture differs."""
import hashlib
import tomllib
from dataclasses import replace

import pytest

from backend.detector import Detector
from conftest import REPO
from training.ops.cli import main
from training.pretrain import SHIPPED, architecture, first_training_start, read_record
from training.train import TrainConfig, preset


def test_the_shipped_detector_is_the_one_its_record_describes():
    record = read_record(SHIPPED)
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == record["sha256"]
    # the small preset's architecture: when it changes, `toothseg pretrain` makes the shipped file again
    assert record["architecture"] == architecture(TrainConfig())
    detector = Detector.load(SHIPPED)
    names = list(detector.model.names.values())
    assert names[:3] == ["11", "12", "13"] and names[-1] == "tooth" and len(names) == 53
    assert detector.imgsz == record["imgsz"] == 512


def test_the_package_installs_the_shipped_detector():
    """`pip install .` (the Docker image) carries the weights and their record: without them a first
    training would start from random weights."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "training.weights" in setuptools["packages"]
    globs = setuptools["package-data"]["training.weights"]
    assert any(SHIPPED.match(g) for g in globs) and any(SHIPPED.with_suffix(".json").match(g) for g in globs)


def test_a_first_training_starts_from_yolo_weights_else_the_shipped_detector_else_random_weights(tmp_path):
    config = TrainConfig()
    assert config.pretrained and first_training_start(None, config) == SHIPPED
    given = tmp_path / "coco.pt"
    given.write_bytes(b"any YOLOv8-seg weights")
    assert first_training_start(given, config) == given
    assert first_training_start(tmp_path / "missing.pt", config) == SHIPPED  # logged, and the default start
    assert first_training_start(None, TrainConfig.from_env({"TRAIN_PRETRAINED": "false"})) is None
    # another architecture cannot start from it: the paper preset's prototype stride, no tooth super-class
    assert first_training_start(None, preset("paper")) is None
    assert first_training_start(None, replace(config, tooth_class=False)) is None
    assert first_training_start(None, config, shipped=tmp_path / "not-installed.pt") is None


@pytest.mark.slow  # trains (2 steps at 64 px: about 10 s)
def test_pretrain_writes_weights_and_their_record(tmp_path, capsys):
    out = tmp_path / "pretrained.pt"
    assert main(["pretrain", "--out", str(out), "--images", "4", "--steps", "2", "--imgsz", "64",
                 "--size", "128x128"]) == 0
    record = read_record(out)
    assert (record["images"], record["steps"], record["imgsz"], record["size"]) == (4, 2, 64, [128, 128])
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and record["sha256"][:12] in \
        capsys.readouterr().out
    assert record["architecture"] == architecture(TrainConfig()) and Detector.load(out).imgsz == 64
    # bad input: one line, nothing written
    assert main(["pretrain", "--out", str(tmp_path / "none.pt"), "--images", "1"]) == 2
    assert "at least 2 images" in capsys.readouterr().err and not (tmp_path / "none.pt").exists()
