import numpy as np
import pytest

from backend import fdi
from backend.numbering import argmax_labels, fit_arch, number_teeth, occlusal_cost, position_cost

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


def test_arch_search_fixes_a_shift_at_a_missing_tooth():
    # 38 is missing; the detector calls 35 36 37 "36 37 38", confidently enough that lines fitted
    # to its top labels keep the shift
    labs = [lab for lab in fdi.ARCHES["upper_permanent"] + fdi.ARCHES["lower_permanent"] if lab[1] != "8"]
    boxes, probs = candidates(labs)
    for lab, shifted in (("35", "36"), ("36", "37"), ("37", "38")):
        i = labs.index(lab)
        probs[i, fdi.CLASS_INDEX[lab]], probs[i, fdi.CLASS_INDEX[shifted]] = 0.3, 0.7
    assert labels_of(number_teeth(boxes, probs)) == dict(enumerate(labs))
    fitted = labels_of(number_teeth(boxes, probs, arch_search=False))
    assert [fitted[labs.index(lab)] for lab in ("35", "36", "37")] == ["36", "37", "38"]


def test_the_upper_midline_pulls_a_lower_arch_shifted_across_its_midline_back():
    # no third molars; the detector slightly prefers, for every lower tooth, the number of its
    # neighbour on the image's right (47 as 46, ..., 41 as 31, ..., 37 as 38): a lower midline one
    # tooth off, which fits the lower arch's line as well as the right one
    labs = [lab for lab in fdi.ARCHES["upper_permanent"] + fdi.ARCHES["lower_permanent"] if lab[1] != "8"]
    boxes, probs = candidates(labs)
    lower = [lab for lab in fdi.ARCHES["lower_permanent"] if lab[1] != "8"]  # left to right on the image
    for lab, shifted in zip(lower, [*lower[1:], "38"]):
        i = labs.index(lab)
        probs[i, fdi.CLASS_INDEX[lab]], probs[i, fdi.CLASS_INDEX[shifted]] = 0.34, 0.66
    assert labels_of(number_teeth(boxes, probs)) == dict(enumerate(labs))
    apart = labels_of(number_teeth(boxes, probs, midline_weight=0.0))
    assert [apart[labs.index(lab)] for lab in ("41", "31")] == ["31", "32"]


def mixed_dentition():
    """A child's panoramic: erupted crowns along the occlusal plane (y 300 upper, 500 lower; first
    molars and deciduous teeth), the upper permanent successors as buds above them (y 100)."""
    def box(lab, y):
        cx = MIDLINE + PX_PER_MM * fdi.arch_coordinate(lab)
        return [cx - 25, y - 80, cx + 25, y + 80]

    erupted_upper = ["16", *fdi.ARCHES["upper_deciduous"], "26"]
    erupted_lower = ["46", *fdi.ARCHES["lower_deciduous"], "36"]
    buds = ["15", "14", "13", "12", "11", "21", "22", "23", "24", "25"]
    labs = erupted_upper + erupted_lower + buds
    boxes = [box(lab, 300) for lab in erupted_upper] + [box(lab, 500) for lab in erupted_lower]
    boxes += [box(lab, 100) for lab in buds]
    probs = np.full((len(labs), 52), 0.01)
    probs[np.arange(len(labs)), [fdi.CLASS_INDEX[lab] for lab in labs]] = 0.9
    return labs, np.array(boxes), probs


def test_occlusal_prior_tells_a_bud_from_the_deciduous_tooth_over_it():
    labs, boxes, probs = mixed_dentition()
    assert labels_of(number_teeth(boxes, probs)) == dict(enumerate(labs))
    # the detector swaps the bud 12 and the deciduous 52 it lies over, and the bud 22 and 62
    for bud, milk in (("12", "52"), ("22", "62")):
        i, j = labs.index(bud), labs.index(milk)
        probs[i, fdi.CLASS_INDEX[bud]], probs[i, fdi.CLASS_INDEX[milk]] = 0.3, 0.7
        probs[j, fdi.CLASS_INDEX[milk]], probs[j, fdi.CLASS_INDEX[bud]] = 0.3, 0.7
    assert labels_of(number_teeth(boxes, probs)) == dict(enumerate(labs))
    swapped = labels_of(number_teeth(boxes, probs, occlusal_weight=0.0))
    assert swapped[labs.index("12")] == "52" and swapped[labs.index("52")] == "12"


def test_occlusal_prior_keeps_a_tooth_on_its_arch():
    labs, boxes, probs = mixed_dentition()  # an upper first molar taken for the lower one, 36 being absent
    keep = [k for k, lab in enumerate(labs) if lab != "36"]
    labs, boxes, probs = [labs[k] for k in keep], boxes[keep], probs[keep]
    i = labs.index("26")
    probs[i, fdi.CLASS_INDEX["26"]], probs[i, fdi.CLASS_INDEX["36"]] = 0.1, 0.9
    assert labels_of(number_teeth(boxes, probs, min_score=0.05))[i] == "26"
    assert labels_of(number_teeth(boxes, probs, min_score=0.05, occlusal_weight=0.0))[i] == "36"


def test_occlusal_cost_values():
    labs, boxes, probs = mixed_dentition()
    cost = occlusal_cost(boxes, probs)
    upper_cols = [fdi.CLASS_INDEX[lab] for lab in fdi.FDI_LABELS if fdi.is_upper(lab)]
    lower_cols = [fdi.CLASS_INDEX[lab] for lab in fdi.FDI_LABELS if not fdi.is_upper(lab)]
    upper_milk = [fdi.CLASS_INDEX[lab] for lab in fdi.ARCHES["upper_deciduous"]]
    i16, i46, i12 = labs.index("16"), labs.index("46"), labs.index("12")
    assert np.all(cost[i16, upper_cols] == 0) and np.all(cost[i16, lower_cols] == 1)  # centre 0.6 heights above
    assert np.all(cost[i46, lower_cols] == 0) and np.all(cost[i46, upper_cols] == 1)
    # the bud: far above the curve (its crown 1.4 box heights from it): wrong arch and deciduous both cost
    assert cost[i12, fdi.CLASS_INDEX["12"]] == 0 and np.all(cost[i12, upper_milk] == 1)
    assert np.all(cost[i16, upper_milk] == 0)  # an erupted crown: no bud cost
    assert cost[i12, fdi.CLASS_INDEX["82"]] == 2
    assert np.all(occlusal_cost(boxes[:3], probs[:3]) == 0)  # one arch only: no curve


def test_a_weak_candidate_cannot_move_a_confident_tooths_number():
    """SCORE_ANCHOR: candidates at or above anchor_score are numbered first; a weaker one sure of a
    label a confident tooth holds takes a label left instead of pushing that tooth off its number."""
    labels = ["14", "13", "12", "11", "21", "22", "23", "24"]
    x = {label: 1000 + 10 * fdi.arch_coordinate(label) for label in labels}
    boxes = [[x[label] - 30, 100, x[label] + 30, 260] for label in labels] + [[x["11"] - 20, 100, x["11"] + 40, 260]]
    probs = np.full((len(boxes), 52), 0.005)
    for i, label in enumerate(labels):
        probs[i, fdi.CLASS_INDEX[label]] = 0.5
    probs[-1, fdi.CLASS_INDEX["11"]] = 0.95  # weak (tooth score 0.45), beside the 11, and sure it is one
    tooth = np.array([0.9] * len(labels) + [0.45])
    together = {a.index: a.label for a in number_teeth(np.array(boxes), probs, min_score=0.4, tooth=tooth)}
    assert together[8] == "11" and together[3] != "11"  # numbered together, the weak one takes the 11
    anchored = {a.index: a.label for a in number_teeth(np.array(boxes), probs, min_score=0.4, tooth=tooth,
                                                       anchor_score=0.5)}
    assert [anchored[i] for i in range(len(labels))] == labels
    assert anchored[8] not in labels  # kept, on a label the confident teeth left
    alone = number_teeth(np.array(boxes), probs, min_score=0.4, tooth=np.full(len(boxes), 0.45), anchor_score=0.5)
    assert len(alone) == len(boxes)  # none that strong: all numbered together
