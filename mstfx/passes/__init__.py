"""The mstfx torch-level graph passes: analyse and rewrite the FX graph Dynamo hands to the backend.

The pipeline sits above the region kinds (:mod:`mstfx.regions`: each kind's package owns its finder and
rewrite) and the graph vocabulary they share sits below them (:mod:`.common`: matching ops and
projections, side effects; :mod:`.recompute`: the chunk form and recompute-tag ids).

Level: the torch-level graph, before AOT autograd (the one aten-level pass, which runs inside Inductor
after the partitioner, is :mod:`mstfx.post_grad`).  :func:`run_passes` (:mod:`.driver`) runs
:func:`pipeline`, whose names are :data:`PASS_ORDER`; ``python -m mstfx.passes`` prints it.  For each region kind of
:data:`mstfx.regions.registry.REGION_KINDS`, in that order, a ``find_<kind>`` pass, then one
``chunk_rule`` pass, a ``rewrite_<kind>`` pass per kind, and three graph-wide passes::

    find_lm_head            analyse: LM head (+ scaling / soft-capping) feeding cross-entropy
    find_routed_experts     analyse: mixture-of-experts expert computation (sorted slots → grouped
                            matmuls → sum over the top-k), also inside activation-checkpointed bodies
    find_mlp                analyse: token-wise MLP regions (up-projection → activation → down-projection),
                            also inside activation-checkpointed bodies; never a node another kind claimed
    chunk_rule              choose M per region (the kind's default rule, or the user's / planner's numbers)
    rewrite_lm_head         fused chunked linear cross-entropy (loss and logits-gradient per chunk)
    rewrite_routed_experts  every token-major input split into the same runs, tagged for recompute
    rewrite_mlp             chunked loop, tagged for recompute in backward
    attention               SDPA fed HF's in-graph causal mask → is_causal=True (guarded per step when the
                            mask reads a runtime padding mask or position ids); K/V heads repeated (expand+reshape, repeat_interleave) → enable_gqa
    sequence_parallel       with ``sequence_parallel=group`` only: SDPA → Ulysses attention (all-to-all to
                            H/N heads over all S tokens and back); a masked attention is refused
    verify                  fake-tensor propagation of the rewritten graph; any failure restores the original

Each region is rewritten whole or not at all; a graph whose rewrite fails verification is returned
unchanged and the failure is reported (under sequence parallelism the failure is raised instead).  No pass removes, moves past, or copies a node with side effects
(:func:`.common.has_side_effects`): a region that contains or crosses one is left unchanged.  The one
exception is a write into a buffer the region itself created (routed experts' inverse permutation):
it is part of the region and is copied and removed with it.
"""

from __future__ import annotations

from .common import CantChunk
from .driver import PASS_ORDER, RewriteContext, pipeline, run_passes
from .report import GraphReport, RegionDecision

__all__ = [
    "PASS_ORDER",
    "CantChunk",
    "GraphReport",
    "RegionDecision",
    "RewriteContext",
    "pipeline",
    "run_passes",
]
