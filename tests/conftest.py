"""Shared fixtures: real Redis, a tiny YOLOv8-seg trained here on synthetic X-rays, a small SAM
built by segment_anything's builders, and the backend under gunicorn.

The tiny detector is trained once per test session (about 5 minutes on 2 cores); its weights
are cached under .pytest_cache keyed by the code and data that produce them, so a rerun with
unchanged training code reuses them. `pytest --cache-clear` retrains.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_VERBOSE", "False")

import httpx  # noqa: E402
import pytest  # noqa: E402

import backend  # noqa: E402,F401  (prepares ultralytics for offline use)
from training.ops.stack import PROCESS_ENV, _descendants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HARDENING_TABLE = REPO / "bench" / "results" / "hardening.md"


# --- README's "what we tried and what happened" table -----------------------------------------------

SCENARIOS: dict[str, tuple[str, str, str]] = {}
"""nodeid -> (tried, happened, outcome) of this session's `scenario` tests: "passed", "failed", "skipped"."""


def pytest_configure(config):
    config.addinivalue_line("markers", "scenario(tried, happened): a hardening test, a row of README's table")
    config.addinivalue_line("markers", "last: runs after every other test of the session (it checks their outcomes)")


def pytest_collection_modifyitems(session, config, items):
    """The compose test runs after the others (its 8 GB of images then cannot fill the disk under
    them), and the tests marked `last` after it; the rest keep their order (a stable sort)."""
    items.sort(key=lambda item: 2 if item.get_closest_marker("last") else 1 if item.get_closest_marker("compose")
               else 0)


def pytest_collection_finish(session):
    """Only a whole-suite run (every test file, nothing deselected) rewrites the table."""
    files = {Path(str(i.path)) for i in session.items}
    whole = all(f in files for f in Path(__file__).parent.glob("test_*.py"))
    whole = whole and not session.config.option.keyword and not session.config.option.markexpr
    session.config._scenario_items = [i.nodeid for i in session.items if i.get_closest_marker("scenario")]
    session.config._whole_suite = whole


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("scenario")
    if marker and (report.when == "call" or report.failed or report.skipped):
        result = "passed" if report.passed else "skipped" if report.skipped else "failed"
        if SCENARIOS.get(item.nodeid, (0, 0, "passed"))[2] == "passed":  # a failed setup or teardown sticks
            SCENARIOS[item.nodeid] = (marker.args[0], marker.args[1], result)


def scenario_rows(nodeids) -> dict[tuple[str, str], str]:
    """(tried, happened) -> "yes" / "NO" / "skipped" for this session (parametrised tests share a row)."""
    rows: dict[tuple[str, str], str] = {}
    rank = {"yes": 0, "skipped": 1, "NO": 2}
    for nodeid in nodeids:
        tried, happened, result = SCENARIOS.get(nodeid, (None, None, "skipped"))
        if tried is None:
            continue
        value = {"passed": "yes", "failed": "NO", "skipped": "skipped"}[result]
        old = rows.get((tried, happened), "yes")
        rows[(tried, happened)] = max(old, value, key=rank.__getitem__)
    return rows


def pytest_sessionfinish(session, exitstatus):
    """After a whole-suite run, rewrite the scenario section of bench/results/hardening.md from this
    session's outcomes only (passed, failed or skipped); the mutation section is scripts/mutations.py's."""
    if not getattr(session.config, "_whole_suite", False):
        return
    rows = scenario_rows(session.config._scenario_items)
    lines = [SCENARIO_HEADING, "",
             "Written by the last whole test session (`scripts/test`) from its own outcomes of the tests marked "
             "`scenario`.", "", "| what we tried | what happened | test passed |", "|---|---|---|"]
    lines += [f"| {tried} | {happened} | {result} |" for (tried, happened), result in rows.items()]
    write_section(HARDENING_TABLE, SCENARIO_HEADING, "\n".join(lines))


SCENARIO_HEADING = "## Scenario tests"
MUTATION_HEADING = "## Mutations"


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the `heading` section of the markdown file `path` (or add it), keeping the others."""
    title = "# What we tried and what happened"
    sections = {}
    if path.exists():
        current = None
        for line in path.read_text().splitlines():
            if line.startswith("## "):
                current = line
                sections[current] = []
            elif current is not None:
                sections[current].append(line)
    sections[heading] = text.splitlines()[1:]
    order = [SCENARIO_HEADING, MUTATION_HEADING]
    body = [title, ""]
    for key in sorted(sections, key=lambda k: order.index(k) if k in order else len(order)):
        body += [key, *[line for line in sections[key]]]
        if body[-1] != "":
            body.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(body).rstrip() + "\n")


SYNTH_SIZE = (640, 320)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- Label Studio ----------------------------------------------------------------------------

LS_TOKEN = "toothseg-tests-token-1234"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """Base URL of a Label Studio server shared by the session's tests (its own data dir, legacy
    token LS_TOKEN); tests make their own projects in it."""
    from training.ops.bootstrap import wait_for_label_studio
    from training.ops.stack import Stack

    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.skip(f"no Label Studio venv at {LS_VENV} (scripts/setup creates it)")
    root = tmp_path_factory.mktemp("ls")
    stack = Stack(data=root / "stack", images=root / "images", ls_venv=LS_VENV,
                  env={"LABEL_STUDIO_PORT": str(free_port()), "LABEL_STUDIO_USER_TOKEN": LS_TOKEN})
    argv, env = stack.services()["label-studio"]
    stack.data.mkdir(parents=True)
    log = root / "label-studio.log"
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_label_studio(stack.label_studio_url, 240)
        yield stack.label_studio_url
    finally:
        stop(proc, 30)


@pytest.fixture(scope="session")
def ls_client(label_studio):
    """label-studio-sdk's client of the `label_studio` server."""
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=label_studio, api_key=LS_TOKEN)


# --- Redis -----------------------------------------------------------------------------------

class RedisServer:
    def __init__(self, directory: Path, appendonly: bool = False):
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--protected-mode", "yes"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


# --- rq workers --------------------------------------------------------------------------------

QUEUE = "toothseg-train-test"


def worker_env(redis_url: str, **extra) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_url, "TRAIN_QUEUE": QUEUE, "RETRAIN_MIN_NEW_ANNOTATIONS": "1",
            "PYTHONPATH": str(REPO / "tests"), **{k: str(v) for k, v in extra.items()}}


@pytest.fixture
def start_worker(tmp_path):
    """Start real `rq worker` processes on QUEUE, or on `queues` in priority order (tests/ importable
    for test job functions)."""
    procs = []

    def start(redis_url: str, queues: tuple[str, ...] = (QUEUE,), **extra) -> subprocess.Popen:
        log = tmp_path / f"worker-{len(procs)}.log"
        proc = subprocess.Popen([str(VENV_BIN / "rq"), "worker", *queues, "--url", redis_url, "--with-scheduler",
                                 "--path", str(REPO / "tests"), "--job-monitoring-interval", "5"], cwd=REPO,
                                env=worker_env(redis_url, **extra), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        # a worker stopped mid-job (warm shutdown past stop's wait, then SIGKILL) would leave its work
        # horse and scheduler running into the next test: they are found by pid and killed too
        tree = _descendants(proc.pid)
        if proc.poll() is None:  # warm shutdown; a second SIGTERM is rq's cold one (a job in hand is killed)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        stop(proc)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- data and models ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from training.data.synth import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, n=24, seed=7, size=SYNTH_SIZE, progress=False)
    return out


def _code_hash(*extra: object) -> str:
    h = hashlib.sha1(repr(extra).encode())
    for rel in ("training/data/synth.py", "training/train.py", "training/model_changes.py", "training/dataset.py",
                "training/data/dataset_io.py",
                "backend/yolo_model.py", "backend/preprocess.py", "backend/formats.py"):
        h.update((REPO / rel).read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_weights(request, tmp_path_factory) -> Path:
    """A YOLOv8n-seg trained here on 24 synthetic X-rays (the small preset at imgsz 320, 1000 steps: about
    3 min on 2 cores), cached across sessions by the hash of the code that makes it."""
    from training.data.synth import train_synthetic_detector

    cache = Path(request.config.cache.mkdir("toothseg")) / f"base-{_code_hash(SYNTH_SIZE)}.pt"
    if not cache.exists():
        weights = train_synthetic_detector(tmp_path_factory.mktemp("base-model"), size=SYNTH_SIZE)
        shutil.copyfile(weights, cache)
    return cache


@pytest.fixture(scope="session")
def sam_checkpoint(tmp_path_factory) -> Path:
    """A vit_tiny SAM (segment_anything's builders, random weights), saved as a checkpoint file."""
    import torch

    from backend.sam import SAM_BUILDERS

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(SAM_BUILDERS["vit_tiny"](checkpoint=None).state_dict(), path)
    return path


def register_model(model_dir: Path, project: str, weights: Path, **meta) -> str:
    """Store `weights` as a promoted version of `project` in the registry at `model_dir`."""
    from backend.registry import Registry
    from backend.registry import promote, store_version

    registry = Registry(model_dir)
    version = store_version(registry, project, weights, {"normalisation": {"mean": 0.4, "std": 0.2}, **meta},
                            {"tasks": []})
    promote(registry, project, version.version, "test fixture")
    return version.version


# --- the backend under gunicorn -----------------------------------------------------------------

class BackendServer:
    def __init__(self, env: dict[str, str], log: Path, threads: int = 4):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = env
        cmd = [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{self.port}", "--workers", "1",
               "--threads", str(threads), "--timeout", "600", "backend.app:create_app()"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**PROCESS_ENV, **os.environ, **env},
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.url}/health", 60, self.proc, log)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Kill gunicorn and its worker (their own process group): a graceful stop spends 1.5 s in the
        worker's interpreter teardown (torch), for nothing the tests look at."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def backend_servers(directory: Path):
    """`start(**env)` -> a BackendServer (MODEL_DIR defaults to `directory`/models, logs in
    `directory`); every one started is stopped on exit."""
    servers = []

    def start(**env) -> BackendServer:
        env = {k: str(v) for k, v in env.items()}
        env.setdefault("MODEL_DIR", str(directory / "models"))
        server = BackendServer(env, directory / f"backend-{len(servers)}.log")
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def start_backend(tmp_path):
    with backend_servers(tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def start_module_backend(tmp_path_factory):
    """`start_backend` for backends a module's tests share (tests that only read from them)."""
    with backend_servers(tmp_path_factory.mktemp("backends")) as start:
        yield start


# --- the native stack (end-to-end tests) ----------------------------------------------------------

LS_VENV = Path(os.environ.get("TOOTHSEG_LS_VENV", REPO / ".venv-ls"))


def wait_for(what, predicate, timeout, interval=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def gt_result(sample) -> list[dict]:
    """A synthetic sample's ground truth as brush regions of the shipped labeling config."""
    from backend.formats import find_target, mask_to_regions
    from backend.label_config import render_label_config

    target = find_target(render_label_config())
    return [r for label, mask in sample.masks().items() for r in mask_to_regions(mask, target.value_for(label), target)]


def box_prompt(mask, label: str) -> dict:
    """The region Label Studio's interactive context carries for a rectangle drawn around `mask`
    (H, W bool) with tooth `label` (the shipped config's tooth_box)."""
    import numpy as np

    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    return {"original_width": w, "original_height": h, "image_rotation": 0, "type": "rectanglelabels",
            "from_name": "tooth_box", "to_name": "image", "origin": "manual", "id": "r1",
            "value": {"x": xs.min() / w * 100, "y": ys.min() / h * 100, "width": (xs.max() - xs.min()) / w * 100,
                      "height": (ys.max() - ys.min()) / h * 100, "rotation": 0, "rectanglelabels": [label]}}


def predict_seconds(stack) -> list[float]:
    """Per-task pipeline seconds the backend logged ("task N: K teeth (load 2 ms, ...)")."""
    import re

    text = (stack.data / "logs" / "backend.log").read_text(errors="replace")
    return [sum(int(ms) for ms in re.findall(r"(\d+) ms", m.group(1))) / 1000
            for m in re.finditer(r"backend\.model: task \d+: \d+ teeth \(([^)]*)\)", text)]


QUICK_TRAINING = {"TRAIN_STEPS": 60, "TRAIN_WARM_STEPS": 40, "TRAIN_IMGSZ": 320, "TRAIN_WARMUP_STEPS": 0,
                  "TRAIN_TIME_BUDGET": 0, "TRAIN_REFINER_STEPS": 20, "TRAIN_REFINER_WARM_STEPS": 10}
"""Short retrains for tests about the loop's mechanics (they warm-start from `trained_weights`).
Pre-annotation keeps the product's SCORE_THRESHOLD: at 0.1 such a model's weak candidates are false
teeth (on the 12 seed images of test_e2e_preannotate, 115 wrong regions against 18 at 0.5), and the
first-model gate rightly refuses it."""


@pytest.fixture
def make_stack(tmp_path, trained_weights, sam_checkpoint):
    """A native stack (not started) with `seeds` + `pool` synthetic images of `size`: pool_*.png in
    the imported folder, seed_*.png in a sibling folder the test imports with annotations.
    `yolo_weights`: start from `trained_weights` (YOLO_WEIGHTS); `quick_training`: QUICK_TRAINING
    instead of the product's training defaults. Idle training is off (IDLE_TRAINING_ROUNDS=0) unless
    the test sets it: its rounds would add versions the tests do not expect (tests/test_e2e_idle.py)."""
    import cv2

    from training.ops.stack import Stack
    from training.data.synth import generate

    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.skip(f"no Label Studio venv at {LS_VENV} (scripts/setup creates it)")
    stacks = []

    def make(seeds: int, pool: int, token: str, size: tuple[int, int] = SYNTH_SIZE, yolo_weights: bool = True,
             quick_training: bool = True, **env) -> Stack:
        files = tmp_path / "files"
        images, seed_dir = files / "images", files / "seed"
        images.mkdir(parents=True)
        seed_dir.mkdir()
        samples = {}
        for i in range(seeds + pool):
            sample = generate(9000 + i, size)
            name = f"{'seed' if i < seeds else 'pool'}_{i:02d}.png"
            cv2.imwrite(str((seed_dir if i < seeds else images) / name), sample.image)
            samples[name] = sample
        settings = {
            "LABEL_STUDIO_PORT": free_port(), "BACKEND_PORT": free_port(), "REDIS_PORT": free_port(),
            "LABEL_STUDIO_USER_TOKEN": token, "YOLO_WEIGHTS": trained_weights if yolo_weights else "",
            "SAM_CHECKPOINT": sam_checkpoint, "SAM_MODEL_TYPE": "vit_tiny", "SAM_PREANNOTATE": "true",
            "RETRAIN_MIN_NEW_ANNOTATIONS": 5,
            "TRAIN_AFTER_ANNOTATIONS": 0, "YOLO_VERBOSE": "False", "IDLE_TRAINING_ROUNDS": 0,
            **(QUICK_TRAINING if quick_training else {}), **env,
        }
        stack = Stack(data=tmp_path / "stack", images=images, env={k: str(v) for k, v in settings.items()},
                      ls_venv=LS_VENV)
        stack.samples = samples
        stack.seed_dir = seed_dir
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.down()


def import_seeds(client, project: int, stack) -> list[str]:
    """Import the seed images as tasks with ground-truth annotations (served by a second storage)."""
    client.import_storage.local.create(project=project, path=str(stack.seed_dir), use_blob_urls=True, title="seed")
    seeds = sorted(n for n in stack.samples if n.startswith("seed"))
    client.projects.import_tasks(id=project, request=[
        {"data": {"image": f"/data/local-files/?d=seed/{n}"},
         "annotations": [{"result": gt_result(stack.samples[n]), "ground_truth": True}]} for n in seeds])
    return seeds
