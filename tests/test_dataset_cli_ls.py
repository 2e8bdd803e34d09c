"""`toothseg import` and `toothseg export` against a real Label Studio server started here.

A synthetic Labelme dataset (and one malformed file) goes in with --new, comes back with
export, and must be the same masks; a rerun adds nothing; --as predictions makes predictions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from backend.formats import result_to_masks
from training.data.dataset_io import ItemError, read_dataset
from training.data.synth import write_dataset

from conftest import LS_TOKEN as TOKEN, REPO, SYNTH_SIZE  # noqa: F401  (label_studio, ls_client: conftest fixtures)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]



@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 synthetic X-rays as STS Labelme (labelme/ + images/)."""
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, n=4, seed=21, size=SYNTH_SIZE, progress=False)
    return out


def toothseg(url: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "LABEL_STUDIO_URL": url, "LABEL_STUDIO_API_KEY": TOKEN}
    return subprocess.run([sys.executable, "-m", "training.ops.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def summary(out: subprocess.CompletedProcess) -> str:
    return out.stdout.strip().splitlines()[-1]


def ground_truth(folder: Path) -> dict:
    return {item.name: item for item in read_dataset(folder, "labelme") if not isinstance(item, ItemError)}


def test_import_rerun_and_export_round_trip(label_studio, ls_client, dataset, tmp_path):
    src = tmp_path / "labelme"
    src.mkdir()
    for path in (dataset / "labelme").glob("*.json"):  # imagePath ../images/<name>.png still resolves
        doc = json.loads(path.read_text())
        doc["imagePath"] = str((dataset / "images" / f"{path.stem}.png").resolve())
        (src / path.name).write_text(json.dumps(doc))
    (src / "broken.json").write_text('{"shapes": [')
    gt = ground_truth(src)
    assert len(gt) == 4

    out = toothseg(label_studio, "import", src, "--new", "--title", "round trip", "--format", "labelme")
    assert out.returncode == 1, out.stderr  # one file failed, the rest imported
    assert out.stdout.startswith("created project ")
    project = int(out.stdout.split()[2])
    assert summary(out) == (f"import into project {project} as annotations: "
                            f"4 imported, 0 skipped (already there), 1 failed")
    errors = [line for line in out.stderr.splitlines() if "broken.json" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{src / 'broken.json'}: invalid JSON")

    tasks = list(ls_client.tasks.list(project=project, fields="all"))
    assert len(tasks) == 4
    by_name = {t.data["toothseg_source"].split(":")[0]: t for t in tasks}
    assert sorted(by_name) == sorted(f"{name}.png" for name in gt)
    for name, item in gt.items():
        task = by_name[f"{name}.png"]
        assert task.data["image"].startswith(f"/data/upload/{project}/")
        annotations = ls_client.annotations.list(id=task.id)
        assert len(annotations) == 1 and annotations[0].ground_truth
        masks = result_to_masks(annotations[0].result)
        assert sorted(masks) == sorted(item.masks)
        assert all(np.array_equal(masks[label], item.masks[label]) for label in item.masks)  # brush RLE: exact
    assert not list(ls_client.predictions.list(project=project))

    again = toothseg(label_studio, "import", src, "--project", project, "--format", "labelme")
    assert summary(again) == (f"import into project {project} as annotations: "
                              f"0 imported, 4 skipped (already there), 1 failed")
    assert len(list(ls_client.tasks.list(project=project))) == 4
    assert sum(len(ls_client.annotations.list(id=t.id)) for t in tasks) == 4

    out = toothseg(label_studio, "export", "--project", project, tmp_path / "export", "--format", "labelme")
    assert out.returncode == 0, out.stderr
    assert summary(out) == (f"exported project {project} to {tmp_path / 'export'} as labelme: 4 images; "
                            f"0 tasks without annotations, 0 failed")
    exported = ground_truth(tmp_path / "export")
    assert sorted(exported) == sorted(gt)
    for name, item in gt.items():
        back = exported[name]
        assert np.array_equal(back.pixels(), item.pixels())
        assert sorted(back.masks) == sorted(item.masks)
        for label, mask in item.masks.items():  # Labelme outlines: exact up to holes, which they fill
            assert np.array_equal(back.masks[label], ndimage.binary_fill_holes(mask)), (name, label)

    out = toothseg(label_studio, "export", "--project", project, tmp_path / "yolo", "--format", "yolo",
                   "--val-fraction", "0.5")
    assert out.returncode == 0, out.stderr
    train = sorted(p.stem for p in (tmp_path / "yolo" / "labels" / "train").glob("*.txt"))
    val = sorted(p.stem for p in (tmp_path / "yolo" / "labels" / "val").glob("*.txt"))
    assert train and val and sorted(train + val) == sorted(gt)
    assert f"{len(train)} train, {len(val)} val images" in summary(out)


def test_import_as_predictions(label_studio, ls_client, dataset, tmp_path):
    out = toothseg(label_studio, "import", dataset / "labelme", "--new", "--format", "labelme",
                   "--as", "predictions")
    assert out.returncode == 0, out.stderr
    project = int(out.stdout.split()[2])
    assert summary(out) == (f"import into project {project} as predictions: "
                            f"4 imported, 0 skipped (already there), 0 failed")
    tasks = list(ls_client.tasks.list(project=project, fields="all"))
    assert len(tasks) == 4 and all(t.total_annotations == 0 for t in tasks)
    predictions = list(ls_client.predictions.list(project=project))
    assert len(predictions) == 4 and {p.model_version for p in predictions} == {"import"}
    gt = ground_truth(dataset / "labelme")
    for prediction in predictions:
        task = next(t for t in tasks if t.id == prediction.task)
        name = task.data["toothseg_source"].split(":")[0].removesuffix(".png")
        assert sorted(result_to_masks(prediction.result)) == sorted(gt[name].masks)

    again = toothseg(label_studio, "import", dataset / "labelme", "--project", project, "--format", "labelme",
                     "--as", "predictions")
    assert summary(again).endswith("0 imported, 4 skipped (already there), 0 failed")
    assert len(list(ls_client.predictions.list(project=project))) == 4


def test_personal_access_token_is_refreshed_and_sent_as_bearer(label_studio, ls_client, tmp_path):
    """A personal access token (a JWT refresh token) as LABEL_STUDIO_API_KEY: the export and the image
    download go through, each with an access token label_studio_sdk refreshed from it."""
    import httpx
    from PIL import Image

    from backend.images import ImageError, ImageLoader
    from backend.settings import Settings
    from training.export import export_project

    personal = ls_client.tokens.create().token  # made with the legacy token; a JWT refresh token
    assert personal.count(".") == 2
    project = ls_client.projects.create(title="pat", label_config='<View><Image name="image" value="$image"/>'
                                     '<BrushLabels name="tag" toName="image"><Label value="11"/></BrushLabels></View>')
    png = tmp_path / "pat.png"
    Image.fromarray((np.arange(64 * 32) % 251).astype(np.uint8).reshape(32, 64)).save(png)
    with open(png, "rb") as f:
        r = httpx.post(f"{label_studio}/api/projects/{project.id}/import", files={"file": ("pat.png", f, "image/png")},
                       headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    assert r.status_code == 201, r.text
    url = next(iter(ls_client.tasks.list(project=project.id))).data["image"]
    assert url.startswith("/data/upload/")

    settings = Settings.from_env({"LABEL_STUDIO_URL": label_studio, "LABEL_STUDIO_API_KEY": personal})
    loader = ImageLoader(settings)
    assert loader.auth_headers()["Authorization"].startswith("Bearer ")
    assert loader.auth_headers()["Authorization"] != f"Bearer {personal}"  # an access token, not the refresh token
    image = loader.load(url)
    assert (image.height, image.width) == (32, 64)
    assert len(export_project(label_studio, personal, project.id)) == 1
    # the same request with the refresh token itself as the bearer is refused by Label Studio
    assert httpx.get(f"{label_studio}{url}", headers={"Authorization": f"Bearer {personal}"}).status_code == 401
    forged = personal[:-4] + ("AAAA" if not personal.endswith("AAAA") else "BBBB")
    with pytest.raises(ImageError, match="rejected the API key"):
        ImageLoader(Settings.from_env({"LABEL_STUDIO_URL": label_studio, "LABEL_STUDIO_API_KEY": forged})).load(url)
