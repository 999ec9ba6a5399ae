"""Stage packages name their entry point (``from selectmoe.select import select``) without importing it.

Ray workers import a stage's worker-side modules (``select.scorer``, ``pretrain.worker``), which runs the
package's ``__init__``; importing the driver there too (every stage's config, the lm-eval tasks, the
plots) cost each new worker process seconds.
"""

from __future__ import annotations

import importlib


def lazy_attribute(package: str, name: str, module: str):
    """A module-level ``__getattr__`` for ``package``: ``name`` is imported from ``module`` on first use."""

    def __getattr__(attr: str):
        if attr == name:
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    return __getattr__
