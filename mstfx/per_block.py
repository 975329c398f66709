"""Per-block compilation: each repeated block of a model compiled on its own, the rest of the step too.

    model = mstfx.compile(model, per_block=True)

Why: compiling a whole model gives one backward graph whose outputs are all the gradients, all alive
until it returns (13.9 GiB for an 8B model).  Compiling each transformer block on its own (as
torchtitan's ``apply_compile`` and torchtune do) makes each block its own autograd node: its gradients
are accumulated, and post-accumulate-grad hooks (an optimizer step in backward, FSDP's reduce-scatter)
fire, as soon as its backward ends; identical blocks reuse one compiled graph, so a cold compile
traces and compiles one block instead of N.

What is compiled: the blocks are found by structure, not by class name (:func:`find_blocks`); each
block's call runs its own ``torch.compile`` of the block (one backend object shared by all blocks,
so identical blocks hit one compiled graph), and the model around them is compiled with the same
backend, so the LM head + loss stays one chunked graph.  Dynamo would inline
a compiled block into the model's trace; the blocks' compiled calls are therefore wrapped in
``torch.compiler.disable`` (reason :data:`PER_BLOCK_REASON`), a graph break per block in the model's
trace that the backend recognises as its own and does not warn about (:func:`is_per_block_break`).

The module that runs the blocks (a decoder's body: embedding, attention mask, final norm) runs
eagerly, outside the model's trace, behind the same kind of call: traced, it would build the full
B×1×S×S attention mask that Hugging Face's eager code skips for causal attention, and hand it to
every block graph (S² bytes: 58 GiB at S = 250K).  What stays in the model's own graph is what follows
the body, the LM head and the loss, chunked there.

Dynamo calls a module's ``forward`` directly, bypassing ``_compiled_call_impl``, when the module has
no hooks; a no-op forward pre-hook on each block keeps its compiled call in the path (FSDP2's
``fully_shard`` adds hooks of its own, which does the same).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .compat import with_tracing_settings

log = logging.getLogger("mstfx")

#: The reason given to ``torch.compiler.disable`` for each block's compiled call; Dynamo's graph-break
#: message quotes it.
PER_BLOCK_REASON = "mstfx per-block compilation: this block runs its own compiled graph"
_BLOCKS_ATTR = "_mstfx_blocks"


class NoRepeatedBlocksError(ValueError):
    """The model has no list of at least two structurally identical blocks to compile one by one."""


def _structure(module: torch.nn.Module) -> tuple:
    """What makes two blocks interchangeable for one compiled graph: the types of all submodules (by
    path) and the names, shapes and dtypes of all parameters and buffers."""
    mods = tuple((name, type(m)) for name, m in module.named_modules())
    params = tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters())
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers())
    return mods, params, buffers


def _repeated(container: torch.nn.Module) -> bool:
    children = list(container.children())
    if len(children) < 2 or len(children) != len(container):
        return False
    first = _structure(children[0])
    return any(True for _ in children[0].parameters()) and all(_structure(c) == first for c in children[1:])


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The model's repeated blocks: ``(path, container)`` of the ``nn.ModuleList`` or ``nn.Sequential``
    of at least two structurally identical children (same types, same parameter shapes) that is not
    inside another such list (a layer's experts are not the layers) and, of those, the longest (then the
    one with the most parameters).  Raises :class:`NoRepeatedBlocksError` when there is none."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and _repeated(m)]
    outer = [(name, m) for name, m in found
             if not any(other != name and name.startswith(other + ".") for other, _ in found)]
    if not outer:
        raise NoRepeatedBlocksError(
            f"per_block: {type(model).__name__} has no nn.ModuleList or nn.Sequential of two or more blocks of "
            "identical structure; compile it whole (per_block=False)")

    def size(item):
        return len(item[1]), sum(p.numel() for p in item[1].parameters())

    return max(outer, key=size)


def _keep_compiled_call(module, args):  # noqa: ARG001 - no-op: keeps Dynamo on __call__
    return None


def _opaque(fn: Callable) -> Callable:
    """``fn`` behind a plain function that Dynamo does not trace into (not ``functools.wraps``: that
    would copy the compiled function's ``_torchdynamo_inline`` and Dynamo would inline it again)."""

    def mstfx_per_block_call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return torch.compiler.disable(mstfx_per_block_call, reason=PER_BLOCK_REASON)


def compile_blocks(model: torch.nn.Module, backend: Any, *, dynamic: bool | None = None,
                   fullgraph: bool = False) -> list[torch.nn.Module]:
    """Compile each block :func:`find_blocks` finds with ``backend`` (in place, as ``block.compile``
    does), behind a call the model's own trace does not inline.  Returns the blocks."""
    path, container = find_blocks(model)
    blocks = list(container.children())
    for block in blocks:
        compiled = torch.compile(block._call_impl, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        block._compiled_call_impl = _opaque(with_tracing_settings(compiled))
        if _keep_compiled_call not in block._forward_pre_hooks.values():
            block.register_forward_pre_hook(_keep_compiled_call)
    owner = model.get_submodule(path.rpartition(".")[0]) if "." in path else None
    if owner is not None and owner is not model:
        # the module that runs the blocks (embedding, mask, final norm) runs eagerly, outside the model's
        # trace: traced, it would build the full B×1×S×S attention mask that eager Hugging Face code skips
        # for causal attention, and hand it to every block graph
        owner._compiled_call_impl = _opaque(owner._call_impl)
        if _keep_compiled_call not in owner._forward_pre_hooks.values():
            owner.register_forward_pre_hook(_keep_compiled_call)
    object.__setattr__(model, _BLOCKS_ATTR, (path, blocks))
    log.info("mstfx: per-block compilation of %d blocks at %s (%s)", len(blocks), path or "<model>",
             type(blocks[0]).__name__)
    return blocks


def blocks_of(model: Any) -> tuple[str, list[torch.nn.Module]] | None:
    """``(path, blocks)`` that :func:`compile_blocks` compiled in ``model``, if any."""
    return getattr(model, _BLOCKS_ATTR, None)


def is_per_block_break(reason: str) -> bool:
    """A graph break that per-block compilation makes on purpose (a block's own compiled call)."""
    return PER_BLOCK_REASON in str(reason)
