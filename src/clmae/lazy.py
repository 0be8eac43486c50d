"""Package attributes imported on first use (PEP 562), so ``import clmae`` and ``--help`` stay torch-free.

A package lists the names it offers and the submodule each lives in; :func:`lazy_attributes` gives
the module-level ``__getattr__`` and ``__dir__`` that import a submodule only when one of its names
is first looked up (and then keep the name, so later lookups are plain attribute reads).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``where`` maps a name to its submodule (relative), or to
    ``"submodule:attribute"`` when the package offers the attribute under another name."""

    def __getattr__(name: str) -> Any:
        if name in where:
            namespace = sys.modules[package].__dict__
            module, _, attribute = where[name].partition(":")
            value = getattr(importlib.import_module(f".{module}", package), attribute or name)
            namespace[name] = value  # later lookups find it directly
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(sys.modules[package].__dict__) | set(where))

    return __getattr__, __dir__
