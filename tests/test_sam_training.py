"""Tuning LiteMedSAM's prompt encoder and mask decoder on annotated teeth (training.sam_training),
with its real weights on synthetic panoramics at its scale."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from backend.images import pixel_hash
from backend.sam import EmbeddingCache, SamRefiner
from training.data.dataset_io import DatasetItem
from training.data.synth import generate
from training.sam_training import decoder_state, tune_sam

pytestmark = pytest.mark.slow  # trains SAM's decoder, and a detector in a smoke retrain: about 1.5 min
SIZE = (512, 512)


@pytest.fixture(scope="module")
def lite_medsam() -> SamRefiner:
    return SamRefiner.load("lite_medsam", None, cache=EmbeddingCache(8), batch_size=4)


def tooth_dice(refiner: SamRefiner, sample) -> float:
    """Mean Dice of SAM's masks from each tooth's own box."""
    masks = [m for m in sample.masks().values() if m.sum() >= 200]
    boxes = np.array([[xs.min(), ys.min(), xs.max(), ys.max()] for ys, xs in (np.nonzero(m) for m in masks)], float)
    found, _ = refiner.sam_masks(sample.image, pixel_hash(sample.image), boxes)
    return float(np.mean([2 * (f & m).sum() / (f.sum() + m.sum()) for f, m in zip(found, masks)]))


def test_tuning_on_annotated_teeth_gives_better_masks_on_another_image(lite_medsam):
    """Tuned on two annotated images (6 steps of 6 teeth; 8 steps of 8 measured 0.894 -> 0.950 on
    the third image), SAM draws the teeth of a third better than the shipped decoder does, from the same boxes, on the same embeddings (the tuned refiner finds the third
    image's embedding in the shared cache). The shipped refiner is left as it was."""
    train = [generate(seed, SIZE).item(f"s{seed}") for seed in (41, 42)]
    other = generate(43, SIZE)
    before = tooth_dice(lite_medsam, other)
    shipped = {k: v.clone() for k, v in decoder_state(lite_medsam.predictor.model).items()}

    result, state = tune_sam(lite_medsam, train, steps=6, images_per_step=1, boxes_per_image=6, lr=3e-4)
    assert (result.images, result.steps_run, result.stopped_by) == (2, 6, "steps") and result.teeth >= 40
    assert state is not None and all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in state)
    tuned = lite_medsam.with_decoder(state)
    assert tuned.cache is lite_medsam.cache and tuned.checkpoint_id == lite_medsam.checkpoint_id
    with tuned.lock:
        assert tuned.set_image(other.image, pixel_hash(other.image)), "the embedding comes from the shared cache"
    after = tooth_dice(tuned, other)
    assert after >= before + 0.02, (before, after)
    assert all(torch.equal(v, shipped[k]) for k, v in decoder_state(lite_medsam.predictor.model).items())
    assert tooth_dice(lite_medsam, other) == pytest.approx(before)


def test_no_annotated_teeth_no_state_and_a_foreign_state_is_refused(lite_medsam):
    empty = DatasetItem("empty", generate(44, SIZE).image, {})
    result, state = tune_sam(lite_medsam, [empty], steps=5)
    assert state is None and (result.teeth, result.steps_run, result.stopped_by) == (0, 0, "no teeth")
    with pytest.raises(ValueError, match="not a SAM decoder state"):
        lite_medsam.with_decoder({"mask_decoder.iou_token.weight": torch.zeros(1, 256)})


@pytest.fixture(scope="module")
def tuned_round(tmp_path_factory, lite_medsam):
    """A smoke project's first retrain with TRAIN_SAM_STEPS=4: (sim, its version)."""
    from backend.registry import Registry
    from training.jobs import Progress, run_round
    from training.simulate import SimProject, preset

    sim = SimProject(preset("smoke"), 0, tmp_path_factory.mktemp("sam-round"), log=lambda line: None)
    config = replace(sim.config_for({"TRAIN_SAM_STEPS": "4"}), time_budget=0)
    summary = run_round("101", sim.settings, sim.exported(sim.keys["lab"]), "sam-1", config, Progress("101", 0))
    return sim, Registry(sim.settings.model_dir).get("101", summary["version"])


def damaged(state: dict) -> dict:
    """A decoder state whose masks are inverted: SAM draws everything but the tooth."""
    return {k: -v if k.startswith("mask_decoder.output_hypernetworks_mlps.") and k.endswith(".2.weight") else v
            for k, v in state.items()}


def test_a_retrain_with_train_sam_steps_stores_the_tuned_sam_and_the_backend_serves_it(tmp_path, lite_medsam,
                                                                                      tuned_round):
    """TRAIN_SAM_STEPS > 0: the retrain job tunes SAM after the refiner, the gate finds it better than
    the shipped SAM on the validation split, and the job writes the decoder and its thresholds into
    the version's weights (its meta says how); the backend serves that version with them, on the
    shipped encoder. A decoder tuned from another SAM checkpoint is not served."""
    from backend.detector import Detector
    from backend.pipeline import PipelineOptions
    from backend.runtime import Runtime
    from backend.settings import Settings
    from conftest import register_model
    from training.sam_training import write_decoder

    sim, version = tuned_round
    meta = version.meta["sam_decoder"]
    assert meta["steps_run"] == 4 and meta["images"] >= 1 and meta["promoted"], meta
    assert meta["tuned"]["instance_dice"] >= meta["current"]["instance_dice"] - 0.05, meta
    detector = Detector.load(version.weights)
    runtime = Runtime(sim.settings)
    shipped = runtime.refiner()
    assert detector.sam_decoder["base"] == shipped.checkpoint_id == lite_medsam.checkpoint_id
    assert detector.sam_decoder["thresholds"] == meta["thresholds"]
    tuned = runtime.refiner_for(detector)
    assert tuned is not shipped and tuned is runtime.refiner_for(detector)  # built once per loaded model
    assert (tuned.min_iou, tuned.min_agreement) == tuple(meta["thresholds"].values())
    assert tuned.predictor.model.image_encoder is shipped.predictor.model.image_encoder
    served = decoder_state(tuned.predictor.model)
    assert all(torch.equal(served[k], v) for k, v in detector.sam_decoder["state"].items())
    assert not all(torch.equal(served[k], v) for k, v in decoder_state(shipped.predictor.model).items())
    # pre-annotation with SAM serves the version's own decoder (promoted or not, the gate's call)
    serving = Runtime(Settings.from_env({**sim.env, "MODEL_DIR": str(tmp_path / "serving")}))
    register_model(tmp_path / "serving", "1", version.weights)
    pipeline = serving.serve("1", PipelineOptions(use_sam=True)).pipeline
    assert pipeline.refiner is serving.refiner_for(pipeline.detector) and pipeline.refiner is not serving.refiner()

    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(version.weights.read_bytes())
    write_decoder(foreign, detector.sam_decoder["state"], "vit_b-0123456789abcdef", {})
    assert runtime.refiner_for(Detector.load(foreign)) is shipped


def test_the_gate_refuses_a_worse_sam_and_the_current_one_stays(tuned_round, lite_medsam, monkeypatch):
    """A tuned SAM that draws worse on the validation split is not promoted: against the shipped SAM
    nothing is stored; against the current version's tuned SAM the new version carries that one."""
    import training.jobs
    from backend.detector import Detector
    from backend.pipeline import PipelineOptions
    from backend.registry import Registry, promote
    from training.jobs import Progress, run_round
    from training.sam_training import SamTuneResult, gate_sam

    sim, first = tuned_round
    carried = Detector.load(first.weights).sam_decoder
    worse = damaged(carried["state"])
    val = [generate(seed, sim.config.size).item(f"v{seed}") for seed in (45,)]
    decision = gate_sam(Detector.load(first.weights), lite_medsam, lite_medsam.with_decoder(worse), val,
                        PipelineOptions(use_sam=False))
    assert not decision.promote and "not promoted" in decision.reason, decision
    assert decision.tuned["instance_dice"] < decision.current["instance_dice"]

    registry = Registry(sim.settings.model_dir)
    promote(registry, "101", first.version, "the tuned SAM serves")  # whatever the smoke detector's gate said
    monkeypatch.setattr(training.jobs, "tune_sam", lambda *a, **k: (SamTuneResult(9, 2, 4, 1.0, "steps"), worse))
    config = replace(sim.config_for({"TRAIN_SAM_STEPS": "4"}), time_budget=0)
    summary = run_round("101", sim.settings, sim.exported(sim.keys["lab"]), "sam-2", config, Progress("101", 0))
    second = registry.get("101", summary["version"])
    assert second.meta["sam_decoder"]["promoted"] is False, second.meta["sam_decoder"]
    stored = Detector.load(second.weights).sam_decoder
    assert all(torch.equal(stored["state"][k], v) for k, v in carried["state"].items())


def test_rollback_serves_the_previous_versions_sam(tmp_path, tuned_round):
    """Each version carries its own SAM decoder and thresholds: after a rollback the backend serves
    the older version's."""
    from backend.detector import Detector
    from backend.pipeline import PipelineOptions
    from backend.registry import Registry, rollback
    from backend.runtime import Runtime
    from backend.settings import Settings
    from conftest import register_model
    from training.sam_training import write_decoder

    sim, version = tuned_round
    decoder = Detector.load(version.weights).sam_decoder
    other = tmp_path / "other.pt"
    other.write_bytes(version.weights.read_bytes())
    write_decoder(other, damaged(decoder["state"]), decoder["base"], {}, (0.9, 0.8))
    model_dir = tmp_path / "models"
    first = register_model(model_dir, "7", version.weights)
    register_model(model_dir, "7", other)
    runtime = Runtime(Settings.from_env({**sim.env, "MODEL_DIR": str(model_dir)}))

    def served() -> tuple[dict, tuple[float, float]]:
        refiner = runtime.serve("7", PipelineOptions(use_sam=True)).pipeline.refiner
        return decoder_state(refiner.predictor.model), (refiner.min_iou, refiner.min_agreement)

    state, thresholds = served()
    assert thresholds == (0.9, 0.8) and not torch.equal(state["mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"],
                                                        decoder["state"]["mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"])
    rollback(Registry(model_dir), "7", first)
    state, thresholds = served()
    assert thresholds == tuple(decoder["thresholds"].values())
    assert all(torch.equal(state[k], v) for k, v in decoder["state"].items())


def test_the_gate_scores_from_the_detectors_boxes_and_chooses_thresholds(trained_weights, lite_medsam):
    """With a detector that finds the teeth, the gate prompts SAM with its numbered boxes, and the
    thresholds are the best pair of the grid for the SAM that serves (an equal SAM is kept: a tie)."""
    from backend.detector import Detector
    from backend.pipeline import PipelineOptions
    from conftest import SYNTH_SIZE
    from training.sam_training import THRESHOLD_PAIRS, gate_sam

    val = [generate(seed, SYNTH_SIZE).item(f"v{seed}") for seed in (46, 47)]
    same = lite_medsam.with_decoder(decoder_state(lite_medsam.predictor.model))
    decision = gate_sam(Detector.load(trained_weights), lite_medsam, same, val, PipelineOptions(use_sam=False))
    assert decision.promote and "from the detector's boxes" in decision.reason and decision.teeth >= 20, decision
    assert decision.tuned == decision.current and decision.thresholds in THRESHOLD_PAIRS


def test_predict_answers_a_box_with_the_versions_tuned_sam(tmp_path, tuned_round, monkeypatch):
    """The backend's `/predict` (Label Studio's interactive rectangle) draws the tooth with the
    serving version's tuned SAM, not the shipped one."""
    import cv2

    from backend import app as app_module
    from backend import runtime as runtime_module
    from backend.formats import result_to_masks
    from backend.label_config import render_label_config
    from conftest import box_prompt, register_model
    from training.metrics import dice

    sim, version = tuned_round
    model_dir, files = tmp_path / "models", tmp_path / "files"
    register_model(model_dir, "3", version.weights)
    (files / "images").mkdir(parents=True)
    sample = generate(48, sim.config.size)
    cv2.imwrite(str(files / "images" / "48.png"), sample.image)
    for name, value in {"MODEL_DIR": str(model_dir), "LOCAL_FILES_DOCUMENT_ROOT": str(files),
                        "LABEL_STUDIO_URL": "", "EMBEDDING_CACHE_DIR": ""}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime_module, "_runtime", None)  # this process's Runtime, from the environment above
    client = app_module.create_app().test_client()
    label, mask = max(sample.masks().items(), key=lambda item: item[1].sum())
    answer = client.post("/predict", json={
        "tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=images/48.png"}}], "project": "3.0",
        "label_config": render_label_config(), "params": {"context": {"result": [box_prompt(mask, label)]}}})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    drawn = result_to_masks(answer.get_json()["results"][0]["result"])[label]
    runtime = runtime_module.get_runtime()
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], float)
    tuned, _ = runtime.refiner_for(runtime.detector("3")[1]).prompt(sample.image, pixel_hash(sample.image), box)
    shipped, _ = runtime.refiner().prompt(sample.image, pixel_hash(sample.image), box)
    assert dice(drawn, tuned) > 0.98 and dice(drawn, shipped) < dice(drawn, tuned) - 0.01, (
        dice(drawn, tuned), dice(drawn, shipped))
