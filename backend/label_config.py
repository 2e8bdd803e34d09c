"""The labeling interface toothseg ships (`label_studio_config.xml` is this module's output).

`toothseg label-config > label_studio_config.xml` regenerates the file; a test keeps the two equal.
"""
from __future__ import annotations

from backend import fdi

IMAGE_NAME = "image"
BRUSH_NAME = "tooth"
POINT_NAME = "tooth_point"
BOX_NAME = "tooth_box"

_GROUPS = (
    ("1", "Permanent, upper right (Q1)"),
    ("2", "Permanent, upper left (Q2)"),
    ("3", "Permanent, lower left (Q3)"),
    ("4", "Permanent, lower right (Q4)"),
    ("5", "Deciduous, upper right (Q5)"),
    ("6", "Deciduous, upper left (Q6)"),
    ("7", "Deciduous, lower left (Q7)"),
    ("8", "Deciduous, lower right (Q8)"),
)


def _label_lines(indent: str, comments: bool = True) -> list[str]:
    lines = []
    for quadrant, title in _GROUPS:
        if comments:
            lines.append(f"{indent}<!-- {title} -->")
        for label in fdi.FDI_LABELS:
            if label[0] != quadrant:
                continue
            kind = "deciduous" if fdi.is_deciduous(label) else "permanent"
            lines.append(f'{indent}<Label value="{label}" background="{fdi.colour(label)}" '
                         f'hint="{fdi.tooth_type(label).value}, {kind}"/>')
    return lines


CHART_CLASS = "toothseg-chart"


def chart_cell(label: str) -> tuple[int, int]:
    """(grid row, grid column) of an FDI label in the dental-chart layout, as a dentist reads a chart
    facing the patient: upper teeth on top (18-11 | 21-28), lower teeth at the bottom (48-41 | 31-38),
    the deciduous quadrants inside them (55-51 | 61-65 over 85-81 | 71-75). Column 9 and row 3 are
    gutters: the midline and the occlusal plane."""
    quadrant, tooth = int(label[0]), int(label[1])
    row = {1: 1, 2: 1, 5: 2, 6: 2, 8: 4, 7: 4, 4: 5, 3: 5}[quadrant]
    right = quadrant in (1, 4, 5, 8)  # the patient's right is the chart's left
    return row, (9 - tooth) if right else (9 + tooth)


def _chart_style() -> str:
    """CSS that lays each labels list out on the chart grid. The labels keep their FDI order in the
    config (11-18, 21-28, ..., 81-85), so Label Studio's automatic hotkeys are the ones it always
    gave them; only their place on screen changes (each child's grid cell, by its position)."""
    rules = [f".{CHART_CLASS} .lsf-labels {{ display: grid; gap: 2px; "
             "grid-template-columns: repeat(8, minmax(0, 1fr)) 10px repeat(8, minmax(0, 1fr)); "
             "grid-template-rows: auto auto 8px auto auto; }",
             f".{CHART_CLASS} .lsf-label {{ margin: 0; justify-content: center; }}"]
    for index, label in enumerate(fdi.FDI_LABELS, start=1):
        row, column = chart_cell(label)
        rules.append(f".{CHART_CLASS} .lsf-label:nth-child({index}) {{ grid-area: {row} / {column}; }}")
    return "\n".join("    " + rule for rule in rules)


def render_label_config() -> str:
    """The XML of toothseg's labeling config: Image + BrushLabels with the 52 FDI labels, plus the
    keypoint and rectangle tools that prompt SAM interactively (shown with Auto-Annotation on)."""
    labels = "\n".join(_label_lines("    "))
    smart_labels = "\n".join(_label_lines("    ", comments=False))
    return f"""<View>
  <!-- toothseg: one brush mask per tooth, numbered in the FDI system.
       One hue family per quadrant: upper right red, upper left blue, lower left green,
       lower right amber; permanent teeth (11-48) saturated, deciduous teeth (51-85) pale;
       neighbouring teeth alternate light and dark. -->
  <Header value="Paint each tooth as its own mask and give it its FDI number"/>
  <Image name="{IMAGE_NAME}" value="${IMAGE_NAME}" zoom="true" zoomControl="true" rotateControl="false"
         brightnessControl="true" contrastControl="true" crosshair="true"/>
  <!-- The labels are laid out like a dental chart (upper 18-11 | 21-28 over lower 48-41 | 31-38,
       deciduous quadrants inside), by the Style below; they keep their FDI order, and hotkeys. -->
  <Style>
{_chart_style()}
  </Style>
  <View className="{CHART_CLASS}">
  <BrushLabels name="{BRUSH_NAME}" toName="{IMAGE_NAME}" choice="single" showInline="false">
{labels}
  </BrushLabels>
  </View>
  <!-- Interactive SAM (turn on Auto-Annotation): click a tooth, or drag a box around it, with its
       number selected; the backend answers with that tooth's brush mask. -->
  <View className="{CHART_CLASS}">
  <KeyPointLabels name="{POINT_NAME}" toName="{IMAGE_NAME}" smart="true" smartOnly="true">
{smart_labels}
  </KeyPointLabels>
  </View>
  <View className="{CHART_CLASS}">
  <RectangleLabels name="{BOX_NAME}" toName="{IMAGE_NAME}" smart="true" smartOnly="true">
{smart_labels}
  </RectangleLabels>
  </View>
</View>
"""
