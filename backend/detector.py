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
from backend.preprocess import letterbox

logger = logging.getLogger(__name__)


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

    def __len__(self) -> int:
        return len(self.boxes)

    def masks(self, indices: Sequence[int], guide: np.ndarray | None = None) -> np.ndarray:
        """(k, H, W) bool masks at the original image size for the candidates `indices`.

        Each mask's logits are sampled from the prototypes at the original pixels of its box (plus
        one prototype cell around it), so its outline follows the logits at full resolution.
        `guide`: the (H, W) uint8 image; when given, each tooth's probability is refined by a
        guided filter on it (`guided_filter`, radius one prototype cell) before thresholding.
        """
        h, w = self.image_hw
        out = np.zeros((len(indices), h, w), dtype=bool)
        if len(indices) == 0:
            return out
        ih, iw = self.input_hw
        nm, ph, pw = self.proto.shape
        gain = min(ih / h, iw / w)
        pad_x, pad_y = (iw - round(w * gain)) / 2, (ih - round(h * gain)) / 2
        cell = ih / ph / gain  # original pixels per prototype pixel
        margin = int(np.ceil(cell))
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        with torch.no_grad():
            logits = (self.coefficients[idx].float() @ self.proto.float().reshape(nm, -1)).reshape(-1, 1, ph, pw)
        for k, i in enumerate(indices):
            x1, y1, x2, y2 = self.boxes[i]
            cx1, cy1 = max(int(np.floor(x1)) - margin, 0), max(int(np.floor(y1)) - margin, 0)
            cx2, cy2 = min(int(np.ceil(x2)) + margin, w), min(int(np.ceil(y2)) + margin, h)
            if cx2 <= cx1 or cy2 <= cy1:
                continue
            # pixel centres of the crop -> grid_sample's [-1, 1] over the letterboxed input
            gx = torch.as_tensor(2 * ((np.arange(cx1, cx2) + 0.5) * gain + pad_x) / iw - 1, dtype=torch.float32)
            gy = torch.as_tensor(2 * ((np.arange(cy1, cy2) + 0.5) * gain + pad_y) / ih - 1, dtype=torch.float32)
            grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
            with torch.no_grad():
                crop = F.grid_sample(logits[k:k + 1], grid, mode="bilinear", align_corners=False)[0, 0]
            prob = crop.sigmoid().numpy()
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
    (bench/bench_cold_start.py measures the gain)."""
    def mean(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, (2 * radius + 1, 2 * radius + 1))

    mean_i, mean_p = mean(image), mean(p)
    a = (mean(image * p) - mean_i * mean_p) / (mean(image * image) - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return mean(a) * image + mean(b)


class Detector:
    """A loaded YOLOv8-seg model. Thread-safe: one forward pass at a time."""

    def __init__(self, model: torch.nn.Module, imgsz: int, device: str = "cpu", conf: float = 0.05,
                 iou: float = 0.6, max_det: int = 100):
        self.model = model
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
        """Load an ultralytics .pt (toothseg's or any YOLOv8-seg whose class names are FDI labels)."""
        model, ckpt = load_checkpoint(str(weights), device=torch.device(device), fuse=True)
        if imgsz is None:
            imgsz = int((ckpt.get("train_args") or {}).get("imgsz") or 640)
        return cls(model.eval(), imgsz=imgsz, device=device, **kwargs)

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
                          boxes_input=boxes_input, image_hw=tuple(image_hw))

    def detect(self, pixels: np.ndarray) -> Candidates:
        """(H, W) uint8 grey image -> candidates."""
        return self.forward(self.prepare(pixels), pixels.shape[:2])
