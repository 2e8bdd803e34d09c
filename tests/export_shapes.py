"""The annotations recorded in tests/data/ls_export_1.23.2.json (by tests/data/record_ls_export.py),
as masks: the export tests decode Label Studio's own output and compare with these."""
import numpy as np

H, W = 100, 200
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tooth" toName="image"><Label value="11"/><Label value="21"/><Label value="Caries"/></BrushLabels>
  <PolygonLabels name="outline" toName="image"><Label value="11"/><Label value="21"/></PolygonLabels>
</View>"""


def rect(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


# brush strokes: tooth 11 painted in two strokes, tooth 21 in one, a caries region (not a tooth)
STROKES = {"11": [rect(20, 20, 40, 60), rect(30, 55, 45, 80)], "21": [rect(100, 20, 130, 70)],
           "Caries": [rect(22, 22, 26, 26)]}
# polygons in percent of the image: tooth 11 as one polygon, tooth 21 as two parts
POLYGONS = {"11": [[[10, 20], [20, 20], [20, 60], [10, 60]]],
            "21": [[[50, 20], [60, 20], [60, 40], [50, 40]], [[50, 50], [60, 50], [60, 70], [50, 70]]]}


def expected_brush_masks():
    return {"11": STROKES["11"][0] | STROKES["11"][1], "21": STROKES["21"][0]}
