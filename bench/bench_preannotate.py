"""Background pre-annotation throughput, cold and warm, and the delay it adds to interactive /predict.

    .venv/bin/python bench/bench_preannotate.py [--tasks 12] [--size 2000x1000] [--weights best.pt]
                                                [--sam lite_medsam] [--sam-runtime openvino]
                                                [--sam-preannotate false] [--out bench/results/preannotate.md]

Runs the native stack (redis, Label Studio 1.23.2, backend, worker), imports `--tasks` synthetic
panoramics, stores the detector as the project's current version and times the worker's pass
(tasks with a saved prediction per minute): cold (no SAM embeddings cached) and warm (a second
version, as after a retrain: embeddings come from the shared disk cache). Meanwhile and afterwards
it sends interactive one-task /predict requests for other images (after one warm-up request, so
model loading is not timed) and reports their latency with the pass running and with the worker
idle. The SAM settings are the product's defaults unless given: LiteMedSAM with its packaged
weights (another SAM type: its architecture with random weights, the same cost), SAM_RUNTIME, and
SAM_PREANNOTATE (false: the pass does not run SAM; true: SAM redraws every tooth's mask).
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import backend  # noqa: E402,F401
import torch  # noqa: E402

from backend.label_config import render_label_config  # noqa: E402
from backend.registry import Registry  # noqa: E402
from backend.sam import SAM_BUILDERS  # noqa: E402
from backend.sam_runtime import RUNTIMES  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.bench_predict import detector_weights, machine, write_report  # noqa: E402
from backend.registry import promote, store_version  # noqa: E402
from training.ops.stack import Stack  # noqa: E402
from training.data.synth import generate  # noqa: E402

TOKEN = "bench-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_pass(client, project: int, registry: Registry, weights: Path, stack: Stack, n: int,
               probe=None) -> float:
    """Store `weights` as a new current version, queue its pass, return seconds until every task has it."""
    import subprocess

    version = store_version(registry, project, weights, {"normalisation": {}}, {"tasks": []}).version
    promote(registry, project, version, "bench")
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "toothseg"), "preannotate", "--project", str(project)],
                   env=stack.app_env(), check=True, capture_output=True)
    if probe:
        probe.start()
    while sum(p.model_version == version for p in client.predictions.list(project=project)) < n:
        time.sleep(1)
    return time.perf_counter() - start


def interactive(stack: Stack, project: int, names: list[str], results: list[float]) -> None:
    """One-task /predict requests for `names` (images not in the pass), latencies appended to `results`."""
    config = render_label_config()
    for name in names:
        body = {"tasks": [{"id": 10**6 + len(results), "data": {"image": f"/data/local-files/?d=probe/{name}"}}],
                "project": f"{project}.1", "label_config": config, "params": {"context": None}}
        t = time.perf_counter()
        r = httpx.post(f"{stack.backend_url}/predict", json=body, timeout=600)
        r.raise_for_status()
        results.append(time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--size", default="2000x1000")
    parser.add_argument("--weights")
    defaults = Settings.from_env({})
    parser.add_argument("--sam", default=defaults.sam_model_type, choices=sorted(SAM_BUILDERS))
    parser.add_argument("--sam-runtime", default=defaults.sam_runtime, choices=RUNTIMES)
    parser.add_argument("--sam-preannotate", default=str(defaults.sam_preannotate).lower(), choices=("false", "true"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "preannotate.md"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    weights = detector_weights(args)
    root = Path(tempfile.mkdtemp(prefix="toothseg-bench-pass-"))
    images, probe_dir = root / "files" / "images", root / "files" / "probe"
    images.mkdir(parents=True)
    probe_dir.mkdir()
    for i in range(args.tasks):
        cv2.imwrite(str(images / f"pool_{i:03d}.png"), generate(700 + i, (width, height)).image)
    probe_names = []
    for i in range(2 * args.probes + 1):
        name = f"probe_{i}.png"
        cv2.imwrite(str(probe_dir / name), generate(800 + i, (width, height)).image)
        probe_names.append(name)
    sam_path = ""
    if args.sam != "lite_medsam":  # LiteMedSAM: its packaged weights; the others: random weights, the same cost
        torch.manual_seed(0)
        sam_path = root / "sam.pth"
        torch.save(SAM_BUILDERS[args.sam](checkpoint=None).state_dict(), sam_path)
    env = {"LABEL_STUDIO_PORT": str(free_port()), "BACKEND_PORT": str(free_port()), "REDIS_PORT": str(free_port()),
           "LABEL_STUDIO_USER_TOKEN": TOKEN, "SAM_CHECKPOINT": str(sam_path), "SAM_MODEL_TYPE": args.sam,
           "SAM_RUNTIME": args.sam_runtime, "SAM_PREANNOTATE": args.sam_preannotate,
           "PREDICT_BATCH_LIMIT": "0", "YOLO_VERBOSE": "False", "PREANNOTATE_CHUNK": "1000"}
    stack = Stack(data=root / "stack", images=images, env=env)
    try:
        from label_studio_sdk import LabelStudio

        project = stack.up()["project"]
        client = LabelStudio(base_url=stack.label_studio_url, api_key=TOKEN)
        client.import_storage.local.create(project=project, path=str(probe_dir), use_blob_urls=True, title="probe")
        registry = Registry(stack.data / "models")
        version = store_version(registry, project, weights, {"normalisation": {}}, {"tasks": []}).version
        promote(registry, project, version, "bench warm-up")
        interactive(stack, project, probe_names[-1:], [])  # the backend loads its models before timing starts

        busy: list[float] = []
        probe = threading.Thread(target=interactive, args=(stack, project, probe_names[:args.probes], busy))
        cold = timed_pass(client, project, registry, weights, stack, args.tasks, probe)
        probe.join()
        warm = timed_pass(client, project, registry, weights, stack, args.tasks)
        idle: list[float] = []
        interactive(stack, project, probe_names[args.probes:2 * args.probes], idle)
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)

    busy_med, idle_med = statistics.median(busy), statistics.median(idle)
    lines = [
        "# Background pre-annotation",
        "",
        f"Command: `{shlex.join(['.venv/bin/python', 'bench/bench_preannotate.py', *sys.argv[1:]])}`",
        f"Machine: {machine()}",
        f"{args.tasks} synthetic panoramics {width}x{height}, SAM {args.sam} "
        f"({'its packaged weights' if args.sam == 'lite_medsam' else 'random weights'}), "
        f"SAM_RUNTIME={args.sam_runtime}, SAM_PREANNOTATE={args.sam_preannotate}, one rq worker "
        f"(WORKER_NICE default), backend under gunicorn, Label Studio 1.23.2, all on this machine.",
        "",
        "| pass | seconds | tasks per minute |",
        "|---|---|---|",
        f"| cold (no embeddings cached) | {cold:.0f} | {args.tasks / cold * 60:.1f} |",
        f"| warm (after a retrain: embeddings on disk) | {warm:.0f} | {args.tasks / warm * 60:.1f} |",
        f"| warm / cold time | {warm / cold:.2f}x | |",
        "",
        "| interactive one-task /predict (new image, cold) | median seconds | n |",
        "|---|---|---|",
        f"| while the cold pass runs | {busy_med:.1f} | {len(busy)} |",
        f"| worker idle | {idle_med:.1f} | {len(idle)} |",
        f"| delay added by the pass | {busy_med - idle_med:+.1f} ({busy_med / idle_med:.2f}x) | |",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
