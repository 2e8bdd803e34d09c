"""FDI (ISO 3950) tooth numbering: the label set, its class order and anatomy.

A label is a two-digit string: quadrant digit then position digit.
Quadrants 1-4 are permanent (upper right, upper left, lower left, lower right, as seen by
the patient), 5-8 deciduous in the same order. Positions count from the midline: 1-8 for
permanent teeth (central incisor to third molar), 1-5 for deciduous ones.

A panoramic radiograph is viewed as if facing the patient, so the patient's right side is
on the image's left: the upper arch reads 18 ... 11 21 ... 28 from image left to right, the
lower arch 48 ... 41 31 ... 38.
"""
from __future__ import annotations

import colorsys
from enum import Enum

PERMANENT: tuple[str, ...] = tuple(f"{q}{p}" for q in (1, 2, 3, 4) for p in range(1, 9))
DECIDUOUS: tuple[str, ...] = tuple(f"{q}{p}" for q in (5, 6, 7, 8) for p in range(1, 6))

FDI_LABELS: tuple[str, ...] = PERMANENT + DECIDUOUS
"""All 52 labels in the stable class order used by the detector (class index = position here)."""

CLASS_INDEX: dict[str, int] = {label: i for i, label in enumerate(FDI_LABELS)}

NUM_CLASSES = len(FDI_LABELS)

TOOTH_CLASS = "tooth"
"""Name of the detector's class-agnostic column (a 53rd class every tooth has, after the 52 FDI
classes): the detector keeps candidates by it, the numbering picks their FDI labels."""


class ToothType(str, Enum):
    INCISOR = "incisor"
    CANINE = "canine"
    PREMOLAR = "premolar"
    MOLAR = "molar"


def validate(label: str | int) -> str:
    """Return `label` as a canonical FDI string; raise ValueError if it is not one of the 52."""
    text = str(label).strip()
    if text not in CLASS_INDEX:
        raise ValueError(f"not an FDI tooth label: {label!r} (expected 11-48 or 51-85)")
    return text


def is_fdi(label: object) -> bool:
    """True if `label` (str or int) is one of the 52 FDI tooth labels."""
    return str(label).strip() in CLASS_INDEX


def quadrant(label: str) -> int:
    """Quadrant digit 1-8."""
    return int(validate(label)[0])


def position(label: str) -> int:
    """Position from the midline: 1-8 permanent, 1-5 deciduous."""
    return int(validate(label)[1])


def is_deciduous(label: str) -> bool:
    return quadrant(label) >= 5


def is_permanent(label: str) -> bool:
    return not is_deciduous(label)


def is_upper(label: str) -> bool:
    """Maxillary tooth (quadrants 1, 2, 5, 6)."""
    return quadrant(label) in (1, 2, 5, 6)


def on_image_left(label: str) -> bool:
    """Patient's right side, which is the left half of a panoramic image."""
    return quadrant(label) in (1, 4, 5, 8)


_MIRROR_QUADRANT = {1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5, 7: 8, 8: 7}


def mirrored(label: str) -> str:
    """The same tooth on the patient's other side (11 <-> 21, 36 <-> 46, 55 <-> 65): its label in a
    panoramic image flipped left to right."""
    return f"{_MIRROR_QUADRANT[quadrant(label)]}{position(label)}"


def tooth_type(label: str) -> ToothType:
    """Incisor, canine, premolar or molar. Deciduous 4 and 5 are (primary) molars."""
    p = position(label)
    if p <= 2:
        return ToothType.INCISOR
    if p == 3:
        return ToothType.CANINE
    if is_deciduous(label):
        return ToothType.MOLAR
    return ToothType.PREMOLAR if p <= 5 else ToothType.MOLAR


# Typical mesiodistal crown widths (mm) of permanent teeth by position 1-8, upper and lower.
_WIDTH_MM = {
    True: (8.5, 6.5, 7.5, 7.0, 6.5, 10.0, 9.0, 8.5),
    False: (5.0, 5.5, 7.0, 7.0, 7.0, 11.0, 10.5, 10.0),
}


def arch_coordinate(label: str) -> float:
    """Expected centre of a tooth along its arch, in mm from the midline: negative on the image's
    left (the patient's right), positive on its right, from typical crown widths.

    A deciduous tooth is placed where its permanent successor erupts (55 at 15's place), so both
    dentitions share one scale. The numbering prior fits this coordinate to the candidates'
    x positions (x ~ a * coordinate + b) and penalises labels far from where they should be.
    """
    p = position(label)
    widths = _WIDTH_MM[is_upper(label)]
    centre = sum(widths[: p - 1]) + widths[p - 1] / 2.0
    return -centre if on_image_left(label) else centre


def arch_order(upper: bool, deciduous: bool) -> tuple[str, ...]:
    """Labels of one arch and dentition, ordered as they appear on the image from left to right."""
    qs = ((5, 6) if upper else (8, 7)) if deciduous else ((1, 2) if upper else (4, 3))
    n = 5 if deciduous else 8
    left = [f"{qs[0]}{p}" for p in range(n, 0, -1)]
    right = [f"{qs[1]}{p}" for p in range(1, n + 1)]
    return tuple(left + right)


ARCHES: dict[str, tuple[str, ...]] = {
    "upper_permanent": arch_order(upper=True, deciduous=False),
    "lower_permanent": arch_order(upper=False, deciduous=False),
    "upper_deciduous": arch_order(upper=True, deciduous=True),
    "lower_deciduous": arch_order(upper=False, deciduous=True),
}
"""The four arches, each ordered image left to right, e.g. upper_permanent = 18 ... 11 21 ... 28."""


def successor(label: str) -> str | None:
    """The permanent tooth that replaces a deciduous one (55 -> 15); None for permanent teeth."""
    if not is_deciduous(label):
        return None
    return f"{quadrant(label) - 4}{position(label)}"


# Quadrant hues (degrees): upper right red, upper left blue, lower left green, lower right amber.
_QUADRANT_HUE = {1: 0.0, 2: 215.0, 3: 125.0, 4: 35.0}


def colour(label: str) -> str:
    """Display colour "#rrggbb": one hue family per quadrant (drifting a little with position),
    lightness alternating from tooth to tooth so neighbours stand apart; permanent teeth
    saturated, deciduous teeth pale (pastel) in the same family."""
    q, p = quadrant(label), position(label)
    hue = ((_QUADRANT_HUE[q - 4 if q >= 5 else q] + 5.0 * (p - 1)) % 360.0) / 360.0
    if is_deciduous(label):
        sat, val = 0.35, (1.0 if p % 2 else 0.86)
    else:
        sat, val = 0.9, (1.0 if p % 2 else 0.7)
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return "#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255))
