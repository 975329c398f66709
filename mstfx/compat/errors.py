"""What every compatibility entry shares: the torch versions it was checked on and the error raised
when a torch release no longer has a private API mstfx needs (checked on torch 2.13.0 and 2.14.1).

Imports nothing from torch at import time, so a torch-free part of mstfx (the planner, the cost model)
may import it."""

from __future__ import annotations

import importlib
from typing import Any

#: torch releases every entry of :mod:`mstfx.compat` was checked on (its tests pass there):
#: 2.13.0 (CPU build) and 2.14.1 (CUDA build, imported and run on a machine without a GPU).
CHECKED_ON = ("2.13.0", "2.14.1")


class MissingTorchAPI(ImportError):
    """A private PyTorch API mstfx relies on is not in the installed torch (moved, renamed or removed).

    The message names the API, what mstfx uses it for and the releases it was checked on; an
    ``ImportError`` so that code which already treats a missing optional module as "not available"
    treats this one the same way."""


def torch_version() -> str:
    """The installed torch's version, for error messages (never raises, even without torch)."""
    try:
        import torch

        return torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        return "(torch not installed)"


def private(module: str, name: str | None = None, *, used_for: str) -> Any:
    """``module`` (imported) or its attribute ``name``; :class:`MissingTorchAPI` when either is gone.

    ``used_for``: what mstfx does with it, for the error message."""
    what = module if name is None else f"{module}.{name}"
    try:
        obj = importlib.import_module(module)
        return obj if name is None else getattr(obj, name)
    except (ImportError, AttributeError) as err:
        raise MissingTorchAPI(
            f"mstfx needs the private PyTorch API {what} ({used_for}), which torch {torch_version()} does not "
            f"have; mstfx was checked on torch {', '.join(CHECKED_ON)} (see docs/compatibility.md)"
        ) from err
