"""The docker-compose stack without Docker: `toothseg stack up | down | status`.

Runs the same five services as docker-compose.yml, as local processes with the same commands
and environment variables: redis-server (append-only), Label Studio (from its own venv), the
backend under gunicorn, an `rq worker`, and the one-shot bootstrap. Logs go to
<data>/logs/<service>.log, process ids to <data>/stack.json; `down` stops them (SIGTERM, then
SIGKILL after a grace period). Settings come from the environment, then `.env`, then defaults
(the same names docker-compose.yml reads).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]

DEFAULTS = {
    "LABEL_STUDIO_PORT": "8080",
    "BACKEND_PORT": "9090",
    "REDIS_PORT": "6379",
    "LABEL_STUDIO_USERNAME": "admin@toothseg.local",
    "LABEL_STUDIO_PASSWORD": "toothseg-admin",
    "LABEL_STUDIO_USER_TOKEN": "toothseg-dev-token-change-me",
    "PROJECT_TITLE": "toothseg",
    "TRAIN_AFTER_ANNOTATIONS": "10",
    "RETRAIN_MIN_NEW_ANNOTATIONS": "10",
    "TRAIN_QUEUE": "toothseg-train",
    "PREANNOTATE_QUEUE": "toothseg-preannotate",
    "IDLE_QUEUE": "toothseg-idle",
}

# Variables the backend and the worker get, in both the compose file and the native stack.
APP_ENV = ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL", "MODEL_DIR", "SAM_CHECKPOINT", "SAM_MODEL_TYPE",
           "SAM_PREANNOTATE", "SAM_RUNTIME", "YOLO_WEIGHTS", "LOCAL_FILES_DOCUMENT_ROOT", "EMBEDDING_CACHE_DIR",
           "RETRAIN_MIN_NEW_ANNOTATIONS",
           "TRAIN_QUEUE", "PREANNOTATE_QUEUE", "IDLE_QUEUE", "LABEL_STUDIO_ML_BACKEND_V2", "DEVICE", "BASIC_AUTH_USER",
           "BASIC_AUTH_PASS", "WEBHOOK_SECRET")
# Of those, the ones the Docker image sets itself and docker-compose.yml leaves to it (.env may still
# set them): SAM_CHECKPOINT is the checkpoint the build fetched, or empty for LiteMedSAM's packaged weights.
IMAGE_ENV = ("SAM_CHECKPOINT",)
# Variables of the Label Studio service (both places).
LABEL_STUDIO_ENV = ("LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN", "ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED",
                    "LOCAL_FILES_SERVING_ENABLED", "LOCAL_FILES_DOCUMENT_ROOT", "LABEL_STUDIO_USERNAME",
                    "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN", "LATEST_VERSION_CHECK")


PROCESS_ENV = {"MALLOC_ARENA_MAX": "2"}
"""Set for the backend and the worker (the Dockerfile's ENV, the native stack, the tests' servers)
unless the environment sets them. glibc otherwise gives each of gunicorn's threads its own malloc
arena (up to 8 per core), and memory one thread frees the others do not reuse: 20 concurrent
/predicts (tests/test_load.py, SAM vit_tiny) peaked at 2147-2196 MB RSS with glibc's default and
1728-1825 MB with 2 arenas (3 and 2 runs; SAM ViT-B: bench/results/load.md)."""
LABEL_STUDIO_PASSED = ("ML_TIMEOUT_PREDICT",)
"""Label Studio's own settings that `Stack(env=...)` passes to Label Studio: ML_TIMEOUT_PREDICT, the
seconds it waits for one `/predict` (its default 100)."""


def backend_command(bind: str) -> list[str]:
    return ["gunicorn", "--bind", bind, "--workers", "1", "--threads", "4", "--timeout", "600",
            "backend.app:create_app()"]


def worker_command(redis_url: str, train_queue: str, preannotate_queue: str, idle_queue: str) -> list[str]:
    """The worker's queues in priority order: retraining, pre-annotation, idle training."""
    return ["rq", "worker", "--url", redis_url, "--with-scheduler", train_queue, preannotate_queue, idle_queue]


BOOTSTRAP_COMMAND = ["toothseg", "bootstrap"]


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments and blank lines skipped, quotes stripped)."""
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip().strip("'\"")
    return values


@dataclass
class Stack:
    """The native stack's layout: `data` holds every service's state and logs."""

    data: Path
    images: Path
    env: dict[str, str] = field(default_factory=dict)
    ls_venv: Path = REPO / ".venv-ls"

    def __post_init__(self):
        self.data = Path(self.data).resolve()
        self.images = Path(self.images).resolve()
        merged = {**DEFAULTS, **read_dotenv(REPO / ".env"), **os.environ, **self.env}
        self.env = {k: str(v) for k, v in merged.items()}

    def setting(self, key: str) -> str:
        return self.env[key]

    @property
    def label_studio_url(self) -> str:
        return f"http://127.0.0.1:{self.setting('LABEL_STUDIO_PORT')}"

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.setting('BACKEND_PORT')}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.setting('REDIS_PORT')}/0"

    def app_env(self) -> dict[str, str]:
        """Environment of the backend, worker and bootstrap (names as in docker-compose.yml)."""
        env = {
            "LABEL_STUDIO_URL": self.label_studio_url,
            "LABEL_STUDIO_API_KEY": self.setting("LABEL_STUDIO_USER_TOKEN"),
            "REDIS_URL": self.redis_url,
            "MODEL_DIR": str(self.data / "models"),
            "SAM_CHECKPOINT": self.env.get("SAM_CHECKPOINT", ""),
            "SAM_MODEL_TYPE": self.env.get("SAM_MODEL_TYPE", "lite_medsam"),
            "SAM_PREANNOTATE": self.env.get("SAM_PREANNOTATE", "false"),
            "SAM_RUNTIME": self.env.get("SAM_RUNTIME", "openvino"),
            "YOLO_WEIGHTS": self.env.get("YOLO_WEIGHTS", ""),
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.images.parent),
            "EMBEDDING_CACHE_DIR": str(self.data / "embeddings"),
            "RETRAIN_MIN_NEW_ANNOTATIONS": self.setting("RETRAIN_MIN_NEW_ANNOTATIONS"),
            "TRAIN_QUEUE": self.setting("TRAIN_QUEUE"),
            "PREANNOTATE_QUEUE": self.setting("PREANNOTATE_QUEUE"),
            "LABEL_STUDIO_ML_BACKEND_V2": "1",
            "DEVICE": self.env.get("DEVICE", "cpu"),
            "BASIC_AUTH_USER": self.env.get("BASIC_AUTH_USER", ""),
            "BASIC_AUTH_PASS": self.env.get("BASIC_AUTH_PASS", ""),
            "WEBHOOK_SECRET": self.env.get("WEBHOOK_SECRET", ""),
        }
        from backend.settings import settings_table

        known = {name for name, _, _ in settings_table()}
        prefixes = ("TRAIN_", "YOLO_", "BASIC_AUTH_")
        extra = {k: v for k, v in self.env.items() if k in known or k.startswith(prefixes)}
        return {**PROCESS_ENV, **os.environ, **extra, **env}

    def label_studio_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.images.parent),
            "LABEL_STUDIO_USERNAME": self.setting("LABEL_STUDIO_USERNAME"),
            "LABEL_STUDIO_PASSWORD": self.setting("LABEL_STUDIO_PASSWORD"),
            "LABEL_STUDIO_USER_TOKEN": self.setting("LABEL_STUDIO_USER_TOKEN"),
            "LATEST_VERSION_CHECK": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            # Label Studio's own settings that a stack's env may give
            **{k: v for k, v in self.env.items() if k in LABEL_STUDIO_PASSED},
        }

    def services(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        """name -> (argv, env) of the long-running services, in start order."""
        bin_dir = Path(sys.executable).parent
        redis_dir = self.data / "redis"
        return {
            "redis": ([shutil.which("redis-server") or "redis-server", "--port", self.setting("REDIS_PORT"),
                       "--bind", "127.0.0.1", "--appendonly", "yes", "--dir", str(redis_dir)], dict(os.environ)),
            "label-studio": ([str(self.ls_venv / "bin" / "label-studio"), "start", "--no-browser",
                              "--data-dir", str(self.data / "label-studio"),
                              "--port", self.setting("LABEL_STUDIO_PORT"), "--internal-host", "127.0.0.1"],
                             self.label_studio_env()),
            "backend": ([str(bin_dir / backend_command("")[0]), *backend_command(
                f"127.0.0.1:{self.setting('BACKEND_PORT')}")[1:]], self.app_env()),
            "worker": ([str(bin_dir / "rq"), *worker_command(self.redis_url, self.setting("TRAIN_QUEUE"),
                                                             self.setting("PREANNOTATE_QUEUE"),
                                                             self.setting("IDLE_QUEUE"))[1:]], self.app_env()),
        }

    def bootstrap_env(self) -> dict[str, str]:
        return {**self.app_env(), "BACKEND_URL": self.backend_url, "PROJECT_TITLE": self.setting("PROJECT_TITLE"),
                "IMAGES_DIR": str(self.images), "TRAIN_AFTER_ANNOTATIONS": self.setting("TRAIN_AFTER_ANNOTATIONS"),
                "LABEL_CONFIG_PATH": str(REPO / "label_studio_config.xml")}

    # --- process control -----------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.data / "stack.json"

    def _check_ports(self) -> None:
        for key in ("REDIS_PORT", "LABEL_STUDIO_PORT", "BACKEND_PORT"):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", int(self.setting(key)))) == 0:
                    raise RuntimeError(f"port {self.setting(key)} ({key}) is already in use: is a stack running? "
                                       f"(`toothseg stack down --data {self.data}`)")

    def up(self, wait: float = 600.0) -> dict:
        """Start every service and run the bootstrap; returns the bootstrap's result."""
        self._check_ports()
        (self.data / "logs").mkdir(parents=True, exist_ok=True)
        (self.data / "redis").mkdir(parents=True, exist_ok=True)
        self.images.mkdir(parents=True, exist_ok=True)
        pids = {}
        for name, (argv, env) in self.services().items():
            log = open(self.data / "logs" / f"{name}.log", "ab")
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            pids[name] = proc.pid
            self.state_file.write_text(json.dumps(pids))
            if name == "redis":
                _wait_port(int(self.setting("REDIS_PORT")), 20, proc)
            if name == "backend":
                _wait_http(f"{self.backend_url}/health", 120, proc)
        log = open(self.data / "logs" / "bootstrap.log", "ab")
        result = subprocess.run([str(Path(sys.executable).parent / "toothseg"), "bootstrap", "--json",
                                 "--wait", str(wait)], cwd=REPO, env=self.bootstrap_env(), stdout=subprocess.PIPE,
                                stderr=log, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"bootstrap failed (see {self.data / 'logs' / 'bootstrap.log'})")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def pids(self) -> dict[str, int]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def status(self) -> dict[str, bool]:
        return {name: _alive(pid) for name, pid in self.pids().items()}

    def down(self, grace: float = 20.0) -> None:
        """Stop every service (process groups: gunicorn and rq children too), reverse start order."""
        for pid in reversed(list(self.pids().values())):
            _stop_group(pid, grace)
        self.state_file.unlink(missing_ok=True)

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for log in sorted((self.data / "logs").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {log.name} -----\n" + "\n".join(text))
        return "\n".join(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc), e.g. gunicorn workers and rq work horses, which
    rq puts in process groups of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop_group(pid: int, grace: float) -> None:
    """SIGTERM the service's process group (twice: an rq worker's second SIGTERM is its cold
    shutdown, which stops the running job), then SIGKILL whatever is left, descendants included."""
    below = _descendants(pid)
    for _ in range(2):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (_alive(pid) or any(_alive(p) for p in below)):
        time.sleep(0.2)
    for target in [pid, *below, *_descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout} s")
