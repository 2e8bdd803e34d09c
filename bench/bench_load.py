"""Concurrent /predict load: latency percentiles and peak memory of the backend process.

    .venv/bin/python bench/bench_load.py [--requests 20] [--concurrency 20] [--size 2000x1000]
                                         [--sam vit_b] [--weights best.pt] [--out bench/results/load.md]

Starts the backend under gunicorn (1 worker, 4 threads, as in docker-compose.yml) with a registered
detector and SAM (real architecture, random weights), then sends `--requests` one-task /predict
requests for different synthetic panoramics, `--concurrency` at a time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
from bench.bench_predict import detector_weights, machine  # noqa: E402
from bench.bench_preannotate import free_port  # noqa: E402
from training.promotion import promote, store_version  # noqa: E402
from training.stack import _descendants, backend_command  # noqa: E402
from training.synth import generate  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", default="2000x1000")
    parser.add_argument("--sam", default="vit_b", choices=sorted(SAM_BUILDERS))
    parser.add_argument("--weights")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "load.md"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    weights = detector_weights(args)
    root = Path(tempfile.mkdtemp(prefix="toothseg-bench-load-"))
    (root / "files" / "images").mkdir(parents=True)
    for i in range(args.requests):
        cv2.imwrite(str(root / "files" / "images" / f"p{i}.png"), generate(900 + i, (width, height)).image)
    torch.manual_seed(0)
    torch.save(SAM_BUILDERS[args.sam](checkpoint=None).state_dict(), root / "sam.pth")
    registry = Registry(root / "models")
    version = store_version(registry, "1", weights, {}, {"tasks": []}).version
    promote(registry, "1", version, "bench")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "gunicorn"), *backend_command(f"127.0.0.1:{port}")[1:]]
    env = {**os.environ, "MODEL_DIR": str(root / "models"), "SAM_CHECKPOINT": str(root / "sam.pth"),
           "SAM_MODEL_TYPE": args.sam, "LOCAL_FILES_DOCUMENT_ROOT": str(root / "files"), "YOLO_VERBOSE": "False"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(root / "backend.log", "wb"), stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        config = render_label_config()

        def one(i: int) -> tuple[int, float]:
            body = {"tasks": [{"id": i, "data": {"image": f"/data/local-files/?d=images/p{i}.png"}}],
                    "project": "1.1", "label_config": config, "params": {"context": None}}
            t = time.perf_counter()
            r = httpx.post(f"http://127.0.0.1:{port}/predict", json=body, timeout=3600)
            return r.status_code, time.perf_counter() - t

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
        workers = _descendants(proc.pid)
        peak = max(int(next(line.split()[1] for line in open(f"/proc/{w}/status") if line.startswith("VmHWM:")))
                   for w in workers) / 1024
    finally:
        proc.terminate()
        proc.wait(30)
    latencies = [t for _, t in answers]
    ok = sum(code == 200 for code, _ in answers)
    lines = [
        "# Concurrent /predict load",
        "",
        f"Command: `.venv/bin/python bench/bench_load.py --requests {args.requests} --concurrency "
        f"{args.concurrency} --size {args.size} --sam {args.sam}`",
        f"Machine: {machine()}",
        f"Backend: gunicorn, 1 worker, 4 threads; SAM {args.sam} (random weights); one-task requests for "
        f"{args.requests} different {width}x{height} synthetic panoramics, {args.concurrency} at a time.",
        "",
        "| answered 200 | p50 latency (s) | p95 latency (s) | max (s) | wall (s) | throughput (img/min) "
        "| peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
        f"| {ok}/{args.requests} | {statistics.median(latencies):.1f} | {percentile(latencies, 0.95):.1f} | "
        f"{max(latencies):.1f} | {wall:.0f} | {args.requests / wall * 60:.1f} | {peak:.0f} |",
        "",
        "Requests queue on the one SAM predictor (one image at a time per process): latency grows with the "
        "queue, memory does not.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
