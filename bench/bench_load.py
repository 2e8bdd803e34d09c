"""Concurrent /predict load: latency percentiles and peak memory of the backend process.

    .venv/bin/python bench/bench_load.py [--requests 20] [--concurrency 20] [--size 2000x1000]
                                         [--sam vit_b] [--weights best.pt] [--arenas 2 glibc]
                                         [--out bench/results/load.md]

Starts the backend under gunicorn (1 worker, 4 threads, as in docker-compose.yml) with a registered
detector and SAM (real architecture, random weights), then sends `--requests` one-task /predict
requests for different synthetic panoramics, `--concurrency` at a time. Once per `--arenas` value
(MALLOC_ARENA_MAX; "glibc": unset, glibc's default), each with a fresh server, in the same run:
the first is the product's setting (`training.ops.stack.PROCESS_ENV`).
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
from bench.bench_predict import detector_weights, machine, write_report  # noqa: E402
from bench.bench_preannotate import free_port  # noqa: E402
from backend.registry import promote, store_version  # noqa: E402
from training.ops.stack import PROCESS_ENV, _descendants, backend_command  # noqa: E402
from training.data.synth import generate  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class BenchBackend:
    """The backend under gunicorn (as in docker-compose.yml) with a registered detector and SAM (real
    architecture, random weights), serving `images` synthetic panoramics p0.png ... from a temp dir."""

    def __init__(self, images: int, size: tuple[int, int], sam: str, weights: Path,
                 arenas: str = PROCESS_ENV["MALLOC_ARENA_MAX"]):
        self.root = Path(tempfile.mkdtemp(prefix="toothseg-bench-"))
        (self.root / "files" / "images").mkdir(parents=True)
        for i in range(images):
            cv2.imwrite(str(self.root / "files" / "images" / f"p{i}.png"), generate(900 + i, size).image)
        torch.manual_seed(0)
        torch.save(SAM_BUILDERS[sam](checkpoint=None).state_dict(), self.root / "sam.pth")
        registry = Registry(self.root / "models")
        version = store_version(registry, "1", weights, {}, {"tasks": []}).version
        promote(registry, "1", version, "bench")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(Path(sys.executable).parent / "gunicorn"), *backend_command(f"127.0.0.1:{self.port}")[1:]]
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        if arenas != "glibc":
            env["MALLOC_ARENA_MAX"] = arenas
        env = {**env, "MODEL_DIR": str(self.root / "models"), "SAM_CHECKPOINT": str(self.root / "sam.pth"),
               "SAM_MODEL_TYPE": sam, "LOCAL_FILES_DOCUMENT_ROOT": str(self.root / "files"), "YOLO_VERBOSE": "False"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(self.root / "backend.log", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.config = render_label_config()
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"backend did not start: see {self.root / 'backend.log'}")

    def predict(self, ids: list[int]) -> tuple[httpx.Response, float]:
        """One /predict for the tasks with these image numbers, as Label Studio sends it."""
        body = {"tasks": [{"id": i, "data": {"image": f"/data/local-files/?d=images/p{i}.png"}} for i in ids],
                "project": "1.1", "label_config": self.config, "params": {"context": None}}
        t = time.perf_counter()
        r = httpx.post(f"{self.url}/predict", json=body, timeout=3600)
        return r, time.perf_counter() - t

    def peak_rss_mb(self) -> float:
        """Peak resident memory (VmHWM) of the largest backend process (gunicorn's worker)."""
        return max(int(next(line.split()[1] for line in open(f"/proc/{w}/status") if line.startswith("VmHWM:")))
                   for w in _descendants(self.proc.pid)) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run(args: argparse.Namespace, arenas: str) -> tuple[list[tuple[int, float]], float, float]:
    """([(status, latency s)] per request, wall s, peak RSS MB) with a fresh server."""
    width, height = (int(v) for v in args.size.split("x"))
    server = BenchBackend(args.requests, (width, height), args.sam, detector_weights(args), arenas)
    try:
        def one(i: int) -> tuple[int, float]:
            r, seconds = server.predict([i])
            return r.status_code, seconds

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(one, range(args.requests)))
        return answers, time.perf_counter() - start, server.peak_rss_mb()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", default="2000x1000")
    parser.add_argument("--sam", default="vit_b", choices=sorted(SAM_BUILDERS))
    parser.add_argument("--weights")
    product = PROCESS_ENV["MALLOC_ARENA_MAX"]
    parser.add_argument("--arenas", nargs="+", default=[product, "glibc"],
                        help=f"MALLOC_ARENA_MAX values, one run each (glibc: unset; default: {product} glibc)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "load.md"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    rows = []
    for arenas in args.arenas:
        answers, wall, peak = run(args, arenas)
        latencies = [t for _, t in answers]
        ok = sum(code == 200 for code, _ in answers)
        name = ("unset (glibc's default: 8 per core)" if arenas == "glibc"
                else arenas + (" (toothseg's setting)" if arenas == product else ""))
        rows.append(f"| {name} | {ok}/{args.requests} | {statistics.median(latencies):.1f} | "
                    f"{percentile(latencies, 0.95):.1f} | {max(latencies):.1f} | {wall:.0f} | "
                    f"{args.requests / wall * 60:.1f} | {peak:.0f} |")
        print(rows[-1], flush=True)
    lines = [
        "# Concurrent /predict load",
        "",
        f"Command: `.venv/bin/python bench/bench_load.py --requests {args.requests} --concurrency "
        f"{args.concurrency} --size {args.size} --sam {args.sam} --arenas {' '.join(args.arenas)}`",
        f"Machine: {machine()}",
        f"Backend: gunicorn, 1 worker, 4 threads; SAM {args.sam} (random weights); one-task requests for "
        f"{args.requests} different {width}x{height} synthetic panoramics, {args.concurrency} at a time; "
        "one fresh server per row, rows in order, same run.",
        "",
        "| MALLOC_ARENA_MAX | answered 200 | p50 latency (s) | p95 latency (s) | max (s) | wall (s) "
        "| throughput (img/min) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Requests queue on the one SAM predictor (one image at a time per process): latency grows with the "
        "queue, memory does not. glibc gives each thread its own malloc arena by default, and memory one "
        "thread frees the others do not reuse; the Dockerfile and the native stack set MALLOC_ARENA_MAX "
        f"to {product} (`training.ops.stack.PROCESS_ENV`).",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
