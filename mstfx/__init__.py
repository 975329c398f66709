"""mstfx: the Mini-Sequence Transformer (MsT) as a torch.compile pass.

    model = torch.compile(model, backend="mst")            # after `pip install mstfx`
    model = torch.compile(model, backend=mstfx.backend(mini_sequences=8))
    model = mstfx.compile(model)      # in place, with the Dynamo settings checkpointed layers need

The public names below are imported on first use, so ``import mstfx`` (and ``mstfx --help``) does not
import torch, transformers or sympy until something needs them.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "MstBackend": ".backend",
    "MstFallbackWarning": ".backend",
    "MstGraphBreakWarning": ".backend",
    "compile": ".compile_model",
    "backend": ".backend",
    "MstConfig": ".config",
    "explain": ".explain",
    "drop_logits": ".wrappers",
    "linear_cross_entropy": ".chunked_ops",
    "chunked_logprobs": ".chunked_ops",
    "InfeasibleBudgetError": ".planning.planner",
    "InfeasibleHostBudgetError": ".planning.planner",
    "Plan": ".planning.planner",
    "plan": ".planning.planner",
    "TrainingSetup": ".planning.setup",
    "transform": ".transform",
    "untransform": ".transform",
}
#: submodules reachable as attributes without an import of their own (``mstfx.sequence_parallel.shard_batch``)
_SUBMODULES = ("sequence_parallel",)
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mstfx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``mstfx.backend``, ``mstfx.explain`` and ``mstfx.transform`` are functions that share their name
    with the submodule defining them: importing the submodule must not replace the function on the
    package (the submodules stay reachable through ``sys.modules`` and ``from mstfx.backend import ...``)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == f".{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
