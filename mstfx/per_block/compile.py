"""Per-block compilation under ``mstfx.compile``: each repeated block compiled on its own, the rest too.

    model = mstfx.compile(model, per_block=True)

Each block's call runs its own ``torch.compile`` of the block (one backend object shared by all blocks,
so identical blocks hit one compiled graph), hung on the block through :mod:`.compiled_call` so the
model's trace breaks at it instead of inlining it.  The module that runs the blocks (a decoder's body:
embedding, attention mask, final norm) runs eagerly behind the same kind of call
(:func:`~.blocks.blocks_owner` says why); the model around them is compiled with the same backend by
the caller, so what stays in the model's own graph is what follows the body, the LM head and the loss,
chunked there.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..compat import with_tracing_settings
from .blocks import blocks_owner, find_blocks
from .compiled_call import install_compiled_call, record_blocks

log = logging.getLogger("mstfx")


def compile_blocks(model: torch.nn.Module, backend: Any, *, dynamic: bool | None = None,
                   fullgraph: bool = False) -> list[torch.nn.Module]:
    """Compile each block :func:`~.blocks.find_blocks` finds with ``backend`` (in place, as
    ``block.compile`` does), behind a call the model's own trace does not inline, and run the blocks'
    owner eagerly.  Returns the blocks."""
    path, container = find_blocks(model)
    blocks = list(container.children())
    for block in blocks:
        compiled = torch.compile(block._call_impl, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        install_compiled_call(block, with_tracing_settings(compiled))
    owner = blocks_owner(model, path)
    if owner is not None:
        install_compiled_call(owner, owner._call_impl)
    record_blocks(model, path, blocks)
    log.info("mstfx: per-block compilation of %d blocks at %s (%s)", len(blocks), path or "<model>",
             type(blocks[0]).__name__)
    return blocks
