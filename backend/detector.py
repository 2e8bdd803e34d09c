"""YOLOv8-seg tooth candidates with their full class-probability vectors.

ultralytics' predictor keeps only each box's top class; numbering needs all 52. So the network
runs directly on the letterboxed image, class-agnostic NMS keeps one candidate per physical
tooth (`return_idxs` gives each kept row's anchor), and the class probabilities (sigmoid
outputs, one per FDI class) are read back from the raw head output at those anchors. Masks are
assembled from the prototypes only for the candidates the numbering keeps.

A candidate's tooth score ("is this a tooth") is the model's `fdi.TOOTH_CLASS` column where it
has one (toothseg's models since the tooth super-class, `training.model_changes`), else its best
FDI probability (any YOLOv8-seg with FDI class names). NMS ranks and thresholds by it.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils import nms, ops

from backend import fdi
from backend.mask_refiner import CHECKPOINT_KEY, CROP_H, CROP_W, MaskRefiner, crop_image, crop_window, paste
from backend.preprocess import letterbox

logger = logging.getLogger(__name__)

REFINER_MIN_AGREEMENT = 0.5
"""IoU between the learned refiner's mask and the guided-filter mask below which the refiner is
taken to have lost the tooth (an undertrained refiner, an unusual crop) and the latter is kept."""
SAM_DECODER_KEY = "toothseg_sam_decoder"
"""Checkpoint entry of SAM's prompt encoder and mask decoder tuned with the model: {"base": the id of
the SAM checkpoint they were tuned from, "state": their weights, "training": how}
(training.sam_training)."""


@dataclass
class Candidates:
    """Detector output for one image, before numbering.

    boxes: (n, 4) x1, y1, x2, y2 in original pixels. probs: (n, 52) class probabilities in FDI
    class order. tooth: (n,) tooth scores in [0, 1], descending. The rest is what `masks` needs:
    mask coefficients (n, nm), prototypes (nm, ph, pw), the letterboxed input size and letterbox
    boxes.
    """

    boxes: np.ndarray
    probs: np.ndarray
    tooth: np.ndarray
    coefficients: torch.Tensor
    proto: torch.Tensor
    input_hw: tuple[int, int]
    boxes_input: torch.Tensor
    image_hw: tuple[int, int]
    refiner: MaskRefiner | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    def _letterbox_geometry(self) -> tuple[float, float, float]:
        """(gain, pad_x, pad_y): original pixels -> letterboxed input pixels."""
        (h, w), (ih, iw) = self.image_hw, self.input_hw
        gain = min(ih / h, iw / w)
        return gain, (iw - round(w * gain)) / 2, (ih - round(h * gain)) / 2

    def _logits(self, indices: Sequence[int]) -> torch.Tensor:
        """(k, 1, ph, pw) prototype-resolution mask logits of the candidates `indices`."""
        nm, ph, pw = self.proto.shape
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        with torch.no_grad():
            return (self.coefficients[idx].float() @ self.proto.float().reshape(nm, -1)).reshape(-1, 1, ph, pw)

    def _sample(self, logits: torch.Tensor, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Mask probability (len(ys), len(xs)) of one candidate's logits (1, 1, ph, pw) at the
        original-image coordinates xs (columns) and ys (rows), continuous (pixel i covers [i, i + 1))."""
        ih, iw = self.input_hw
        gain, pad_x, pad_y = self._letterbox_geometry()
        gx = torch.as_tensor(2 * (xs * gain + pad_x) / iw - 1, dtype=torch.float32)
        gy = torch.as_tensor(2 * (ys * gain + pad_y) / ih - 1, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
        with torch.no_grad():
            return F.grid_sample(logits, grid, mode="bilinear", align_corners=False)[0, 0].sigmoid().numpy()

    def refiner_inputs(self, indices: Sequence[int], pixels: np.ndarray,
                       windows: Sequence[Sequence[float]] | None = None) -> np.ndarray:
        """(k, 2, CROP_H, CROP_W) float32 inputs of the mask refiner for the candidates `indices`:
        the radiograph `pixels` ((H, W) uint8) and YOLO's mask probability (scaled to [-1, 1]) on
        each candidate's crop grid (`windows`, default `crop_window` of its box)."""
        windows = windows if windows is not None else [crop_window(self.boxes[i]) for i in indices]
        out = np.zeros((len(indices), 2, CROP_H, CROP_W), dtype=np.float32)
        if len(indices) == 0:
            return out
        logits = self._logits(indices)
        for k, (x1, y1, x2, y2) in enumerate(windows):
            xs = x1 + (np.arange(CROP_W) + 0.5) * (x2 - x1) / CROP_W
            ys = y1 + (np.arange(CROP_H) + 0.5) * (y2 - y1) / CROP_H
            out[k, 0] = crop_image(pixels, (x1, y1, x2, y2))
            out[k, 1] = self._sample(logits[k:k + 1], xs, ys) * 2 - 1
        return out

    def masks(self, indices: Sequence[int], guide: np.ndarray | None = None, learned: bool = True,
              mirror: bool = True) -> np.ndarray:
        """(k, H, W) bool masks at the original image size for the candidates `indices`.

        Without `guide`, each mask's logits are sampled from the prototypes at the original pixels
        of its box (plus one prototype cell around it), so its outline follows the logits at full
        resolution. `guide`: the (H, W) uint8 image; when given, the model's learned mask refiner
        (`backend.mask_refiner`) redraws each mask from the image and YOLO's probability (where its
        mask agrees with the guided filter's by IoU >= REFINER_MIN_AGREEMENT), or, for a model
        without one or with `learned` False, each tooth's probability is refined by a guided filter
        on the image (`guided_filter`, radius one prototype cell) before thresholding. `mirror`: the
        refiner averages each crop with its mirror image (`MaskRefiner.predict`).
        """
        h, w = self.image_hw
        out = np.zeros((len(indices), h, w), dtype=bool)
        if len(indices) == 0:
            return out
        if guide is not None and learned and self.refiner is not None:
            out = self.masks(indices, guide, learned=False)
            windows = [crop_window(self.boxes[i]) for i in indices]
            logits = self.refiner.predict(self.refiner_inputs(indices, guide, windows), mirror=mirror)
            for k, window in enumerate(windows):
                rows, cols, mask = paste(logits[k], window, self.image_hw)
                before = out[k, rows, cols]
                agreement = (mask & before).sum() / max((mask | before).sum(), 1)
                if agreement >= REFINER_MIN_AGREEMENT:  # else the refiner lost the tooth: keep the filtered mask
                    out[k] = False
                    out[k, rows, cols] = mask
            return out
        ih, iw = self.input_hw
        nm, ph, pw = self.proto.shape
        gain = min(ih / h, iw / w)
        cell = ih / ph / gain  # original pixels per prototype pixel
        margin = int(np.ceil(cell))
        logits = self._logits(indices)
        for k, i in enumerate(indices):
            x1, y1, x2, y2 = self.boxes[i]
            cx1, cy1 = max(int(np.floor(x1)) - margin, 0), max(int(np.floor(y1)) - margin, 0)
            cx2, cy2 = min(int(np.ceil(x2)) + margin, w), min(int(np.ceil(y2)) + margin, h)
            if cx2 <= cx1 or cy2 <= cy1:
                continue
            prob = self._sample(logits[k:k + 1], np.arange(cx1, cx2) + 0.5, np.arange(cy1, cy2) + 0.5)
            inside = np.zeros_like(prob, dtype=bool)  # the box, as ultralytics' crop_mask
            bx1, by1 = max(int(round(x1)) - cx1, 0), max(int(round(y1)) - cy1, 0)
            inside[by1:int(round(y2)) - cy1, bx1:int(round(x2)) - cx1] = True
            prob = np.where(inside, prob, 0.0).astype(np.float32)
            if guide is not None:
                prob = guided_filter(guide[cy1:cy2, cx1:cx2].astype(np.float32) / 255.0, prob, max(int(round(cell)), 1))
            out[k, cy1:cy2, cx1:cx2] = prob > 0.5
        return out


def guided_filter(image: np.ndarray, p: np.ndarray, radius: int, eps: float = 1e-4) -> np.ndarray:
    """He, Sun and Tang's guided filter (ECCV 2010): `p` (a tooth's mask probability, (h, w)
    float32) smoothed so that its edges follow the edges of `image` ((h, w) float32 in [0, 1]),
    with box windows of side 2 * radius + 1 and regularisation `eps`. Edge-aware upsampling of the
    prototype-resolution mask: where the radiograph shows the tooth's outline, the mask snaps to it
    (bench/bench_loop.py measures the gain: its "no mask refinement" and "guided filter" rows)."""
    def mean(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, (2 * radius + 1, 2 * radius + 1))

    mean_i, mean_p = mean(image), mean(p)
    a = (mean(image * p) - mean_i * mean_p) / (mean(image * image) - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return mean(a) * image + mean(b)


class Detector:
    """A loaded YOLOv8-seg model. Thread-safe: one forward pass at a time."""

    def __init__(self, model: torch.nn.Module, imgsz: int, device: str = "cpu", conf: float = 0.05,
                 iou: float = 0.6, max_det: int = 100, refiner: MaskRefiner | None = None,
                 sam_decoder: dict | None = None):
        self.model = model
        self.refiner = refiner
        self.sam_decoder = sam_decoder  # SAM's decoder tuned with this model (training.sam_training), or None
        self.imgsz = int(imgsz)
        self.device = torch.device(device)
        self.conf = conf
        self.iou = iou
        self.max_det = max_det
        self.stride = int(max(getattr(model, "stride", torch.tensor([32.0])).max().item(), 32))
        names = getattr(model, "names", None) or {}
        # model class i -> FDI column; classes whose names are not FDI labels are ignored
        self.columns = {int(i): fdi.CLASS_INDEX[str(n)] for i, n in dict(names).items() if fdi.is_fdi(n)}
        if not self.columns:
            raise ValueError(f"model has no FDI class names (names: {dict(names)})")
        self.tooth_column = next((int(i) for i, n in dict(names).items() if str(n) == fdi.TOOTH_CLASS), None)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, weights: Path, imgsz: int | None = None, device: str = "cpu", **kwargs) -> "Detector":
        """Load an ultralytics .pt (toothseg's or any YOLOv8-seg whose class names are FDI labels),
        with the mask refiner and the SAM decoder trained with it when the checkpoint holds them."""
        model, ckpt = load_checkpoint(str(weights), device=torch.device(device), fuse=True)
        if imgsz is None:
            imgsz = int((ckpt.get("train_args") or {}).get("imgsz") or 640)
        state = ckpt.get(CHECKPOINT_KEY)
        refiner = MaskRefiner.from_state(state, device) if state else None
        return cls(model.eval(), imgsz=imgsz, device=device, refiner=refiner,
                   sam_decoder=ckpt.get(SAM_DECODER_KEY), **kwargs)

    def prepare(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W) uint8 grey -> the letterboxed (1, 3, h, w) input in [0, 1] on the model's device."""
        return letterbox(pixels, self.imgsz, self.stride).to(self.device)

    def forward(self, x: torch.Tensor, image_hw: tuple[int, int]) -> Candidates:
        """Letterboxed input -> candidates (class-agnostic NMS, confidence >= conf) for an image
        of size `image_hw` (H, W)."""
        with self._lock, torch.no_grad():
            out = self.model(x)
        pred, proto = out[0] if isinstance(out[0], tuple) else out[:2]
        nc = pred.shape[1] - 4 - proto.shape[1]
        ranked, ranked_nc = pred, nc
        if self.tooth_column is not None:  # NMS on the tooth score alone: (boxes, tooth, mask coefficients)
            t = 4 + self.tooth_column
            ranked, ranked_nc = torch.cat([pred[:, :4], pred[:, t:t + 1], pred[:, 4 + nc:]], 1), 1
        dets, keep = nms.non_max_suppression(ranked, conf_thres=self.conf, iou_thres=self.iou, agnostic=True,
                                             nc=ranked_nc, max_det=self.max_det, return_idxs=True)
        det, idx = dets[0], keep[0].long().view(-1)
        raw = pred[0, 4:4 + nc, idx].T.cpu().numpy()  # (n, nc) sigmoid scores
        probs = np.zeros((len(idx), fdi.NUM_CLASSES), dtype=np.float32)
        for i, col in self.columns.items():
            if i < nc:
                probs[:, col] = raw[:, i]
        boxes_input = det[:, :4]
        boxes = ops.scale_boxes(tuple(x.shape[2:]), boxes_input.clone(), image_hw).cpu().numpy()
        return Candidates(boxes=boxes.astype(np.float64), probs=probs, tooth=det[:, 4].cpu().numpy().astype(np.float64),
                          coefficients=det[:, 6:], proto=proto[0], input_hw=tuple(x.shape[2:]),
                          boxes_input=boxes_input, image_hw=tuple(image_hw), refiner=self.refiner)

    def detect(self, pixels: np.ndarray) -> Candidates:
        """(H, W) uint8 grey image -> candidates."""
        return self.forward(self.prepare(pixels), pixels.shape[:2])
