"""STS 2024 metrics: every expected value below is worked out by hand in the comments.

Coordinates are (row, col). For the "sts" NSD, corner (i, j) of the pixel-corner lattice is
the top-left corner of pixel (i, j) and touches pixels (i-1, j-1), (i-1, j), (i, j-1), (i, j);
its surfel area by 2x2 pattern is: 1 pixel T = sqrt(3)/8, 2 edge-adjacent E = sqrt(2)/2,
2 diagonal 2T = sqrt(3)/4, 3 pixels 1/2 + 3T, 4 pixels 1.
"""
from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest

from training.data.labelme import masks_to_labelme, write_labelme
from training.metrics import Scores, dice, evaluate_folder, iou, mean_scores, nsd, score_image

T = math.sqrt(3) / 8  # one foreground pixel at a corner
E = math.sqrt(2) / 2  # two edge-adjacent pixels at a corner
VARIANTS = ("sts", "contour")


def box(r0: int, r1: int, c0: int, c1: int, shape: tuple[int, int] = (20, 40)) -> np.ndarray:
    """Bool mask with rows r0..r1 and cols c0..c1 (inclusive) set."""
    m = np.zeros(shape, dtype=bool)
    m[r0:r1 + 1, c0:c1 + 1] = True
    return m


def pixels(coords: list[tuple[int, int]], shape: tuple[int, int] = (12, 12)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for r, c in coords:
        m[r, c] = True
    return m


EMPTY = np.zeros((20, 40), dtype=bool)


# --- Dice / IoU ----------------------------------------------------------------------------

def test_dice_iou_of_overlapping_rectangles():
    a = box(0, 3, 0, 3)  # 16 px
    b = box(2, 5, 2, 5)  # 16 px, overlap rows 2-3 x cols 2-3 = 4 px
    assert dice(a, b) == pytest.approx(2 * 4 / (16 + 16))  # 0.25
    assert iou(a, b) == pytest.approx(4 / (16 + 16 - 4))  # 1/7
    assert dice(b, a) == dice(a, b) and iou(b, a) == iou(a, b)


def test_dice_iou_of_disjoint_masks_are_zero():
    a, b = box(0, 3, 0, 3), box(10, 13, 20, 23)
    assert dice(a, b) == 0.0
    assert iou(a, b) == 0.0


def test_both_empty_gives_one_everywhere():
    assert dice(EMPTY, EMPTY) == 1.0
    assert iou(EMPTY, EMPTY) == 1.0
    for variant in VARIANTS:
        assert nsd(EMPTY, EMPTY, variant=variant) == 1.0


@pytest.mark.parametrize("swap", [False, True])
def test_one_empty_gives_zero_everywhere(swap):
    a, b = (EMPTY, box(2, 5, 2, 5)) if not swap else (box(2, 5, 2, 5), EMPTY)
    assert dice(a, b) == 0.0
    assert iou(a, b) == 0.0
    for variant in VARIANTS:
        assert nsd(a, b, variant=variant) == 0.0


def test_non_bool_masks_are_cast_to_bool():
    a = box(0, 3, 0, 3).astype(np.uint8) * 255
    b = box(2, 5, 2, 5).astype(np.float32)
    assert dice(a, b) == pytest.approx(0.25)


def test_shape_mismatch_and_bad_options_raise():
    with pytest.raises(ValueError, match="different shapes"):
        dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="2-D"):
        iou(np.zeros((4,), bool), np.zeros((4,), bool))
    with pytest.raises(ValueError, match="unknown NSD variant"):
        nsd(EMPTY, EMPTY, variant="hausdorff")
    with pytest.raises(ValueError, match="tolerance"):
        nsd(EMPTY, EMPTY, tolerance=-1.0)


# --- NSD, contour variant ------------------------------------------------------------------

SQUARE = box(5, 8, 5, 8)  # 4x4; boundary (4-neighbour rule) = 12 px, interior 2x2


def test_contour_nsd_square_shifted_by_one():
    shifted = box(5, 8, 6, 9)
    # tau = 2: every boundary pixel of either square is at most 1 px from the other boundary.
    assert nsd(SQUARE, shifted, variant="contour") == pytest.approx(1.0)
    # tau = 0.5: only exact coincidences count. The common boundary pixels are rows 5 and 8,
    # cols 6-8: 6 of 12 on each side; (5,5), (6,5), (6,8), ... are 1 px away.
    # NSD = (6 + 6) / (12 + 12) = 0.5
    assert nsd(SQUARE, shifted, tolerance=0.5, variant="contour") == pytest.approx(0.5)


def test_contour_nsd_square_shifted_by_five():
    shifted = box(5, 8, 10, 13)
    # A's right column (col 8, rows 5-8) is 2 px from B's left column (col 10): 4 of 12 within;
    # A's (5,7) is already 3 px from (5,10). Symmetric for B: 4 of 12.
    # NSD = (4 + 4) / (12 + 12) = 1/3
    assert nsd(SQUARE, shifted, variant="contour") == pytest.approx(1 / 3)
    # tau = 1: nothing within.
    assert nsd(SQUARE, shifted, tolerance=1.0, variant="contour") == 0.0


def test_contour_nsd_rectangle_against_its_left_half():
    gt = box(10, 19, 30, 39)  # 10x10, boundary 36 px
    pred = box(10, 19, 30, 34)  # 10x5, boundary 2*10 + 2*5 - 4 = 26 px
    # GT boundary within 2 px of pred boundary: top row cols 30-36 (7: col 35 is 1 px and
    # col 36 2 px from (10,34)), bottom row likewise 7, left col rows 11-18 (8, on pred's
    # boundary); right col 39 is 5 px away (0). Total 22.
    # Pred boundary within 2 px of GT boundary: top 5 + bottom 5 + left 8 (all on GT's
    # boundary); right col 34 rows 11-18 is min(r-10, 19-r, 5) away: rows 11, 12, 17, 18
    # within (4), rows 13-16 at 3-4 px not. Total 22.
    # NSD = (22 + 22) / (36 + 26) = 22/31
    assert nsd(pred, gt, variant="contour") == pytest.approx(22 / 31)
    assert nsd(gt, pred, variant="contour") == pytest.approx(22 / 31)


def test_contour_boundary_uses_the_four_neighbour_rule():
    plus = pixels([(4, 5), (5, 4), (5, 5), (5, 6), (6, 5)])
    square = pixels([(r, c) for r in (4, 5, 6) for c in (4, 5, 6)])
    # 4-neighbour rule: the plus's centre has all 4 neighbours inside, so its boundary is the
    # 4 arms; the square's boundary is its 8-px ring. tau = 0: the 4 arms lie on the ring
    # (4 of 4); of the ring, the 4 arms coincide and the 4 corners are 1 px away (4 of 8).
    # NSD = (4 + 4) / (4 + 8) = 2/3   (an 8-neighbour rule would add the centre: 8/13)
    assert nsd(plus, square, tolerance=0.0, variant="contour") == pytest.approx(2 / 3)


def test_contour_nsd_image_border_counts_as_outside():
    a = np.ones((5, 5), dtype=bool)  # whole image: its boundary is the 16-px outer ring
    b = np.zeros((5, 5), dtype=bool)
    b[:, 0:3] = True  # cols 0-2: boundary rows 0 and 4 (3 + 3) and cols 0, 2 rows 1-3 (3 + 3) = 12
    # tau = 0: common pixels are row 0 cols 0-2, row 4 cols 0-2, col 0 rows 1-3 = 9 on each side.
    # NSD = (9 + 9) / (16 + 12) = 9/14
    assert nsd(a, b, tolerance=0.0, variant="contour") == pytest.approx(9 / 14)


# --- NSD, sts variant ----------------------------------------------------------------------

def test_sts_nsd_single_pixels_three_apart():
    a, b = pixels([(5, 2)]), pixels([(5, 5)])
    # Each pixel has 4 surfel corners of area T: a at cols 2, 3, b at cols 5, 6 (rows 5, 6).
    # a's col-3 corners are 2 from b's col-5 corners (within), its col-2 corners 3 (not);
    # symmetric for b. NSD = (2T + 2T) / (4T + 4T) = 0.5
    assert nsd(a, b, variant="sts") == pytest.approx(0.5)
    # Contour: each boundary is the pixel itself, 3 px from the other. NSD = 0.
    assert nsd(a, b, variant="contour") == 0.0


def test_sts_nsd_two_by_two_squares_three_apart():
    a = pixels([(4, 2), (4, 3), (5, 2), (5, 3)])
    b = pixels([(4, 5), (4, 6), (5, 5), (5, 6)])
    # a's 3x3 corners: 4 outer T, 4 edge-middle E, the centre 1: total 4T + 4E + 1.
    # Corner cols of a: 2, 3, 4; of b: 5, 6, 7. a's col 4 (1 away) and col 3 (2 away) are
    # within, col 2 (3 away) is not: it holds T + E + T. Symmetric for b.
    total = 4 * T + 4 * E + 1
    within = total - (2 * T + E)
    assert nsd(a, b, variant="sts") == pytest.approx((2 * within) / (2 * total))  # ~0.7571
    # Contour: the 4 pixels are the boundary; col 3 is 2 px from col 5, col 2 is 3 px. 0.5
    assert nsd(a, b, variant="contour") == pytest.approx(0.5)


def test_sts_nsd_weights_surfels_by_area_diagonal_pattern():
    a = pixels([(3, 3), (4, 4)])  # diagonal pair
    b = pixels([(3, 3)])
    # a: corners (3,3) (3,4) (4,3) T each; (4,4) touches both pixels diagonally: 2T;
    #    (4,5) (5,4) (5,5) T each. Total 6T + 2T = 8T.
    # b: corners (3,3) (3,4) (4,3) (4,4), T each: 4T.
    # tau = 0: b's 4 corners are all a's surfels; a's surfels that are b's: 3T + 2T = 5T.
    # NSD = (5T + 4T) / (8T + 4T) = 3/4   (counting surfels instead would give 8/11)
    assert nsd(a, b, tolerance=0.0, variant="sts") == pytest.approx(0.75)


def test_sts_nsd_weights_surfels_by_area_three_pixel_pattern():
    a = pixels([(3, 3), (3, 4), (4, 3)])  # L shape
    b = pixels([(3, 3), (3, 4), (4, 3), (4, 4)])  # 2x2 square
    # a's corners (rows/cols 3..5): (3,3) T, (3,4) E, (3,5) T, (4,3) E, (4,4) three pixels
    # 1/2 + 3T, (4,5) T, (5,3) T, (5,4) T, (5,5) none. Total 8T + 2E + 1/2.
    # b: 4T + 4E + 1 (as above). tau = 0: all of a's surfels are b's; b's corner (5,5)
    # (area T) is 1 from a's nearest surfel, the rest coincide.
    total = (8 * T + 2 * E + 0.5) + (4 * T + 4 * E + 1)
    assert nsd(a, b, tolerance=0.0, variant="sts") == pytest.approx((total - T) / total)  # ~0.9740
    assert nsd(a, b, tolerance=1.0, variant="sts") == pytest.approx(1.0)


def test_nsd_variants_differ_on_a_shifted_shape():
    a = box(3, 12, 3, 12)
    b = box(3, 12, 6, 15)  # shifted right by 3
    sts, contour = nsd(a, b, variant="sts"), nsd(a, b, variant="contour")
    assert abs(sts - contour) > 0.05
    # The sts surface is the whole slab (all foreground corners), most of it overlapping;
    # the contour surface loses the two 10-px sides that are 3 px apart.
    assert sts > contour


def _brute_nsd(a: np.ndarray, b: np.ndarray, tolerance: float, variant: str) -> float:
    """Direct transcription of the definitions: explicit point lists, pairwise distances."""
    def surface(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = m.shape
        def px(r: int, c: int) -> bool:
            return 0 <= r < h and 0 <= c < w and bool(m[r, c])
        pts, wts = [], []
        if variant == "contour":
            for r, c in zip(*np.nonzero(m)):
                if not all(px(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))):
                    pts.append((r, c)); wts.append(1.0)
        else:
            for r, c in itertools.product(range(h + 1), range(w + 1)):
                tl, tr, bl, br = px(r - 1, c - 1), px(r - 1, c), px(r, c - 1), px(r, c)
                n = tl + tr + bl + br
                if n == 0:
                    continue
                diagonal = n == 2 and tl == br
                area = {1: T, 2: 2 * T if diagonal else E, 3: 0.5 + 3 * T, 4: 1.0}[n]
                pts.append((r, c)); wts.append(area)
        return np.array(pts, float).reshape(-1, 2), np.array(wts)

    (pa, wa), (pb, wb) = surface(a), surface(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return (wa[d.min(1) <= tolerance].sum() + wb[d.min(0) <= tolerance].sum()) / (wa.sum() + wb.sum())


@pytest.mark.parametrize("variant", VARIANTS)
def test_nsd_matches_brute_force_on_random_masks_touching_the_border(variant):
    rng = np.random.default_rng(7)
    for _ in range(30):
        shape = tuple(rng.integers(3, 14, 2))
        a, b = rng.random(shape) < 0.4, rng.random(shape) < 0.4
        if not (a.any() and b.any()):
            continue
        for tol in (0.0, 1.0, 2.0, 2.5):
            assert nsd(a, b, tol, variant) == pytest.approx(_brute_nsd(a, b, tol, variant), abs=1e-12)


# --- score_image: instance level and IA ----------------------------------------------------

X = box(5, 14, 5, 14)  # 100 px
Y = box(5, 14, 25, 34)  # 100 px
Y_LEFT = box(5, 14, 25, 29)  # left half of Y: 50 px, IoU with Y = 50/100 = 0.5
Z = box(16, 18, 5, 14)  # 30 px
W = box(16, 18, 25, 34)


@pytest.mark.parametrize("variant", VARIANTS)
def test_identical_inputs_score_one(variant):
    masks = {"11": X, "21": Y, "31": Z}
    s = score_image(masks, dict(masks), nsd=variant)
    assert s == Scores(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert s.primary == 1.0


def test_swapped_labels_give_zero_ia_but_perfect_image_level():
    s = score_image({"11": Y, "21": X}, {"11": X, "21": Y})
    # Unions are identical: image Dice = IoU = NSD = 1. Per label the masks are disjoint
    # (IoU 0): instance metrics 0, IA 0 / |{11, 21}| = 0.
    assert (s.image_dice, s.image_iou, s.image_nsd) == (1.0, 1.0, 1.0)
    assert (s.instance_dice, s.instance_iou, s.instance_nsd) == (0.0, 0.0, 0.0)
    assert s.ia == 0.0
    assert s.primary == 0.0


def test_missing_tooth():
    s = score_image({"11": X}, {"11": X, "21": Y})
    # Instance: 11 perfect, 21 against an empty mask -> (1 + 0) / 2 for Dice, IoU and NSD.
    assert (s.instance_dice, s.instance_iou, s.instance_nsd) == (0.5, 0.5, 0.5)
    # IA: 11 identified, 21 not; |{11, 21}| = 2 -> 1/2.
    assert s.ia == pytest.approx(0.5)
    # Image: GT 200 px, pred 100 px, overlap 100: Dice 200/300, IoU 100/200.
    assert s.image_dice == pytest.approx(2 / 3)
    assert s.image_iou == pytest.approx(0.5)
    assert s.primary == pytest.approx((0.5 + 0.5) / 2)


def test_extra_predicted_tooth_lowers_ia_not_instance_metrics():
    s = score_image({"11": X, "21": Y}, {"11": X})
    # Instance metrics average over GT labels only: just 11, perfect.
    assert (s.instance_dice, s.instance_iou, s.instance_nsd) == (1.0, 1.0, 1.0)
    # IA: 1 identified / |{11, 21}| = 1/2. Image: 2*100 / (200 + 100) = 2/3.
    assert s.ia == pytest.approx(0.5)
    assert s.image_dice == pytest.approx(2 / 3)


def test_iou_of_exactly_half_does_not_identify():
    s = score_image({"11": Y_LEFT}, {"11": Y})
    # IoU = 50/100 = 0.5, not > 0.5 -> IA 0. Dice = 2*50 / (50 + 100) = 2/3.
    assert s.ia == 0.0
    assert s.instance_dice == pytest.approx(2 / 3)
    assert s.instance_iou == pytest.approx(0.5)


def test_instance_metrics_average_over_gt_labels_only():
    pred = {"11": X, "21": Y_LEFT, "48": W}
    gt = {"11": X, "21": Y, "31": Z}
    s = score_image(pred, gt, nsd="contour")
    # Per GT label: 11 -> Dice 1, IoU 1; 21 -> Dice 2/3, IoU 1/2; 31 (not predicted) -> 0, 0.
    # The extra prediction 48 enters no average.
    assert s.instance_dice == pytest.approx((1 + 2 / 3 + 0) / 3)  # 5/9
    assert s.instance_iou == pytest.approx((1 + 0.5 + 0) / 3)  # 1/2
    # NSD of 21: Y vs its left half is the 10x10 / 10x5 case above = 22/31.
    assert s.instance_nsd == pytest.approx((1 + 22 / 31 + 0) / 3)
    # IA: only 11 has IoU > 0.5; labels {11, 21, 31, 48} -> 1/4.
    assert s.ia == pytest.approx(0.25)


def test_empty_sides():
    ones = Scores(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    zeros = Scores(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert score_image({}, {}) == ones
    # An empty mask counts as an absent label.
    assert score_image({"11": EMPTY}, {}) == ones
    # GT teeth, nothing predicted: everything 0.
    assert score_image({}, {"11": X}) == zeros
    # Predicted teeth, no GT: image level 0 (one side empty), instance level 0 by
    # convention (prediction not empty), IA 0 / 1.
    assert score_image({"11": X}, {}) == zeros


def test_score_image_rejects_masks_of_different_shapes():
    with pytest.raises(ValueError, match="same shape"):
        score_image({"11": np.zeros((10, 10), bool)}, {"11": np.zeros((12, 10), bool)})
    with pytest.raises(ValueError, match="unknown NSD variant"):
        score_image({}, {}, nsd="mesh")


def test_mean_scores_and_primary():
    a = Scores(1.0, 0.5, 0.25, 0.8, 0.6, 0.4, 1.0)
    b = Scores(0.0, 0.5, 0.75, 0.4, 0.2, 0.0, 0.5)
    m = mean_scores([a, b])
    assert m == Scores(0.5, 0.5, 0.5, pytest.approx(0.6), pytest.approx(0.4), 0.2, 0.75)
    assert m.primary == pytest.approx((0.6 + 0.75) / 2)
    assert a.as_dict() == {"image_dice": 1.0, "image_iou": 0.5, "image_nsd": 0.25,
                           "instance_dice": 0.8, "instance_iou": 0.6, "instance_nsd": 0.4, "ia": 1.0}
    with pytest.raises(ValueError, match="at least one"):
        mean_scores([])


# --- evaluate_folder -----------------------------------------------------------------------

def _write(folder, stem: str, masks: dict[str, np.ndarray]) -> None:
    folder.mkdir(exist_ok=True)
    write_labelme(folder / f"{stem}.json", masks_to_labelme(masks, f"{stem}.png"))


GT_X = box(10, 19, 10, 19, shape=(40, 60))
GT_Y = box(10, 19, 30, 39, shape=(40, 60))
PRED_Y = box(10, 19, 30, 34, shape=(40, 60))


def _folders(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    _write(gt_dir, "a", {"11": GT_X, "21": GT_Y})
    _write(pred_dir, "a", {"11": GT_X, "21": PRED_Y})
    _write(gt_dir, "b", {"11": GT_X})  # no prediction file
    _write(pred_dir, "c", {"11": GT_X})  # no GT: ignored
    return pred_dir, gt_dir


def test_evaluate_folder(tmp_path, caplog):
    pred_dir, gt_dir = _folders(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.metrics"):
        rows, mean = evaluate_folder(pred_dir, gt_dir, nsd="contour")
    assert "have no ground truth and are ignored: c" in caplog.text
    assert [r["image"] for r in rows] == ["a", "b"]
    a, b = rows
    assert a["missing_prediction"] is False and b["missing_prediction"] is True
    # Image a. Union GT 200 px, pred 150 px, overlap 150: Dice 300/350 = 6/7, IoU 150/200.
    assert a["image_dice"] == pytest.approx(6 / 7)
    assert a["image_iou"] == pytest.approx(0.75)
    # Contour NSD: 11's boundaries coincide (36 + 36 within); 21 is the 10x10 vs 10x5 case
    # (22 + 22 within, 36 + 26 in all); the teeth are 11 px apart so they do not interact.
    # (36 + 36 + 22 + 22) / (36 + 36 + 36 + 26) = 116/134
    assert a["image_nsd"] == pytest.approx(116 / 134)
    # Instance: 11 perfect; 21 Dice 2*50/150 = 2/3, IoU 1/2, NSD 22/31.
    assert a["instance_dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert a["instance_iou"] == pytest.approx((1 + 0.5) / 2)
    assert a["instance_nsd"] == pytest.approx((1 + 22 / 31) / 2)
    # IA: 21's IoU is exactly 0.5 -> not identified: 1/2.
    assert a["ia"] == pytest.approx(0.5)
    # Image b: scored against an empty prediction -> all 0.
    assert all(b[k] == 0.0 for k in Scores(*[0.0] * 7).as_dict())
    assert mean.image_dice == pytest.approx((6 / 7 + 0) / 2)
    assert mean.instance_dice == pytest.approx(((1 + 2 / 3) / 2 + 0) / 2)
    assert mean.ia == pytest.approx(0.25)
    assert mean.primary == pytest.approx((mean.instance_dice + 0.25) / 2)


def test_evaluate_folder_sts_variant(tmp_path):
    pred_dir, gt_dir = _folders(tmp_path)
    rows, _ = evaluate_folder(pred_dir, gt_dir)  # default: sts
    a = rows[0]
    assert a["image_dice"] == pytest.approx(6 / 7)
    assert a["image_nsd"] == pytest.approx(nsd(GT_X | PRED_Y, GT_X | GT_Y, variant="sts"))
    assert a["image_nsd"] != pytest.approx(116 / 134)


def test_evaluate_folder_errors(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    gt_dir.mkdir()
    pred_dir.mkdir()
    with pytest.raises(ValueError, match="no Labelme"):
        evaluate_folder(pred_dir, gt_dir)
    with pytest.raises(NotADirectoryError):
        evaluate_folder(tmp_path / "nowhere", gt_dir)
    _write(gt_dir, "a", {"11": GT_X})
    _write(pred_dir, "a", {"11": box(1, 5, 1, 5, shape=(30, 60))})
    with pytest.raises(ValueError, match="image size"):
        evaluate_folder(pred_dir, gt_dir)


def test_evaluate_folders_scores_both_variants_in_parallel_as_score_image_does(tmp_path):
    """The folder path (each file read once, masks rasterised on their boxes, both NSD variants in
    one pass, images in 2 processes) gives score_image's values on the full masks read_labelme gives,
    with teeth touching the image border, missing, extra and overlapping."""
    from training.data.labelme import read_labelme
    from training.metrics import evaluate_folders

    rng = np.random.default_rng(3)
    shape = (48, 80)
    for i in range(9):
        def teeth(n):
            out = {}
            for label in rng.choice(["11", "12", "21", "22", "31", "41", "47"], size=n, replace=False):
                r0, c0 = rng.integers(-4, shape[0] - 3), rng.integers(-4, shape[1] - 3)
                m = box(max(r0, 0), r0 + int(rng.integers(2, 15)), max(c0, 0), c0 + int(rng.integers(2, 15)), shape)
                out[str(label)] = m & (rng.random(shape) < 0.9)
            return {k: v for k, v in out.items() if v.any()}
        _write(tmp_path / "gt", f"{i}", teeth(int(rng.integers(1, 6))))
        if i != 4:
            _write(tmp_path / "pred", f"{i}", teeth(int(rng.integers(1, 6))))
    (tmp_path / "pred").mkdir(exist_ok=True)
    parallel = evaluate_folders(tmp_path / "pred", tmp_path / "gt", VARIANTS, workers=2)
    assert evaluate_folders(tmp_path / "pred", tmp_path / "gt", VARIANTS, workers=1) == parallel
    for variant in VARIANTS:
        rows, _ = parallel[variant]
        assert [r["image"] for r in rows] == [str(i) for i in range(9)]
        for row in rows:
            gt, _ = read_labelme(tmp_path / "gt" / f"{row['image']}.json")
            pred_file = tmp_path / "pred" / f"{row['image']}.json"
            pred = read_labelme(pred_file)[0] if pred_file.exists() else {}
            expected = score_image(pred, gt, nsd=variant).as_dict()
            assert {k: row[k] for k in expected} == pytest.approx(expected, abs=1e-12)
