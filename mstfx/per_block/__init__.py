"""Per-block compilation: each repeated block of a model compiled as its own graph.

    model = mstfx.compile(model, per_block=True)
    model = mstfx.transform(model, budget_gb=70, per_block=True)

Why: compiling a whole model gives one backward graph whose outputs are all the gradients, all alive
until it returns (13.9 GiB for an 8B model).  Compiling each transformer block on its own (as
torchtitan's ``apply_compile`` and torchtune do) makes each block its own autograd node: its gradients
are accumulated, and post-accumulate-grad hooks (an optimizer step in backward, FSDP's reduce-scatter)
fire, as soon as its backward ends; identical blocks reuse one compiled graph, so a cold compile
traces and compiles one block instead of N.

The room's modules, one job each:

* :mod:`.blocks` finds the repeated blocks by structure (:func:`find_blocks`) and the module that runs
  them (:func:`blocks_owner`);
* :mod:`.compiled_call` is the seam to PyTorch: it hangs a compiled call on a module so the enclosing
  trace breaks at it (:func:`install_compiled_call`, :func:`remove_compiled_call`), and records which
  blocks run their own graph (:func:`blocks_of`);
* :mod:`.compile` is the program under ``mstfx.compile`` (:func:`compile_blocks`: one compile shared by
  all blocks);
* :mod:`.buckets` is the program under ``mstfx.transform`` (:class:`BucketedBlocks`: a compile of the
  blocks per (batch, length) bucket, each with that bucket's M).
"""

from __future__ import annotations

from .blocks import NoRepeatedBlocksError, blocks_owner, find_blocks
from .buckets import BucketedBlocks
from .compile import compile_blocks
from .compiled_call import (
    PER_BLOCK_REASON,
    blocks_of,
    clear_blocks,
    install_compiled_call,
    is_per_block_break,
    record_blocks,
    remove_compiled_call,
)

__all__ = [
    "PER_BLOCK_REASON",
    "BucketedBlocks",
    "NoRepeatedBlocksError",
    "blocks_of",
    "blocks_owner",
    "clear_blocks",
    "compile_blocks",
    "find_blocks",
    "install_compiled_call",
    "is_per_block_break",
    "record_blocks",
    "remove_compiled_call",
]
