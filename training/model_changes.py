"""toothseg's changes to ultralytics' YOLOv8-seg training, each switchable (`ModelChanges`).

The paper's (section 2.3):

(a) Finer prototypes: `proto_stride` 4 (stock), 2 (paper: one extra 2x upsampling in the Proto
    module) or 1. The network side is `backend.yolo_model.FineProto`; here the trainer asks the
    dataset for masks at the same stride (`mask_ratio`) and the validator derives the prototype
    stride from the tensors instead of assuming 4.
(b) Large-box loss: with `large_box_alpha` = alpha > 0, every foreground anchor's box terms
    (CIoU and DFL) and mask term (BCE inside the box) are multiplied by

        w = 1 + alpha * sqrt(a)

    where a is the area of the anchor's ground-truth box as a fraction of the input image.
    A tooth covering 1% of the image gets w = 1 + 0.1 alpha, one covering 4% w = 1 + 0.2 alpha
    (default alpha = 4: 1.4 and 1.8). alpha = 0 is exactly ultralytics' loss.
(c) Standardisation with the train split's mean/std: `backend.yolo_model.ToothSegModel`, the
    statistics given here and stored in the checkpoint.

toothseg's own, for projects with a handful of annotated images:

(d) A tooth super-class next to the 52 FDI classes (`tooth_class`): the head gets a 53rd class,
    `backend.fdi.TOOTH_CLASS`, that every tooth has. Anchors are assigned to ground-truth teeth
    by ultralytics' task-aligned assigner run class-agnostically on that column, and the FDI
    column of the assigned tooth gets the same target. So *is this a tooth* is learnt from every
    tooth of every image (about 28 per panoramic), while *which tooth* (52 classes, each seen
    once per image at most) may stay uncertain; the detector keeps candidates by the tooth
    score and the numbering decides the label (`backend.numbering`).
(e) Panoramic canvas (`PanoramicDataset`): without mosaic, ultralytics pads every training
    image into an imgsz x imgsz square; a 2:1 panoramic then wastes half of each batch on
    padding. Here the canvas has the images' own aspect ratio (640 x 320 at imgsz 640), the
    shape the detector letterboxes to at prediction time, so a step costs half as much.
(g) Mirror flip (`MirrorFlip`, when `fliplr` > 0: half of the images by default): ultralytics'
    horizontal flip teaches an "11" where a "21" belongs, since mirroring a panoramic swaps the
    patient's sides; this flip also swaps each FDI class with its mirror tooth
    (`backend.fdi.mirrored`: quadrants 1<->2, 3<->4, 5<->6, 7<->8), so a flipped radiograph is a
    valid one with valid numbers.
(f) Validation by the product's own score (`ToothSegTrainer.validate`): each epoch the EMA model
    runs through `backend.pipeline` on the validation images and is scored with the STS metrics;
    the primary score (mean of instance Dice and IA) is ultralytics' fitness, so best.pt and
    early stopping follow what the promotion gate will measure.
"""
from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.data.augment import RandomFlip
from ultralytics.data.dataset import YOLODataset
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.models.yolo.segment import SegmentationTrainer, SegmentationValidator
from ultralytics.utils import RANK, ops
from ultralytics.utils.loss import BboxLoss, v8SegmentationLoss
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.ops import crop_mask
from ultralytics.utils.tal import TaskAlignedAssigner, bbox2dist
from ultralytics.utils.torch_utils import strip_optimizer, unwrap_model

from backend import fdi
from backend.yolo_model import ToothSegModel


@dataclass(frozen=True)
class ModelChanges:
    """Which of the changes a training run uses, and the normalisation statistics."""

    proto_stride: int = 2
    large_box_alpha: float = 4.0
    tooth_class: bool = True
    mean: float = 0.0
    std: float = 1.0


def area_weight(area: torch.Tensor, alpha: float) -> torch.Tensor:
    """w = 1 + alpha * sqrt(area); area = ground-truth box area / image area."""
    return 1.0 + alpha * area.clamp(min=0).sqrt()


class LargeBoxBboxLoss(BboxLoss):
    """ultralytics' CIoU + DFL box loss with each foreground anchor weighted by `area_weight`."""

    def __init__(self, reg_max: int, alpha: float):
        super().__init__(reg_max)
        self.alpha = alpha

    def forward(self, pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, target_scores_sum,
                fg_mask, imgsz, stride):
        fg = fg_mask.nonzero(as_tuple=True)
        boxes_px = (target_bboxes * stride)[fg]  # target boxes arrive in grid units
        area = (boxes_px[:, 2] - boxes_px[:, 0]) * (boxes_px[:, 3] - boxes_px[:, 1]) / (imgsz[0] * imgsz[1])
        weight = target_scores[fg].sum(-1, keepdim=True) * area_weight(area, self.alpha)[:, None]
        iou = bbox_iou(pred_bboxes[fg], target_bboxes[fg], xywh=False, CIoU=True)
        loss_iou = ((1.0 - iou) * weight).sum() / target_scores_sum
        target_ltrb = bbox2dist(anchor_points, target_bboxes, self.dfl_loss.reg_max - 1)
        loss_dfl = (self.dfl_loss(pred_dist[fg].view(-1, self.dfl_loss.reg_max), target_ltrb[fg]) * weight).sum()
        return loss_iou, loss_dfl / target_scores_sum


class ToothAssigner(nn.Module):
    """Task-aligned assignment by the tooth column (the last class), class-agnostic.

    Wraps a one-class `TaskAlignedAssigner`. Returns what ultralytics' assigner returns, with
    target scores (bs, anchors, nc) holding the alignment target t in the tooth column and in the
    FDI column of the assigned ground-truth tooth (0 elsewhere and on background anchors).
    """

    def __init__(self, assigner: TaskAlignedAssigner):
        super().__init__()
        self.inner = TaskAlignedAssigner(topk=assigner.topk, num_classes=1, alpha=assigner.alpha,
                                         beta=assigner.beta, stride=assigner.stride, eps=assigner.eps,
                                         topk2=assigner.topk2)

    def forward(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **extra):
        nc = pd_scores.shape[-1]
        labels, bboxes, tooth, fg, gt_idx = self.inner(pd_scores[..., -1:], pd_bboxes, anc_points,
                                                        torch.zeros_like(gt_labels), gt_bboxes, mask_gt, **extra)
        scores = torch.zeros_like(pd_scores)
        if gt_labels.shape[1]:
            fdi = gt_labels.squeeze(-1).long().gather(1, gt_idx).clamp_(0, nc - 2)
            scores.scatter_(-1, fdi.unsqueeze(-1), tooth)
            labels = fdi
        scores[..., -1:] = tooth
        return labels, bboxes, scores, fg, gt_idx


class ToothSegmentationLoss(v8SegmentationLoss):
    """v8SegmentationLoss with the large-box weighting (b) and, optionally, the tooth super-class (d)."""

    def __init__(self, model, alpha: float, tooth_class: bool, tal_topk: int = 10):
        super().__init__(model, tal_topk)
        self.alpha = alpha
        if alpha > 0:
            self.bbox_loss = LargeBoxBboxLoss(self.reg_max, alpha).to(self.device)
        if tooth_class:
            self.assigner = ToothAssigner(self.assigner)

    def single_mask_loss(self, gt_mask, pred, proto, xyxy, area):
        pred_mask = torch.einsum("in,nhw->ihw", pred, proto)
        loss = F.binary_cross_entropy_with_logits(pred_mask, gt_mask, reduction="none")
        return (crop_mask(loss, xyxy).mean(dim=(1, 2)) / area * area_weight(area, self.alpha)).sum()


def mirror_classes(names: dict[int, str]) -> np.ndarray:
    """Class index -> the index of its mirror tooth (`fdi.mirrored`) for a dataset's `names`
    {index: label}; a class that is not an FDI tooth, or whose mirror is not a class, keeps its index."""
    index = {label: i for i, label in names.items()}
    table = np.arange(max(names) + 1 if names else 0)
    for i, label in names.items():
        if fdi.is_fdi(label):
            table[i] = index.get(fdi.mirrored(label), i)
    return table


class MirrorFlip(RandomFlip):
    """ultralytics' horizontal RandomFlip that also relabels each tooth as its mirror tooth (`swap`:
    `mirror_classes` of the dataset's names), so the flipped image's FDI numbers stay true."""

    def __init__(self, p: float, swap: np.ndarray):
        super().__init__(p=p, direction="horizontal")
        self.swap = swap

    def apply_instances(self, labels, params):
        labels = super().apply_instances(labels, params)
        if params["flip"] and len(labels["cls"]):
            labels["cls"] = self.swap[labels["cls"].astype(np.int64)].astype(labels["cls"].dtype)
        return labels


class PanoramicDataset(YOLODataset):
    """YOLODataset whose augmented training images are laid on a canvas of the images' aspect ratio
    (imgsz along the longer side, the shorter one rounded up to the stride) instead of a square.
    Only without mosaic: a mosaic is square by construction, so it keeps ultralytics' canvas.
    Its horizontal flips are `MirrorFlip`s."""

    def build_transforms(self, hyp):
        self.canvas = self._canvas() if self.augment and not hyp.mosaic else None
        transforms = super().build_transforms(hyp)
        swap = mirror_classes(self.data["names"])
        for i, transform in enumerate(transforms.transforms):
            if type(transform) is RandomFlip and transform.direction == "horizontal":
                transforms.transforms[i] = MirrorFlip(transform.p, swap)
        return transforms

    def _canvas(self) -> tuple[int, int]:
        """(h, w) of the canvas: the widest landscape (or tallest portrait) aspect of the images."""
        shapes = np.array([lb["shape"] for lb in self.labels], dtype=np.float64)  # (n, 2) h, w
        ratio = (shapes[:, 0] / shapes[:, 1]).max() if (shapes[:, 1] >= shapes[:, 0]).all() else 1.0
        short = int(np.ceil(self.imgsz * ratio / self.stride) * self.stride)
        return min(short, self.imgsz), self.imgsz

    def get_image_and_label(self, index):
        label = super().get_image_and_label(index)
        if self.canvas is not None:
            label["rect_shape"] = self.canvas  # RandomPerspective's output size
        return label


class StrideAwareSegmentationValidator(SegmentationValidator):
    """ultralytics' validator assumes prototypes at stride 4; this one reads the stride off the tensors."""

    def preprocess(self, batch):
        batch = super().preprocess(batch)
        self._input_hw = tuple(batch["img"].shape[2:])
        return batch

    def postprocess(self, preds):
        proto = preds[0][1] if isinstance(preds[0], tuple) else preds[1]
        self._proto_stride = self._input_hw[0] // proto.shape[2]
        out = DetectionValidator.postprocess(self, preds[0])
        for i, pred in enumerate(out):
            pred["masks"] = self.process(proto[i], pred.pop("extra"), pred["bboxes"], shape=self._input_hw)
        return out

    def _prepare_batch(self, si, batch):
        prepared = DetectionValidator._prepare_batch(self, si, batch)
        nl = prepared["cls"].shape[0]
        if self.args.overlap_mask:
            masks = batch["masks"][si]
            masks = (masks == torch.arange(1, nl + 1, device=masks.device).view(nl, 1, 1)).float()
        else:
            masks = batch["masks"][batch["batch_idx"] == si]
        if nl:
            s = 1 if self.process is ops.process_mask_native else self._proto_stride
            size = [d // s for d in prepared["imgsz"]]
            if list(masks.shape[1:]) != size:
                masks = F.interpolate(masks[None], size, mode="bilinear", align_corners=False)[0].gt_(0.5)
        prepared["masks"] = masks
        return prepared


class ToothSegTrainer(SegmentationTrainer):
    """SegmentationTrainer building `ToothSegModel` with the changes in `changes`, scoring epochs on
    `val_items` (class attributes, bound by `trainer_for`, because ultralytics instantiates the
    trainer class itself). Without `val_items` it validates with ultralytics' mAP."""

    changes: ModelChanges = ModelChanges()
    val_items: Sequence = ()
    val_options = None  # backend.pipeline.PipelineOptions; None: its defaults without SAM
    val_every: int = 1  # epochs between validations (and checkpoint saves); the final epoch always

    def get_model(self, cfg=None, weights=None, verbose=True):
        c = self.changes
        model = ToothSegModel(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1,
                              mean=c.mean, std=c.std, proto_stride=c.proto_stride)
        model = self.set_model_names_for_load(model)
        if weights:
            model.load(weights)
            model.normalisation = (c.mean, c.std)  # this round's statistics, not the parent's
        return model

    def build_dataset(self, img_path, mode="train", batch=None):
        if mode != "train":
            return super().build_dataset(img_path, mode, batch)
        gs = max(int(unwrap_model(self.model).stride.max()), 32)
        return PanoramicDataset(img_path=img_path, imgsz=self.args.imgsz, batch_size=batch, augment=True,
                                hyp=self.args, rect=False, cache=self.args.cache or None,
                                single_cls=self.args.single_cls or False, stride=gs, pad=0.0,
                                prefix="train: ", task=self.args.task, classes=self.args.classes,
                                data=self.data, fraction=self.args.fraction)

    def set_model_attributes(self):
        super().set_model_attributes()
        c = self.changes
        self.model.criterion = ToothSegmentationLoss(self.model, c.large_box_alpha, c.tooth_class)

    def get_validator(self):
        return StrideAwareSegmentationValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args),
                                                _callbacks=self.callbacks)

    def validate(self):
        """(metrics, fitness) of the EMA model on `val_items`: the STS scores through the product's
        pipeline (detector and numbering), fitness = their primary score."""
        if not self.val_items:
            return super().validate()
        if (self.epoch + 1) % self.val_every and self.epoch + 1 < self.epochs:
            return self.metrics, None  # not this epoch: no fitness, so no best.pt and no early-stopping step
        from backend.detector import Detector
        from backend.pipeline import Pipeline, PipelineOptions
        from training.evaluate import score_pipeline

        model = self.ema.ema if self.ema else unwrap_model(self.model)
        was_training = model.training
        pipeline = Pipeline(Detector(model.eval(), imgsz=self.args.imgsz, device=str(self.device)), None,
                            self.val_options or PipelineOptions(use_sam=False))
        scores = score_pipeline(pipeline, self.val_items, nsd="sts")
        model.train(was_training)
        fitness = float(scores.primary)
        if self.best_fitness is None or self.best_fitness < fitness:
            self.best_fitness = fitness
        metrics = {f"val/{name}": round(value, 5) for name, value in scores.as_dict().items()}
        return metrics | {"val/primary": round(fitness, 5)}, fitness

    def save_model(self):
        """Checkpoints only after a validated epoch (ultralytics saves every epoch; with a handful of
        images an epoch is a few steps, and the save would cost as much as the training)."""
        if self.fitness is None and self.epoch + 1 < self.epochs:
            return False
        return super().save_model()

    def final_eval(self):
        """Strip the optimizer from the saved checkpoints; the validation scores are already known."""
        if not self.val_items:
            return super().final_eval()
        for weights in (self.last, self.best):
            if weights.exists():
                strip_optimizer(weights)


def trainer_for(changes: ModelChanges, val_items: Sequence = (), val_options=None, val_every: int = 1
                ) -> type[ToothSegTrainer]:
    """A ToothSegTrainer subclass bound to `changes`, the validation images and pipeline options."""
    return type("BoundToothSegTrainer", (ToothSegTrainer,),
                {"changes": changes, "val_items": tuple(val_items), "val_options": val_options,
                 "val_every": max(int(val_every), 1)})
