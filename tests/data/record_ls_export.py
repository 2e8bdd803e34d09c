"""Record tests/data/ls_export_1.23.2.json from a real Label Studio server (run by hand:
`.venv/bin/python tests/data/record_ls_export.py`, after scripts/setup).

Three tasks: brush regions (a tooth in two strokes, a non-tooth label), polygon regions (a tooth
in two parts), a cancelled annotation, several annotations per task, a ground-truth one."""
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

from backend.formats import mask_to_rle  # noqa: E402
from export_shapes import CONFIG, H, POLYGONS, STROKES, W  # noqa: E402
from training.ops.stack import Stack  # noqa: E402
from conftest import free_port  # noqa: E402


def brush(label, mask, i):
    return {"id": f"b{label}{i}", "from_name": "tooth", "to_name": "image", "type": "brushlabels",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def polygon(label, points, i):
    return {"id": f"p{label}{i}", "from_name": "outline", "to_name": "image", "type": "polygonlabels",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"points": points, "closed": True, "polygonlabels": [label]}}


def main():
    from label_studio_sdk import LabelStudio

    root = Path(tempfile.mkdtemp())
    images = root / "files" / "images"
    images.mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(images / f"x{i}.png"), (np.random.default_rng(i).random((H, W)) * 255).astype(np.uint8))
    stack = Stack(data=root / "stack", images=images, env={"LABEL_STUDIO_PORT": str(free_port()),
                                                           "LABEL_STUDIO_USER_TOKEN": "record-token-123"})
    argv, env = stack.services()["label-studio"]
    import subprocess
    (root / "stack").mkdir(parents=True)
    proc = subprocess.Popen(argv, env=env, stdout=open(root / "ls.log", "wb"), stderr=subprocess.STDOUT)
    try:
        from training.ops.bootstrap import wait_for_label_studio

        wait_for_label_studio(stack.label_studio_url, 300)
        client = LabelStudio(base_url=stack.label_studio_url, api_key="record-token-123")
        project = client.projects.create(title="export-recording", label_config=CONFIG)
        storage = client.import_storage.local.create(project=project.id, path=str(images), use_blob_urls=True)
        client.import_storage.local.sync(id=storage.id)
        tasks = sorted(client.tasks.list(project=project.id), key=lambda t: t.id)
        strokes = [brush(lab, m, i) for lab, ms in STROKES.items() for i, m in enumerate(ms)]
        polys = [polygon(lab, pts, i) for lab, parts in POLYGONS.items() for i, pts in enumerate(parts)]
        # task 0: one brush annotation
        client.annotations.create(id=tasks[0].id, result=strokes)
        # task 1: a polygon annotation, then a cancelled (skipped) one, created later
        client.annotations.create(id=tasks[1].id, result=polys)
        time.sleep(1.1)
        client.annotations.create(id=tasks[1].id, result=[], was_cancelled=True)
        # task 2: a ground-truth brush annotation, then a later polygon annotation
        client.annotations.create(id=tasks[2].id, result=strokes, ground_truth=True)
        time.sleep(1.1)
        client.annotations.create(id=tasks[2].id, result=polys)
        export = client.projects.exports.as_json(project.id)
        out = HERE / "ls_export_1.23.2.json"
        out.write_text(json.dumps(export, indent=1))
        print(f"wrote {out} ({len(export)} tasks)")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
