"""toothseg's YOLOv8-seg network: ultralytics' SegmentationModel with the paper's changes that
live in the weights file (so the backend must import this module to load a toothseg .pt).

- Input standardisation (paper 2.1): `ToothSegModel` standardises its input, pixels in [0, 1],
  with the training split's global mean and std (`backend.preprocess.standardise`) as the first
  step of every forward pass. Training, validation and prediction all go through it, and the
  statistics travel inside the checkpoint (plain floats, so the fp16 save cannot round them).
- Finer prototypes (paper 2.3): `FineProto` adds 2x upsampling stages after ultralytics'
  `Proto`, so mask prototypes come out at stride 2 (one stage) or 1 (two) instead of 4.
  It keeps Proto's parameter names, so stride-4 weights load into it (warm start).

The loss change and the trainer live on the training side (`training.model_changes`).
"""
from __future__ import annotations

import torch
from torch import nn
from ultralytics.nn.modules import Conv
from ultralytics.nn.modules.block import Proto
from ultralytics.nn.tasks import SegmentationModel

from backend.preprocess import standardise

BASE_PROTO_STRIDE = 4


class FineProto(Proto):
    """ultralytics Proto plus `extra` (ConvTranspose 2x, Conv 3x3) stages: stride 4 / 2**extra."""

    def __init__(self, c1: int, c_: int = 256, c2: int = 32, extra: int = 1):
        super().__init__(c1, c_, c2)
        self.extra = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose2d(c_, c_, 2, 2, 0, bias=True), Conv(c_, c_, k=3)) for _ in range(extra)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.extra(self.cv2(self.upsample(self.cv1(x)))))

    @classmethod
    def from_proto(cls, proto: Proto, extra: int) -> "FineProto":
        """A FineProto with `proto`'s weights in the shared layers."""
        new = cls(proto.cv1.conv.in_channels, proto.cv1.conv.out_channels, proto.cv3.conv.out_channels, extra)
        new.load_state_dict(proto.state_dict(), strict=False)
        return new


def proto_stride_of(model: nn.Module) -> int:
    """Stride of the mask prototypes of a segmentation model (4 for stock YOLOv8-seg)."""
    proto = model.model[-1].proto
    extra = len(proto.extra) if isinstance(proto, FineProto) else 0
    return BASE_PROTO_STRIDE // (2**extra)


class ToothSegModel(SegmentationModel):
    """SegmentationModel that standardises its input with stored (mean, std) statistics.

    cfg: ultralytics model yaml (e.g. "yolov8n-seg.yaml"); nc: number of classes (52 FDI);
    mean/std: global pixel statistics in [0, 1] units; proto_stride: 4, 2 or 1.
    """

    def __init__(self, cfg: str | dict = "yolov8n-seg.yaml", ch: int = 3, nc: int | None = None,
                 verbose: bool = False, mean: float = 0.0, std: float = 1.0, proto_stride: int = 4):
        super().__init__(cfg, ch=ch, nc=nc, verbose=verbose)
        if proto_stride not in (1, 2, 4):
            raise ValueError(f"proto_stride must be 4, 2 or 1, got {proto_stride}")
        if proto_stride != BASE_PROTO_STRIDE:
            head = self.model[-1]
            head.proto = FineProto.from_proto(head.proto, extra={2: 1, 1: 2}[proto_stride])
        self.normalisation = (float(mean), float(std))

    def _predict_once(self, x, profile=False, embed=None):
        norm = getattr(self, "normalisation", None)  # unset during the stride probe in __init__
        if norm is not None:
            x = standardise(x, *norm)
        return super()._predict_once(x, profile, embed)
