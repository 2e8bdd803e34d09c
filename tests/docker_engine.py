"""A private Docker engine for the compose end-to-end test: its own `dockerd` (data root, exec root,
socket), the images the compose file and the Dockerfile name (pulled, or stand-ins built locally
when no registry answers), a wheelhouse and the test's weights served over HTTP for the builds.

Facts this relies on (../shared/DOCKER_NOTES.md, measured on these machines): Debian's docker.io
engine runs as a plain background process; the default bridge is off (`--bridge=none`), so builds
use the host network; no registry can be reached, and a Debian rootfs from debootstrap is the base
of the stand-ins; containers cannot see the host's local wheels, so they are served over HTTP.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STANDINS = REPO / "tests" / "compose"
# Layers, the Debian rootfs and the wheelhouse survive between runs here (a rerun reuses them).
CACHE = Path(os.environ.get("TOOTHSEG_DOCKER_CACHE", Path.home() / ".cache" / "toothseg-docker"))
DEBIAN_BASE = "toothseg-standin/debian:bookworm"
# stand-in Dockerfile (tests/compose/) and its base image, by the repository of the image it replaces
STANDIN_FOR = {"python": ("python.Dockerfile", DEBIAN_BASE), "redis": ("redis.Dockerfile", DEBIAN_BASE),
               "heartexlabs/label-studio": ("label-studio.Dockerfile", "python:3.11-slim")}


def docker_binaries() -> tuple[str, str] | None:
    """(dockerd, the docker client of the same package), or None without an engine. Another
    `docker` earlier on PATH may be a newer client only; the package's is /usr/bin/docker."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        return None
    client = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    return dockerd, str(client if client.exists() else shutil.which("docker") or "docker")


class Engine:
    """One dockerd, started by `start` and stopped by `stop` (its containers first, by id)."""

    def __init__(self, run_dir: Path, log: callable = print):
        binaries = docker_binaries()
        assert binaries, "no dockerd"
        self.dockerd, self.client = binaries
        self.run_dir, self.log = run_dir, log
        self.sock = run_dir / "docker.sock"
        self.proc: subprocess.Popen | None = None
        # BuildKit (built into this 20.10 client and engine) stores a RUN step's files once; the legacy
        # builder commits a copy of them, twice the disk at the step's end (13 GB for the torch layer).
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "1"}

    def start(self, timeout: float = 120) -> None:
        (CACHE / "engine").mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "dockerd.log", "ab") as out:
            self.proc = subprocess.Popen(
                [self.dockerd, "--data-root", str(CACHE / "engine"), "--exec-root", str(self.run_dir / "exec"),
                 "--pidfile", str(self.run_dir / "dockerd.pid"), "-H", f"unix://{self.sock}",
                 "--storage-driver", "overlay2", "--iptables=false", "--ip-masq=false", "--bridge=none"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.docker("info", check=False, timeout=30).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not answer: {self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        path = self.run_dir / "dockerd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def docker(self, *args: str, check: bool = True, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run([self.client, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                             **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: exit {out.returncode}\n{out.stdout[-3000:]}\n"
                               f"{out.stderr[-3000:]}")
        return out

    def stop(self) -> None:
        """Remove every container of this engine by id, then stop dockerd by its pid."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False, timeout=60).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:  # dockerd, its containerd and shims: the session it leads
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None

    # --- images ---------------------------------------------------------------------------
    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False, timeout=60).returncode == 0

    def image_label(self, name: str, label: str) -> str | None:
        out = self.docker("image", "inspect", "-f", f'{{{{ index .Config.Labels "{label}" }}}}', name, check=False,
                          timeout=60)
        return out.stdout.strip() if out.returncode == 0 else None

    def ensure_image(self, name: str, wheels_url: str) -> str:
        """`name` pulled from its registry; when that fails, a stand-in built from tests/compose/
        (kept between runs). Returns how it was obtained, which the log also says."""
        pulled = self.docker("pull", name, check=False, timeout=600)
        if pulled.returncode == 0:
            self.log(f"{name}: pulled")
            return "pulled"
        reason = (pulled.stderr.strip().splitlines() or ["?"])[-1]
        repository = name.rsplit(":", 1)[0]
        dockerfile, base = STANDIN_FOR[repository]
        recipe = standin_recipe(name)
        if self.image_label(name, "org.toothseg.standin-recipe") == recipe:
            self.log(f"{name}: pull failed ({reason}); the stand-in from an earlier run is used")
            return "stand-in (kept)"
        self.log(f"{name}: pull failed ({reason}); building a stand-in from tests/compose/{dockerfile}")
        if base == DEBIAN_BASE and not self.has_image(DEBIAN_BASE):
            self.import_debian()
        elif base != DEBIAN_BASE:
            self.ensure_image(base, wheels_url)
        args = ["--build-arg", f"BASE={base}", "--label", f"org.toothseg.standin-recipe={recipe}"]
        if repository == "heartexlabs/label-studio":
            args += ["--build-arg", f"LABEL_STUDIO_VERSION={name.rsplit(':', 1)[1]}",
                     "--build-arg", f"LABEL_STUDIO_PINS={' '.join(setup_pins('LABEL_STUDIO_PINS'))}",
                     "--build-arg", f"PIP_FIND_LINKS={wheels_url}", "--build-arg", "PIP_NO_INDEX=1"]
        empty = self.run_dir / "empty-context"
        empty.mkdir(exist_ok=True)
        self.docker("build", "--network", "host", "-q", *args, "-t", name, "-f", str(STANDINS / dockerfile),
                    str(empty))
        return "stand-in (built)"

    def import_debian(self) -> None:
        rootfs = CACHE / "rootfs-bookworm"
        if not (rootfs / ".complete").exists():
            shutil.rmtree(rootfs, ignore_errors=True)
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()],
                           check=True, capture_output=True, timeout=900)
            (rootfs / ".complete").touch()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--exclude=./.complete", "-c", "."],
                               stdout=subprocess.PIPE)
        self.docker("import", "-", DEBIAN_BASE, stdin=tar.stdout, timeout=600)
        tar.wait()


def standin_recipe(name: str) -> str:
    """What a stand-in is built from (the stand-in Dockerfiles and the image name): a kept stand-in
    whose recipe changed is built again."""
    h = hashlib.sha1(name.encode())
    for path in sorted(STANDINS.glob("*.Dockerfile")):
        h.update(path.read_bytes())
    h.update(" ".join(setup_pins("LABEL_STUDIO_PINS")).encode())
    return h.hexdigest()[:16]


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (debootstrap fetches the stand-ins' base from it)."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if path.exists():
            found = re.search(r"(?:URIs:\s*|^deb\s+)(https?://\S+/debian)\b", path.read_text(), re.M)
            if found:
                return found.group(1)
    return "http://deb.debian.org/debian"


# --- what the builds download, served from this machine -------------------------------------
def setup_pins(name: str) -> list[str]:
    """The requirement pins scripts/setup installs under `name` (TORCH_PINS, LABEL_STUDIO_PINS)."""
    setup = (REPO / "scripts" / "setup").read_text()
    return re.search(name + r'=\$\{' + name + r':-"([^"]+)"\}', setup).group(1).split()


def wheel_requirements(label_studio_version: str) -> list[list[str]]:
    """Requirement sets of the wheelhouse: toothseg's dependencies with the torch that scripts/setup
    installs, and the Label Studio release of the stand-in with setup's pins for it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [project["project"]["dependencies"] + project["build-system"]["requires"] + setup_pins("TORCH_PINS"),
            # Debian 12's Python is 3.11.2: redis asks for async-timeout below 3.11.3, the host's Python does not
            [f"label-studio=={label_studio_version}", "async-timeout>=4.0.3", *setup_pins("LABEL_STUDIO_PINS")]]


def build_wheelhouse(label_studio_version: str) -> Path:
    """Wheels of everything the image builds install, downloaded once by this machine's pip (kept in
    CACHE, keyed by the requirements); sdists are turned into wheels."""
    sets = wheel_requirements(label_studio_version)
    key = hashlib.sha1(repr(sets).encode()).hexdigest()[:12]
    out = CACHE / f"wheelhouse-{key}"
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    for requirements in sets:
        subprocess.run([*pip, "download", "-q", "--dest", str(out), *requirements], check=True, capture_output=True,
                       timeout=1800)
    for sdist in [p for p in out.iterdir() if p.name.endswith((".tar.gz", ".zip"))]:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "--wheel-dir", str(out), str(sdist)], check=True,
                       capture_output=True, timeout=600)
        sdist.unlink()
    link_local_copies(out)
    (out / ".complete").touch()
    return out


def pip_local_dirs() -> list[Path]:
    """The folders this machine's pip reads files from: its find-links folders and the trees of its
    file:// indexes (`pip config list`)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    dirs = []
    for key, value in re.findall(r"^\S*\.(find-links|index-url|extra-index-url)='([^']*)'", out.stdout, re.M):
        for location in value.split():
            if location.startswith(("http://", "https://")):
                continue
            path = Path(location.removeprefix("file://"))
            if key != "find-links":
                path = path.parent  # an index's pages link to files beside its simple/ tree
            if path.is_dir() and path not in dirs:
                dirs.append(path)
    return dirs


def link_local_copies(wheelhouse: Path) -> None:
    """Replace each downloaded wheel that this machine's pip has on disk (torch and its CUDA wheels,
    3 GB here) by a hard link to that file: the wheelhouse then costs the disk almost nothing."""
    local = {}
    for folder in pip_local_dirs():
        for path in folder.rglob("*.whl"):
            local.setdefault(path.name, path)
    for wheel in wheelhouse.glob("*.whl"):
        source = local.get(wheel.name)
        if source is None or (source.stat().st_size, source.stat().st_dev) != (wheel.stat().st_size,
                                                                               wheel.stat().st_dev):
            continue  # another file under that name, or another disk
        tmp = wheel.with_name(wheel.name + ".link")
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, wheel)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


FILE_SERVER_PORT = 47731
"""The builds' wheel and weight URLs carry this port: the same URLs in every run keep the image's
layers cached (a changed build argument rebuilds the steps after its declaration)."""


class FileServer:
    """Serves `root` on 127.0.0.1 (the builds run on the host network) until `close`, on
    FILE_SERVER_PORT, or on any free port when that one is taken (the layer cache then misses)."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        try:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", FILE_SERVER_PORT), handler)
        except OSError:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
