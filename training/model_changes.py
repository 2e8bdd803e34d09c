"""The paper's model changes (section 2.3) as ultralytics extensions, each switchable.

(a) Finer prototypes: `ModelChanges.proto_stride` 4 (stock), 2 (paper: one extra 2x
    upsampling in the Proto module) or 1. The network side is `backend.yolo_model.FineProto`;
    here the trainer asks the dataset for masks at the same stride (`mask_ratio`) and the
    validator derives the prototype stride from the tensors instead of assuming 4.
(b) Large-box loss: with `large_box_alpha` = alpha > 0, every foreground anchor's box terms
    (CIoU and DFL) and mask term (BCE inside the box) are multiplied by

        w = 1 + alpha * sqrt(a)

    where a is the area of the anchor's ground-truth box as a fraction of the input image.
    A tooth covering 1% of the image gets w = 1 + 0.1 alpha, one covering 4% w = 1 + 0.2 alpha
    (default alpha = 4: 1.4 and 1.8). alpha = 0 is exactly ultralytics' loss.
(c) Standardisation with the train split's mean/std: `backend.yolo_model.ToothSegModel`, the
    statistics given here and stored in the checkpoint.
"""
from __future__ import annotations

from copy import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.models.yolo.segment import SegmentationTrainer, SegmentationValidator
from ultralytics.utils import RANK, ops
from ultralytics.utils.loss import BboxLoss, v8SegmentationLoss
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.ops import crop_mask
from ultralytics.utils.tal import bbox2dist

from backend.yolo_model import ToothSegModel


@dataclass(frozen=True)
class ModelChanges:
    """Which of the paper's changes a training run uses, and the normalisation statistics."""

    proto_stride: int = 2
    large_box_alpha: float = 4.0
    mean: float = 0.0
    std: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


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


class LargeBoxSegmentationLoss(v8SegmentationLoss):
    """v8SegmentationLoss whose box and mask terms are weighted up with the ground-truth box area."""

    def __init__(self, model, alpha: float, tal_topk: int = 10):
        super().__init__(model, tal_topk)
        self.alpha = alpha
        self.bbox_loss = LargeBoxBboxLoss(self.reg_max, alpha).to(self.device)

    def single_mask_loss(self, gt_mask, pred, proto, xyxy, area):
        pred_mask = torch.einsum("in,nhw->ihw", pred, proto)
        loss = F.binary_cross_entropy_with_logits(pred_mask, gt_mask, reduction="none")
        return (crop_mask(loss, xyxy).mean(dim=(1, 2)) / area * area_weight(area, self.alpha)).sum()


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
    """SegmentationTrainer building `ToothSegModel` with the changes in `changes` (a class attribute,
    bound by `trainer_for`, because ultralytics instantiates the trainer class itself)."""

    changes: ModelChanges = ModelChanges()

    def get_model(self, cfg=None, weights=None, verbose=True):
        c = self.changes
        model = ToothSegModel(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1,
                              mean=c.mean, std=c.std, proto_stride=c.proto_stride)
        model = self.set_model_names_for_load(model)
        if weights:
            model.load(weights)
            model.normalisation = (c.mean, c.std)  # this round's statistics, not the parent's
        return model

    def set_model_attributes(self):
        super().set_model_attributes()
        if self.changes.large_box_alpha > 0:
            self.model.criterion = LargeBoxSegmentationLoss(self.model, self.changes.large_box_alpha)

    def get_validator(self):
        return StrideAwareSegmentationValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args),
                                                _callbacks=self.callbacks)


def trainer_for(changes: ModelChanges) -> type[ToothSegTrainer]:
    """A ToothSegTrainer subclass bound to `changes`."""
    return type("BoundToothSegTrainer", (ToothSegTrainer,), {"changes": changes})
