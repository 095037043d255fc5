"""docs/configuration.md is generated from the config models; it must say what the code does."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_configuration_reference_matches_the_models() -> None:
    script = runpy.run_path(str(ROOT / "scripts" / "config_reference.py"))
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == script["render"](), "run: python scripts/config_reference.py"


def test_every_field_says_what_it_is_for() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    undocumented = [
        line.split("|")[1].strip()
        for line in page.splitlines()
        if line.startswith("| `") and line.rstrip().endswith("|  |")
    ]
    assert undocumented == []
