"""The seam between a module and the graph that runs in its place: how both per-block programs hang a
compiled call on a block (or run the blocks' owner eagerly) and record which blocks they did.

Two PyTorch behaviours make this more than ``module.compile()``:

* Dynamo inlines a compiled function into the trace of whatever calls it, so the blocks would vanish
  into the model's one graph.  The call is therefore put behind a plain function wrapped in
  ``torch.compiler.disable`` (reason :data:`PER_BLOCK_REASON`): a graph break per block in the model's
  trace, which the backend recognises as its own and does not warn about (:func:`is_per_block_break`).
* Dynamo calls a module's ``forward`` directly, bypassing ``_compiled_call_impl``, when the module has
  no hooks.  A no-op forward pre-hook keeps the compiled call in the path (FSDP2's ``fully_shard``
  adds hooks of its own, which does the same).

:func:`install_compiled_call` does both, :func:`remove_compiled_call` undoes both;
:func:`record_blocks`, :func:`clear_blocks` and :func:`blocks_of` keep the one attribute on the model
that says which blocks run their own graph (the profiler tools and the report read it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: The reason given to ``torch.compiler.disable`` for each block's compiled call; Dynamo's graph-break
#: message quotes it.
PER_BLOCK_REASON = "mstfx per-block compilation: this block runs its own compiled graph"
_BLOCKS_ATTR = "_mstfx_blocks"


def _keep_compiled_call(module, args):  # noqa: ARG001 - no-op: keeps Dynamo on __call__
    return None


def _opaque(fn: Callable) -> Callable:
    """``fn`` behind a plain function that Dynamo does not trace into (not ``functools.wraps``: that
    would copy the compiled function's ``_torchdynamo_inline`` and Dynamo would inline it again)."""

    def mstfx_per_block_call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return torch.compiler.disable(mstfx_per_block_call, reason=PER_BLOCK_REASON)


def install_compiled_call(module: torch.nn.Module, fn: Callable) -> None:
    """Make ``module(...)`` run ``fn`` (its compiled call, or its own ``_call_impl`` to run it eagerly)
    as an opaque call the enclosing trace breaks at, and keep Dynamo on that path with a no-op forward
    pre-hook (added once, however often this is called)."""
    module._compiled_call_impl = _opaque(fn)
    if _keep_compiled_call not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_keep_compiled_call)


def remove_compiled_call(module: torch.nn.Module) -> None:
    """Undo :func:`install_compiled_call`: ``module`` runs its plain eager call again, without the pre-hook."""
    module._compiled_call_impl = None
    for hook_id in [i for i, hook in module._forward_pre_hooks.items() if hook is _keep_compiled_call]:
        # what the hook's RemovableHandle would do (it was registered without kwargs, so this one dict):
        # no handle is kept, as install is idempotent and a deep-copied handle would point at the original
        module._forward_pre_hooks.pop(hook_id, None)


def record_blocks(model: Any, path: str, blocks: list[torch.nn.Module]) -> None:
    """Note on ``model`` that the ``blocks`` at ``path`` run their own compiled graphs (:func:`blocks_of`)."""
    object.__setattr__(model, _BLOCKS_ATTR, (path, blocks))


def clear_blocks(model: Any) -> None:
    """Forget :func:`record_blocks`'s note (the blocks run eagerly again)."""
    if getattr(model, _BLOCKS_ATTR, None) is not None:
        object.__delattr__(model, _BLOCKS_ATTR)


def blocks_of(model: Any) -> tuple[str, list[torch.nn.Module]] | None:
    """``(path, blocks)`` that a per-block program compiled in ``model``, if any."""
    return getattr(model, _BLOCKS_ATTR, None)


def is_per_block_break(reason: str) -> bool:
    """A graph break that per-block compilation makes on purpose (a block's own compiled call)."""
    return PER_BLOCK_REASON in str(reason)
