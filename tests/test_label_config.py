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


def test_the_labels_are_placed_like_a_dental_chart():
    """Each control's labels keep FDI order (the CSS places the n-th label, and Label Studio's hotkeys
    follow that order); each label has its own cell: upper 18-11 | 21-28, deciduous 55-51 | 61-65 over
    85-81 | 71-75, lower 48-41 | 31-38 (the browser check is in tests/test_e2e_preannotate.py)."""
    from backend.label_config import CHART_CLASS, chart_cell

    interface = LabelInterface(render_label_config())
    for name in ("tooth", "tooth_point", "tooth_box"):
        assert list(interface.get_control(name).labels) == list(fdi.FDI_LABELS)
    cells = {label: chart_cell(label) for label in fdi.FDI_LABELS}
    assert len(set(cells.values())) == 52
    rows = {row: [label for label in fdi.FDI_LABELS if cells[label][0] == row] for row in (1, 2, 4, 5)}
    by_column = {row: [label for _, label in sorted((cells[label][1], label) for label in labels)]
                 for row, labels in rows.items()}
    assert by_column[1] == "18 17 16 15 14 13 12 11 21 22 23 24 25 26 27 28".split()
    assert by_column[2] == "55 54 53 52 51 61 62 63 64 65".split()
    assert by_column[4] == "85 84 83 82 81 71 72 73 74 75".split()
    assert by_column[5] == "48 47 46 45 44 43 42 41 31 32 33 34 35 36 37 38".split()
    assert cells["55"][1] == cells["15"][1] and cells["61"][1] == cells["21"][1]  # deciduous under their successors
    config = render_label_config()
    assert config.count(f'<View className="{CHART_CLASS}">') == 3
    for index, label in enumerate(fdi.FDI_LABELS, start=1):
        row, column = cells[label]
        assert f".lsf-label:nth-child({index}) {{ grid-area: {row} / {column}; }}" in config
