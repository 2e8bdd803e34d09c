"""toothseg's small-data changes, each on its own: the tooth super-class (assignment and detection),
the panoramic canvas, the time budget, the steps-based length, the mask refinement, and the
numbering of candidates by their tooth score."""
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.utils.tal import TaskAlignedAssigner

from backend import fdi
from backend.detector import Detector, guided_filter
from backend.numbering import number_teeth
from backend.settings import Settings
from backend.yolo_model import ToothSegModel
from training.dataset import class_names, write_yolo_dataset
from training.metrics import iou
from training.model_changes import MirrorFlip, PanoramicDataset, ToothAssigner, mirror_classes
from training.data.synth import generate
from training.train import PRESETS, TrainConfig, _Budget, preset


def test_tooth_assigner_targets_the_tooth_column_and_the_assigned_fdi_class():
    """Anchors are assigned by the tooth column alone; the assigned tooth's FDI column gets the same target."""
    torch.manual_seed(0)
    nc = 53
    anchors = torch.stack(torch.meshgrid(torch.arange(4, 64, 8.0), torch.arange(4, 64, 8.0), indexing="xy"), -1)
    anchors = anchors.reshape(-1, 2)
    gt_bboxes = torch.tensor([[[0.0, 0.0, 30.0, 60.0], [32.0, 0.0, 62.0, 60.0]]])
    gt_labels = torch.tensor([[[fdi.CLASS_INDEX["11"]], [fdi.CLASS_INDEX["21"]]]], dtype=torch.float32)
    pd_bboxes = torch.cat([anchors - 12, anchors + 12], -1)[None]
    pd_scores = torch.rand(1, len(anchors), nc) * 0.1
    pd_scores[..., :52] = 0.0  # a young head: the FDI columns say nothing, the tooth column something
    assigner = ToothAssigner(TaskAlignedAssigner(topk=10, num_classes=nc, alpha=0.5, beta=6.0))
    _, _, scores, fg, gt_idx = assigner(pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, torch.ones(1, 2, 1))
    assert fg.sum() > 0
    assert torch.equal(scores[0, :, -1] > 0, fg[0])
    left = fg[0] & (gt_idx[0] == 0)
    right = fg[0] & (gt_idx[0] == 1)
    assert left.any() and right.any()
    assert torch.allclose(scores[0, left, fdi.CLASS_INDEX["11"]], scores[0, left, -1])
    assert torch.allclose(scores[0, right, fdi.CLASS_INDEX["21"]], scores[0, right, -1])
    assert scores[0, :, :52].sum(-1).sub(scores[0, :, -1]).abs().max() < 1e-6  # one FDI class per anchor
    # the stock assigner, on the FDI columns of a head that says nothing, assigns no anchor at all
    stock = TaskAlignedAssigner(topk=10, num_classes=nc, alpha=0.5, beta=6.0)
    assert stock(pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, torch.ones(1, 2, 1))[2].sum() == 0


def test_detector_keeps_candidates_by_the_tooth_column():
    model = ToothSegModel("yolov8n-seg.yaml", nc=53).eval()
    model.names = class_names(tooth_class=True)
    detector = Detector(model, imgsz=256, conf=0.0)
    assert detector.tooth_column == 52 and len(detector.columns) == 52
    head = model.model[-1]
    with torch.no_grad():  # make the tooth column the most confident one everywhere
        for seq in head.cv3:
            seq[-1].bias[:] = -4.0
            seq[-1].bias[52] = 2.0
    candidates = detector.detect(np.full((128, 256), 100, np.uint8))
    assert len(candidates) > 0
    assert np.allclose(candidates.tooth, torch.sigmoid(torch.tensor(2.0)).item(), atol=0.2)
    assert candidates.probs.max() < 0.2  # the FDI columns stay low: kept by the tooth score alone
    legacy = ToothSegModel("yolov8n-seg.yaml", nc=52).eval()
    legacy.names = class_names(tooth_class=False)
    assert Detector(legacy, imgsz=256).tooth_column is None


def test_uncertain_number_is_kept_by_its_tooth_score():
    labels = ["12", "11", "21", "22"]
    boxes = np.array([[1000 + 10 * fdi.arch_coordinate(lab) - 30, 100, 1000 + 10 * fdi.arch_coordinate(lab) + 30, 260]
                      for lab in labels])
    probs = np.full((4, 52), 0.01)
    for i, lab in enumerate(labels):
        probs[i, fdi.CLASS_INDEX[lab]] = 0.2  # a young model: the right number, but unsure
    assert number_teeth(boxes, probs, min_score=0.25) == []  # by its numbering confidence: dropped
    kept = number_teeth(boxes, probs, min_score=0.25, tooth=np.array([0.9, 0.8, 0.9, 0.1]))
    assert [(a.index, a.label) for a in kept] == [(1, "11"), (0, "12"), (2, "21")]  # in FDI order
    assert [a.score for a in kept] == [0.8, 0.9, 0.9]


def test_an_image_where_no_tooth_reaches_the_threshold_gets_its_fallback_candidates():
    from backend.images import XrayImage
    from backend.pipeline import Pipeline, PipelineOptions, image_min_score

    model = ToothSegModel("yolov8n-seg.yaml", nc=53).eval()
    model.names = class_names(tooth_class=True)
    head = model.model[-1]
    with torch.no_grad():  # every candidate's tooth score about 0.3: below the threshold, above the fallback
        for seq in head.cv3:
            seq[-1].bias[:] = -4.0
            seq[-1].bias[52] = float(np.log(0.3 / 0.7))
    image = XrayImage.of(np.full((128, 256), 100, np.uint8), "unsure")
    options = dict(min_score=0.4, use_sam=False, refine_masks=False)
    detector = Detector(model, imgsz=256, conf=0.05)
    assert Pipeline(detector, None, PipelineOptions(**options, fallback_score=0.0)).run(image) == []
    regions = Pipeline(detector, None, PipelineOptions(**options, fallback_score=0.2)).run(image)
    assert regions and all(0.2 <= r.score < 0.4 for r in regions)
    # an image with one candidate at the threshold keeps the threshold; weights without tooth scores too
    assert image_min_score(np.array([0.3, 0.4]), 0.4, 0.2) == 0.4
    assert image_min_score(np.array([0.3, 0.35]), 0.4, 0.2) == 0.2
    assert image_min_score(None, 0.4, 0.2) == 0.4


def test_guided_filter_snaps_a_coarse_mask_to_the_edges():
    image = np.zeros((80, 80), np.float32)
    image[20:60, 25:55] = 0.8  # a bright tooth on a dark background
    truth = image > 0.4
    coarse = np.zeros((80, 80), np.float32)
    coarse[16:64, 20:60] = 1.0  # the prototype mask: a cell too large on every side
    import cv2

    coarse = cv2.GaussianBlur(coarse, (0, 0), 4)
    before = iou(coarse > 0.5, truth)
    after = iou(guided_filter(image, coarse, radius=8) > 0.5, truth)
    assert before < 0.7 and after > 0.9, (before, after)


def test_masks_are_sampled_at_full_resolution_inside_the_box():
    model = ToothSegModel("yolov8n-seg.yaml", nc=53).eval()
    model.names = class_names()
    detector = Detector(model, imgsz=256, conf=0.0)
    pixels = np.full((100, 200), 90, np.uint8)
    candidates = detector.detect(pixels)
    candidates.coefficients = torch.ones_like(candidates.coefficients)
    candidates.proto = torch.ones_like(candidates.proto)  # every logit positive: the mask is the box
    candidates.boxes[0] = [40.0, 20.0, 90.0, 70.0]
    mask = candidates.masks([0])[0]
    assert mask.shape == (100, 200) and mask.sum() == 50 * 50 and mask[20:70, 40:90].all()


def test_panoramic_canvas(tmp_path):
    items = [generate(500 + i, (400, 200)).item(f"s{i}") for i in range(3)]
    data = write_yolo_dataset(items[:2], items[2:], tmp_path)
    import yaml

    info = yaml.safe_load(data.read_text())
    info["nc"] = len(info["names"])
    for mosaic, shape in ((0.0, (3, 128, 256)), (1.0, (3, 256, 256))):
        hyp = get_cfg(overrides={"mosaic": mosaic, "imgsz": 256, "fliplr": 0.0})
        dataset = PanoramicDataset(img_path=str(tmp_path / "images" / "train"), imgsz=256, augment=True, hyp=hyp,
                                   rect=False, stride=32, pad=0.0, task="segment", data=info, batch_size=2)
        assert tuple(dataset[0]["img"].shape) == shape


def test_mirrored_teeth():
    assert [fdi.mirrored(t) for t in ("11", "18", "21", "36", "47", "55", "61", "73", "84")] == \
        ["21", "28", "11", "46", "37", "65", "51", "83", "74"]
    assert all(fdi.mirrored(fdi.mirrored(t)) == t and fdi.is_upper(fdi.mirrored(t)) == fdi.is_upper(t)
               and fdi.on_image_left(fdi.mirrored(t)) != fdi.on_image_left(t) for t in fdi.FDI_LABELS)
    names = class_names()
    table = mirror_classes(names)
    assert [names[int(table[i])] for i in range(len(names))] == \
        [fdi.mirrored(n) if fdi.is_fdi(n) else n for n in names.values()]  # the tooth super-class keeps its index


def test_a_horizontal_flip_swaps_the_fdi_numbers(tmp_path):
    """With fliplr=1 every training image is mirrored: each tooth comes back as its mirror tooth, on
    the other side of the image (ultralytics' own flip would keep the numbers: an 11 where a 21 is)."""
    items = [generate(510 + i, (400, 200)).item(f"s{i}") for i in range(3)]
    data = write_yolo_dataset(items[:2], items[2:], tmp_path)
    import yaml

    info = yaml.safe_load(data.read_text())
    info["nc"] = len(info["names"])
    plain = {"translate": 0.0, "scale": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "imgsz": 256}
    samples = {}
    for fliplr in (0.0, 1.0):
        hyp = get_cfg(overrides={"mosaic": 0.0, "fliplr": fliplr, **plain})
        dataset = PanoramicDataset(img_path=str(tmp_path / "images" / "train"), imgsz=256, augment=True, hyp=hyp,
                                   rect=False, stride=32, pad=0.0, task="segment", data=info, batch_size=2)
        assert sum(isinstance(t, MirrorFlip) for t in dataset.transforms.transforms) == 1
        samples[fliplr] = dataset[0]
    names = info["names"]
    x = {f: {names[int(c)]: float(b[0]) for c, b in zip(samples[f]["cls"].flatten(), samples[f]["bboxes"])}
         for f in samples}
    assert len(x[0.0]) > 20 and sorted(x[1.0]) == sorted(fdi.mirrored(t) for t in x[0.0])
    for tooth, centre in x[0.0].items():
        assert abs(x[1.0][fdi.mirrored(tooth)] - (1.0 - centre)) < 0.02, tooth
    assert np.array_equal(samples[1.0]["img"].numpy(), samples[0.0]["img"].numpy()[:, :, ::-1])


def test_length_in_steps_and_presets():
    config = TrainConfig()
    assert config.preset == "small" and config.steps > 0 and config.tooth_class and config.mosaic == 0
    assert config.epochs_for(7) == -(-config.steps // 4)  # 7 images, batch 2: 4 steps per epoch
    assert config.warm().steps == config.warm_steps
    paper = preset("paper")
    assert (paper.epochs, paper.batch, paper.lr0, paper.optimizer, paper.proto_stride) == (100, 10, 1e-3, "SGD", 2)
    assert paper.epochs_for(7) == 100 and paper.time_budget == 0
    # a warm start keeps the paper's epochs; only the mask refiner trains its shorter warm length
    assert paper.warm() == replace(paper, refiner_steps=paper.refiner_warm_steps)
    assert config.warm().refiner_steps == config.refiner_warm_steps < config.refiner_steps
    assert TrainConfig.from_env({"TRAIN_PRESET": "paper", "TRAIN_BATCH": "4"}).batch == 4
    assert TrainConfig.from_env({"TRAIN_TOOTH_CLASS": "false"}).tooth_class is False
    with pytest.raises(ValueError, match="TRAIN_PRESET"):
        TrainConfig.from_env({"TRAIN_PRESET": "huge"})
    with pytest.raises(ValueError, match="TRAIN_TOOTH_CLASS"):
        TrainConfig.from_env({"TRAIN_TOOTH_CLASS": "maybe"})
    assert set(PRESETS) == {"small", "paper"}


def test_training_runs_on_device_unless_train_device_says_otherwise(monkeypatch):
    from training.jobs import train_config

    settings = Settings.from_env({"DEVICE": "cuda:1"})
    monkeypatch.delenv("TRAIN_DEVICE", raising=False)
    assert train_config(settings).device == "cuda:1"
    monkeypatch.setenv("TRAIN_DEVICE", "cpu")
    assert train_config(settings).device == "cpu"
    # defaults sit between the preset and the TRAIN_* variables
    assert TrainConfig.from_env({"TRAIN_BATCH": "3"}, defaults={"batch": 5, "device": "mps"}).batch == 3
    assert TrainConfig.from_env({}, defaults={"device": "mps"}).device == "mps"


def fake_trainer(epoch: int, epochs: int, elapsed: float):
    trainer = SimpleNamespace(epoch=epoch, epochs=epochs, start_epoch=0, train_time_start=time.time() - elapsed,
                              stop=False, args=SimpleNamespace(epochs=epochs), scheduler=SimpleNamespace(last_epoch=0))
    trainer._setup_scheduler = lambda: None
    return trainer


def test_budget_shortens_the_run_to_what_fits_and_never_lengthens_it():
    budget = _Budget(time.monotonic() + 95, planned=100)
    trainer = fake_trainer(epoch=9, epochs=100, elapsed=10)  # 1 s per epoch, 95 s left: 10 + 95 epochs fit
    budget(trainer)
    assert trainer.epochs == 100 and not budget.cut and not trainer.stop
    budget = _Budget(time.monotonic() + 30, planned=100)
    trainer = fake_trainer(epoch=9, epochs=100, elapsed=10)  # 30 s left: 40 epochs in all
    budget(trainer)
    assert 39 <= trainer.epochs <= 40 and trainer.args.epochs == trainer.epochs and budget.cut and not trainer.stop
    budget = _Budget(time.monotonic() - 1, planned=100)  # past the deadline: this epoch is the last
    trainer = fake_trainer(epoch=9, epochs=100, elapsed=10)
    budget(trainer)
    assert trainer.epochs == 10 and trainer.stop
    no_budget = _Budget(None, planned=100)
    trainer = fake_trainer(epoch=9, epochs=100, elapsed=1000)
    no_budget(trainer)
    assert trainer.epochs == 100 and not trainer.stop


def test_first_training_starts_from_coco_style_weights(tmp_path):
    """YOLO_WEIGHTS with COCO's 80 classes (what the Docker image fetches): the first training takes
    their backbone and gets toothseg's 53 classes."""
    from ultralytics import YOLO

    from training.train import train_model

    torch.manual_seed(0)
    coco = YOLO("yolov8n-seg.yaml", task="segment")
    coco.model.names = {i: f"coco{i}" for i in range(80)}
    coco.save(tmp_path / "coco.pt")
    items = [generate(700 + i, (320, 160)).item(f"s{i}") for i in range(3)]
    data = write_yolo_dataset(items[:2], items[2:], tmp_path / "ds")
    config = TrainConfig(steps=1, batch=2, imgsz=160, lr0=0.0, warmup_steps=0, time_budget=0)
    result = train_model(data, tmp_path / "run", config, 0.4, 0.2, warm_start=tmp_path / "coco.pt", val_items=items[2:])
    from ultralytics.nn.tasks import load_checkpoint

    trained, _ = load_checkpoint(str(result.weights), fuse=False)
    assert list(trained.names.values()) == list(class_names().values())
    first = lambda m: next(p for n, p in m.named_parameters() if n.endswith("0.conv.weight"))  # noqa: E731
    assert torch.allclose(first(trained).float(), first(coco.model).float(), atol=2e-3)  # the backbone came along
