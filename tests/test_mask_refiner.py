"""The learned mask refiner (backend.mask_refiner, training.refiner_training): its crop geometry, that it
travels inside the detector's checkpoint, that it redraws masks tighter than the guided filter after a
short training on the detector's own training images, and that a refiner that loses a tooth does not
take the tooth away."""
import shutil

import numpy as np
import pytest
import torch

from backend.detector import Detector
from backend.mask_refiner import CHECKPOINT_KEY, MaskRefiner, RefinerNet, crop_mask, crop_window, paste
from conftest import SYNTH_SIZE
from training.data.synth import generate

REFINER_TEST_STEPS = 150  # about 40 s on 2 cores; the product trains TRAIN_REFINER_STEPS (200)


def _matched_ious(detector: Detector, samples, learned: bool) -> np.ndarray:
    """IoU of each annotated tooth with the region numbered and matched to it by the pipeline."""
    from scipy.optimize import linear_sum_assignment

    from backend.numbering import number_teeth
    from backend.pipeline import PipelineOptions
    from training.oracle import iou_matrix

    options = PipelineOptions()
    out = []
    for sample in samples:
        candidates = detector.detect(sample.image)
        numbered = number_teeth(candidates.boxes, candidates.probs, options.prior_weight, 0.1, candidates.tooth)
        masks = candidates.masks([a.index for a in numbered], sample.image, learned=learned)
        gt = [m for m in sample.masks().values() if m.any()]
        ious = iou_matrix(list(masks), gt)
        rows, cols = linear_sum_assignment(ious, maximize=True)
        out += [ious[i, j] for i, j in zip(rows, cols) if ious[i, j] > 0.1]
    return np.array(out)


def test_a_crop_pasted_back_is_the_mask_it_came_from():
    import cv2

    mask = np.zeros((300, 400), np.uint8)
    cv2.ellipse(mask, (170, 140), (22, 70), 12, 0, 360, 1, -1)
    mask = mask.astype(bool)
    ys, xs = np.nonzero(mask)
    window = crop_window((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    rows, cols, back = paste(crop_mask(mask, window) * 2 - 1, window, mask.shape)
    pasted = np.zeros_like(mask)
    pasted[rows, cols] = back
    iou = (pasted & mask).sum() / (pasted | mask).sum()
    assert iou >= 0.98, iou  # half a pixel off on either axis gives about 0.96


def test_the_mirror_pass_makes_the_outline_mirror_symmetric():
    """With its mirror pass, the refiner draws the mirror image of a crop as the mirror image of its
    outline (an untrained net does not: without the pass the two differ)."""
    torch.manual_seed(0)
    refiner = MaskRefiner(RefinerNet(8).eval())
    inputs = np.random.default_rng(0).normal(size=(3, 2, 128, 64)).astype(np.float32)
    mirrored = np.ascontiguousarray(inputs[..., ::-1])
    np.testing.assert_allclose(refiner.predict(mirrored), refiner.predict(inputs)[..., ::-1], atol=1e-5)
    plain, plain_mirrored = refiner.predict(inputs, mirror=False), refiner.predict(mirrored, mirror=False)
    assert np.abs(plain_mirrored - plain[..., ::-1]).max() > 1e-2
    np.testing.assert_allclose(refiner.predict(inputs), (plain + plain_mirrored[..., ::-1]) / 2, atol=1e-5)


@pytest.mark.slow
def test_the_refiner_is_stored_in_the_checkpoint_and_redraws_masks_tighter(trained_weights, tmp_path):
    from training.refiner_training import train_refiner

    weights = tmp_path / "weights.pt"
    shutil.copyfile(trained_weights, weights)
    assert Detector.load(weights).refiner is None
    # the fixture's detector was trained on synth seeds 1000..1023: the refiner trains on 8 of them
    train = [generate(1000 + i, SYNTH_SIZE).item(f"s{i}") for i in range(8)]
    result = train_refiner(weights, train, REFINER_TEST_STEPS)
    assert result.steps_run == REFINER_TEST_STEPS and result.pairs > 100, result
    detector = Detector.load(weights)
    assert detector.refiner is not None and detector.refiner.steps == REFINER_TEST_STEPS
    assert CHECKPOINT_KEY in torch.load(weights, map_location="cpu", weights_only=False)

    held_out = [generate(5000 + i, SYNTH_SIZE) for i in range(4)]
    learned, guided = _matched_ious(detector, held_out, True), _matched_ious(detector, held_out, False)
    print(f"\nmatched IoU on {len(held_out)} held-out images: learned refiner median {np.median(learned):.3f} "
          f"(share >= 0.9: {(learned >= 0.9).mean():.2f}), guided filter median {np.median(guided):.3f} "
          f"(share >= 0.9: {(guided >= 0.9).mean():.2f})")
    assert len(learned) == len(guided)
    assert np.median(learned) >= np.median(guided) + 0.05


def test_a_refiner_that_loses_the_tooth_leaves_the_filtered_mask(trained_weights):
    net = RefinerNet()
    with torch.no_grad():
        net.head.bias.fill_(-20.0)  # predicts background everywhere
    detector = Detector.load(trained_weights)
    detector.refiner = MaskRefiner(net.eval())
    sample = generate(5100, SYNTH_SIZE)
    candidates = detector.detect(sample.image)
    keep = [i for i in range(len(candidates)) if candidates.tooth[i] >= 0.25]
    assert keep
    filtered = candidates.masks(keep, sample.image, learned=False)
    assert filtered.any(axis=(1, 2)).all()
    assert np.array_equal(candidates.masks(keep, sample.image), filtered)


def test_the_refiner_stops_at_the_jobs_deadline_and_writes_nothing_then(trained_weights, tmp_path):
    import time

    from training.refiner_training import train_refiner

    weights = tmp_path / "weights.pt"
    shutil.copyfile(trained_weights, weights)
    before = weights.read_bytes()
    train = [generate(1000 + i, SYNTH_SIZE).item(f"s{i}") for i in range(2)]
    result = train_refiner(weights, train, 50, deadline=time.monotonic())
    assert result.steps_run == 0 and result.stopped_by == "budget" and result.pairs > 0, result
    assert weights.read_bytes() == before and Detector.load(weights).refiner is None


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 19])
def test_a_short_warm_started_refiner_trains(trained_weights, tmp_path, steps):
    """Warm starts train TRAIN_REFINER_WARM_STEPS steps, which a test budget makes a handful."""
    from training.refiner_training import train_refiner

    weights = tmp_path / "weights.pt"
    shutil.copyfile(trained_weights, weights)
    train = [generate(1000, SYNTH_SIZE).item("s0")]
    warm = MaskRefiner(RefinerNet().eval(), steps=7)
    result = train_refiner(weights, train, steps, warm=warm)
    assert result.steps_run == steps, result
    assert Detector.load(weights).refiner.steps == 7 + steps


def test_train_refiner_steps_0_means_no_refiner(trained_weights, tmp_path):
    from training.refiner_training import train_refiner

    weights = tmp_path / "weights.pt"
    shutil.copyfile(trained_weights, weights)
    result = train_refiner(weights, [generate(1000, SYNTH_SIZE).item("s0")], 0)
    assert (result.steps_run, result.stopped_by) == (0, "off") and Detector.load(weights).refiner is None
