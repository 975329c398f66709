"""Per-block compilation under :func:`mstfx.transform`: the blocks compiled once per bucket.

    model = mstfx.transform(model, budget_gb=70, per_block=True)

``transform`` plans each (batch, length) bucket on its own, with its own M and its own mst backend
(``mstfx.transform``).  With ``per_block`` the blocks run that bucket's backend too: each bucket
compiles the block once (identical blocks share the graph, as under ``mstfx.compile(per_block=True)``),
through a function of its own code object, so a bucket's graphs have a cache of their own and never
count against another bucket's recompile limit.

Which bucket a block call belongs to is read from the call's own hidden states ([B, S, ...]), by the
rule the model's forward used, not from a "current bucket" set by that forward: a checkpointed block
is called again in the backward (its recompute), after the forward returned, and must run the same
compiled graph as in the forward (the checkpoint checks that it saves the same tensors).

The module that runs the blocks (embedding, mask, final norm) runs eagerly, as under
``mstfx.compile(per_block=True)`` (:func:`~.blocks.blocks_owner`).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch

from ..compat import with_tracing_settings
from .blocks import blocks_owner, find_blocks
from .compiled_call import clear_blocks, install_compiled_call, record_blocks, remove_compiled_call


def _block_call(block, *args, **kwargs):
    """One block's call, as compiled for a bucket (``block`` is an input: identical blocks share a graph)."""
    return block._call_impl(*args, **kwargs)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value
    return None


class BucketedBlocks:
    """The repeated blocks of a model under ``transform(per_block=True)``: each block's call goes to the
    compiled block of its bucket (:meth:`add_bucket`), found from the call's hidden states by ``key_of``
    (batch, seq_len) → bucket key."""

    def __init__(self, model: torch.nn.Module, key_of: Callable[[int, int], Any]) -> None:
        path, container = find_blocks(model)  # NoRepeatedBlocksError (a ValueError) before any change
        self.model = model
        self.path = path
        self.blocks = list(container.children())
        self.key_of = key_of
        self.calls: dict[Any, Callable] = {}
        self.owner = blocks_owner(model, path)

    def install(self) -> None:
        """Route each block's call through its bucket's compile; run the blocks' owner eagerly."""
        for block in self.blocks:
            install_compiled_call(block, self._dispatch(block))
        if self.owner is not None:
            install_compiled_call(self.owner, self.owner._call_impl)
        record_blocks(self.model, self.path, self.blocks)

    def uninstall(self) -> None:
        """Undo :meth:`install`: plain eager blocks and owner again."""
        for module in (*self.blocks, *([self.owner] if self.owner is not None else [])):
            remove_compiled_call(module)
        clear_blocks(self.model)

    def add_bucket(self, key: Any, name: str, backend: Any) -> None:
        """Compile the blocks of bucket ``key`` with ``backend`` (lazily, at their first call); replaces
        the bucket's earlier compile (a re-plan for a longer input)."""
        code = _block_call.__code__.replace(co_name=f"mst_block_{name}")
        fn = types.FunctionType(code, _block_call.__globals__, code.co_name)
        self.calls[key] = with_tracing_settings(torch.compile(fn, backend=backend, dynamic=True))

    def _dispatch(self, block: torch.nn.Module) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            hidden = _first_tensor(args, kwargs)
            compiled = self.calls.get(self.key_of(int(hidden.shape[0]), int(hidden.shape[1]))) \
                if hidden is not None else None
            if compiled is None:  # a call outside any planned bucket (no hidden states to read): eager
                return block._call_impl(*args, **kwargs)
            return compiled(block, *args, **kwargs)

        return call
