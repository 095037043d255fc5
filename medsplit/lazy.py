"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package that re-exports its submodules' names makes ``import pkg.small_module`` load every
submodule, and here that means torch (3 s) for a command that only validates a YAML file.
Packages list their exports as ``name -> module`` and resolve them on first use instead; their
``TYPE_CHECKING`` imports keep the names visible to mypy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` the first time ``name`` is used."""

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module hook PEP 562 names
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
