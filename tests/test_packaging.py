"""What a user installing magicinit gets: one version everywhere, the license, type information."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import magicinit

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_has_one_source() -> None:
    assert importlib.metadata.version("magicinit") == magicinit.__version__
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    citation = (ROOT / "CITATION.cff").read_text()
    assert re.search(r"^version: (.+)$", citation, re.M).group(1) == magicinit.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## (\d+\.\d+\.\d+)", changelog, re.M)
    assert released[0] == magicinit.__version__  # the newest release listed (below "Unreleased")


def test_the_license_is_declared_and_shipped() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"  # an SPDX expression
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert importlib.metadata.metadata("magicinit")["License-Expression"] == "MIT"


def test_the_package_says_it_is_typed() -> None:
    assert (Path(magicinit.__file__).parent / "py.typed").is_file()
