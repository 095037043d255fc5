"""The built-in plans' names: what ``medsplit --help`` lists without loading any model code."""

from __future__ import annotations

from pathlib import Path

BUILTIN_PLANS_DIR = Path(__file__).parent / "plans"


def builtin_plan_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_PLANS_DIR.glob("*.yaml"))
