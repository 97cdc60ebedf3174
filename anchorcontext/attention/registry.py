"""The attention backends, in the order ``backend="auto"`` tries them.

Each backend declares one :class:`~._common.Backend` record (``BACKEND``) in its own module; this list is the
only place that names them all. ``auto``, ``patch_model``'s and the CLI's validation and help, the benchmarks'
trainable backends and the tests' parametrisation read it. Adding a backend: a module with its function and
``BACKEND`` record, one line here, its tests.
"""

from __future__ import annotations

import torch

from . import flex, reference, sdpa, varlen
from ._common import Backend

REGISTRY: tuple[Backend, ...] = (
    varlen.BACKEND,
    flex.BACKEND,
    sdpa.BACKEND,
    reference.BACKEND,  # always available: auto's last resort
)
BACKENDS: dict[str, Backend] = {b.name: b for b in REGISTRY}


def check_backend(backend: str, field: str = "backend") -> str:
    """``backend`` if it is ``"auto"`` or a registered name; else a ValueError naming ``field`` and the value."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{field} must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    return backend


def backend_choices() -> list[str]:
    """``"auto"`` and every registered name (the CLI's choices)."""
    return ["auto", *BACKENDS]


def backend_help() -> str:
    """The CLI's help: one clause per choice."""
    first = "auto: the first that can run of " + " -> ".join(BACKENDS)
    return "; ".join([first] + [f"{b.name}: {b.help}" for b in REGISTRY])


def trainable(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Backends that train on ``device`` (registry order) and, for the others, why not."""
    ok, skipped = [], {}
    for b in REGISTRY:
        why = b.train_reason(device)
        if why is None:
            ok.append(b.name)
        else:
            skipped[b.name] = why
    return ok, skipped
