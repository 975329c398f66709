"""``mstfx.compile``: ``torch.compile`` with the mst backend and the Dynamo settings a training step needs.

    model = mstfx.compile(model)                       # in place, like model.compile(backend="mst")
    model = mstfx.compile(model, mini_sequences=8)     # MstConfig options

Why not only ``torch.compile(model, backend="mst")``: tracing a Hugging Face model's checkpointed layers
whole needs two Dynamo settings (``mstfx.compat.tracing_settings``), and ``torch.compile`` gives a backend
no way to apply them to its own calls only.  This entry point applies them around each call of the
compiled model and nowhere else; without them transformers ≥ 5.25 breaks the graph in every
checkpointed layer and mst's saving is lost there (the backend warns when that happens).
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import MstBackend
from .compat import with_tracing_settings
from .config import MstConfig

_BACKEND_ATTR = "_mstfx_backend"


def compile(model: Any, config: MstConfig | None = None, *, dynamic: bool | None = None, fullgraph: bool = False,
            per_block: bool = False, **options: Any) -> Any:
    """Compile ``model`` with the mst backend (``config`` or ``MstConfig`` keyword ``options``).

    An ``nn.Module`` is compiled in place, as ``model.compile(...)`` does (same class, same parameters:
    trainers, optimizers and state dicts see the model they know) and returned; any other callable (a
    loss function) is returned compiled.  ``mstfx.explain(model)`` shows what was chunked.

    ``per_block``: compile each repeated block (decoder layer) on its own and the model around them
    (the LM head + loss; the body that runs the blocks stays eager) with the same backend
    (``mstfx.per_block``): each block's gradients are ready, and its post-accumulate-grad hooks run,
    when its backward ends; identical blocks share one compiled graph.  ``fullgraph`` then applies to
    each block (the model's own trace breaks at every block on purpose).
    """
    backend = MstBackend(config, **options)
    if per_block and not isinstance(model, torch.nn.Module):
        raise TypeError(f"mstfx.compile(per_block=True) needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.nn.Module):
        if per_block:
            from .per_block import compile_blocks

            compile_blocks(model, backend, dynamic=dynamic, fullgraph=fullgraph)
            fullgraph = False
        model.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        model._compiled_call_impl = with_tracing_settings(model._compiled_call_impl, nested_graph_breaks=per_block)
        object.__setattr__(model, _BACKEND_ATTR, backend)
        return model
    if not callable(model):
        raise TypeError(f"mstfx.compile expects an nn.Module or a callable, got {type(model).__name__}")
    compiled = with_tracing_settings(torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph))
    setattr(compiled, _BACKEND_ATTR, backend)
    return compiled


def backend_of(target: Any) -> MstBackend | None:
    """The backend :func:`compile` compiled ``target`` with, if any."""
    return getattr(target, _BACKEND_ATTR, None)
