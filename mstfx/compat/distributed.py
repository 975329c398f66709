"""Distributed internals mstfx uses: DDP's graph splitting in Dynamo (the setting that turns it off,
and whether it is splitting the graph being compiled) and the traceable functional collectives of
sequence parallelism.

Every entry imports torch's internals when called, never when this module is imported.  Checked on
torch 2.13.0 and 2.14.1 (``mstfx.compat.CHECKED_ON``); a missing entry raises
:class:`mstfx.compat.MissingTorchAPI` unless its docstring names a fallback.
"""

from __future__ import annotations

import contextlib
from typing import Callable

from .errors import private


def ddp_optimizer_off() -> contextlib.AbstractContextManager:
    """``torch._dynamo.config.patch(optimize_ddp=False)``: Dynamo compiles a DDP model's graph whole
    instead of splitting it at gradient-bucket boundaries, for the compiles inside the context."""
    return private("torch._dynamo.config", used_for="compiling DDP models whole").patch(optimize_ddp=False)


def ddp_optimizer_active() -> bool:
    """Whether Dynamo is compiling a DDP model's graph through its DDP optimizer (graph split by buckets)
    now: ``torch._dynamo.utils.get_optimize_ddp_mode() == "ddp_optimizer"`` and a DDP module active
    (``DistributedDataParallel._get_active_ddp_module()``).  Meaningful only inside a backend.
    Fallback: False where either is missing (torch without distributed, or an API moved): the backend
    then only skips its warning about MLPs cut at bucket boundaries."""
    try:
        from torch.nn.parallel import DistributedDataParallel

        mode = private("torch._dynamo.utils", "get_optimize_ddp_mode", used_for="the DDP split warning")
        return mode() == "ddp_optimizer" and DistributedDataParallel._get_active_ddp_module() is not None
    except Exception:  # noqa: BLE001 - documented fallback: a moved API only loses a warning
        return False


def functional_all_to_all() -> tuple[Callable, Callable]:
    """``(all_to_all_single_autograd, wait_tensor)`` of ``torch.distributed._functional_collectives``: the
    all-to-all Dynamo traces into the graph (with its gradient), and the wait on its result, of
    Ulysses sequence parallelism."""
    used_for = "sequence parallelism's all-to-all"
    return (private("torch.distributed._functional_collectives", "all_to_all_single_autograd", used_for=used_for),
            private("torch.distributed._functional_collectives", "wait_tensor", used_for=used_for))
