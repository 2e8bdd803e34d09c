"""Where SAM's image encoder runs: torch, or OpenVINO on the CPU (SAM_RUNTIME).

The image encoder is most of a cold SAM pass on a CPU; OpenVINO runs the same weights, in fp32,
2.6x faster for LiteMedSAM and 2x for ViT-B on 2 cores with the same embedding (cosine 1.0000,
`bench/results/sam_encoder.md`). The prompt encoder and the mask decoder stay in torch (they are
what `training.sam_training` tunes).

The encoder is converted once per machine with `openvino.convert_model` (LiteMedSAM about 10 s,
ViT-B about 80 s on 2 cores) and kept in `cache_dir`, keyed by the checkpoint's identity, the
encoder's input size and the OpenVINO version: another checkpoint, input size or OpenVINO converts
again. A conversion is written to a temporary folder and renamed into place, under a file lock, so
processes starting at once convert once and none reads a half-written model. Anything that keeps
OpenVINO from serving (not installed, a conversion or compilation error) leaves the encoder in
torch, with one warning in the log.
"""
from __future__ import annotations

import fcntl
import logging
import re
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "openvino")
ENCODER_FILE = "encoder.xml"


def openvino_version() -> str:
    import openvino

    return openvino.get_version()


def default_cache_dir(embedding_cache_dir: Path | None) -> Path:
    """Converted encoders live next to the SAM embeddings (EMBEDDING_CACHE_DIR/openvino), else in
    the user's cache folder (~/.cache/toothseg/openvino)."""
    if embedding_cache_dir is not None:
        return Path(embedding_cache_dir) / "openvino"
    return Path.home() / ".cache" / "toothseg" / "openvino"


def cache_key(checkpoint_id: str, img_size: int, version: str) -> str:
    """The folder name of a converted encoder: checkpoint identity, input size, OpenVINO version."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{checkpoint_id}-{img_size}px-ov{version}")


class OpenVinoEncoder(torch.nn.Module):
    """An OpenVINO-compiled SAM image encoder with the torch module's interface (`img_size`,
    `forward(x) -> features`). Frozen: a deep copy (as `tune_sam` makes of the SAM) shares it, and
    so do the refiners of tuned decoders (`SamRefiner.with_decoder`), each with its own lock: the
    compiled model's one infer request is held by one call at a time."""

    runtime = "openvino"

    def __init__(self, compiled, img_size: int, path: Path, converted: bool):
        super().__init__()
        self.compiled = compiled
        self.img_size = img_size
        self.path = path
        self.converted = converted  # whether this process converted it (False: read from the cache)
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            out = self.compiled(x.detach().to("cpu", torch.float32).numpy())[0]
            return torch.from_numpy(np.array(out))

    def __deepcopy__(self, memo):
        return self


def openvino_encoder(encoder: torch.nn.Module, checkpoint_id: str, cache_dir: Path, threads: int) -> OpenVinoEncoder:
    """`encoder` (a SAM image encoder in torch, `img_size` square input) compiled by OpenVINO for
    the CPU in fp32 with `threads` threads; converted and stored in `cache_dir` unless it is there."""
    import openvino as ov

    size = int(encoder.img_size)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / cache_key(checkpoint_id, size, openvino_version())
    converted = False
    with open(cache_dir / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time; the others wait and read its result
        if not (target / ENCODER_FILE).exists():
            start = time.perf_counter()
            work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit's tracer warnings on SAM's shape arithmetic
                    model = ov.convert_model(encoder.eval(), example_input=torch.zeros(1, 3, size, size))
                ov.save_model(model, work / ENCODER_FILE, compress_to_fp16=False)
                shutil.rmtree(target, ignore_errors=True)  # a leftover without its model file
                work.rename(target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            converted = True
            logger.info("converted the SAM image encoder to OpenVINO in %.0f s: %s", time.perf_counter() - start,
                        target)
    compiled = ov.Core().compile_model(target / ENCODER_FILE, "CPU", {"INFERENCE_NUM_THREADS": max(1, threads),
                                                                      "INFERENCE_PRECISION_HINT": "f32"})
    return OpenVinoEncoder(compiled, size, target, converted)


def use_runtime(sam, runtime: str, checkpoint_id: str, cache_dir: Path, device: str = "cpu") -> str:
    """Run `sam`'s image encoder on `runtime` (one of RUNTIMES); returns the runtime that serves:
    torch when OpenVINO was asked for but cannot serve (logged once, with the reason)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown SAM_RUNTIME {runtime!r} (one of {', '.join(RUNTIMES)})")
    if runtime == "torch":
        return "torch"
    if torch.device(device).type != "cpu":
        logger.warning("SAM_RUNTIME=openvino runs on the CPU; DEVICE=%s: SAM's image encoder runs in torch", device)
        return "torch"
    try:
        sam.image_encoder = openvino_encoder(sam.image_encoder, checkpoint_id, cache_dir, torch.get_num_threads())
    except ImportError as exc:
        logger.warning("SAM_RUNTIME=openvino cannot serve: openvino is not installed (%s; pip install openvino): "
                       "SAM's image encoder runs in torch", exc)
        return "torch"
    except Exception as exc:  # not installed, or it cannot convert / compile this encoder
        logger.warning("SAM_RUNTIME=openvino cannot serve (%s: %s): SAM's image encoder runs in torch",
                       exc.__class__.__name__, exc)
        return "torch"
    return "openvino"
