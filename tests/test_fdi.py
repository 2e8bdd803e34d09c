import pytest

from backend import fdi


def test_label_set_and_stable_class_order():
    assert len(fdi.FDI_LABELS) == 52 == fdi.NUM_CLASSES
    assert fdi.FDI_LABELS[:8] == ("11", "12", "13", "14", "15", "16", "17", "18")
    assert fdi.FDI_LABELS[31] == "48" and fdi.FDI_LABELS[32] == "51" and fdi.FDI_LABELS[-1] == "85"
    assert fdi.CLASS_INDEX["21"] == 8 and fdi.CLASS_INDEX["61"] == 37
    assert len(set(fdi.FDI_LABELS)) == 52
    assert "19" not in fdi.CLASS_INDEX and "56" not in fdi.CLASS_INDEX and "91" not in fdi.CLASS_INDEX


@pytest.mark.parametrize("label,q,p,dec,kind,upper", [
    ("11", 1, 1, False, "incisor", True),
    ("23", 2, 3, False, "canine", True),
    ("35", 3, 5, False, "premolar", False),
    ("48", 4, 8, False, "molar", False),
    ("54", 5, 4, True, "molar", True),
    ("62", 6, 2, True, "incisor", True),
    ("73", 7, 3, True, "canine", False),
    ("85", 8, 5, True, "molar", False),
])
def test_anatomy(label, q, p, dec, kind, upper):
    assert fdi.quadrant(label) == q
    assert fdi.position(label) == p
    assert fdi.is_deciduous(label) is dec and fdi.is_permanent(label) is (not dec)
    assert fdi.tooth_type(label).value == kind
    assert fdi.is_upper(label) is upper


def test_validate_rejects_non_fdi():
    assert fdi.validate(11) == "11"
    for bad in ("19", "56", "00", "tooth", "111", ""):
        with pytest.raises(ValueError, match="not an FDI tooth label"):
            fdi.validate(bad)


def test_arch_order_left_to_right_on_panoramic():
    assert fdi.ARCHES["upper_permanent"] == (
        "18", "17", "16", "15", "14", "13", "12", "11", "21", "22", "23", "24", "25", "26", "27", "28")
    assert fdi.ARCHES["lower_permanent"] == (
        "48", "47", "46", "45", "44", "43", "42", "41", "31", "32", "33", "34", "35", "36", "37", "38")
    assert fdi.ARCHES["upper_deciduous"] == ("55", "54", "53", "52", "51", "61", "62", "63", "64", "65")
    assert fdi.ARCHES["lower_deciduous"] == ("85", "84", "83", "82", "81", "71", "72", "73", "74", "75")
    every = [lab for arch in fdi.ARCHES.values() for lab in arch]
    assert sorted(every) == sorted(fdi.FDI_LABELS)


def test_arch_coordinate_is_monotonic_and_shared_by_dentitions():
    for arch in fdi.ARCHES.values():
        coords = [fdi.arch_coordinate(lab) for lab in arch]
        assert coords == sorted(coords) and len(set(coords)) == len(coords)
    # upper central incisors are 8.5 mm wide: centres 4.25 mm either side of the midline
    assert fdi.arch_coordinate("11") == -4.25 and fdi.arch_coordinate("21") == 4.25
    # 16 sits after 8.5 + 6.5 + 7.5 + 7.0 + 6.5 = 36 mm, plus half its 10 mm
    assert fdi.arch_coordinate("16") == -41.0
    assert fdi.arch_coordinate("31") == 2.5
    # a deciduous tooth sits where its successor erupts
    for lab in fdi.DECIDUOUS:
        assert fdi.arch_coordinate(lab) == fdi.arch_coordinate(fdi.successor(lab))
    assert fdi.successor("55") == "15" and fdi.successor("11") is None


def test_colours_distinguish_quadrants_dentitions_and_neighbours():
    colours = {lab: fdi.colour(lab) for lab in fdi.FDI_LABELS}
    assert len(set(colours.values())) == 52
    for arch in fdi.ARCHES.values():
        for a, b in zip(arch, arch[1:]):
            assert colours[a] != colours[b]

    def rgb(lab):
        h = colours[lab]
        return tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))

    def saturation(lab):
        r, g, b = rgb(lab)
        return (max(r, g, b) - min(r, g, b)) / max(r, g, b)

    assert min(saturation(lab) for lab in fdi.PERMANENT) > max(saturation(lab) for lab in fdi.DECIDUOUS)
    # quadrant 1 is red-dominant, 2 blue, 3 green
    assert max(range(3), key=lambda i: rgb("11")[i]) == 0
    assert max(range(3), key=lambda i: rgb("21")[i]) == 2
    assert max(range(3), key=lambda i: rgb("31")[i]) == 1
