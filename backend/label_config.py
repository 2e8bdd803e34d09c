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
  <BrushLabels name="{BRUSH_NAME}" toName="{IMAGE_NAME}" choice="single" showInline="false">
{labels}
  </BrushLabels>
  <!-- Interactive SAM (turn on Auto-Annotation): click a tooth, or drag a box around it, with its
       number selected; the backend answers with that tooth's brush mask. -->
  <KeyPointLabels name="{POINT_NAME}" toName="{IMAGE_NAME}" smart="true" smartOnly="true">
{smart_labels}
  </KeyPointLabels>
  <RectangleLabels name="{BOX_NAME}" toName="{IMAGE_NAME}" smart="true" smartOnly="true">
{smart_labels}
  </RectangleLabels>
</View>
"""
