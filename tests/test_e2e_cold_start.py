"""Cold start on the native stack: a new project, 8 annotated tasks, *Start training* as a user presses it,
and the first model, trained with the product's defaults (no YOLO_WEIGHTS: from toothseg's shipped
synthetic-pretrained detector), pre-annotates the other tasks.

The one setting that differs from a user's is the documented test budget: TRAIN_STEPS below (the
product trains 1500 steps or until its 9-minute budget runs out, whichever comes first: about 1200
steps on this 2-core machine; here 1000, about 7 minutes, so that CI stays within its hour; the
9-minute budget still applies). Everything else, the learning rate, the batch, the augmentations,
the image size, the tooth super-class, the learned mask refiner, the budget and the gate, is what
`docker compose up` ships.
"""
import time

import numpy as np
import pytest

from backend.detector import Detector
from backend.formats import result_to_masks
from backend.registry import Registry
from conftest import import_seeds, wait_for
from training.metrics import mean_scores, score_image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "cold-start-token-0123456789"
COLD_START_TEST_STEPS = 1000  # TRAIN_STEPS; the product's default is 1500 within 9 minutes
BUDGET_MINUTES = 9  # the product's TRAIN_TIME_BUDGET
SIZE = (1000, 500)  # the detector sees every image at imgsz 640, so a 2000x1000 image looks the same to it


def test_first_model_from_8_annotated_images_pre_annotates_the_rest(make_stack):
    from label_studio_sdk import LabelStudio

    stack = make_stack(seeds=8, pool=6, token=TOKEN, size=SIZE, yolo_weights=False, quick_training=False,
                       TRAIN_STEPS=COLD_START_TEST_STEPS, PREANNOTATE_AFTER_PROMOTION="false")
    try:
        boot = stack.up()
        client = LabelStudio(base_url=stack.label_studio_url, api_key=TOKEN)
        project = boot["project"]
        import_seeds(client, project, stack)
        registry = Registry(stack.data / "models")

        # Start training, as the button in Settings -> Model does
        ml = client.ml.list(project=project)[0]
        started = time.monotonic()
        client.ml.train(id=ml.id)
        version = wait_for("the first model", lambda: registry.current_version(project), BUDGET_MINUTES * 60 + 120, 2)
        seconds = time.monotonic() - started
        meta = registry.get(project, version).meta
        assert meta["counts"] == {"train": 7, "val": 1, "pseudo": 0} and meta["parent"] is None
        assert meta["started_from"].endswith("synthetic-pretrained.pt")
        assert meta["hyperparameters"]["preset"] == "small" and meta["hyperparameters"]["tooth_class"]
        assert "first model" in meta["gate"]
        # the learned mask refiner was trained within the same budget and is part of the version
        assert meta["mask_refiner"]["steps_run"] > 0, meta["mask_refiner"]
        assert Detector.load(registry.get(project, version).weights).refiner is not None
        assert seconds < BUDGET_MINUTES * 60 + 60, f"promoted {seconds:.0f} s after Start training"
        # the job's outcome is on the ML backend's card in Label Studio
        title = client.ml.get(id=ml.id).title
        assert title.startswith("toothseg · ") and version in title, title

        # the promoted model pre-annotates the other tasks
        pool = [t for t in client.tasks.list(project=project) if "pool_" in t.data["image"]]
        assert len(pool) == 6
        client.actions.create(id="retrieve_tasks_predictions", project=project,
                              selected_items={"all": False, "included": [t.id for t in pool]},
                              request_options={"timeout_in_seconds": 600})
        predictions = {p.task: p for p in client.predictions.list(project=project) if p.model_version == version}
        scores = []
        for task in pool:
            name = task.data["image"].rsplit("/", 1)[-1]
            sample = stack.samples[name]
            predicted = result_to_masks(predictions[task.id].result, SIZE[1], SIZE[0])
            scores.append(score_image(predicted, sample.masks()))
        mean = mean_scores(scores)
        print(f"\ncold start: promoted {version} {seconds:.0f} s after Start training "
              f"({meta['steps_run']} steps, stopped by {meta['stopped_by']}; mask refiner {meta['mask_refiner']}); on the {len(pool)} other tasks IA "
              f"{mean.ia:.3f}, instance Dice {mean.instance_dice:.3f} (per task {np.round([s.ia for s in scores], 2)})")
        assert mean.ia >= 0.8, mean
    except BaseException:
        print(stack.log_tails(80))
        raise
