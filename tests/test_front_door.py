"""The front door (`backend.front_door`) and the download rules, against one real gunicorn backend
(basic auth, webhook secret and a 20000-byte body limit on), raw sockets where the order of reading
matters, and local HTTP servers standing in for Label Studio and for a host nobody configured."""
import base64
import json
import socket
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from backend import front_door
from backend.images import ImageError, ImageLoader, allowlist_origins
from backend.label_config import render_label_config
from backend.settings import Settings
from conftest import BackendServer, register_model

CONFIG = render_label_config()
AUTH = ("ls", "s3cret")
LIMIT = 20000  # MAX_REQUEST_BYTES of the module's backend: a /setup with the shipped labeling config fits
SECRET = {"X-Toothseg-Webhook-Secret": "hook-key"}


class _Recording(SimpleHTTPRequestHandler):
    """Serves files; remembers every request's path and Authorization header."""

    seen: list

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/data/upload/"):
            self.path = "/" + self.path.rsplit("/", 1)[1]
        super().do_GET()


def serve(root, seen):
    handler = type("Handler", (_Recording,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Label Studio's stand-in and a host nobody configured, each recording what it is asked."""
    root = tmp_path_factory.mktemp("served")
    arr = (np.random.default_rng(0).random((160, 320)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(root / "grey.png")
    seen_ls, seen_other = [], []
    ls, other = serve(root, seen_ls), serve(root, seen_other)
    yield (f"http://127.0.0.1:{ls.server_port}", seen_ls), (f"http://127.0.0.1:{other.server_port}", seen_other)
    ls.shutdown()
    other.shutdown()


@pytest.fixture(scope="module")
def door(tmp_path_factory, redis_server, trained_weights, hosts):
    """One backend for the module: basic auth, webhook secret, MAX_REQUEST_BYTES=20000, a model."""
    models = tmp_path_factory.mktemp("models")
    register_model(models, "1", trained_weights)
    (ls_url, _), _ = hosts
    env = {"MODEL_DIR": str(models), "REDIS_URL": redis_server.url, "TRAIN_QUEUE": "front-door-test",
           "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1], "WEBHOOK_SECRET": "hook-key",
           "MAX_REQUEST_BYTES": str(LIMIT), "PREDICT_BATCH_LIMIT": "0", "LABEL_STUDIO_URL": ls_url,
           "LABEL_STUDIO_API_KEY": "LS-TOKEN-123456", "SCORE_THRESHOLD": "0.05"}
    server = BackendServer(env, tmp_path_factory.mktemp("log") / "backend.log")
    yield server
    server.stop()


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send `head` (and `body`) on a raw socket and return the response (status line, headers and
    its Content-Length of body) as soon as it is complete, or what came before `timeout`."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                headers, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    length = next((int(line.split(b":")[1]) for line in headers.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), None)
                    if length is not None and len(rest) >= length:
                        break
        except (socket.timeout, ConnectionResetError):
            pass
    return data


# --- routes --------------------------------------------------------------------------------------

@pytest.mark.scenario("label-studio-ml's own routes (/train with project 1./../../x, /versions, /is_training, "
                      "/metrics, /), with and without credentials",
                      "404 with a JSON message, no traceback; nothing written outside MODEL_DIR")
def test_only_toothseg_routes_are_served(door, tmp_path):
    body = {"project": "1./../../x", "annotations": [], "label_config": CONFIG}
    for auth in (None, AUTH):
        for method, path in (("POST", "/train"), ("POST", "/versions"), ("GET", "/versions"),
                             ("GET", "/is_training"), ("GET", "/metrics"), ("GET", "/"), ("GET", "/setup")):
            r = httpx.request(method, f"{door.url}{path}", json=body, auth=auth)
            assert r.status_code in (404, 405), (method, path, r.status_code)
            assert r.json()["status"] == r.status_code and "Traceback" not in r.text and "model_dir" not in r.text
    written = [p.name for p in door.log.parent.parent.rglob("*") if p.name.startswith(("train_data", "job_result"))]
    assert written == []
    assert httpx.get(f"{door.url}/health").json()["status"] == "UP"


@pytest.mark.scenario("Project ids with paths and other separators in /setup and /predict ('1./../../x', "
                      "'1/2', '-1', '1e3')", "400 with a message")
def test_project_ids_are_digits_and_an_optional_timestamp(door):
    for bad in ("1./../../x", "1/2", "-1", "1e3", "1.2.3", " 1"):
        r = httpx.post(f"{door.url}/setup", json={"project": bad, "schema": CONFIG}, auth=AUTH)
        assert r.status_code == 400 and "project id" in r.json()["error"], bad
    assert httpx.post(f"{door.url}/setup", json={"project": "1.1764000000", "schema": CONFIG}, auth=AUTH).status_code == 200


# --- access ----------------------------------------------------------------------------------------

def test_credentials_are_checked_as_bytes_and_both_always(door, monkeypatch):
    for user, password in (("lś", "s3cret"), ("ls", "sécret"), ("ls", "s3cret\x00")):
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        r = httpx.post(f"{door.url}/setup", json={"project": "1", "schema": CONFIG},
                       headers={"Authorization": f"Basic {token}"})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), (user, password)
    r = httpx.post(f"{door.url}/setup", json={"project": "1", "schema": CONFIG},
                   headers={"Authorization": "Basic not-base64!"})
    assert r.status_code == 401
    # the password is compared even when the user is wrong: no shortcut that times the user name
    calls = []
    real = front_door._same
    monkeypatch.setattr(front_door, "_same", lambda a, b: calls.append((a, b)) or real(a, b))
    gate = front_door.FrontDoor(None, Settings.from_env({"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"}))
    assert not gate._authorized({"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"xx:pw").decode()})
    assert calls == [(b"xx", b"ls"), (b"pw", b"pw")]


# --- bodies ----------------------------------------------------------------------------------------

@pytest.mark.scenario("A 5 MB body against MAX_REQUEST_BYTES=20000, with a Content-Length and chunked, without "
                      "credentials and with them",
                      "401 or 413 before the body is read; the server keeps serving")
def test_bodies_are_capped_before_they_are_read(door):
    auth = "Authorization: Basic " + base64.b64encode(b"ls:s3cret").decode() + "\r\n"
    for credentials, status in (("", b"401"), (auth, b"413")):
        # a Content-Length of 5 MB, and only 10 bytes sent: an answer means nobody waited for the rest
        head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{credentials}"
                f"Content-Length: 5000000\r\n")
        t = time.perf_counter()
        reply = raw_request(door.url, head, b"{" + b" " * 9, timeout=5)
        assert reply.split(b" ")[1] == status and time.perf_counter() - t < 4, reply[:200]
    # chunked: 30000 bytes in chunks, then the sender stalls (no last chunk): 413 as soon as LIMIT is passed
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (1000, b" " * 1000) for _ in range(30))
    reply = raw_request(door.url, head, body, timeout=5)
    assert reply.split(b" ")[1] == b"413" and b"MAX_REQUEST_BYTES" in reply, reply[:300]
    # a chunked body under the limit goes through
    small = json.dumps({"project": "1", "schema": CONFIG[:10]}).encode()
    assert len(small) < LIMIT
    ok = raw_request(door.url, head, b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small), timeout=10)
    assert ok.split(b" ")[1] == b"400" and b"'tasks' must be a list" in ok  # read, parsed, answered by the app
    assert httpx.get(f"{door.url}/health").status_code == 200


# --- downloads -----------------------------------------------------------------------------------------

@pytest.mark.scenario("/setup naming another host as Label Studio, with a token, then a /predict of a "
                      "relative image URL", "the image comes from LABEL_STUDIO_URL with its token; the other "
                      "host gets no request")
def test_setup_cannot_steer_downloads(door, hosts):
    (ls_url, seen_ls), (other_url, seen_other) = hosts
    seen_ls.clear(), seen_other.clear()
    r = httpx.post(f"{door.url}/setup", auth=AUTH, json={"project": "1.1", "schema": CONFIG, "hostname": other_url,
                                                         "access_token": "STOLEN-TOKEN-999"})
    assert r.status_code == 200
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/grey.png"}}, {"id": 2, "data": {"image": f"{other_url}/x"}}]
    r = httpx.post(f"{door.url}/predict", auth=AUTH, timeout=120,
                   json={"tasks": tasks, "project": "1.1", "label_config": CONFIG, "params": {}})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert seen_other == []  # neither the relative URL nor the foreign absolute one went there
    assert seen_ls == [("/data/upload/1/grey.png", "Token LS-TOKEN-123456")]  # the token went to Label Studio
    assert "not Label Studio's and not in IMAGE_HOST_ALLOWLIST" in door.log_text()


def test_without_label_studio_url_setup_names_no_host(start_backend, hosts, tmp_path, trained_weights):
    (_, _), (other_url, seen_other) = hosts
    seen_other.clear()
    models = tmp_path / "models"
    register_model(models, "1", trained_weights)
    server = start_backend(MODEL_DIR=models, PREDICT_BATCH_LIMIT=0)
    httpx.post(f"{server.url}/setup", json={"project": "1.1", "schema": CONFIG, "hostname": other_url,
                                            "access_token": "STOLEN-TOKEN-999"})
    r = httpx.post(f"{server.url}/predict", timeout=120, json={
        "tasks": [{"id": 1, "data": {"image": "/data/upload/1/grey.png"}}], "project": "1.1",
        "label_config": CONFIG, "params": {}})
    assert r.status_code == 200 and r.json()["results"][0]["result"] == []
    assert seen_other == []
    log = server.log_text()
    assert "/setup named" in log and "no LABEL_STUDIO_URL" in log


def test_hostname_from_setup_is_trusted_only_when_configured():
    settings = Settings.from_env({"LABEL_STUDIO_URL": "http://ls:8080", "IMAGE_HOST_ALLOWLIST": "https://cdn.example"})
    assert ImageLoader.trusted_hostname(settings, "http://ls:8080") == "http://ls:8080"
    assert ImageLoader.trusted_hostname(settings, "http://ls:9999") == ""  # another port
    assert ImageLoader.trusted_hostname(settings, "https://ls:8080") == ""  # another scheme
    assert ImageLoader.trusted_hostname(settings, "https://cdn.example") == "https://cdn.example"
    none = Settings.from_env({})
    loader = ImageLoader(none, hostname="http://attacker:80", access_token="t")
    assert loader.base_url == ""  # LABEL_STUDIO_URL unset: /setup's hostname is not Label Studio
    with pytest.raises(ImageError, match="no LABEL_STUDIO_URL"):
        loader.resolve("/data/upload/1/x.png")


def test_token_goes_to_label_studio_only(hosts):
    (ls_url, seen_ls), (other_url, seen_other) = hosts
    seen_ls.clear(), seen_other.clear()
    loader = ImageLoader(Settings.from_env({"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": "LS-KEY-0042",
                                            "IMAGE_HOST_ALLOWLIST": other_url}))
    loader.fetch("/data/upload/1/grey.png")
    loader.fetch(f"{other_url}/grey.png")
    assert seen_ls == [("/data/upload/1/grey.png", "Token LS-KEY-0042")]
    assert seen_other == [("/grey.png", None)]
    # without LABEL_STUDIO_URL, an allowlisted host /setup names as Label Studio gets /setup's token, never
    # LABEL_STUDIO_API_KEY
    for sent, expected in (("", None), ("SETUP-TOKEN-7", "Token SETUP-TOKEN-7")):
        seen_other.clear()
        ImageLoader(Settings.from_env({"LABEL_STUDIO_API_KEY": "LS-KEY-0042", "IMAGE_HOST_ALLOWLIST": other_url}),
                    hostname=other_url, access_token=sent).fetch("/data/upload/1/grey.png")
        assert seen_other == [("/data/upload/1/grey.png", expected)]


def test_a_token_refresh_that_fails_is_a_clear_error():
    """A personal access token (JWT refresh token) and a Label Studio that does not answer: a 502
    ImageError, not an exception that fails the whole /predict."""
    import jwt

    refresh = jwt.encode({"exp": int(time.time()) + 3600, "token_type": "refresh"}, "k", algorithm="HS256")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loader = ImageLoader(Settings.from_env({"LABEL_STUDIO_URL": f"http://127.0.0.1:{port}",
                                            "LABEL_STUDIO_API_KEY": refresh}))
    with pytest.raises(ImageError, match="could not get an access token from Label Studio") as err:
        loader.fetch("/data/upload/1/grey.png")
    assert err.value.status == 502


def test_allowlist_entries_are_origins():
    assert allowlist_origins(("cdn.example", "http://10.0.0.5:8081")) == {("https", "cdn.example", 443),
                                                                         ("http", "10.0.0.5", 8081)}
    loader = ImageLoader(Settings.from_env({"IMAGE_HOST_ALLOWLIST": "cdn.example,http://10.0.0.5:8081"}))
    assert loader._allowed("https://cdn.example/a.png") and loader._allowed("https://cdn.example:443/a.png")
    assert not loader._allowed("http://cdn.example/a.png")  # the bare host means https
    assert not loader._allowed("https://cdn.example:8443/a.png")
    assert loader._allowed("http://10.0.0.5:8081/a.png") and not loader._allowed("http://10.0.0.5/a.png")
    with pytest.raises(ValueError, match="not an http"):
        allowlist_origins(("ftp://x",))


class _Drip(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/slow-redirect"):  # each hop answers after 0.7 s, within a per-read timeout of 1 s
            time.sleep(0.7)
            self.send_response(302)
            self.send_header("Location", "/slow-redirect")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "40")
        self.end_headers()
        for _ in range(40):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.3)


@pytest.mark.scenario("An image server that sends 1 byte every 0.3 s, with DOWNLOAD_TIMEOUT=1",
                      "the download is cut off after about 1 s (the timeout is for the whole download)")
def test_download_timeout_is_for_the_whole_download():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        loader = ImageLoader(Settings.from_env({"DOWNLOAD_TIMEOUT": "1", "IMAGE_HOST_ALLOWLIST": url}))
        t = time.perf_counter()
        with pytest.raises(ImageError, match="longer than DOWNLOAD_TIMEOUT"):
            loader.fetch(f"{url}/drip.png")
        assert time.perf_counter() - t < 1.8
        t = time.perf_counter()  # redirects: the deadline holds across hops, each waits only for what is left
        with pytest.raises(ImageError, match="longer than DOWNLOAD_TIMEOUT"):
            loader.fetch(f"{url}/slow-redirect")
        assert time.perf_counter() - t < 1.5
    finally:
        server.shutdown()


def test_pillow_keeps_its_own_guard():
    import PIL.Image

    import backend.images  # noqa: F401  (importing it must not switch the guard off)

    assert PIL.Image.MAX_IMAGE_PIXELS is not None and PIL.Image.MAX_IMAGE_PIXELS > 0


@pytest.fixture(scope="module")
def in_process_app(tmp_path_factory):
    """toothseg's Flask app (create_app) in this process, with an empty MODEL_DIR."""
    from backend import app as app_module
    from backend import runtime

    mp = pytest.MonkeyPatch()
    mp.setenv("MODEL_DIR", str(tmp_path_factory.mktemp("in-process-models")))
    mp.setattr(runtime, "_runtime", None)  # this process's Runtime, built from the environment above
    try:
        yield app_module.create_app()
    finally:
        mp.undo()


def test_errors_label_studio_ml_would_answer_as_text_are_json(in_process_app):
    """label-studio-ml registers its own handlers for FileNotFoundError, AssertionError, IndexError
    and NoSuchJobError (plain text, file paths included); toothseg's app answers them as JSON."""
    from rq.exceptions import NoSuchJobError

    original = in_process_app.view_functions["_predict"]
    try:
        for error in (FileNotFoundError("/srv/models/1/CURRENT"), AssertionError("x"), IndexError("y"),
                      NoSuchJobError("/srv/models/job")):
            def broken(error=error):
                raise error
            in_process_app.view_functions["_predict"] = broken
            r = in_process_app.test_client().post("/predict", json={})
            assert r.status_code == 500 and r.json["error"].startswith("internal error"), r.get_data()
            assert "/srv/models" not in r.get_data(as_text=True)
    finally:
        in_process_app.view_functions["_predict"] = original


def test_ignored_setup_hostnames_are_remembered_bounded(in_process_app):
    """A /setup naming hosts nobody configured, many times over: each is logged once, and what is
    remembered of them stays bounded (at most 100, 200 characters each)."""
    from backend.app import ToothSegManager

    for i in range(150):
        r = in_process_app.test_client().post("/setup", json={"project": "1", "schema": CONFIG,
                                                               "hostname": f"http://h{i}.invalid/{'x' * 5000}"})
        assert r.status_code == 200
    assert len(ToothSegManager._ignored) <= 100
    assert all(len(h) <= 200 for h in ToothSegManager._ignored)


def test_a_non_ascii_webhook_secret_matches():
    """gunicorn hands header values over latin-1 decoded (PEP 3333): the secret is compared as the
    bytes the client sent."""
    from werkzeug.test import EnvironBuilder

    door = front_door.FrontDoor(lambda environ, start_response: start_response("200 OK", []) or [b"in"],
                                Settings.from_env({"WEBHOOK_SECRET": "clé-ü-9"}))
    for sent, status in (("clé-ü-9", "200 OK"), ("cle-u-9", "401 Unauthorized")):
        environ = EnvironBuilder(path="/webhook", method="POST", json={}).get_environ()
        environ["HTTP_X_TOOTHSEG_WEBHOOK_SECRET"] = sent.encode().decode("latin-1")
        answered = []
        door(environ, lambda s, headers, exc_info=None: answered.append(s))
        assert answered == [status], sent


def test_an_error_that_escapes_the_app_is_a_json_500_without_traceback(caplog):
    from werkzeug.test import EnvironBuilder

    def broken(environ, start_response):
        raise RuntimeError("secret detail /srv/models/1 in a traceback")

    answered = []
    environ = EnvironBuilder(path="/predict", method="POST", json={"tasks": []}).get_environ()
    body = b"".join(front_door.FrontDoor(broken, Settings.from_env({}))(
        environ, lambda status, headers, exc_info=None: answered.append((status, dict(headers)))))
    assert answered[0][0] == "500 Internal Server Error" and answered[0][1]["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": "internal error (RuntimeError); see the backend log", "status": 500}
    assert b"Traceback" not in body and b"secret detail" not in body
    assert "unexpected error on POST /predict" in caplog.text  # the traceback goes to the log
