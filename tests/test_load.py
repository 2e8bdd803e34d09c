"""Concurrent load on the backend under gunicorn with threads."""
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from backend.label_config import render_label_config
from conftest import register_model
from training.ops.stack import _descendants

pytestmark = pytest.mark.slow  # a gunicorn backend under 20 concurrent requests: about 1 min


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.scenario("20 concurrent one-task /predict requests for 20 different images (gunicorn, 1 worker, "
                      "4 threads, the test SAM vit_tiny)", "all answered 200 with teeth; one copy of each model in "
                      "the process (loaded once); peak memory below 2.5 GB (1.7-1.8 GB measured with MALLOC_ARENA_MAX=2 "
                      "as shipped, 2.1-2.2 GB without; with SAM ViT-B: bench/results/load.md)")
def test_twenty_concurrent_predicts(start_backend, synth_dir, trained_weights, sam_checkpoint, tmp_path):
    models = tmp_path / "models"
    version = register_model(models, "1", trained_weights)
    server = start_backend(MODEL_DIR=models, SAM_CHECKPOINT=sam_checkpoint, SAM_MODEL_TYPE="vit_tiny",
                           SAM_PREANNOTATE="true", LOCAL_FILES_DOCUMENT_ROOT=synth_dir, SCORE_THRESHOLD=0.05)
    names = sorted(p.name for p in (synth_dir / "images").iterdir())[:20]
    config = render_label_config()

    def one(i_name):
        i, name = i_name
        body = {"tasks": [{"id": i, "data": {"image": f"/data/local-files/?d=images/{name}"}}],
                "project": "1.17", "label_config": config, "params": {"context": None}}
        t = time.perf_counter()
        r = httpx.post(f"{server.url}/predict", json=body, timeout=600)
        return r, time.perf_counter() - t

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, enumerate(names)))
    assert [r.status_code for r, _ in answers] == [200] * 20
    assert all(r.json()["results"][0]["result"] and r.json()["model_version"] == version for r, _ in answers)
    log = server.log_text()
    assert log.count("loaded model version") == 1 and log.count("loading SAM") == 1
    workers = _descendants(server.proc.pid)
    assert len(workers) == 1
    peak = peak_rss_mb(workers[0])
    print(f"\npeak RSS of the worker: {peak:.0f} MB")
    assert peak < 2500, peak
    assert httpx.get(f"{server.url}/health").status_code == 200
