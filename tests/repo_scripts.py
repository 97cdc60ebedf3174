"""The repository's scripts (``benchmarks/*.py``, ``scripts/*.py``, the programs under ``tests/gpu``) loaded as
modules, for tests that call their ``main`` or helpers in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(rel: str, name: str | None = None) -> ModuleType:
    """The script at ``rel`` (a path relative to the repository root) executed as a module named ``name`` (default:
    derived from ``rel``). Not entered in ``sys.modules``: every call gives a fresh copy, so a test that monkeypatches
    one leaves the others alone."""
    path = ROOT / rel
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"rel must name a .py file under {ROOT}, got {rel!r}")
    name = name or rel.removesuffix(".py").replace("/", "_")  # benchmarks/attention.py -> benchmarks_attention
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
