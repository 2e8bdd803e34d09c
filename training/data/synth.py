"""Seeded synthetic panoramic dental X-rays with exact tooth ground truth (FDI numbering).

No real radiographs can be downloaded, so tests and benchmarks train on these. The image model
is laid out in a 1024 x 512 reference frame and scaled to the requested size, so every size
shows the same anatomy (a 320 x 160 image is a shrunken 1024 x 512 one).

Image model. An attenuation map A (float, about 0.1 to 1.4: more is brighter) is the sum of:

* soft tissue: a mid-dark base with a low-frequency exposure field, the tongue and lips as
  faint bright shadows, the pharyngeal airway and the palatoglossal air space as dark bands,
  the cervical spine as a bright, segmented vertical band at both image sides and its ghost
  as a faint broad brightening over the front teeth;
* bone: the maxilla above the upper alveolar crest (hard palate line, dark maxillary sinuses
  and nasal cavity, zygomatic arches) and the mandible below the lower crest (body, rami,
  condyles and coronoid processes, a bright cortical lower border, the dark mandibular
  canal), both with a trabecular texture;
* teeth, drawn one by one into their bounding boxes: dentin brighter in the middle of the
  tooth than at its rim (thickness), crowns brighter than roots (enamel), a darker pulp
  chamber and root canals, a thin dark periodontal space around the roots; very bright
  restorations (fillings, crowns, root-canal fillings) on some teeth; unerupted tooth buds
  in a dark follicle. Overlapping teeth add up, as on a real radiograph.

A is blurred, windowed with a random contrast, brightness and gamma, and Gaussian noise is
added before quantising to uint8.

Teeth stand on two smile-shaped occlusal curves (upper and lower arch, rising toward the image
sides), placed by arc length with touching or slightly overlapping neighbours and roughly
perpendicular to the curve with a small random tilt; crowns face the occlusal plane and roots
point away from it. Shapes follow `fdi.tooth_type`: narrow incisors with one long root, canines
with the longest root, premolars with one or two roots, wide molars with two or three roots
(one outline per tooth). Adults have permanent teeth 11-48 with random gaps (third molars
often missing). A quarter of the images show a mixed dentition: deciduous teeth (51-85) in the
arch with their permanent successors as buds (crowns without roots, labelled 11-45) in the bone
beyond them, erupted first permanent molars, second molar buds, and permanent incisors
erupted or not depending on a random age.

Ground truth: per tooth one polygon (N, 2) of (x=col, y=row) pixel-centre coordinates, rounded
to whole pixels (Labelme files are read back by truncating to integers, as the STS scorer
does); its mask is `backend.formats.polygons_to_mask`, exactly the pixels the tooth was drawn
on, so Labelme polygons and Label Studio brush masks agree to the pixel.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from backend import fdi
from backend.fdi import ToothType
from backend.formats import find_target, mask_to_regions, polygons_to_mask
from backend.label_config import render_label_config
from training.data.dataset_io import DatasetItem
from training.data.labelme import polygons_to_labelme, write_labelme

REF_W, REF_H = 1024.0, 512.0
"""The reference frame all geometry is laid out in (pixels of a 1024 x 512 image)."""

MIN_SIDE = 64
CHILD_FRACTION = 0.25
CONTACT_SHEET_SAMPLES = 8
_TILE_W = 720

_Dims = tuple[float, float, float, tuple[tuple[int, float], ...]]
# (mesiodistal crown width, crown height, root length) in reference pixels, and the root counts
# with their probabilities, by upper/lower and position.
_PERMANENT: dict[bool, dict[int, _Dims]] = {
    True: {1: (40, 52, 62, ((1, 1.0),)), 2: (32, 46, 58, ((1, 1.0),)), 3: (36, 52, 80, ((1, 1.0),)),
           4: (34, 44, 60, ((1, 0.4), (2, 0.6))), 5: (33, 42, 60, ((1, 0.8), (2, 0.2))),
           6: (48, 42, 54, ((3, 0.8), (2, 0.2))), 7: (45, 40, 50, ((3, 0.5), (2, 0.5))),
           8: (42, 38, 42, ((1, 0.3), (2, 0.4), (3, 0.3)))},
    False: {1: (26, 44, 60, ((1, 1.0),)), 2: (28, 45, 62, ((1, 1.0),)), 3: (33, 52, 76, ((1, 1.0),)),
            4: (33, 44, 64, ((1, 1.0),)), 5: (34, 42, 66, ((1, 0.9), (2, 0.1))),
            6: (50, 42, 58, ((2, 1.0),)), 7: (47, 40, 56, ((2, 0.9), (1, 0.1))),
            8: (45, 38, 48, ((2, 0.6), (1, 0.4)))},
}
_DECIDUOUS: dict[bool, dict[int, _Dims]] = {
    True: {1: (32, 34, 40, ((1, 1.0),)), 2: (26, 32, 40, ((1, 1.0),)), 3: (30, 36, 46, ((1, 1.0),)),
           4: (34, 34, 36, ((2, 0.5), (3, 0.5))), 5: (42, 36, 38, ((2, 0.4), (3, 0.6)))},
    False: {1: (22, 32, 38, ((1, 1.0),)), 2: (24, 32, 40, ((1, 1.0),)), 3: (28, 36, 44, ((1, 1.0),)),
            4: (34, 34, 36, ((2, 1.0),)), 5: (44, 36, 38, ((2, 1.0),))},
}
# Probability that an adult's permanent tooth is missing, by position (scaled per image).
_MISSING = {1: 0.01, 2: 0.02, 3: 0.01, 4: 0.04, 5: 0.04, 6: 0.07, 7: 0.05, 8: 0.45}


@dataclass
class SynthSample:
    """One synthetic radiograph and its ground truth.

    image: (H, W) uint8 grey. polygons: FDI label -> list of (N, 2) float polygons in pixel
    (x=col, y=row) coordinates of pixel centres, whole pixels (one polygon per tooth).
    child: mixed dentition.
    """

    image: np.ndarray
    polygons: dict[str, list[np.ndarray]]
    child: bool

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    def masks(self) -> dict[str, np.ndarray]:
        """FDI label -> (H, W) bool ground-truth mask (`polygons_to_mask` of its polygons)."""
        height, width = self.image.shape
        return {label: polygons_to_mask(polys, height, width) for label, polys in self.polygons.items()}

    def item(self, name: str) -> DatasetItem:
        """The sample as a dataset record named `name`: its image and ground-truth masks."""
        return DatasetItem(name, self.image, self.masks(), source="synthetic")


# --- arches --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Arch:
    """An occlusal curve y = y0 - k * ((x - xc) / 400)^2 in reference pixels (a smile)."""

    xc: float
    y0: float
    k: float
    upper: bool

    def y(self, x: np.ndarray) -> np.ndarray:
        return self.y0 - self.k * ((np.asarray(x, dtype=np.float64) - self.xc) / 400.0) ** 2

    def place(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Arc positions s (reference px from the midline x = xc, negative to the image left)
        -> points (n, 2) on the curve and unit tangents (n, 2) pointing image right."""
        xs = np.linspace(self.xc - 560.0, self.xc + 560.0, 1121)
        ys = self.y(xs)
        arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(xs), np.diff(ys)))])
        arc -= np.interp(self.xc, xs, arc)
        x = np.interp(s, arc, xs)
        slope = -2.0 * self.k * (x - self.xc) / 400.0 ** 2
        tangent = np.stack([np.ones_like(x), slope], axis=1) / np.hypot(1.0, slope)[:, None]
        return np.stack([x, self.y(x)], axis=1), tangent


# --- tooth shapes --------------------------------------------------------------------------

@dataclass
class _Tooth:
    """One tooth in its local frame: a across the tooth (image-rightward), r from the occlusal
    surface toward the apex, both in reference pixels; placed at `base` with unit axes `t`, `n`."""

    label: str
    bud: bool
    base: np.ndarray
    t: np.ndarray
    n: np.ndarray
    half_width: float
    neck: float  # half width at the cemento-enamel junction
    crown: float  # crown height: the crown is r < crown
    roots: list[tuple[float, float, float, float]]  # (a at the neck, a at the apex, half width, length)
    bend: float  # distal apex bend (a offset at the apex)
    furcation: float  # r where the roots split (== crown for one root)
    root_fraction: float  # formed part of the roots (1 = complete)
    dentin: float  # attenuation of dentin
    enamel: float  # relative extra attenuation of the crown
    pulp_width: float  # relative width of the pulp (wide in young teeth)
    # "filling" (a blob of half axes ra, rr at a = a0 on the occlusal surface), "crown" or "endo"
    restoration: tuple[str, float, float, float] | None = None  # kind, a0, ra, rr
    outline: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (N, 2) local (a, r)

    def root_centre(self, root: tuple[float, float, float, float], t: np.ndarray) -> np.ndarray:
        """Centre line a of a root at relative depth t (0 at the neck, 1 at the apex)."""
        top, apex, _, _ = root
        return top + (apex - top) * np.abs(t) ** 1.3 + self.bend * t ** 2

    def to_reference(self, local: np.ndarray) -> np.ndarray:
        """(N, 2) local (a, r) -> (N, 2) reference (x, y)."""
        return self.base + local[:, :1] * self.t + local[:, 1:] * self.n


def _apical(tangent: np.ndarray, upper: bool) -> np.ndarray:
    """Unit vector perpendicular to an arch tangent, pointing toward the roots (up for the
    upper arch, down for the lower; image y grows downward)."""
    return np.array([tangent[1], -tangent[0]]) if upper else np.array([-tangent[1], tangent[0]])


def _occlusal_profile(kind: ToothType, u: np.ndarray, crown: float) -> np.ndarray:
    """Depth r of the occlusal edge at relative across-position u = a / half_width."""
    if kind is ToothType.INCISOR:
        return 0.04 * crown * u ** 2
    if kind is ToothType.CANINE:
        return 0.2 * crown * np.abs(u) ** 1.2
    if kind is ToothType.PREMOLAR:
        return 0.07 * crown * (0.5 + 0.5 * np.cos(2 * np.pi * u / 0.8))
    return 0.06 * crown * (0.5 - 0.5 * np.cos(2 * np.pi * u / 0.53))


def _chaikin(points: np.ndarray, iterations: int) -> np.ndarray:
    """Corner-cutting smoothing of a closed polygon (N, 2)."""
    for _ in range(iterations):
        nxt = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt], axis=1).reshape(-1, 2)
    return points


def _outline(tooth: _Tooth, rng: np.random.Generator) -> np.ndarray:
    """Closed outline (N, 2) of a tooth in its local (a, r): occlusal edge, right crown side,
    the roots from right to left (with furcations between them; open ends while the roots are
    still forming), left crown side; jittered and smoothed."""
    kind = fdi.tooth_type(tooth.label)
    half_width, neck, crown, roots = tooth.half_width, tooth.neck, tooth.crown, tooth.roots
    furcation, root_fraction = tooth.furcation, tooth.root_fraction
    complete = root_fraction >= 0.95
    m = 7 if kind is ToothType.INCISOR else 9
    a_occ = np.linspace(-0.8, 0.8, m) * half_width
    occlusal = np.stack([a_occ, _occlusal_profile(kind, a_occ / half_width, crown)], axis=1)
    side = np.array([(0.97 * half_width, 0.16 * crown), (half_width, 0.38 * crown),
                     (0.94 * half_width, 0.68 * crown), (1.03 * neck, 0.93 * crown)])
    steps = np.linspace(0.0, 1.0, 6)[:, None]
    root_pts: list[np.ndarray] = []
    count = len(roots)
    for k in range(count - 1, -1, -1):
        root = roots[k]
        _, _, width, length = root
        t_fur = (furcation - crown) / length
        t_right = (0.0 if k == count - 1 else t_fur) + steps * (root_fraction - (0.0 if k == count - 1 else t_fur))
        t_left = (0.0 if k == 0 else t_fur) + steps * (root_fraction - (0.0 if k == 0 else t_fur))
        stretch = 0.93 if complete else 1.0
        t_right, t_left = t_right.ravel() * stretch, t_left.ravel()[::-1] * stretch

        def edge(t: np.ndarray, sign: float) -> np.ndarray:
            half = width * (1.0 - 0.65 * np.clip(t, 0.0, 1.0) ** 1.6)
            return np.stack([tooth.root_centre(root, t) + sign * half, crown + t * length], axis=1)

        root_pts.append(edge(t_right, 1.0))
        if complete:
            root_pts.append(np.array([[float(tooth.root_centre(root, np.array(root_fraction))),
                                       crown + root_fraction * length]]))
        root_pts.append(edge(t_left, -1.0))
        if k > 0:  # the furcation between this root and the next one to the left
            prev = roots[k - 1]
            t_prev = stretch * (furcation - crown) / prev[3]
            a_prev = float(tooth.root_centre(prev, np.array(t_prev))) + prev[2] * (1.0 - 0.65 * t_prev ** 1.6)
            a_here = edge(np.array([stretch * t_fur]), -1.0)[0, 0]
            root_pts.append(np.array([[(a_here + a_prev) / 2.0, furcation - 0.05 * length]]))
    left = side[::-1] * (-1.0, 1.0)
    pts = np.concatenate([occlusal, side, *root_pts, left])
    pts += rng.normal(0.0, 0.012 * half_width, pts.shape)
    return _chaikin(pts, 2)


def _make_tooth(rng: np.random.Generator, label: str, base: np.ndarray, tangent: np.ndarray,
                scale: float, root_fraction: float, bud: bool, tilt_deg: float) -> _Tooth:
    """Build one tooth of `label` with its occlusal centre at `base` (reference px)."""
    upper = fdi.is_upper(label)
    kind = fdi.tooth_type(label)
    table = _DECIDUOUS if fdi.is_deciduous(label) else _PERMANENT
    width, crown, root_len, choices = table[upper][fdi.position(label)]
    width *= scale * rng.uniform(0.95, 1.05)
    crown *= scale * rng.uniform(0.93, 1.07)
    root_len *= scale * rng.uniform(0.9, 1.08)
    counts, probs = zip(*choices)
    count = int(rng.choice(counts, p=probs))
    half_width = width / 2.0
    neck = half_width * {ToothType.INCISOR: 0.7, ToothType.CANINE: 0.72,
                         ToothType.PREMOLAR: 0.76, ToothType.MOLAR: 0.86}[kind]
    if bud and root_fraction < 0.35:
        count = 1
    if count == 1:
        roots = [(0.0, 0.0, 0.96 * neck, root_len)]
        furcation = crown
    else:
        spread = rng.uniform(1.4, 1.8) if fdi.is_deciduous(label) else rng.uniform(1.0, 1.3)
        seg = 2.0 * neck / count
        roots = []
        for k in range(count):
            top = -neck + (k + 0.5) * seg
            roots.append((top, top * spread, 0.47 * seg, root_len * rng.uniform(0.88, 1.05)))
        furcation = crown + root_len * rng.uniform(0.15, 0.3)
    side = -1.0 if fdi.on_image_left(label) else 1.0
    angle = math.radians(tilt_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    t = np.array([tangent[0] * cos - tangent[1] * sin, tangent[0] * sin + tangent[1] * cos])
    n = _apical(t, upper)
    tooth = _Tooth(label=label, bud=bud, base=np.asarray(base, dtype=np.float64), t=t, n=n,
                   half_width=half_width, neck=neck, crown=crown, roots=roots,
                   bend=side * rng.uniform(0.0, 0.12) * half_width, furcation=furcation,
                   root_fraction=root_fraction, dentin=rng.uniform(0.2, 0.26),
                   enamel=rng.uniform(0.5, 0.8) if bud else rng.uniform(0.9, 1.2),
                   pulp_width=(1.6 if bud or root_fraction < 0.95 else 1.0) * rng.uniform(0.8, 1.2))
    tooth.outline = _outline(tooth, rng)
    return tooth


def _restore(rng: np.random.Generator, tooth: _Tooth, rate: float) -> None:
    """Maybe give an erupted tooth a filling, a crown or a root-canal filling (in place)."""
    posterior = fdi.tooth_type(tooth.label) in (ToothType.PREMOLAR, ToothType.MOLAR)
    if tooth.bud or rng.random() >= rate * (1.0 if posterior else 0.3):
        return
    kind = str(rng.choice(["filling", "crown", "endo"], p=[0.6, 0.2, 0.2]))
    tooth.restoration = (kind, rng.uniform(-0.3, 0.3) * tooth.half_width,
                         rng.uniform(0.3, 0.6) * tooth.half_width, rng.uniform(0.25, 0.55) * tooth.crown)


# --- dentition -----------------------------------------------------------------------------

def _arch_labels(upper: bool, side: int, deciduous: bool) -> tuple[str, ...]:
    """Labels of one quadrant from the midline outward (side -1: image left)."""
    quadrant = (1 if side < 0 else 2) if upper else (4 if side < 0 else 3)
    return tuple(f"{quadrant + (4 if deciduous else 0)}{p}" for p in range(1, 6 if deciduous else 9))


def _tilt(rng: np.random.Generator, spread: float) -> float:
    return float(np.clip(rng.normal(0.0, spread), -2.0 * spread, 2.0 * spread))


def _dentition(rng: np.random.Generator, upper_arch: _Arch, lower_arch: _Arch, child: bool,
               scale: float) -> list[_Tooth]:
    """All teeth of one image (sizes times `scale`): buds first (they lie under the erupted
    teeth), then erupted ones."""
    spacing = rng.uniform(0.9, 0.98)
    missing_factor = rng.uniform(0.3, 2.0)
    restoration_rate = 0.0 if child else rng.uniform(0.0, 0.6) ** 2
    age = rng.uniform(0.0, 1.0)
    buds: list[_Tooth] = []
    erupted: list[_Tooth] = []
    for arch in (upper_arch, lower_arch):
        midline = rng.normal(0.0, 3.0)
        for side in (-1, 1):
            members: list[tuple[str, float, str | None]] = []  # (label, root fraction, successor bud)
            if child:
                permanent, deciduous = _arch_labels(arch.upper, side, False), _arch_labels(arch.upper, side, True)
                thresholds = (0.35, 0.65) if arch.upper else (0.2, 0.45)
                for p in (1, 2):
                    if age > thresholds[p - 1]:
                        members.append((permanent[p - 1], rng.uniform(0.55, 0.9), None))
                    else:
                        members.append((deciduous[p - 1], rng.uniform(0.6, 1.0), permanent[p - 1]))
                for p in (3, 4, 5):
                    successor = None if p == 5 and rng.random() < 0.04 else permanent[p - 1]
                    members.append((deciduous[p - 1], rng.uniform(0.6, 1.0), successor))
                members.append((permanent[5], rng.uniform(0.75, 1.0), None))
            else:
                members = [(label, 1.0, None) for label in _arch_labels(arch.upper, side, False)]
            widths = np.array([(_DECIDUOUS if fdi.is_deciduous(lab) else _PERMANENT)[arch.upper][fdi.position(lab)][0]
                               for lab, _, _ in members]) * scale * spacing
            edges = midline + side * np.concatenate([[0.0], np.cumsum(widths)])
            centres = (edges[:-1] + edges[1:]) / 2.0 + rng.normal(0.0, 0.025, len(widths)) * widths
            if child:  # the second permanent molar bud behind the first molar
                second = _PERMANENT[arch.upper][7][0] * scale
                centres = np.append(centres, edges[-1] + side * 0.4 * second)
            points, tangents = arch.place(centres)
            for i, (label, fraction, successor) in enumerate(members):
                gone = (not child and rng.random() < _MISSING[fdi.position(label)] * missing_factor) or \
                       (child and fdi.is_deciduous(label) and rng.random() < 0.04)
                if not gone:
                    tooth = _make_tooth(rng, label, points[i], tangents[i], scale, fraction, False, _tilt(rng, 2.5))
                    tooth.base = tooth.base + tooth.n * rng.normal(0.0, 1.0)
                    _restore(rng, tooth, restoration_rate)
                    erupted.append(tooth)
                if successor is not None:
                    crown, root_len = _DECIDUOUS[arch.upper][fdi.position(label)][1:3]
                    extra = 20.0 if fdi.position(label) == 3 else 0.0  # canine buds lie deepest
                    depth = (crown + rng.uniform(0.5, 0.75) * root_len + extra) * scale
                    normal = _apical(tangents[i], arch.upper)
                    buds.append(_make_tooth(rng, successor, points[i] + depth * normal, tangents[i], scale,
                                            rng.uniform(0.08, 0.3), True, _tilt(rng, 4.0)))
            if child:
                label = _arch_labels(arch.upper, side, False)[6]
                normal = _apical(tangents[-1], arch.upper)
                depth = rng.uniform(0.9, 1.4) * _PERMANENT[arch.upper][7][1] * scale
                buds.append(_make_tooth(rng, label, points[-1] + depth * normal, tangents[-1], scale,
                                        rng.uniform(0.1, 0.35), True, _tilt(rng, 4.0) - side * 6.0))
    return buds + erupted


# --- rendering -----------------------------------------------------------------------------

def _px(points: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Reference (x, y) points -> int32 pixel points shaped for cv2 drawing."""
    return np.round(np.asarray(points, dtype=np.float64) * (sx, sy)).astype(np.int32).reshape(-1, 1, 2)


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int], size: tuple[int, int],
                  sigma: float = 0.0) -> np.ndarray:
    """Gaussian noise on a (rows, cols) grid, optionally blurred, resized to size (W, H); float32."""
    grid = rng.standard_normal(cells, dtype=np.float32)
    if sigma > 0:
        grid = cv2.GaussianBlur(grid, (0, 0), sigma)
    return cv2.resize(grid, size, interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, size: tuple[int, int], upper: _Arch, lower: _Arch,
                crest: float, jaw: float) -> np.ndarray:
    """Soft tissue, bone and spine attenuation (H, W) float32, before the teeth. `crest`: depth
    of the alveolar crests below the occlusal curves; `jaw`: width factor of the jaws."""
    width, height = size
    sx, sy = width / REF_W, height / REF_H
    px = lambda pts: _px(pts, sx, sy)  # noqa: E731
    lw = lambda ref: max(1, int(round(ref * (sx + sy) / 2)))  # noqa: E731
    xc, y_occ = upper.xc, (upper.y0 + lower.y0) / 2.0
    bone = np.zeros((height, width), np.float32)
    cortex = np.zeros_like(bone)
    dark = np.zeros_like(bone)
    extra = np.zeros_like(bone)

    # maxilla: everything above the upper alveolar crest, rounded off at the tuberosities
    reach = rng.uniform(320, 345) * jaw
    xs = np.linspace(xc - reach, xc + reach, 61)
    ridge = upper.y(xs) - crest - 40.0 * ((xs - xc) / reach) ** 8
    maxilla = np.zeros_like(bone)
    cv2.fillPoly(maxilla, [px(np.concatenate([[(xc - reach + 60, -10)], np.stack([xs, ridge], 1),
                                               [(xc + reach - 60, -10)]]))], float(rng.uniform(0.13, 0.19)))
    bone += cv2.GaussianBlur(maxilla, (0, 0), 6.0 * (sx + sy) / 2)
    # mandible: crest between the rami, ramus, condyle, angle and lower border (dx, dy from xc, y_occ)
    drop = rng.uniform(-15, 15)
    ramus = np.array([(318, -40), (330, -100), (345, -95), (365, -72), (388, -112), (400, -132), (418, -134),
                      (428, -115), (426, -85), (432, 0), (430, 80), (418, 130), (385, 158), (320, 178),
                      (230, 192), (120, 202), (0, 206)], dtype=np.float64)
    ramus += rng.normal(0.0, 3.0, ramus.shape)
    ramus[:, 0] *= jaw
    ramus[1:9, 1] *= rng.uniform(0.9, 1.1)  # height of the coronoid and condyle
    ramus[9:, 1] += drop * np.linspace(0.2, 1.0, len(ramus) - 9)
    right = ramus + (xc, y_occ)
    left = (ramus[:-1] * (-1.0, 1.0) + (xc, y_occ))[::-1]
    xs = np.linspace(xc - 300 * jaw, xc + 300 * jaw, 31)
    alveolar = np.stack([xs, lower.y(xs) + crest], 1)
    mandible = _chaikin(np.concatenate([alveolar, right, left]), 3)
    cv2.fillPoly(bone, [px(mandible)], float(rng.uniform(0.17, 0.23)))
    border = mandible[8 * (len(alveolar) + 4):-8 * 5]  # condyle to condyle, without the crest
    cv2.polylines(cortex, [px(border)], False, float(rng.uniform(0.12, 0.2)), lw(7))
    canal = np.array([(390, -5), (330, 75), (250, 115), (150, 125), (100, 117)]) + rng.normal(0, 4, (5, 2))
    for sign in (-1.0, 1.0):
        cv2.polylines(dark, [px(canal * (sign * jaw, 1.0) + (xc, lower.y0))], False, 0.06, lw(7))

    # maxillary structures above the upper apices
    palate = upper.y0 - rng.uniform(138, 158)
    cv2.ellipse(dark, (int(xc * sx), int((palate - 72) * sy)), (lw(95), lw(65)), 0, 0, 360, 0.1, -1)
    cv2.line(extra, (int(xc * sx), 0), (int(xc * sx), int((palate - 20) * sy)), 0.08, lw(8))
    for sign in (-1.0, 1.0):
        centre = (int((xc + sign * rng.uniform(220, 250)) * sx), int((palate + rng.uniform(-5, 10)) * sy))
        axes = (lw(rng.uniform(90, 115)), lw(rng.uniform(42, 56)))
        cv2.ellipse(dark, centre, axes, 0, 0, 360, float(rng.uniform(0.08, 0.14)), -1)
        cv2.ellipse(cortex, centre, axes, 0, 0, 180, 0.08, lw(3))
        zygoma = np.array([(270, -40), (360, -50), (440, -58)]) * (sign, 1.0) + (xc, palate)
        cv2.polylines(extra, [px(zygoma + rng.normal(0, 4, zygoma.shape))], False, 0.06, lw(26))
    xs = np.linspace(xc - 300, xc + 300, 31)
    cv2.polylines(cortex, [px(np.stack([xs, palate + 12.0 * ((xs - xc) / 300) ** 2], 1))], False,
                  float(rng.uniform(0.1, 0.16)), lw(9))

    # soft tissue: tongue, lips, palatoglossal air space, pharyngeal airway
    cv2.ellipse(extra, (int(xc * sx), int((upper.y0 - 55) * sy)), (lw(320), lw(60)), 0, 0, 360, 0.05, -1)
    cv2.ellipse(extra, (int(xc * sx), int(y_occ * sy)), (lw(210), lw(28)), 0, 0, 360,
                float(rng.uniform(0.0, 0.06)), -1)
    if rng.random() < 0.6:
        cv2.ellipse(dark, (int(xc * sx), int((upper.y0 - 30) * sy)), (lw(340), lw(rng.uniform(80, 105))),
                    0, 195, 345, float(rng.uniform(0.05, 0.1)), lw(14))
    for sign in (-1.0, 1.0):
        top, bottom = xc + sign * rng.uniform(320, 350), xc + sign * rng.uniform(345, 380)
        cv2.line(dark, (int(top * sx), 0), (int(bottom * sx), height), float(rng.uniform(0.02, 0.06)), lw(28))

    a = 0.27 + bone + cortex + extra - dark
    a = cv2.GaussianBlur(a, (0, 0), 2.5 * (sx + sy) / 2)
    cells = (int(REF_H / 3), int(REF_W / 3))
    bone_soft = cv2.GaussianBlur(bone, (0, 0), 4.0 * (sx + sy) / 2) * 6.0
    a += 0.035 * _smooth_noise(rng, cells, size, 0.8) * np.clip(bone_soft, 0.0, 1.0)
    a += 0.04 * _smooth_noise(rng, (4, 8), size)

    # spine: bright segmented bands at both sides; its ghost brightens the front teeth
    cols = np.arange(width, dtype=np.float32) / sx
    rows = np.arange(height, dtype=np.float32) / sy
    band = rng.uniform(30, 50)
    spine = 0.5 * (2.0 + np.tanh((band - cols) / 8.0) + np.tanh((cols - REF_W + band) / 8.0))
    period, phase = rng.uniform(75, 95), rng.uniform(0, 100)
    vertebrae = 0.85 + 0.15 * np.cos(2 * np.pi * (rows - phase) / period)
    a += float(rng.uniform(0.16, 0.28)) * vertebrae[:, None] * spine[None, :]
    ghost = np.outer(np.exp(-0.5 * ((rows - y_occ - 40) / 160.0) ** 2), np.exp(-0.5 * ((cols - xc) / 60.0) ** 2))
    a += float(rng.uniform(0.0, 0.12)) * ghost
    return a


def _pulp(tooth: _Tooth, a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pulp chamber and root canals as a bool array over local coordinates (a, r)."""
    crown = tooth.crown
    top = (0.3 if tooth.bud else 0.5) * crown
    bottom = crown + 0.3 * (tooth.furcation - crown) if len(tooth.roots) > 1 else crown
    centre, half_height = (top + bottom) / 2.0, (bottom - top) / 2.0 + 1e-3
    chamber = 0.4 * tooth.neck * tooth.pulp_width * np.sqrt(np.clip(1.0 - ((r - centre) / half_height) ** 4, 0.0, 1.0))
    pulp = np.abs(a) < chamber
    for root in tooth.roots:
        t = (r - crown) / root[3]
        half = root[2] * 0.2 * tooth.pulp_width * (1.0 - 0.6 * t)
        pulp |= (t >= -0.05) & (t < 0.9 * tooth.root_fraction) & (np.abs(a - tooth.root_centre(root, t)) < half)
    return pulp


def _draw_tooth(att: np.ndarray, tooth: _Tooth, polygon: np.ndarray, sx: float, sy: float) -> None:
    """Add one tooth's attenuation to `att` (H, W) in place; the tooth covers exactly the
    pixels of polygons_to_mask([polygon])."""
    height, width = att.shape
    margin = int(math.ceil(8 * max(sx, sy))) + 2
    x0, y0 = max(int(polygon[:, 0].min()) - margin, 0), max(int(polygon[:, 1].min()) - margin, 0)
    x1 = min(int(math.ceil(polygon[:, 0].max())) + margin + 1, width)
    y1 = min(int(math.ceil(polygon[:, 1].max())) + margin + 1, height)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [np.round(polygon).astype(np.int32).reshape(-1, 1, 2) - np.int32((x0, y0))], 1)
    dx = (np.arange(x0, x1, dtype=np.float32) / sx - tooth.base[0])[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) / sy - tooth.base[1])[:, None]
    a = dx * tooth.t[0] + dy * tooth.t[1]
    r = dx * tooth.n[0] + dy * tooth.n[1]
    inside = mask.astype(bool)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    thickness = 0.5 + 0.5 * np.sqrt(np.clip(dist / (0.45 * tooth.half_width * sx), 0.0, 1.0))
    crown = np.clip((tooth.crown - r) / (0.08 * tooth.crown) + 0.5, 0.0, 1.0)
    cap = crown * np.clip(1.0 - dist / (3.0 * sx), 0.0, 1.0)
    body = tooth.dentin * (thickness * (1.0 + tooth.enamel * crown) + 0.4 * cap)
    body -= 0.4 * tooth.dentin * _pulp(tooth, a, r)
    if tooth.restoration is not None:
        kind, a0, ra, rr = tooth.restoration
        if kind == "crown":
            filled = r < 1.03 * tooth.crown
        else:
            filled = ((a - a0) / ra) ** 4 + (r / rr) ** 4 < 1.0
        if kind == "endo":
            canals = _pulp(tooth, a, r) & (r > 0.5 * tooth.crown)
            filled |= cv2.dilate(canals.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        body += 0.95 * filled
    ring_size = 2 * max(1, int(round((5.0 if tooth.bud else 1.5) * (sx + sy) / 2))) + 1
    ring = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ring_size, ring_size))).astype(bool) & ~inside
    if tooth.bud:
        halo = 0.1 * ring
    else:
        halo = 0.07 * (ring & (r > 0.9 * tooth.crown))
    roi = att[y0:y1, x0:x1]
    roi += np.where(inside, body, 0.0).astype(np.float32) - halo.astype(np.float32)


def _finish(rng: np.random.Generator, att: np.ndarray, xc: float, sx: float, sy: float) -> np.ndarray:
    """Blur (more over the front teeth, outside the focal trough), window (contrast,
    brightness, gamma), add noise and quantise: (H, W) uint8."""
    s = (sx + sy) / 2
    att = cv2.GaussianBlur(att, (0, 0), max(0.3, rng.uniform(0.5, 1.4) * s))
    front = np.exp(-0.5 * ((np.arange(att.shape[1], dtype=np.float32) / sx - xc) / 90.0) ** 2)[None, :]
    weight = float(rng.uniform(0.0, 0.8)) * front
    att = att * (1.0 - weight) + cv2.GaussianBlur(att, (0, 0), 2.5 * s) * weight
    low, high = rng.uniform(0.04, 0.14), rng.uniform(0.95, 1.15)
    grey = np.clip((att - low) / (high - low), 0.0, 1.0) ** rng.uniform(0.75, 1.3)
    grey += rng.uniform(0.015, 0.045) * rng.standard_normal(att.shape, dtype=np.float32)
    return np.round(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)


# --- public API ----------------------------------------------------------------------------

def sample_seed(seed: int, index: int) -> int:
    """Seed of image `index` of a dataset with `seed` (independent of the dataset's length)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0])


def generate(seed: int, size: tuple[int, int] = (1024, 512)) -> SynthSample:
    """One synthetic panoramic radiograph of `size` (width, height) px, deterministic for `seed`."""
    width, height = int(size[0]), int(size[1])
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(f"image size {width}x{height} is too small (at least {MIN_SIDE}x{MIN_SIDE})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    sx, sy = width / REF_W, height / REF_H
    child = bool(rng.random() < CHILD_FRACTION)
    xc = REF_W / 2 + rng.uniform(-25, 25)
    y_occ = REF_H / 2 + rng.uniform(-10, 22)
    gap = rng.uniform(2, 16)
    k = rng.uniform(25, 55)
    upper = _Arch(xc, y_occ - gap / 2, k, True)
    lower = _Arch(xc, y_occ + gap / 2, k + rng.uniform(-5, 12), False)
    scale = rng.uniform(0.95, 1.1)
    teeth = _dentition(rng, upper, lower, child, scale)
    crest = (36.0 if child else 44.0) * scale + rng.uniform(0, 10)
    jaw = rng.uniform(0.86, 0.94) if child else rng.uniform(0.93, 1.0)
    att = _background(rng, (width, height), upper, lower, crest, jaw)
    polygons: dict[str, list[np.ndarray]] = {}
    for tooth in teeth:
        poly = tooth.to_reference(tooth.outline) * (sx, sy)
        poly = cv2.approxPolyDP(poly.astype(np.float32).reshape(-1, 1, 2), 0.3, True).reshape(-1, 2)
        poly = np.round(np.clip(poly.astype(np.float64), 0.0, (width - 1, height - 1)))
        poly = poly[np.any(poly != np.roll(poly, 1, axis=0), axis=1)]  # no repeated vertices
        _draw_tooth(att, tooth, poly, sx, sy)
        polygons[tooth.label] = [poly]
    return SynthSample(image=_finish(rng, att, xc, sx, sy), polygons=polygons, child=child)


def _hex_bgr(colour: str) -> tuple[int, int, int]:
    value = colour.lstrip("#")
    return int(value[4:6], 16), int(value[2:4], 16), int(value[0:2], 16)


def _contact_tile(sample: SynthSample, masks: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The X-ray with coloured masks, outlines and FDI numbers, _TILE_W px wide (BGR uint8)."""
    width, height = sample.size
    scale = _TILE_W / width
    tile_h = int(round(height * scale))
    grey = cv2.resize(sample.image, (_TILE_W, tile_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    tile = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    overlay = tile.copy()
    for label, polys in sample.polygons.items():
        pts = [np.round(p * scale).astype(np.int32).reshape(-1, 1, 2) for p in polys]
        cv2.fillPoly(overlay, pts, _hex_bgr(fdi.colour(label)))
    tile = cv2.addWeighted(overlay, 0.35, tile, 0.65, 0.0)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for label, polys in sample.polygons.items():
        colour = _hex_bgr(fdi.colour(label))
        cv2.polylines(tile, [np.round(p * scale).astype(np.int32).reshape(-1, 1, 2) for p in polys], True, colour, 1)
        moments = cv2.moments(masks[label].view(np.uint8), binaryImage=True)
        (tw, th), _ = cv2.getTextSize(label, font, 0.42, 1)
        x, y = moments["m10"] / moments["m00"] * scale, moments["m01"] / moments["m00"] * scale
        org = (int(x - tw / 2), int(y + th / 2))
        cv2.putText(tile, label, org, font, 0.42, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(tile, label, org, font, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    kind = "mixed dentition" if sample.child else "adult"
    caption = f"{name}  {kind}, {len(sample.polygons)} teeth"
    bar = np.zeros((22, _TILE_W, 3), np.uint8)
    cv2.putText(bar, caption, (6, 16), font, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([bar, tile])


def _contact_sheet(tiles: list[np.ndarray]) -> np.ndarray:
    """Tiles in a grid of two columns (one for a single tile), separated by 4 px of grey."""
    cols = 1 if len(tiles) == 1 else 2
    rows = math.ceil(len(tiles) / cols)
    tile_h = max(t.shape[0] for t in tiles)
    sheet = np.full((rows * (tile_h + 4) + 4, cols * (_TILE_W + 4) + 4, 3), 64, np.uint8)
    for i, tile in enumerate(tiles):
        y, x = 4 + (i // cols) * (tile_h + 4), 4 + (i % cols) * (_TILE_W + 4)
        sheet[y:y + tile.shape[0], x:x + _TILE_W] = tile
    return sheet


def label_studio_result(masks: dict[str, np.ndarray], target) -> list[dict]:
    """{FDI label: (H, W) mask} -> a Label Studio annotation result for `target` (a
    `backend.formats.Target`): one brush region per tooth, in FDI order, with stable ids ("gt11")."""
    result = []
    for label in sorted(masks, key=fdi.CLASS_INDEX.__getitem__):
        for region in mask_to_regions(masks[label], target.value_for(label), target):  # one brush region
            region["id"] = f"gt{label}"  # stable ids: the same seed writes the same bytes
            result.append(region)
    return result


def write_dataset(out: Path, n: int, seed: int, size: tuple[int, int] = (1024, 512),
                  progress: bool = True, url_prefix: str = "") -> str:
    """Write n images with Labelme and Label Studio ground truth under `out`; return a summary.

    Per image `synth_{seed}_{i:04d}`: images/<name>.png, labelme/<name>.json, tasks/<name>.json
    (a Label Studio task whose image URL is url_prefix + "images/<name>.png", with one brush
    region per tooth as a ground-truth annotation); also tasks.json (all tasks) and
    contact_sheet.png (the first 8 images with their coloured, numbered masks).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    start = time.perf_counter()
    out = Path(out)
    for sub in ("images", "labelme", "tasks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    target = find_target(render_label_config())
    tasks: list[dict] = []
    tiles: list[np.ndarray] = []
    children = teeth = 0
    for i in tqdm(range(n), desc="synth", unit="img", disable=not progress):
        name = f"synth_{seed}_{i:04d}"
        sample = generate(sample_seed(seed, i), size)
        width, height = sample.size
        masks = sample.masks()
        ok, png = cv2.imencode(".png", sample.image)
        if not ok:
            raise OSError(f"cannot encode {name}.png")
        (out / "images" / f"{name}.png").write_bytes(png.tobytes())
        write_labelme(out / "labelme" / f"{name}.json",
                      polygons_to_labelme(sample.polygons, f"../images/{name}.png", height, width))
        result = label_studio_result(masks, target)
        task = {"data": {target.value_key: f"{url_prefix}images/{name}.png"},
                "annotations": [{"result": result, "ground_truth": True}]}
        (out / "tasks" / f"{name}.json").write_text(json.dumps(task))
        tasks.append(task)
        children += sample.child
        teeth += len(masks)
        if i < CONTACT_SHEET_SAMPLES:
            tiles.append(_contact_tile(sample, masks, name))
    (out / "tasks.json").write_text(json.dumps(tasks))
    cv2.imwrite(str(out / "contact_sheet.png"), _contact_sheet(tiles))
    return (f"{n} images ({children} with mixed dentition), {teeth} teeth -> {out} "
            f"[images/, labelme/, tasks/, tasks.json, contact_sheet.png] in {time.perf_counter() - start:.1f} s")


def train_synthetic_detector(work: Path, n: int = 24, seed: int = 1000, size: tuple[int, int] = (640, 320),
                             **train_overrides) -> Path:
    """Train a YOLOv8-seg on `n` synthetic X-rays (tests and benchmarks: no weights can be
    downloaded); returns the best weights. The product's training defaults ("small" preset) at
    imgsz 320, 1000 steps without a time budget (the same model on any machine), unless
    `train_overrides` say otherwise."""
    from backend.preprocess import pixel_statistics
    from training.dataset import split_train_val, write_yolo_dataset
    from training.train import TrainConfig, train_model

    items = [generate(seed + i, size).item(f"s{i}") for i in range(n)]
    train, val = split_train_val([it.name for it in items], 0.15)
    config = TrainConfig(**{**dict(imgsz=320, steps=1000, time_budget=0.0), **train_overrides})
    train_items, val_items = [it for it in items if it.name in train], [it for it in items if it.name in val]
    data = write_yolo_dataset(train_items, val_items, Path(work) / "dataset", tooth_class=config.tooth_class)
    mean, std = pixel_statistics([it.pixels() for it in train_items])
    return train_model(data, Path(work) / "run", config, mean, std, val_items=val_items).weights
