"""The backend through real HTTP (gunicorn on loopback) with the bodies Label Studio sends."""
import json
import time

import httpx
import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.formats import result_to_masks
from backend.label_config import render_label_config
from conftest import box_prompt, register_model

CONFIG = render_label_config()
POLY_CONFIG = """<View><Image name="img" value="$image"/>
  <PolygonLabels name="teeth" toName="img">""" + "".join(
    f'<Label value="{lab}"/>' for lab in ("11", "12", "13", "21", "22", "23", "31", "32", "33", "41", "42", "43")
) + "</PolygonLabels></View>"
PROJECT = "1.1764000000"  # what Label Studio sends: "<id>.<created timestamp>"


def setup_body(schema=CONFIG, project=PROJECT):
    return {"project": project, "schema": schema, "hostname": "http://localhost:8080",
            "access_token": "legacy-token", "model_version": None, "extra_params": None}


def predict_body(tasks, label_config=CONFIG, project=PROJECT, context=None):
    return {"tasks": tasks, "project": project, "label_config": label_config,
            "params": {"login": None, "password": None, "context": context}}


def task(i, image):
    return {"id": i, "data": {"image": image}, "annotations": [], "predictions": [], "meta": {}, "project": 1}


def local(name):
    return f"/data/local-files/?d=images/{name}"


@pytest.fixture(scope="module")
def bare_backend(start_module_backend, tmp_path_factory):
    """One backend with no model for the tests that only send it bad bodies: each still sees it
    serving after its own."""
    return start_module_backend(MODEL_DIR=tmp_path_factory.mktemp("bare") / "models")


def test_health_and_setup_without_a_model(start_backend, tmp_path):
    server = start_backend(PREDICT_BATCH_LIMIT=0)
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "UP"
    times = []
    for _ in range(5):
        t = time.perf_counter()
        r = httpx.post(f"{server.url}/setup", json=setup_body())
        times.append(time.perf_counter() - t)
        assert r.status_code == 200 and r.json() == {"model_version": "toothseg-untrained"}
    assert sorted(times)[2] < 0.3, times
    # /predict before any model: one empty prediction per task, with a clear log line
    r = httpx.post(f"{server.url}/predict", json=predict_body([task(1, local("a.png")), task(2, local("b.png"))]))
    assert r.status_code == 200
    body = r.json()
    assert body["model_version"] == "toothseg-untrained"
    assert [p["result"] for p in body["results"]] == [[], []]
    assert "has no trained model yet" in server.log_text()


def test_setup_follows_promotions_without_restart(start_backend, tmp_path, trained_weights):
    models = tmp_path / "models"
    server = start_backend(MODEL_DIR=models)
    assert httpx.post(f"{server.url}/setup", json=setup_body()).json()["model_version"] == "toothseg-untrained"
    v1 = register_model(models, "1", trained_weights)
    assert httpx.post(f"{server.url}/setup", json=setup_body()).json()["model_version"] == v1
    v2 = register_model(models, "1", trained_weights)
    assert v2 != v1
    t = time.perf_counter()
    assert httpx.post(f"{server.url}/setup", json=setup_body()).json()["model_version"] == v2
    assert time.perf_counter() - t < 0.3  # no model load in /setup
    # another project has its own registry
    assert httpx.post(f"{server.url}/setup", json=setup_body(project="2.1764000001")).json()["model_version"] == \
        "toothseg-untrained"
    assert "loaded model version" not in server.log_text()


@pytest.fixture(scope="module")
def served(start_module_backend, tmp_path_factory, trained_weights, sam_checkpoint, synth_dir):
    """The backend with the test SAM (vit_tiny, random weights: what SAM costs, not its masks),
    shared by this module's tests that only read from it."""
    return serve(start_module_backend, tmp_path_factory.mktemp("served"), trained_weights, synth_dir,
                 SAM_CHECKPOINT=sam_checkpoint, SAM_MODEL_TYPE="vit_tiny")


@pytest.fixture(scope="module")
def served_lite_medsam(start_module_backend, tmp_path_factory, trained_weights, synth_dir):
    """The backend with LiteMedSAM's real weights, from the package (no SAM_CHECKPOINT), shared
    like `served`."""
    return serve(start_module_backend, tmp_path_factory.mktemp("served-lite-medsam"), trained_weights, synth_dir,
                 SAM_MODEL_TYPE="lite_medsam")


def serve(start_backend, work, trained_weights, synth_dir, **sam):
    models = work / "models"
    version = register_model(models, "1", trained_weights)
    images = synth_dir / "images"
    bad = synth_dir / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("L", (12000, 12000)).save(bad / "bomb.png")
    server = start_backend(MODEL_DIR=models, **sam, SAM_PREANNOTATE="true", LOCAL_FILES_DOCUMENT_ROOT=synth_dir,
                           MAX_IMAGE_PIXELS=50_000_000 // 2, SCORE_THRESHOLD=0.05, PREDICT_BATCH_LIMIT=0)
    names = sorted(p.name for p in images.iterdir())
    return server, version, names


def test_predict_brush_regions_with_fdi_labels(served, synth_dir):
    server, version, names = served
    tasks = [task(i, local(n)) for i, n in enumerate(names[:3])]
    r = httpx.post(f"{server.url}/predict", json=predict_body(tasks), timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == version
    assert len(body["results"]) == 3
    interface = LabelInterface(CONFIG)
    total = 0
    for pred in body["results"]:
        assert pred["model_version"] == version
        assert interface.validate_prediction(pred, return_errors=True) == []
        labels = [region["value"]["brushlabels"][0] for region in pred["result"]]
        assert len(labels) == len(set(labels))  # Hungarian numbering: each tooth label once
        assert all(0 < region["score"] <= 1 for region in pred["result"])
        if pred["result"]:
            assert pred["score"] == pytest.approx(np.mean([region["score"] for region in pred["result"]]), abs=1e-3)
            masks = result_to_masks(pred["result"])
            assert all(m.shape == (320, 640) and m.any() for m in masks.values())
        total += len(labels)
    assert total > 0, server.log_text()[-2000:]
    assert httpx.post(f"{server.url}/setup", json=setup_body()).json()["model_version"] == version


def test_large_batch_makes_label_studio_send_tasks_one_at_a_time(start_backend, tmp_path, trained_weights):
    """Label Studio resends the tasks one per request when a batch gets exactly one result."""
    models = tmp_path / "models"
    version = register_model(models, "1", trained_weights)
    server = start_backend(MODEL_DIR=models)  # PREDICT_BATCH_LIMIT defaults to 1
    t = time.perf_counter()
    r = httpx.post(f"{server.url}/predict", json=predict_body([task(i, local(f"x{i}.png")) for i in range(30)]))
    assert time.perf_counter() - t < 1.0
    assert r.status_code == 200 and len(r.json()["results"]) == 1 and r.json()["model_version"] == version
    assert "asking Label Studio to send them one at a time" in server.log_text()
    single = httpx.post(f"{server.url}/predict", json=predict_body([task(1, local("x1.png"))]))
    assert len(single.json()["results"]) == 1


def test_predict_polygon_config(served):
    server, version, names = served
    r = httpx.post(f"{server.url}/predict", json=predict_body([task(1, local(names[0]))], POLY_CONFIG), timeout=300)
    assert r.status_code == 200
    pred = r.json()["results"][0]
    assert LabelInterface(POLY_CONFIG).validate_prediction(pred, return_errors=True) == []
    assert all(region["type"] == "polygonlabels" and region["from_name"] == "teeth" for region in pred["result"])


@pytest.mark.scenario("One /predict batch with a task without an image key, a missing file, corrupt bytes, a 12000x12000 decompression bomb, a foreign host and a path escape",
                      "each gets an empty prediction with its reason logged; the good task in the batch is predicted; the server keeps serving")
def test_bad_tasks_get_empty_predictions_and_the_rest_is_predicted(served):
    server, version, names = served
    tasks = [
        {"id": 1, "data": {"text": "no image key"}},
        task(2, local("missing.png")),
        task(3, "/data/local-files/?d=bad/corrupt.png"),
        task(4, "/data/local-files/?d=bad/bomb.png"),
        task(5, "http://example.invalid/x.png"),
        task(6, "/data/local-files/?d=../../etc/passwd"),
        task(7, local(names[0])),
    ]
    r = httpx.post(f"{server.url}/predict", json=predict_body(tasks), timeout=300)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [p["result"] for p in results[:6]] == [[]] * 6
    assert results[6]["result"], "the good task in the batch is still predicted"
    log = server.log_text()
    for reason in ("no 'image' image URL", "image file not found", "not a readable image",
                   "exceeds the limit", "not Label Studio's", "outside the document root"):
        assert reason in log
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.scenario("Malformed /predict and /setup bodies (not JSON, not an object, tasks not a list, bad project id, no label config, a config without BrushLabels or PolygonLabels)",
                      "400 with a message, no traceback; the server keeps serving")
@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "JSON object"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"tasks": "x", "project": "1.2", "label_config": CONFIG}).encode(), 400, "list of task objects"),
    (json.dumps({"tasks": [], "project": "abc", "label_config": CONFIG}).encode(), 400, "project id"),
    (json.dumps({"tasks": [], "project": "1.2"}).encode(), 400, "label_config"),
    (json.dumps({"tasks": [], "project": "1.2", "label_config":
                 '<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'}
                ).encode(), 400, "no BrushLabels or PolygonLabels"),
])
def test_malformed_predict_requests_are_400_with_a_message(bare_backend, body, status, message):
    server = bare_backend
    r = httpx.post(f"{server.url}/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    assert message in r.json()["error"]
    assert "Traceback" not in r.text
    r = httpx.post(f"{server.url}/setup", content=b"nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/health").status_code == 200


def the_tooth_it_covers(mask, masks) -> tuple[str, float]:
    """The drawn tooth a returned mask overlaps most, and their Dice."""
    label = max(masks, key=lambda other: (mask & masks[other]).sum())
    return label, 2 * (mask & masks[label]).sum() / (mask.sum() + masks[label].sum())


def test_interactive_rectangle_prompts_sam(served_lite_medsam, synth_dir):
    """A box drawn in Label Studio around a tooth gives LiteMedSAM's mask of that tooth, with the
    box's label."""
    server, version, names = served_lite_medsam
    from training.data.labelme import read_labelme

    masks, (h, w) = read_labelme(synth_dir / "labelme" / names[1].replace(".png", ".json"))
    box = box_prompt(masks["21"], "21")
    r = httpx.post(f"{server.url}/predict", json=predict_body([task(1, local(names[1]))], context={"result": [box]}),
                   timeout=300)
    regions = r.json()["results"][0]["result"]
    assert len(regions) == 1 and regions[0]["value"]["brushlabels"] == ["21"]
    mask = result_to_masks(regions)["21"]
    assert mask.shape == (h, w)
    label, dice = the_tooth_it_covers(mask, masks)
    assert label == "21" and dice >= 0.7, (label, dice)
    # a prompt without a tooth label gives an empty result, not an error
    box["value"]["rectanglelabels"] = ["Caries"]
    r = httpx.post(f"{server.url}/predict", json=predict_body([task(1, local(names[1]))], context={"result": [box]}))
    assert r.status_code == 200 and r.json()["results"][0]["result"] == []


def test_interactive_keypoint_prompts_sam(served_lite_medsam, synth_dir):
    """A point clicked on a tooth gives a mask on that tooth, with the point's label (LiteMedSAM
    takes boxes only: the click picks the detector's box under it); a click on no tooth gives no
    region."""
    server, version, names = served_lite_medsam
    from training.data.labelme import read_labelme

    masks, (h, w) = read_labelme(synth_dir / "labelme" / names[0].replace(".png", ".json"))
    ys, xs = np.nonzero(masks["11"])
    point = {"original_width": w, "original_height": h, "image_rotation": 0, "type": "keypointlabels",
             "from_name": "tooth_point", "to_name": "image", "is_positive": True, "origin": "manual", "id": "p1",
             "value": {"x": xs.mean() / w * 100, "y": ys.mean() / h * 100, "width": 0.5, "keypointlabels": ["11"]}}
    r = httpx.post(f"{server.url}/predict", json=predict_body([task(1, local(names[0]))], context={"result": [point]}),
                   timeout=300)
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 1
    regions = results[0]["result"]
    assert len(regions) == 1 and regions[0]["value"]["brushlabels"] == ["11"]
    label, dice = the_tooth_it_covers(result_to_masks(regions)["11"], masks)
    assert label == "11" and dice >= 0.7, (label, dice)
    point["value"].update(x=0.5, y=0.5)  # the image's corner
    r = httpx.post(f"{server.url}/predict", json=predict_body([task(1, local(names[0]))], context={"result": [point]}))
    assert r.status_code == 200 and r.json()["results"][0]["result"] == []


def test_the_background_pass_gives_what_predict_gives(served_lite_medsam, synth_dir):
    """/predict (the backend process) and the pipeline the background pass runs
    (`Runtime.serve(project).pipeline`, training.preannotate.run_chunk, here in the test's process
    with its own embedding) give the same regions for the same image and version; LiteMedSAM
    changed some of those masks (the same pipeline without SAM differs)."""
    from backend.formats import find_target, instances_to_results
    from backend.images import ImageLoader
    from backend.pipeline import PipelineOptions
    from backend.runtime import Runtime
    from backend.settings import Settings

    server, version, names = served_lite_medsam
    r = httpx.post(f"{server.url}/predict", json=predict_body([task(1, local(names[2]))]), timeout=300)
    assert r.status_code == 200, r.text
    over_http = r.json()["results"][0]
    assert over_http["model_version"] == version and over_http["result"]

    settings = Settings.from_env({**server.env, "LOCAL_FILES_DOCUMENT_ROOT": str(synth_dir)})
    served = Runtime(settings).serve("1")
    target = find_target(CONFIG)
    image = ImageLoader(settings).load(local(names[2]))
    background = instances_to_results(served.pipeline.run(image), target)
    assert served.version == version
    assert result_to_masks(background).keys() == result_to_masks(over_http["result"]).keys()
    for label, mask in result_to_masks(background).items():
        assert np.array_equal(mask, result_to_masks(over_http["result"])[label]), label
    served.pipeline.options = PipelineOptions.from_settings(settings, use_sam=False)
    without_sam = result_to_masks(instances_to_results(served.pipeline.run(image), target))
    assert any(not np.array_equal(m, without_sam[label]) for label, m in result_to_masks(background).items())
