import logging

import cv2
import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend import formats
from backend.instance import Instance, mask_box
from backend.label_config import render_label_config

H, W = 500, 1000


def tooth_mask(cx=300, cy=200, h=160, w=60, angle=12.0, shape=(H, W)):
    """A tooth-sized shape: an ellipse crown on top of a tapering root polygon, rotated."""
    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, (cx, cy - h // 4), (w // 2, h // 4), 0, 0, 360, 1, -1)
    root = np.array([[cx - w // 2 + 4, cy - h // 4], [cx + w // 2 - 4, cy - h // 4],
                     [cx + 6, cy + h // 2], [cx - 8, cy + h // 2 - 10]], np.int32)
    cv2.fillPoly(m, [root], 1)
    rot = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    return cv2.warpAffine(m, rot, (shape[1], shape[0]), flags=cv2.INTER_NEAREST).astype(bool)


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brush_rle_round_trip_is_exact(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((H, W)) > 0.7  # noisy: every run length occurs
    mask |= tooth_mask()
    assert np.array_equal(formats.rle_to_mask(formats.mask_to_rle(mask), H, W), mask)
    empty = np.zeros((7, 13), bool)
    assert np.array_equal(formats.rle_to_mask(formats.mask_to_rle(empty), 7, 13), empty)


def test_rle_size_mismatch_is_a_clear_error():
    rle = formats.mask_to_rle(np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="expected 10x11x4"):
        formats.rle_to_mask(rle, 10, 11)


@pytest.mark.parametrize("angle", [0.0, 17.0, -33.0])
def test_polygon_round_trip_tooth_sized(angle):
    mask = tooth_mask(angle=angle)
    polys = formats.mask_to_polygons(mask, epsilon=0.7)
    assert len(polys) == 1
    pct = formats.pixels_to_percent(polys[0], H, W)
    assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in pct)
    back = formats.polygons_to_mask([formats.percent_to_pixels(pct, H, W)], H, W)
    assert iou(back, mask) >= 0.98
    exact = formats.polygons_to_mask(formats.mask_to_polygons(mask), H, W)
    assert iou(exact, mask) >= 0.995


def test_pixel_percent_convention():
    # pixel (0, 0) centre is at 0.05% of a 1000-wide image; the last pixel centre at 99.95%
    assert formats.pixels_to_percent(np.array([[0, 0], [999, 499]]), H, W) == [[0.05, 0.1], [99.95, 99.9]]
    assert np.allclose(formats.percent_to_pixels([[0.05, 0.1], [99.95, 99.9]], H, W), [[0, 0], [999, 499]])


def test_multi_part_tooth_gives_one_polygon_per_part_and_drops_specks():
    mask = tooth_mask(cx=200) | tooth_mask(cx=500)
    mask[10, 10] = True  # a one-pixel speck
    polys = formats.mask_to_polygons(mask)
    assert len(polys) == 2
    assert sorted(round((p[:, 0].min() + p[:, 0].max()) / 200) for p in polys) == [2, 5]


def test_instances_to_results_brush_validates_and_round_trips():
    target = formats.find_target(render_label_config())
    a, b = tooth_mask(cx=300), tooth_mask(cx=600, angle=-10)
    result = formats.instances_to_results([Instance(a, "11", 0.91), Instance(b, "21", 0.5)], target)
    assert [r["value"]["brushlabels"] for r in result] == [["11"], ["21"]]
    assert [r["score"] for r in result] == [0.91, 0.5]
    assert all(r["original_width"] == W and r["original_height"] == H and r["type"] == "brushlabels" for r in result)
    assert len({r["id"] for r in result}) == 2
    interface = LabelInterface(render_label_config())
    assert interface.validate_prediction({"result": result, "score": 0.7}, return_errors=True) == []
    masks = formats.result_to_masks(result)
    assert set(masks) == {"11", "21"}
    assert np.array_equal(masks["11"], a) and np.array_equal(masks["21"], b)


POLY_CONFIG = """<View><Image name="img" value="$image"/>
  <PolygonLabels name="poly" toName="img"><Label value="11"/><Label value="21"/><Label value="Caries"/></PolygonLabels></View>"""


def test_instances_to_results_polygon_validates_and_round_trips():
    target = formats.find_target(POLY_CONFIG)
    two_part = tooth_mask(cx=250) | tooth_mask(cx=700)
    result = formats.instances_to_results([Instance(two_part, "11", 0.8)], target)
    assert len(result) == 2 and all(r["value"]["polygonlabels"] == ["11"] for r in result)
    assert LabelInterface(POLY_CONFIG).validate_prediction({"result": result}, return_errors=True) == []
    back = formats.result_to_masks(result)
    assert iou(back["11"], two_part) >= 0.98


def test_missing_config_label_is_skipped_and_logged_once(caplog):
    target = formats.find_target(POLY_CONFIG)
    m = tooth_mask()
    with caplog.at_level(logging.WARNING, logger="backend.formats"):
        r1 = formats.instances_to_results([Instance(m, "36", 0.9), Instance(m, "11", 0.9)], target)
        r2 = formats.instances_to_results([Instance(m, "36", 0.9)], target)
    assert [r["value"]["polygonlabels"] for r in r1] == [["11"]] and r2 == []
    assert sum("tooth 36" in rec.message for rec in caplog.records) == 1


def test_result_to_masks_unions_regions_and_skips_foreign_ones():
    """An export as Label Studio writes it: two brush strokes for 11, a polygon for 21, a
    rectangle and a non-tooth label that must be ignored."""
    a1 = np.zeros((H, W), bool)
    a1[100:200, 100:150] = True
    a2 = np.zeros((H, W), bool)
    a2[180:300, 120:160] = True
    poly21 = [[60.0, 20.0], [70.0, 20.0], [70.0, 60.0], [60.0, 60.0]]
    result = [
        {"id": "a", "type": "brushlabels", "from_name": "tooth", "to_name": "image", "original_width": W,
         "original_height": H, "value": {"format": "rle", "rle": formats.mask_to_rle(a1), "brushlabels": ["11"]}},
        {"id": "b", "type": "brushlabels", "from_name": "tooth", "to_name": "image", "original_width": W,
         "original_height": H, "value": {"format": "rle", "rle": formats.mask_to_rle(a2), "brushlabels": ["Tooth 11"]}},
        {"id": "c", "type": "polygonlabels", "from_name": "p", "to_name": "image", "original_width": W,
         "original_height": H, "value": {"points": poly21, "polygonlabels": ["21"]}},
        {"id": "d", "type": "rectanglelabels", "from_name": "r", "to_name": "image", "original_width": W,
         "original_height": H, "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["11"]}},
        {"id": "e", "type": "brushlabels", "from_name": "tooth", "to_name": "image", "original_width": W,
         "original_height": H, "value": {"format": "rle", "rle": formats.mask_to_rle(a2), "brushlabels": ["Caries"]}},
    ]
    masks = formats.result_to_masks(result)
    assert set(masks) == {"11", "21"}
    assert np.array_equal(masks["11"], a1 | a2)
    # polygon 60-70% x 20-60% of 1000x500 -> cols 599.5..699.5, rows 99.5..299.5
    assert masks["21"].sum() == pytest.approx(101 * 201, rel=0.02)
    assert formats.result_image_size(result) == (H, W)


def test_region_without_size_is_a_clear_error():
    with pytest.raises(ValueError, match="original_width"):
        formats.region_mask({"id": "x", "type": "brushlabels", "value": {"rle": [1, 2]}})


def test_instance_box_from_mask():
    m = np.zeros((20, 30), bool)
    m[5:9, 10:25] = True
    inst = Instance(m, "11", 0.5)
    assert inst.box == (10.0, 5.0, 25.0, 9.0) == mask_box(m)
    assert inst.area == 60 and inst.center_x == 17.5
    assert mask_box(np.zeros((3, 3), bool)) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        Instance(np.zeros((2, 2, 2)), "11")
