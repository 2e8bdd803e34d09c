"""YOLOv8-seg tooth candidates with their full class-probability vectors.

ultralytics' predictor keeps only each box's top class; numbering needs all 52. So the network
runs directly on the letterboxed image, class-agnostic NMS keeps one candidate per physical
tooth (`return_idxs` gives each kept row's anchor), and the class probabilities (sigmoid
outputs, one per FDI class) are read back from the raw head output at those anchors. Masks are
assembled from the prototypes only for the candidates the numbering keeps.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils import nms, ops

from backend import fdi
from backend.preprocess import letterbox

logger = logging.getLogger(__name__)


@dataclass
class Candidates:
    """Detector output for one image, before numbering.

    boxes: (n, 4) x1, y1, x2, y2 in original pixels. probs: (n, 52) class probabilities in FDI
    class order. The rest is what `masks` needs: mask coefficients (n, nm), prototypes
    (nm, ph, pw), the letterboxed input size and letterbox boxes.
    """

    boxes: np.ndarray
    probs: np.ndarray
    coefficients: torch.Tensor
    proto: torch.Tensor
    input_hw: tuple[int, int]
    boxes_input: torch.Tensor
    image_hw: tuple[int, int]

    def __len__(self) -> int:
        return len(self.boxes)

    def masks(self, indices: Sequence[int]) -> np.ndarray:
        """(k, H, W) bool masks at the original image size for the candidates `indices`."""
        h, w = self.image_hw
        if len(indices) == 0:
            return np.zeros((0, h, w), dtype=bool)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        with torch.no_grad():
            m = ops.process_mask(self.proto, self.coefficients[idx], self.boxes_input[idx].clone(),
                                 self.input_hw, upsample=True)
            m = ops.scale_masks(m[None].float(), (h, w))[0]
        return (m > 0.5).cpu().numpy()


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
        dets, keep = nms.non_max_suppression(pred, conf_thres=self.conf, iou_thres=self.iou, agnostic=True,
                                             nc=nc, max_det=self.max_det, return_idxs=True)
        det, idx = dets[0], keep[0].long().view(-1)
        raw = pred[0, 4:4 + nc, idx].T.cpu().numpy()  # (n, nc) sigmoid scores
        probs = np.zeros((len(idx), fdi.NUM_CLASSES), dtype=np.float32)
        for i, col in self.columns.items():
            if i < nc:
                probs[:, col] = raw[:, i]
        boxes_input = det[:, :4]
        boxes = ops.scale_boxes(tuple(x.shape[2:]), boxes_input.clone(), image_hw).cpu().numpy()
        return Candidates(boxes=boxes.astype(np.float64), probs=probs, coefficients=det[:, 6:],
                          proto=proto[0], input_hw=tuple(x.shape[2:]), boxes_input=boxes_input,
                          image_hw=tuple(image_hw))

    def detect(self, pixels: np.ndarray) -> Candidates:
        """(H, W) uint8 grey image -> candidates."""
        return self.forward(self.prepare(pixels), pixels.shape[:2])
