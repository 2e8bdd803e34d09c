"""The layering, read from the import graph: `training` may import `backend`, never the reverse;
the worker's modules do not load the serving stack, nor the web app SAM's libraries before SAM is
used; module-level imports have no cycles."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = ("backend", "training")
SERVING = ("flask", "gunicorn", "label_studio_ml", "backend.app", "backend.model")
"""What only the backend's web process needs."""
WORKER_ENTRY_POINTS = ("training.jobs", "training.preannotate", "training.ops.status")
"""What `rq worker` imports to run toothseg's jobs, and what `toothseg status` imports."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules `path` imports (absolute names; `from x import y` gives x and x.y)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_backend_never_imports_training():
    offenders = {name: sorted(i for i in _imports(path) if i == "training" or i.startswith("training."))
                 for name, path in _modules().items() if name.startswith("backend")}
    assert not {k: v for k, v in offenders.items() if v}, "backend serves and holds the shared core; training " \
                                                          "learns and may import backend, not the reverse"


def test_module_level_imports_have_no_cycles():
    modules = _modules()
    graph = {name: {i for i in _imports(path, top_level_only=True) if i in modules and i != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                cycles.append(path[path.index(other):] + [name, other] if other in path else [name, other])
            elif other not in state:
                visit(other, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles


def test_the_worker_does_not_load_the_serving_stack():
    code = (f"import importlib, sys\nfor m in {WORKER_ENTRY_POINTS!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {SERVING!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"the worker's imports load {out.stdout.strip()}"


def test_the_web_app_starts_without_sams_libraries():
    """A backend boots (and /health answers) without importing segment_anything and torchvision
    (1.3 s of a 4 s start here): they load with SAM, on the first request that needs it."""
    code = ("import sys\nimport backend.app\nbackend.app.create_app()\n"
            "print(sorted(m for m in ('segment_anything', 'torchvision', 'backend.sam') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"the app's start loads {out.stdout.strip()}"
