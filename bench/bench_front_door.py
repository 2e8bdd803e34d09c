"""The backend's memory while hostile requests arrive: a 1 GB body with and without a
Content-Length, and an image server that drips its bytes.

    .venv/bin/python bench/bench_front_door.py [--gigabytes 1] [--out bench/results/front_door.md]

One gunicorn backend (the product's command, default settings but a registered model and
DOWNLOAD_TIMEOUT=2) is sampled every 10 ms (VmRSS of its worker process) while each request
runs; the table gives its idle RSS, the peak above idle, the answer and when it came. The
bodies are sent on raw sockets as fast as loopback takes them, all of them (also after the
answer), unless the server closes the connection. The drip server sends a 50 MB PNG-sized
body one 1 KB chunk every 50 ms.
"""
from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("YOLO_VERBOSE", "False")

from bench_predict import machine, write_report  # noqa: E402

MB = 1024 * 1024


class Drip(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(50 * MB))
        self.end_headers()
        try:
            for _ in range(50 * 1024):
                self.wfile.write(b"\0" * 1024)
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass


class RssSampler:
    """Peak VmRSS (MB) of a process while the `with` block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def rss(self) -> float:
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def send_body(port: int, head: bytes, chunks, total: int) -> tuple[str, float, int]:
    """Send `head` and then `total` bytes of body chunks, as fast as loopback takes them, whether
    or not the server has answered (an attacker does not stop), until all are sent or the server
    closes; (status line, seconds until the answer was readable, bytes sent)."""
    start = time.perf_counter()
    answered = None
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head)
        for chunk in chunks:
            if answered is None and select.select([s], [], [], 0)[0]:
                answered = time.perf_counter() - start
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if sent >= total:
                break
        s.settimeout(60)
        try:
            reply = s.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
        except (ConnectionResetError, socket.timeout) as exc:
            reply = f"no answer ({exc.__class__.__name__})"
    return reply, answered if answered is not None else time.perf_counter() - start, sent


def tiny_model(work: Path) -> Path:
    """A detector to register (the drip scenario needs a model, else /predict downloads nothing)."""
    from training.dataset import write_yolo_dataset
    from training.data.synth import generate
    from training.train import TrainConfig, train_model

    items = [generate(i, (320, 160)).item(f"s{i}") for i in range(3)]
    data = write_yolo_dataset(items[:2], items[2:], work / "ds")
    return train_model(data, work / "run", TrainConfig(steps=1, batch=2, imgsz=160, time_budget=0), 0.4, 0.2).weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "front_door.md"))
    args = parser.parse_args()
    from conftest import BackendServer, register_model

    from backend.label_config import render_label_config
    from training.ops.stack import _descendants

    work = Path(tempfile.mkdtemp(prefix="toothseg-door-"))
    drip = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    drip_url = f"http://127.0.0.1:{drip.server_port}"
    register_model(work / "models", "1", tiny_model(work))
    env = {"MODEL_DIR": str(work / "models"), "LABEL_STUDIO_URL": drip_url, "DOWNLOAD_TIMEOUT": "2",
           "PREDICT_BATCH_LIMIT": "0"}
    server = BackendServer(env, work / "backend.log")
    rows = []
    try:
        worker = _descendants(server.proc.pid)[0]
        sampler = RssSampler(worker)
        import httpx

        httpx.get(f"{server.url}/health")
        idle = sampler.rss()
        total = int(args.gigabytes * 1024 * MB)
        zeros = b"\0" * MB
        with_length = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % total)
        chunked = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (len(zeros), zeros)
        scenarios = [
            (f"{args.gigabytes:g} GB body with Content-Length", lambda: send_body(
                server.port, with_length, iter(lambda: zeros, None), total)),
            (f"{args.gigabytes:g} GB body, chunked (no Content-Length)", lambda: send_body(
                server.port, chunked, iter(lambda: chunk, None), total)),
        ]
        for name, action in scenarios:
            with sampler:
                status, seconds, sent = action()
            note = "all sent" if sent >= total else \
                f"{sent / MB:.0f} of {total / MB:.0f} MB sent, then the server closed"
            rows.append((name, status, seconds, note, sampler.peak - idle))
        body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/drip.png"}}], "project": "1.1",
                "label_config": render_label_config(), "params": {}}
        with sampler:
            start = time.perf_counter()
            r = httpx.post(f"{server.url}/predict", json=body, timeout=120)
            seconds = time.perf_counter() - start
        cut = "cut off" if "DOWNLOAD_TIMEOUT" in server.log_text() else "NOT cut off"
        rows.append(("image server dripping 1 KB / 50 ms (DOWNLOAD_TIMEOUT=2)", f"HTTP {r.status_code}, empty "
                     f"prediction" if not r.json()["results"][0]["result"] else f"HTTP {r.status_code}", seconds,
                     f"download {cut}", sampler.peak - idle))
        alive = httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
        drip.shutdown()
    from backend.settings import Settings

    limit = Settings.from_env({}).max_request_bytes
    lines = ["# The front door under hostile requests: backend memory", "",
             f"Command: `{' '.join(['.venv/bin/python', 'bench/bench_front_door.py', *sys.argv[1:]])}`",
             f"Machine: {machine()}",
             f"Backend: gunicorn (1 worker, 4 threads), MAX_REQUEST_BYTES {limit} (default), DOWNLOAD_TIMEOUT 2 s; "
             f"idle RSS of the worker {idle:.0f} MB, sampled every 10 ms.", "",
             "| request | answer | answered after (s) | sent | peak RSS above idle (MB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {status} | {secs:.2f} | {note} | {peak:.1f} |" for name, status, secs, note, peak in rows]
    lines += ["", f"The server kept serving afterwards: {'yes' if alive else 'NO'}."]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
