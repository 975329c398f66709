"""The words a cost term is written in: the symbols S (tokens per sequence) and B (batch), byte sizes,
and :class:`RegionCost`, what a region kind's cost side returns.  A module of its own so that a kind's
cost side and the cost model that sums the kinds import it, not each other."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

S, B = sp.symbols("S B", positive=True)
FP32 = 4


@dataclass
class RegionCost:
    """Bytes of one region kind, as expressions (per region instance, count = how many)."""

    kind: str
    count: int
    shape: str
    saved: sp.Expr
    fwd_transient: sp.Expr
    bwd_transient: sp.Expr
    recompute_flops: sp.Expr = sp.Integer(0)
    chunks: sp.Expr = sp.Integer(1)
    #: a region kind's chunk buffers that Inductor's reuse pool keeps alive through the attention
    #: backward after the region's own (``None``: none, or the dense MLP's rule in :func:`step_cost`)
    pooled: sp.Expr | None = None
