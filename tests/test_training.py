"""Training with the paper's model changes, the evaluation gate, the registry and its faults."""
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ultralytics.nn.tasks import SegmentationModel
from ultralytics.utils.loss import BboxLoss

from backend.detector import Detector
from backend.pipeline import PipelineOptions
from backend.preprocess import pixel_statistics, standardise
from backend.registry import Registry
from backend.runtime import Runtime
from backend.settings import Settings
from backend.yolo_model import ToothSegModel, proto_stride_of
from conftest import REPO, register_model
from training.data.dataset_io import mask_polygon, yolo_label_lines
from training.dataset import split_train_val, write_yolo_dataset
from training.evaluate import Evaluation, evaluate_weights, first_model_verdict, gate, gate_weights
from training.ops.history import format_table, plot_history, version_rows
from training.metrics import Scores
from training.model_changes import LargeBoxBboxLoss, area_weight
from backend.registry import reject, store_version
from training.data.synth import generate
from training.pretrain import SHIPPED
from training.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    items = [generate(2000 + i, (320, 160)).item(f"s{i}") for i in range(6)]
    out = tmp_path_factory.mktemp("ds")
    data = write_yolo_dataset(items[:4], items[4:], out)
    return data, items


@pytest.mark.parametrize("stride", [4, 2, 1])
def test_proto_stride_resolution(stride):
    model = ToothSegModel("yolov8n-seg.yaml", nc=52, proto_stride=stride).eval()
    with torch.no_grad():
        (_, proto), _ = model(torch.rand(1, 3, 256, 320))
    assert proto.shape[2:] == (256 // stride, 320 // stride)
    assert proto_stride_of(model) == stride


def test_normalisation_is_the_first_step_of_the_network():
    torch.manual_seed(0)
    ours = ToothSegModel("yolov8n-seg.yaml", nc=52, mean=0.4, std=0.2).eval()
    stock = SegmentationModel("yolov8n-seg.yaml", nc=52, verbose=False).eval()
    stock.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(ours(x)[0][0], stock(standardise(x, 0.4, 0.2))[0][0], atol=1e-5)


def test_pixel_statistics():
    a = np.zeros((2, 2), np.uint8)
    b = np.full((2, 2), 255, np.uint8)
    mean, std = pixel_statistics([a, b])
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.5)


def test_large_box_loss_formula_and_identity_at_alpha_zero():
    assert area_weight(torch.tensor([0.0, 0.01, 0.04]), 4.0).tolist() == pytest.approx([1.0, 1.4, 1.8])
    torch.manual_seed(0)
    n_anchor, reg_max = 6, 16
    anchors = torch.rand(n_anchor, 2) * 8 + 4
    target = torch.cat([anchors - torch.rand(n_anchor, 2) * 3 - 1, anchors + torch.rand(n_anchor, 2) * 3 + 1], 1)[None]
    pred = target + torch.randn_like(target) * 0.5
    pred_dist = torch.randn(1, n_anchor, 4 * reg_max)
    scores = torch.rand(1, n_anchor, 52)
    fg = torch.tensor([[True, True, False, True, True, False]])
    args = (pred_dist, pred, anchors, target, scores, scores.sum(), fg, torch.tensor([64.0, 64.0]), torch.tensor(8.0))
    stock = BboxLoss(reg_max)(*args)
    same = LargeBoxBboxLoss(reg_max, 0.0)(*args)
    weighted = LargeBoxBboxLoss(reg_max, 4.0)(*args)
    assert torch.allclose(stock[0], same[0]) and torch.allclose(stock[1], same[1])
    assert weighted[0] > stock[0] and weighted[1] > stock[1]


def test_dataset_labels_and_split(small_dataset, tmp_path):
    data, items = small_dataset
    text = (Path(data).parent / "labels" / "train" / "s0.txt").read_text().split("\n")
    assert len([t for t in text if t]) == len(items[0].masks)
    cls, *coords = text[0].split()
    assert 0 <= int(cls) < 52 and all(0.0 <= float(c) <= 1.0 for c in coords)
    # a tooth in two parts becomes one polygon covering both
    two = np.zeros((100, 200), bool)
    two[10:40, 10:40] = True
    two[60:90, 150:190] = True
    poly = mask_polygon(two)
    assert poly[:, 0].min() <= 11 and poly[:, 0].max() >= 188
    assert len(yolo_label_lines({"11": two})) == 1
    # deterministic, stable split: adding tasks never moves an old one
    train, val = split_train_val(list(range(1, 41)))
    train2, val2 = split_train_val(list(range(1, 81)))
    assert set(val) <= set(val2) and set(train) <= set(train2) and 4 <= len(val) <= 14
    assert split_train_val([5, 9]) in (([5], [9]), ([9], [5]))


@pytest.mark.parametrize("stride,alpha", [(2, 4.0), (4, 0.0), (1, 4.0)])
def test_training_runs_with_each_change(small_dataset, tmp_path, stride, alpha):
    data, items = small_dataset
    mean, std = pixel_statistics([it.pixels() for it in items[:4]])
    config = TrainConfig(steps=2, batch=2, imgsz=256, proto_stride=stride, large_box_alpha=alpha, warmup_steps=0,
                         time_budget=0)
    result = train_model(data, tmp_path / "run", config, mean, std)
    detector = Detector.load(result.weights)
    assert proto_stride_of(detector.model) == stride
    assert detector.model.normalisation == pytest.approx((mean, std))
    assert detector.imgsz == 256
    with torch.no_grad():
        (_, proto), _ = detector.model(torch.rand(1, 3, 256, 256))
    assert proto.shape[2] == 256 // stride


def test_warm_start_keeps_classes_and_takes_new_statistics(small_dataset, tmp_path, trained_weights):
    data, items = small_dataset
    result = train_model(data, tmp_path / "run", TrainConfig(steps=2, batch=2, imgsz=256, time_budget=0), 0.3, 0.25,
                         warm_start=trained_weights)
    model = Detector.load(result.weights).model
    names = list(model.names.values())
    assert names[:3] == ["11", "12", "13"] and len(names) == 53 and names[-1] == "tooth"
    assert model.normalisation == pytest.approx((0.3, 0.25))


def test_worse_candidate_is_not_promoted(small_dataset, tmp_path, trained_weights):
    _, items = small_dataset
    val = [generate(3000 + i, (640, 320)).item(f"v{i}") for i in range(4)]
    options = PipelineOptions(min_score=0.05, use_sam=False)
    current = evaluate_weights(trained_weights, val, options)
    # a candidate trained for two steps from scratch: clearly worse
    data = write_yolo_dataset(val[:3], val[3:], tmp_path / "ds")
    bad = train_model(data, tmp_path / "bad", TrainConfig(steps=2, batch=2, imgsz=320, time_budget=0), 0.4, 0.2).weights
    candidate = evaluate_weights(bad, val, options)
    assert current.scores.primary > candidate.scores.primary + 0.01, (current, candidate)
    decision = gate(candidate, current, tolerance=0.01)
    assert not decision.promote and "worse than current" in decision.reason and "Wilcoxon" in decision.reason

    registry = Registry(tmp_path / "models")
    good_version = register_model(tmp_path / "models", "1", trained_weights)
    stored = store_version(registry, "1", bad, {"status": "rejected", "metrics": candidate.scores.as_dict()},
                           {"tasks": []})
    reject(registry, "1", stored.version, decision.reason)
    assert registry.current_version("1") == good_version
    assert registry.history("1")[-1]["event"] == "rejected" and "worse" in registry.history("1")[-1]["reason"]


def evaluation(identified: int, wrong: int, teeth: int = 28, per_tooth=None, dice: float = 0.8,
               misnumbered: int = 0) -> Evaluation:
    """`misnumbered` of the `wrong` regions are teeth (IoU > 0.5) with another number."""
    ia = identified / max(teeth + wrong, 1)
    scores = Scores(0.8, 0.7, 0.8, dice * identified / teeth, 0.6, 0.7, ia)
    per_tooth = per_tooth if per_tooth is not None else [(dice + 1) / 2] * identified + [0.0] * (teeth - identified)
    return Evaluation(scores, 1, teeth, identified, wrong, tuple(per_tooth), identified + misnumbered,
                      wrong - misnumbered)


def test_gate_first_model_must_show_that_it_saves_work():
    nothing = gate(evaluation(0, 0), None, annotated=8)
    assert not nothing.promote and "0 of its 0 region(s)" in nothing.reason
    assert "annotate more images (8 so far)" in nothing.advice
    assert not gate(evaluation(0, 12), None).promote  # only stray regions
    assert not gate(evaluation(3, 0), None).promote  # 3 of 3 right: p = 0.125, too little evidence
    assert gate(evaluation(5, 0), None).promote  # p = 0.031
    assert gate(evaluation(20, 8), None).promote  # p = 0.018
    assert not gate(evaluation(10, 12), None).promote  # more stray than teeth
    promoted = gate(evaluation(26, 1), None)
    assert promoted.promote and promoted.advice == "" and "identified with the right number: 26 of 28" in promoted.reason


def test_gate_first_model_counts_a_misnumbered_tooth_as_saved_drawing():
    # 2 right, 8 teeth with a neighbour's number (one missed tooth shifts them), 1 stray: the masks
    # save drawing 10 teeth; counting the misnumbered ones as wrong would reject it (2 against 9)
    shifted = evaluation(2, 9, misnumbered=8)
    assert first_model_verdict(shifted) is True
    decision = gate(shifted, None)
    assert decision.promote and "10 of its 11 region(s)" in decision.reason, decision.reason
    assert not gate(evaluation(2, 9), None).promote  # 9 stray regions: no


def test_gate_first_model_whose_validation_cannot_decide_is_judged_on_its_training_images():
    learned = evaluation(170, 9, teeth=196)  # 7 training images
    # the one validation image got no region, or a few stray ones: no evidence either way
    for undecided in (evaluation(0, 0, teeth=10), evaluation(0, 2, teeth=11), evaluation(3, 0),
                      evaluation(0, 5, teeth=11, misnumbered=3)):
        assert first_model_verdict(undecided) is None
        decision = gate(undecided, None, fit=learned)
        assert decision.promote and "cannot tell" in decision.reason, decision.reason
        assert "identified 170 of 196 teeth" in decision.reason
    # a model that has not learned its own training images is not promoted on them
    for unlearned in (evaluation(0, 0, teeth=196), evaluation(60, 20, teeth=196), evaluation(110, 120, teeth=196)):
        decision = gate(evaluation(0, 0, teeth=10), None, annotated=8, fit=unlearned)
        assert not decision.promote and "has not learned" in decision.reason, decision.reason
        assert "annotate more images (8 so far)" in decision.advice
    # validation that shows it costs work rejects whatever the training images say
    for costly in (evaluation(0, 12), evaluation(2, 14)):
        assert first_model_verdict(costly) is False
        decision = gate(costly, None, fit=learned)
        assert not decision.promote and "would cost work" in decision.reason
    # validation that shows it saves work needs no training images
    assert first_model_verdict(evaluation(20, 8)) is True
    assert gate(evaluation(20, 8), None, fit=evaluation(0, 0, teeth=196)).promote


def test_gate_weights_judges_a_first_model_on_its_training_images_when_validation_cannot(trained_weights):
    from dataclasses import replace

    learned = [generate(3100 + i, (640, 320)).item(f"t{i}") for i in range(3)]
    blank = [replace(item, name=f"blank-{item.name}", image=np.zeros_like(item.image)) for item in learned]
    options = PipelineOptions(use_sam=False)
    # the validation image is blank (no region, no evidence): the training images decide
    promoted = gate_weights(trained_weights, None, blank[:1], learned, options)
    assert promoted.promote and "training image" in promoted.reason, promoted.reason
    rejected = gate_weights(trained_weights, None, blank[:1], blank[1:], options, annotated=3)
    assert not rejected.promote and "has not learned" in rejected.reason, rejected.reason
    # validation that decides: the training images are not scored (they would reject here)
    decided = gate_weights(trained_weights, None, learned, blank, options)
    assert decided.promote and "training" not in decided.reason, decided.reason


def test_gate_later_candidates_tooth_by_tooth():
    current = evaluation(26, 1)
    assert gate(evaluation(26, 1), current, tolerance=0.01).promote  # the same
    # two teeth worse (primary down by more than the tolerance) on one image: not significant, promoted
    close = evaluation(24, 1, per_tooth=[0.9] * 24 + [0.0] * 4)
    assert close.scores.primary < current.scores.primary - 0.01
    decision = gate(close, current, tolerance=0.01)
    assert decision.promote and "not significantly worse" in decision.reason
    # worse on most teeth: significant, rejected
    worse = evaluation(12, 1, per_tooth=[0.9] * 12 + [0.0] * 16)
    decision = gate(worse, current, tolerance=0.01)
    assert not decision.promote and "worse than current" in decision.reason


def test_registry_rollback_history_and_cli(tmp_path, trained_weights):
    models = tmp_path / "models"
    v1 = register_model(models, "3", trained_weights, metrics={"instance_dice": 0.5, "ia": 0.4, "primary": 0.45})
    v2 = register_model(models, "3", trained_weights, metrics={"instance_dice": 0.6, "ia": 0.5, "primary": 0.55})
    registry = Registry(models)
    assert registry.current_version("3") == v2
    env = {**os.environ, "MODEL_DIR": str(models)}
    out = subprocess.run([sys.executable, "-m", "training.ops.cli", "models", "rollback", v1, "--project", "3"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and v1 in out.stdout
    assert registry.current_version("3") == v1
    assert [e["event"] for e in registry.history("3")] == ["promoted", "promoted", "rolled_back"]
    listing = subprocess.run([sys.executable, "-m", "training.ops.cli", "models", "list"], cwd=REPO, env=env,
                             capture_output=True, text=True).stdout
    assert v1 in listing and v2 in listing and "current" in listing and "0.550" in listing
    bad = subprocess.run([sys.executable, "-m", "training.ops.cli", "models", "rollback", "v9-nope", "--project", "3"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "v9-nope" in bad.stderr
    png = plot_history(version_rows(registry, "3"), tmp_path / "h.png")
    assert png.stat().st_size > 5000
    assert "instance_dice" in format_table(version_rows(registry, "3"))


@pytest.mark.scenario("The current version's weights file corrupted",
                      "the backend logs an error and serves the previous version")
def test_corrupted_current_weights_fall_back_to_the_previous_version(tmp_path, trained_weights, caplog):
    models = tmp_path / "models"
    v1 = register_model(models, "5", trained_weights)
    v2 = register_model(models, "5", trained_weights)
    registry = Registry(models)
    (registry.get("5", v2).weights).write_bytes(b"garbage, not a checkpoint")
    runtime = Runtime(Settings.from_env({"MODEL_DIR": str(models)}))
    assert runtime.version("5") == v2  # not known to be broken before the first load
    version, detector = runtime.detector("5")
    assert version == v1 and detector is not None
    assert runtime.version("5") == v1
    assert any(f"model version {v2} cannot be loaded" in r.message and r.levelname == "ERROR" for r in caplog.records)


def test_a_version_that_failed_to_load_for_want_of_memory_is_retried(tmp_path, trained_weights, monkeypatch):
    """Out of memory (or a file system error) is no verdict on the weights: the previous version
    serves that request, the current one is loaded again on the next."""
    models = tmp_path / "models"
    v1 = register_model(models, "15", trained_weights)
    v2 = register_model(models, "15", trained_weights)
    runtime = Runtime(Settings.from_env({"MODEL_DIR": str(models)}))
    load, failures = runtime._load_detector, []

    def short_of_memory_once(weights):
        if v2 in str(weights) and not failures:
            failures.append(weights)
            raise MemoryError("simulated")
        return load(weights)

    monkeypatch.setattr(runtime, "_load_detector", short_of_memory_once)
    assert runtime.detector("15")[0] == v1 and failures
    assert runtime.version("15") == v2 and runtime.detector("15")[0] == v2


@pytest.mark.scenario("Disk full (ENOSPC) while a new model version is written",
                      "the half-written version is removed; CURRENT and the stored versions are unchanged")
def test_disk_full_while_saving_leaves_current_untouched(tmp_path, trained_weights, monkeypatch):
    import shutil as shutil_module

    import backend.registry as registry_module

    models = tmp_path / "models"
    v1 = register_model(models, "6", trained_weights)
    registry = Registry(models)

    def full(src, dst, *a, **k):
        with open(dst, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry_module.shutil, "copyfile", full)
    with pytest.raises(OSError, match="No space left"):
        store_version(registry, "6", trained_weights, {}, {"tasks": []})
    monkeypatch.setattr(registry_module.shutil, "copyfile", shutil_module.copyfile)
    assert registry.current_version("6") == v1
    assert [v.version for v in registry.versions("6")] == [v1]
    assert not [p for p in (registry.project_dir("6") / "versions").iterdir() if p.name != v1]


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import backend
import backend.registry as registry_module
from backend.registry import Registry
from training.dataset import write_yolo_dataset
from backend.registry import promote, store_version
from training.data.synth import generate
from training.train import TrainConfig, train_model
work = Path(sys.argv[1]); models = Path(sys.argv[2])
items = [generate(4000 + i, (320, 160)).item(f"s{i}") for i in range(6)]
data = write_yolo_dataset(items[:4], items[4:], work / "ds")
r = train_model(data, work / "run", TrainConfig(steps=4, batch=2, imgsz=256, time_budget=0), 0.4, 0.2)
def half_then_wait(src, dst, *args, **kwargs):  # the weights half written when the kill comes
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: len(data) // 2])
    print("storing", flush=True)
    time.sleep(600)
registry_module.shutil.copyfile = half_then_wait
reg = Registry(models)
v = store_version(reg, "7", r.weights, {}, {"tasks": []})
promote(reg, "7", v.version, "done")
"""


@pytest.mark.scenario("A training process SIGKILLed while it writes the new version into the registry",
                      "no partial version appears; the current model is unchanged and still served")
def test_killed_training_leaves_the_current_model_untouched(tmp_path, trained_weights):
    models = tmp_path / "models"
    v1 = register_model(models, "7", trained_weights)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(models)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:  # wait for the event: the version's weights half written
        lines.append(line)
        if line.strip() == b"storing":
            break
    assert lines and lines[-1].strip() == b"storing", b"".join(lines[-20:]).decode(errors="replace")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    registry = Registry(models)
    assert any(p.name.startswith(".") for p in (registry.project_dir("7") / "versions").iterdir())  # the half write
    assert registry.current_version("7") == v1
    assert [v.version for v in registry.versions("7")] == [v1]
    assert Runtime(Settings.from_env({"MODEL_DIR": str(models)})).detector("7")[0] == v1


def test_promotion_loses_to_a_rollback_made_during_training(tmp_path, trained_weights):
    from backend.registry import promote, rollback

    models = tmp_path / "models"
    v1 = register_model(models, "8", trained_weights)
    v2 = register_model(models, "8", trained_weights)
    registry = Registry(models)
    candidate = store_version(registry, "8", trained_weights, {"parent": v2}, {"tasks": []})  # trained from v2
    rollback(registry, "8", v1)  # meanwhile, someone rolls back
    assert not promote(registry, "8", candidate.version, "gate passed", expected=v2)
    assert registry.current_version("8") == v1
    last = registry.history("8")[-1]
    assert last["event"] == "not promoted" and f"CURRENT changed from {v2} to {v1}" in last["reason"]
    assert promote(registry, "8", candidate.version, "gate passed", expected=v1)  # a current expectation wins
    assert registry.current_version("8") == candidate.version


def test_pseudo_labels_keep_only_confident_predictions(trained_weights, synth_dir):
    from backend.images import ImageLoader
    from training.jobs import Progress, pseudo_labels

    names = sorted(p.name for p in (synth_dir / "images").iterdir())[:4]
    tasks = [{"id": i, "data": {"image": f"/data/local-files/?d=images/{n}"}} for i, n in enumerate(names)]
    tasks.append({"id": 99, "data": {"image": "/data/local-files/?d=images/missing.png"}})

    def run(threshold):
        settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(synth_dir), "SCORE_THRESHOLD": "0.05",
                                      "PSEUDO_LABEL_THRESHOLD": str(threshold)})
        return pseudo_labels(settings, trained_weights, tasks, "image", ImageLoader(settings), Progress("1"))

    images, records = run(0.01)
    assert [r["task_id"] for r in records] == [0, 1, 2, 3]  # the missing image is skipped
    assert [im.name for im in images] == ["pseudo_0", "pseudo_1", "pseudo_2", "pseudo_3"]
    assert all(len(im.masks) == r["teeth"] > 0 for im, r in zip(images, records))
    scores = sorted(r["score"] for r in records)  # rounded to 4 places: cut between two of them
    assert scores[1] < scores[2]
    cut = (scores[1] + scores[2]) / 2
    images, records = run(cut)
    assert len(records) == 2 and all(r["score"] >= cut for r in records)
    assert run(1.01) == ([], [])


def test_imgsz_is_fitted_to_the_images():
    config = TrainConfig(imgsz=640)
    assert config.fitted(512).imgsz == 512  # UFBA-425's 512x512 radiographs are not upscaled
    assert config.fitted(500).imgsz == 512  # rounded up to the stride
    assert config.fitted(2000).imgsz == 640 and config.fitted(640) is config  # larger images: as configured


def test_the_retrain_job_trains_no_larger_than_its_images(tmp_path):
    from training.simulate import SimProject, preset

    sim = SimProject(preset("smoke"), 0, tmp_path, log=lambda line: None)  # 320x160 images
    record = sim.run(101, "fit", sim.keys["lab"], overrides={"imgsz": 640})
    version = Registry(sim.settings.model_dir).versions(101)[-1]
    assert record.steps == 4 and version.meta["hyperparameters"]["imgsz"] == 320
    # a first training without YOLO_WEIGHTS starts from the shipped pretrained detector (test_pretrain)
    assert version.meta["started_from"] == str(SHIPPED)
    assert Detector.load(version.weights).imgsz == 320  # and it predicts at that size
    # by default half of the training images are mirrored (with their FDI numbers swapped, see
    # test_small_data): chosen on the real radiographs' pool (bench/results/real-selection.md)
    train_args = torch.load(version.weights, map_location="cpu", weights_only=False)["train_args"]
    assert train_args["fliplr"] == 0.5


def test_a_training_with_few_validation_images_returns_its_last_epoch(small_dataset, tmp_path):
    """One or two validation images cannot rank epochs (bench/results/real-selection.md): below
    TRAIN_BEST_MIN_VAL_IMAGES the last epoch is the model, else best.pt."""
    data, items = small_dataset
    config = TrainConfig(steps=2, batch=2, imgsz=256, warmup_steps=0, time_budget=0)
    assert config.best_min_val_images == 3
    few = train_model(data, tmp_path / "few", config, 0.4, 0.2, val_items=items[4:])  # 2 validation images
    assert few.weights.name == "last.pt" and few.weights.exists()
    enough = train_model(data, tmp_path / "enough", replace(config, best_min_val_images=2), 0.4, 0.2,
                         val_items=items[4:])
    assert enough.weights.name == "best.pt"
