"""Hostile and broken input, access control and faults, each against the real parts (gunicorn,
redis-server, rq workers). Each test is one row of README's "what we tried" table."""
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from rq import Queue, Retry
from rq.job import Job

from backend.label_config import render_label_config
from backend.retrain_queue import RetrainQueue
from backend.security import redact
from conftest import QUEUE, RedisServer, register_model
from training.ops.stack import Stack

CONFIG = render_label_config()


def predict_body(images, project="1.17"):
    return {"tasks": [{"id": i, "data": {"image": url}} for i, url in enumerate(images)], "project": project,
            "label_config": CONFIG, "params": {"context": None}}


@pytest.mark.scenario("Basic auth on: requests without or with wrong credentials",
                      "401 with WWW-Authenticate; with the right credentials 200; /health stays open")
def test_basic_auth(start_backend):
    server = start_backend(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret", PREDICT_BATCH_LIMIT=0)
    setup = {"project": "1.1", "schema": CONFIG}
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = httpx.post(f"{server.url}/setup", json=setup)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert httpx.post(f"{server.url}/setup", json=setup, auth=("ls", "wrong")).status_code == 401
    assert httpx.post(f"{server.url}/predict", json=predict_body([])).status_code == 401
    ok = httpx.post(f"{server.url}/setup", json=setup, auth=("ls", "s3cret"))
    assert ok.status_code == 200 and ok.json()["model_version"]
    assert "model_dir" not in httpx.get(f"{server.url}/health").json()


@pytest.mark.scenario("Webhook secret on: webhooks without or with a wrong secret header",
                      "401, nothing queued; with the header the event is queued")
def test_webhook_secret(start_backend, redis_url):
    server = start_backend(REDIS_URL=redis_url, TRAIN_QUEUE=QUEUE, WEBHOOK_SECRET="hook-key")
    body = {"action": "START_TRAINING", "project": {"id": 3}}
    assert httpx.post(f"{server.url}/webhook", json=body).status_code == 401
    assert httpx.post(f"{server.url}/webhook", json=body,
                      headers={"X-Toothseg-Webhook-Secret": "nope"}).status_code == 401
    assert len(Queue(QUEUE, connection=redis.Redis.from_url(redis_url))) == 0
    r = httpx.post(f"{server.url}/webhook", json=body, headers={"X-Toothseg-Webhook-Secret": "hook-key"})
    assert r.status_code == 201 and r.json()["status"] == "enqueued"


class _LabelStudioLike(SimpleHTTPRequestHandler):
    seen: list = []  # (path, Authorization header) of every request

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/slow"):
            time.sleep(3)
        if self.path.startswith(("/data/upload/", "/slow/")):
            self.path = "/" + self.path.rsplit("/", 1)[1]
        super().do_GET()


@pytest.fixture
def fake_storage(tmp_path):
    """An HTTP server standing in for Label Studio's file storage (images with auth headers)."""
    root = tmp_path / "served"
    root.mkdir()
    arr = (np.random.default_rng(0).random((160, 320)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(root / "grey.png")
    Image.fromarray(np.repeat(arr[:, :, None], 3, 2)).convert("CMYK").save(root / "cmyk.jpg")
    rgba = np.dstack([np.repeat(arr[:, :, None], 3, 2), np.full(arr.shape, 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray((arr.astype(np.uint16) * 16)).save(root / "deep.png")  # 12-bit values in a 16-bit PNG
    (root / "truncated.png").write_bytes((root / "grey.png").read_bytes()[:500])
    _LabelStudioLike.seen.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_LabelStudioLike, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.scenario("Tokens: Label Studio's token in /setup, an Authorization header, image downloads, "
                      "at LOG_LEVEL=DEBUG", "no token or password appears in the backend log")
def test_tokens_never_logged(start_backend, fake_storage, tmp_path, trained_weights):
    models = tmp_path / "models"
    register_model(models, "1", trained_weights)
    server = start_backend(MODEL_DIR=models, LOG_LEVEL="DEBUG", LABEL_STUDIO_URL=fake_storage,
                           LABEL_STUDIO_API_KEY="LSKEY-0123456789", PREDICT_BATCH_LIMIT=0)
    httpx.post(f"{server.url}/setup", json={"project": "1.1", "schema": CONFIG, "hostname": fake_storage,
                                            "access_token": "SETUPTOKEN-987654"},
               headers={"Authorization": "Token HEADERTOKEN-55555"})
    r = httpx.post(f"{server.url}/predict", json=predict_body(["/data/upload/1/grey.png"]),
                   headers={"Authorization": "Bearer BEARER-TOKEN-777"}, timeout=120)
    assert r.status_code == 200
    assert _LabelStudioLike.seen == [("/data/upload/1/grey.png", "Token LSKEY-0123456789")]  # it carried the token
    log = server.log_text()
    assert "DEBUG" in log  # the debug request logging of label-studio-ml did run
    for secret in ("LSKEY-0123456789", "SETUPTOKEN-987654", "HEADERTOKEN-55555", "BEARER-TOKEN-777"):
        assert secret not in log
    assert redact('{"access_token": "abc123"} Authorization: Token xyz987') == '{"access_token": "***"} ' \
                                                                            'Authorization: Token ***'


def test_tracebacks_are_redacted_too():
    import io
    import logging

    from backend.security import RedactingFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("toothseg.test.redaction")
    log.addHandler(handler)
    try:
        try:
            raise RuntimeError("Label Studio said no to Authorization: Token TRACEBACK-TOKEN-4242")
        except RuntimeError:
            log.exception("download failed for access_token=QUERY-TOKEN-77")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" in text and "RuntimeError" in text
    assert "TRACEBACK-TOKEN-4242" not in text and "QUERY-TOKEN-77" not in text and "Token ***" in text


def test_secret_headers_logged_by_label_studio_ml_are_redacted():
    """label-studio-ml logs request headers at DEBUG, one "Name: value" per line."""
    from backend.security import redact

    headers = "Host: backend:9090\nX-Toothseg-Webhook-Secret: hook-key-31\nX-Api-Key: key-55\nContent-Type: a/b\n"
    cleaned = redact(headers)
    assert "hook-key-31" not in cleaned and "key-55" not in cleaned
    assert "Host: backend:9090" in cleaned and "Content-Type: a/b" in cleaned


@pytest.mark.scenario("Images over HTTP: CMYK JPEG, RGBA PNG, 12-bit-in-16-bit PNG, a truncated PNG and a 3 s "
                      "download with DOWNLOAD_TIMEOUT=1 in one batch",
                      "the decodable images are predicted, the truncated and slow ones get an empty prediction "
                      "with the reason logged")
def test_image_kinds_in_one_batch(start_backend, fake_storage, tmp_path, trained_weights):
    models = tmp_path / "models"
    register_model(models, "1", trained_weights)
    server = start_backend(MODEL_DIR=models, LABEL_STUDIO_URL=fake_storage, PREDICT_BATCH_LIMIT=0,
                           DOWNLOAD_TIMEOUT=1, SCORE_THRESHOLD=0.0)
    names = ["cmyk.jpg", "rgba.png", "deep.png", "truncated.png", "grey.png"]
    urls = [f"/data/upload/1/{n}" for n in names] + [f"{fake_storage}/slow/grey.png"]
    r = httpx.post(f"{server.url}/predict", json=predict_body(urls), timeout=300)
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 6
    assert results[3]["result"] == [] and results[5]["result"] == []
    log = server.log_text()
    assert "corrupt or truncated" in log and "longer than DOWNLOAD_TIMEOUT (1 s)" in log
    assert log.count("teeth (load") == 4  # cmyk, rgba, 16-bit, grey went through the pipeline


@pytest.mark.scenario("A request body over MAX_REQUEST_BYTES", "413 with a message; the server keeps serving")
def test_body_limit(start_backend):
    server = start_backend(MAX_REQUEST_BYTES=2000)
    r = httpx.post(f"{server.url}/predict", content=b"{" + b" " * 5000 + b"}",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "MAX_REQUEST_BYTES" in r.json()["error"]
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.scenario("Redis down", "/webhook answers 503 with the reason; /setup and /predict keep working")
def test_redis_down(start_backend, tmp_path, trained_weights, synth_dir):
    models = tmp_path / "models"
    version = register_model(models, "5", trained_weights)
    server = start_backend(REDIS_URL="redis://127.0.0.1:1/0", PREDICT_BATCH_LIMIT=0, MODEL_DIR=models,
                           LOCAL_FILES_DOCUMENT_ROOT=synth_dir, SCORE_THRESHOLD=0.05)
    r = httpx.post(f"{server.url}/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
    assert r.status_code == 503 and "Redis" in r.json()["error"]
    setup = httpx.post(f"{server.url}/setup", json={"project": "5.1", "schema": CONFIG})
    assert setup.status_code == 200 and setup.json()["model_version"] == version
    name = sorted(p.name for p in (synth_dir / "images").iterdir())[0]
    r = httpx.post(f"{server.url}/predict", json=predict_body([f"/data/local-files/?d=images/{name}"], "5.1"),
                   timeout=120)
    assert r.status_code == 200 and r.json()["model_version"] == version
    assert len(r.json()["results"][0]["result"]) > 10  # teeth predicted while Redis is down


@pytest.mark.scenario("Redis restarted (append-only file) with a retrain job queued",
                      "the job is still queued after the restart and a worker runs it")
def test_queued_job_survives_a_redis_restart(tmp_path, start_worker):
    server = RedisServer(tmp_path / "aof", appendonly=True).start()
    try:
        q = RetrainQueue(redis.Redis.from_url(server.url), QUEUE, 1, job_timeout=60,
                         job_function="jobs_for_tests.slow_job")
        q.record_training_request("2")
        decision = q.maybe_enqueue("2")
        assert decision.status == "enqueued"
        server.stop()
        server.start()  # same port, same directory: the AOF is replayed
        conn = redis.Redis.from_url(server.url)
        assert Job.fetch(decision.job_id, connection=conn).get_status() == "queued"
        start_worker(server.url, SLOW_JOB_SECONDS=0.1)
        deadline = time.monotonic() + 60
        while Job.fetch(decision.job_id, connection=conn).get_status() != "finished":
            assert time.monotonic() < deadline, "the restored job never ran"
            time.sleep(0.3)
    finally:
        server.stop()


@pytest.mark.slow  # a worker retrying with backoff: about 35 s
@pytest.mark.scenario("Label Studio unreachable while a retrain exports",
                      "the job is retried with backoff, then fails with the reason in its status; the project "
                      "is released and the current model untouched")
def test_label_studio_down_during_export(redis_url, start_worker, tmp_path, monkeypatch, trained_weights):
    import backend.retrain_queue as rq_module
    from backend.registry import Registry

    models = tmp_path / "models"
    v1 = register_model(models, "4", trained_weights)
    monkeypatch.setattr(rq_module, "RETRY", Retry(max=2, interval=[1, 2]))
    start_worker(redis_url, LABEL_STUDIO_URL="http://127.0.0.1:1", LABEL_STUDIO_API_KEY="k", MODEL_DIR=models)
    q = RetrainQueue(redis.Redis.from_url(redis_url), QUEUE, 1, job_timeout=300)  # the real training job
    q.record_training_request("4")
    decision = q.maybe_enqueue("4")
    conn = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 180
    while (job := Job.fetch(decision.job_id, connection=conn)).get_status() != "failed":
        assert time.monotonic() < deadline, f"job status {job.get_status()}"
        time.sleep(1)
    assert "unreachable" in job.meta["error"] and "127.0.0.1:1" in job.meta["error"]
    assert job.retries_left == 0
    assert q.active_job("4") is None
    assert Registry(models).current_version("4") == v1


@pytest.mark.scenario("Two rq workers, one project, events during a run",
                      "runs of the project never overlap: one worker trains it at a time")
def test_two_workers_one_project(redis_url, start_worker):
    conn = redis.Redis.from_url(redis_url)
    start_worker(redis_url, SLOW_JOB_SECONDS=1.5)
    start_worker(redis_url, SLOW_JOB_SECONDS=1.5)
    q = RetrainQueue(conn, QUEUE, 1, job_timeout=60, job_function="jobs_for_tests.slow_job")
    for _ in range(6):
        q.record_training_request("6")
        q.maybe_enqueue("6")
        time.sleep(0.7)
    deadline = time.monotonic() + 60
    while q.active_job("6") is not None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    spans = sorted(tuple(map(float, s.decode().split())) for s in conn.lrange("test:spans", 0, -1))
    assert len(spans) >= 2
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, f"overlapping runs: {spans}"


def test_native_stack_redis_listens_on_loopback_only(tmp_path):
    argv, _ = Stack(data=tmp_path / "d", images=tmp_path / "i").services()["redis"]
    assert argv[argv.index("--bind") + 1] == "127.0.0.1"
