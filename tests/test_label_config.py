from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend import fdi
from backend.formats import BRUSH, POLYGON, LabelConfigError, fdi_of_value, find_target
from backend.label_config import render_label_config

REPO = Path(__file__).resolve().parents[1]


def test_committed_config_is_the_rendered_one():
    assert (REPO / "label_studio_config.xml").read_text() == render_label_config()


def test_config_has_the_52_fdi_labels_with_colours():
    interface = LabelInterface((REPO / "label_studio_config.xml").read_text())
    brush = interface.get_control("tooth")
    assert brush.tag == "BrushLabels"
    assert list(brush.labels) == list(fdi.FDI_LABELS)
    assert brush.labels_attrs["11"].attr["background"] == fdi.colour("11")
    image = interface.get_object("image")
    assert image.attr["zoom"] == "true"
    assert image.attr["brightnessControl"] == "true" and image.attr["contrastControl"] == "true"


def test_find_target_on_shipped_config():
    target = find_target(render_label_config())
    assert (target.from_name, target.to_name, target.type, target.value_key) == ("tooth", "image", BRUSH, "image")
    assert target.value_for("48") == "48" and len(target.fdi_to_value) == 52


def test_find_target_maps_label_values_and_polygon_configs():
    config = """<View><Image name="xray" value="$img"/>
      <PolygonLabels name="teeth" toName="xray">
        <Label value="Tooth 11"/><Label value="tooth_21"/><Label value="Caries"/><Label value="11/21 gap"/>
      </PolygonLabels></View>"""
    target = find_target(config)
    assert (target.from_name, target.to_name, target.type, target.value_key) == ("teeth", "xray", POLYGON, "img")
    assert dict(target.fdi_to_value) == {"11": "Tooth 11", "21": "tooth_21"}
    assert target.value_for("31") is None


def test_brush_preferred_over_polygon():
    config = """<View><Image name="i" value="$image"/>
      <PolygonLabels name="p" toName="i"><Label value="11"/></PolygonLabels>
      <BrushLabels name="b" toName="i"><Label value="11"/></BrushLabels></View>"""
    assert find_target(config).from_name == "b"
    assert find_target(config, prefer=POLYGON).from_name == "p"


@pytest.mark.parametrize("config,reason", [
    ('<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i"><Label value="11"/></RectangleLabels></View>',
     "no BrushLabels or PolygonLabels"),
    ('<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i"><Label value="Caries"/></BrushLabels></View>',
     "no FDI tooth labels"),
    ("<View><Image", "cannot parse"),
])
def test_find_target_errors(config, reason):
    with pytest.raises(LabelConfigError, match=reason):
        find_target(config)


@pytest.mark.parametrize("value,expected", [
    ("11", "11"), (" 85 ", "85"), ("Tooth 36", "36"), ("UR-18", "18"),
    ("19", None), ("111", None), ("11/21", None), ("caries", None), ("tooth 9", None),
])
def test_fdi_of_value(value, expected):
    assert fdi_of_value(value) == expected
