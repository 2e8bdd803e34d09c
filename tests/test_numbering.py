import numpy as np
import pytest

from backend import fdi
from backend.numbering import argmax_labels, fit_arch, number_teeth, position_cost

PX_PER_MM = 10.0
MIDLINE = 1000.0


def candidates(labels, confident=0.9, background=0.01):
    """Boxes where each label really sits on a panoramic image, probs peaked on that label."""
    boxes, probs = [], []
    for lab in labels:
        cx = MIDLINE + PX_PER_MM * fdi.arch_coordinate(lab)
        y = 200.0 if fdi.is_upper(lab) else 400.0
        boxes.append([cx - 30, y - 80, cx + 30, y + 80])
        p = np.full(52, background)
        p[fdi.CLASS_INDEX[lab]] = confident
        probs.append(p)
    return np.array(boxes), np.array(probs)


def labels_of(assignments):
    return {a.index: a.label for a in assignments}


def test_correct_input_is_kept():
    labs = list(fdi.ARCHES["upper_permanent"]) + list(fdi.ARCHES["lower_permanent"])
    boxes, probs = candidates(labs)
    out = number_teeth(boxes, probs)
    assert labels_of(out) == dict(enumerate(labs))
    assert all(a.score == pytest.approx(0.9) for a in out)


def test_duplicated_label_is_resolved_by_confidence():
    labs = ["13", "12", "11", "21", "22"]
    boxes, probs = candidates(labs)
    # the 12 candidate also claims 11 more strongly than 12
    probs[1, fdi.CLASS_INDEX["11"]] = 0.8
    probs[1, fdi.CLASS_INDEX["12"]] = 0.7
    assert [a.label for a in argmax_labels(probs)].count("11") == 2
    out = number_teeth(boxes, probs)
    assert sorted(a.label for a in out) == sorted(labs)
    assert labels_of(out)[1] == "12" and labels_of(out)[2] == "11"
    assert labels_of(out) == dict(enumerate(labs))


def test_ordering_prior_fixes_swapped_midline_pair():
    labs = ["14", "13", "12", "11", "21", "22", "23", "24"]
    boxes, probs = candidates(labs)
    # the detector prefers the swapped labels for the two central incisors
    i11, i21 = 3, 4
    probs[i11, fdi.CLASS_INDEX["11"]], probs[i11, fdi.CLASS_INDEX["21"]] = 0.5, 0.6
    probs[i21, fdi.CLASS_INDEX["11"]], probs[i21, fdi.CLASS_INDEX["21"]] = 0.6, 0.5
    # confidences alone (no prior) take the swap: log .6 + log .6 > log .5 + log .5
    no_prior = labels_of(number_teeth(boxes, probs, prior_weight=0.0))
    assert (no_prior[i11], no_prior[i21]) == ("21", "11")
    with_prior = labels_of(number_teeth(boxes, probs))
    assert (with_prior[i11], with_prior[i21]) == ("11", "21")


def test_prior_does_not_override_a_confident_detector():
    labs = ["13", "12", "11", "21", "22", "23"]
    boxes, probs = candidates(labs, confident=0.95)
    # a candidate placed half a tooth off where 12 is expected keeps its confident label
    boxes[1, [0, 2]] += 0.5 * 7 * PX_PER_MM
    assert labels_of(number_teeth(boxes, probs))[1] == "12"


def test_weak_and_unassigned_candidates_are_dropped():
    labs = ["11", "21", "31"]
    boxes, probs = candidates(labs)
    probs[2] = 0.02
    probs[2, fdi.CLASS_INDEX["31"]] = 0.1  # weak
    out = number_teeth(boxes, probs, min_score=0.25)
    assert labels_of(out) == {0: "11", 1: "21"}
    # 60 candidates all claiming 11: at most 52 get a label, and only one gets 11
    boxes60 = np.repeat(boxes[:1], 60, axis=0)
    probs60 = np.full((60, 52), 0.3)
    probs60[:, 0] = 0.9
    out60 = number_teeth(boxes60, probs60, min_score=0.25)
    assert len(out60) == 52 and [a.label for a in out60].count("11") == 1


def test_fit_arch_is_robust_to_one_mislabeled_candidate():
    labs = ["16", "15", "14", "13", "12", "11", "21", "22", "23", "24", "25", "26"]
    coord = np.array([fdi.arch_coordinate(lab) for lab in labs])
    x = MIDLINE + PX_PER_MM * coord
    x_bad = x.copy()
    x_bad[0] = x[-1]  # "16" detected on the wrong side
    a, b = fit_arch(x_bad, coord, np.ones(len(x)))
    assert a == pytest.approx(PX_PER_MM, rel=0.02) and b == pytest.approx(MIDLINE, abs=5)
    assert fit_arch(x[:1], coord[:1], np.ones(1)) is None
    assert fit_arch(x[::-1], coord, np.ones(len(x))) is None  # decreasing: not an arch


def test_position_cost_values():
    boxes, probs = candidates(["12", "11", "21", "22"])
    cost = position_cost(boxes, probs)
    assert cost.shape == (4, 52)
    assert cost[1, fdi.CLASS_INDEX["11"]] == pytest.approx(0.0, abs=1e-6)
    # 11 sits 8.5 mm from 21: d = 8.5 / 7 tooth widths, cost d^2 / 2
    assert cost[1, fdi.CLASS_INDEX["21"]] == pytest.approx((8.5 / 7) ** 2 / 2, rel=1e-3)
    # lower-arch labels: no lower candidates, no fit, no cost
    assert np.all(cost[:, fdi.CLASS_INDEX["31"]] == 0)


def test_empty_input():
    assert number_teeth(np.zeros((0, 4)), np.zeros((0, 52))) == []
