"""What a backend process loads once and shares between requests: SAM, and one detector per
project at its current version.

Models load lazily on the first `/predict` that needs them, never in `/setup` (which must answer
within Label Studio's 3 s). The current version is read from the registry on every call (one
small file read), so a promotion by the worker is picked up without a restart; the replaced
version's detector is dropped, keeping one model copy per project. A version whose weights cannot
be loaded is logged and the registry's previous current version is served instead: for the
process's life when the file is missing or corrupt, for that request only when the machine was
short of memory or the file system failed (MemoryError, OSError).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backend.detector import Detector
from backend.pipeline import Pipeline, PipelineOptions
from backend.process import set_torch_threads
from backend.registry import Registry, project_key
from backend.settings import Settings

if TYPE_CHECKING:  # segment_anything (and torchvision) load with SAM, on the first request that needs it
    from backend.sam import SamRefiner

logger = logging.getLogger(__name__)

NO_MODEL_VERSION = "toothseg-untrained"


@dataclass
class Served:
    """The model serving a project: its version string and pipeline (None: no model yet)."""

    version: str
    pipeline: Pipeline | None


class Runtime:
    """Process-wide model state. Thread-safe."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry(settings.model_dir)
        self._lock = threading.RLock()
        self._detectors: dict[str, tuple[str, Detector]] = {}  # project -> (version, detector)
        self._broken: set[tuple[str, str]] = set()  # (project, version) that failed to load
        self._refiner: SamRefiner | None = None
        self._refiner_loaded = False
        self._tuned: weakref.WeakKeyDictionary[Detector, SamRefiner] = weakref.WeakKeyDictionary()
        self._base: tuple[str, Detector] | None = None
        self._base_failed = False
        set_torch_threads(settings.torch_threads)
        if settings.sam_checkpoint is None and settings.sam_model_type != "lite_medsam":
            logger.warning("SAM_CHECKPOINT is not set for SAM_MODEL_TYPE=%s: no SAM (interactive prompts get no "
                           "mask; SAM_MODEL_TYPE=lite_medsam needs no checkpoint)", settings.sam_model_type)

    # --- versions (cheap) -----------------------------------------------------------------
    def base_version(self) -> str:
        """Version name before a project's first trained model: from YOLO_WEIGHTS, or 'untrained'."""
        weights = self.settings.yolo_weights
        if weights is None or self._base_failed:
            return NO_MODEL_VERSION
        return f"base-{hashlib.sha1(str(weights.resolve()).encode()).hexdigest()[:8]}"

    def version(self, project) -> str:
        """The version `/setup` reports: the current registry version (or the fallback actually
        served when it failed to load), else the base version. No model is loaded."""
        key = project_key(project)
        for version in self.registry.fallback_chain(key):
            if (key, version) not in self._broken:
                return version
        return self.base_version()

    # --- models (lazy) --------------------------------------------------------------------
    def refiner(self) -> SamRefiner | None:
        """The SAM refiner, built on first use; None without SAM weights (SAM_CHECKPOINT, or the
        packaged LiteMedSAM weights for SAM_MODEL_TYPE=lite_medsam)."""
        with self._lock:
            if not self._refiner_loaded:
                from backend.sam import EmbeddingCache, SamRefiner

                self._refiner_loaded = True
                s = self.settings
                self._refiner = SamRefiner.load(
                    s.sam_model_type, s.sam_checkpoint, s.device,
                    EmbeddingCache(s.embedding_cache_size, s.embedding_cache_dir), runtime=s.sam_runtime,
                    batch_size=s.sam_batch_size, min_iou=s.sam_min_iou, min_agreement=s.sam_min_agreement,
                    tile=s.sam_tile)
            return self._refiner

    def sam_encoder_runtime(self) -> str | None:
        """Where the loaded SAM's image encoder runs (torch, openvino); None before SAM is loaded
        (on the first request that needs it) or without SAM weights."""
        with self._lock:
            return self._refiner.encoder_runtime if self._refiner is not None else None

    def refiner_for(self, detector: Detector | None) -> SamRefiner | None:
        """The SAM serving `detector`'s model: the shipped one, with the prompt encoder and mask
        decoder tuned with that model, and the acceptance thresholds chosen for them, when its
        checkpoint carries them for this SAM (same checkpoint id; the embeddings and their cache
        are shared). SAM_MIN_IOU / SAM_MIN_AGREEMENT apply to the shipped decoder."""
        base = self.refiner()
        tuned = detector.sam_decoder if detector is not None else None
        if base is None or not tuned:
            return base
        if tuned.get("base") != base.checkpoint_id:
            logger.warning("the model's SAM decoder was tuned from %s, not %s (SAM_MODEL_TYPE / SAM_CHECKPOINT): "
                           "serving the shipped decoder", tuned.get("base"), base.checkpoint_id)
            return base
        with self._lock:
            refiner = self._tuned.get(detector)
            if refiner is None:
                refiner = self._tuned[detector] = base.with_decoder(tuned["state"], **tuned.get("thresholds", {}))
            return refiner

    def _load_detector(self, weights: Path) -> Detector:
        return Detector.load(weights, device=self.settings.device, conf=self.settings.detector_conf)

    def detector(self, project) -> tuple[str, Detector | None]:
        """(version, detector) serving `project`: the newest loadable version of its fallback chain,
        else YOLO_WEIGHTS, else (untrained, None)."""
        key = project_key(project)
        with self._lock:
            for version in self.registry.fallback_chain(key):
                if (key, version) in self._broken:
                    continue
                cached = self._detectors.get(key)
                if cached and cached[0] == version:
                    return cached
                try:
                    model = self.registry.get(key, version)
                    detector = self._load_detector(model.weights)
                except Exception as exc:  # serve the previous version
                    transient = isinstance(exc, (MemoryError, OSError)) and not isinstance(exc, FileNotFoundError)
                    logger.error("project %s: model version %s cannot be loaded (%s: %s); falling back to the "
                                 "previous version%s", key, version, exc.__class__.__name__, exc,
                                 ", retried on the next request" if transient else "")
                    if not transient:  # corrupt or missing weights: broken for the process's life
                        self._broken.add((key, version))
                    continue
                logger.info("project %s: loaded model version %s", key, version)
                self._detectors[key] = (version, detector)
                return version, detector
            self._detectors.pop(key, None)
            if self.base_version() != NO_MODEL_VERSION:
                if self._base is None:
                    try:
                        self._base = (self.base_version(), self._load_detector(self.settings.yolo_weights))
                    except Exception as exc:  # e.g. COCO weights: a training start, not a tooth detector
                        logger.warning("YOLO_WEIGHTS %s cannot pre-annotate (%s); it is only used as the starting "
                                       "point of the first training", self.settings.yolo_weights, exc)
                        self._base_failed = True
                        return NO_MODEL_VERSION, None
                return self._base
            return NO_MODEL_VERSION, None

    def serve(self, project, options: PipelineOptions | None = None) -> Served:
        """The pipeline for a project's current model (None before any model exists)."""
        version, detector = self.detector(project)
        if detector is None:
            return Served(version, None)
        opts = options or PipelineOptions.from_settings(self.settings)
        return Served(version, Pipeline(detector, self.refiner_for(detector) if opts.use_sam else None, opts))


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process's Runtime, created from the environment on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(Settings.from_env())
        return _runtime
