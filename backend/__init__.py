"""toothseg serving side: the Label Studio ML backend and its inference pipeline.

Importing the package prepares ultralytics for offline use before anything imports it:
YOLO_OFFLINE=1 and YOLO_AUTOINSTALL=false (no network calls, no pip installs at run time), a
writable YOLO_CONFIG_DIR, and a local font where ultralytics looks for Arial (it downloads one
otherwise). Each variable already set in the environment is left alone.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


def _prepare_ultralytics() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "toothseg-yolo")))
    fonts = config_dir / "Ultralytics"
    targets = [fonts / "Arial.ttf", fonts / "Arial.Unicode.ttf"]
    if all(t.exists() for t in targets):
        return
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return
    font = Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        fonts.mkdir(parents=True, exist_ok=True)
        for target in targets:
            if not target.exists() and font.exists():
                shutil.copyfile(font, target)
    except OSError:
        pass  # a read-only config dir only costs ultralytics a failed font download


_prepare_ultralytics()
