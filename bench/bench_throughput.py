"""Throughput of a batch of images through /predict with the worker idle and with training running,
and peak memory of the backend process.

    .venv/bin/python bench/bench_throughput.py [--images 50] [--size 2000x1000] [--sam vit_b]
                                               [--weights best.pt] [--out bench/results/throughput.md]

Label Studio's *Retrieve predictions* sends the selected tasks in one /predict; the backend answers
a batch over PREDICT_BATCH_LIMIT with Label Studio's fallback (one result for several tasks), and
Label Studio resends the tasks one at a time. This bench does the same: the batch request, then
one request per task, for `--images` different synthetic panoramics (cold: no SAM embedding
cached). It runs twice on different images: with nothing else running, and while a YOLOv8-seg
training runs in its own session as the rq worker runs it (niced with WORKER_NICE through
backend.process.lower_priority). The backend is gunicorn as in docker-compose.yml, SAM the real
architecture with random weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.sam import SAM_BUILDERS  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.bench_load import BenchBackend  # noqa: E402
from bench.bench_predict import detector_weights, machine, write_report  # noqa: E402
from training.ops.stack import _descendants  # noqa: E402

TRAINER = """
import sys
from pathlib import Path
from backend.process import lower_priority
from training.data.synth import train_synthetic_detector
lower_priority(int(sys.argv[2]))
train_synthetic_detector(Path(sys.argv[1]), n=24, epochs=10000, imgsz=640, batch=8)
"""


def run_batch(server: BenchBackend, ids: list[int]) -> dict:
    batch, batch_s = server.predict(ids)
    assert batch.status_code == 200, batch.text
    start = time.perf_counter()
    seconds, teeth = [], []
    for i in ids:  # Label Studio's resend, one task per request
        r, s = server.predict([i])
        assert r.status_code == 200, r.text
        seconds.append(s)
        teeth.append(len(r.json()["results"][0]["result"]))
    wall = time.perf_counter() - start
    return {"batch_s": batch_s, "batch_results": len(batch.json()["results"]), "wall": wall,
            "per_min": len(ids) / wall * 60, "median": statistics.median(seconds), "teeth": statistics.median(teeth),
            "rss": server.peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--size", default="2000x1000")
    parser.add_argument("--sam", default="vit_b", choices=sorted(SAM_BUILDERS))
    parser.add_argument("--weights")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "throughput.md"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    nice = Settings.from_env().worker_nice
    server = BenchBackend(2 * args.images, (width, height), args.sam, detector_weights(args))
    trainer = None
    try:
        idle = run_batch(server, list(range(args.images)))
        print(f"worker idle: {idle}", flush=True)
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(server.root / "train"), str(nice)], cwd=REPO,
                                   env={**os.environ, "YOLO_VERBOSE": "False"}, start_new_session=True,
                                   stdout=open(server.root / "train.log", "wb"), stderr=subprocess.STDOUT)
        time.sleep(60)  # past dataset writing and model building: the trainer is in its epochs
        assert trainer.poll() is None, f"training exited: see {server.root / 'train.log'}"
        training = run_batch(server, list(range(args.images, 2 * args.images)))
        assert trainer.poll() is None, "training ended before the batch did"
        print(f"training running: {training}", flush=True)
    finally:
        if trainer is not None:
            for pid in [*_descendants(trainer.pid), trainer.pid]:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        server.stop()
    rows = [("worker idle", idle), (f"training running (nice {nice}, own session)", training)]
    lines = [
        "# /predict throughput, worker idle and training running",
        "",
        f"Command: `.venv/bin/python bench/bench_throughput.py --images {args.images} --size {args.size} "
        f"--sam {args.sam}`",
        f"Machine: {machine()}",
        f"Backend: gunicorn, 1 worker, 4 threads; SAM {args.sam} (random weights); {args.images} different "
        f"{width}x{height} synthetic panoramics per run, none cached. Each run: one /predict with all "
        f"{args.images} tasks (answered with Label Studio's one-at-a-time fallback), then one request per task, "
        "as Label Studio resends them. Training: YOLOv8n-seg, imgsz 640, batch 8, in its own session.",
        "",
        "| condition | batch request answered in (s) | results in it | images/min | median s/image | wall (s) "
        "| median teeth | backend peak RSS so far (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['batch_s']:.2f} | {r['batch_results']} | {r['per_min']:.1f} | {r['median']:.1f} | "
              f"{r['wall']:.0f} | {r['teeth']:.0f} | {r['rss']:.0f} |" for name, r in rows]
    lines += ["", f"Throughput with training running / idle: {training['per_min'] / idle['per_min']:.2f}x."]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
