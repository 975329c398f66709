"""The one list of region kinds.  Everything that handles regions iterates over :data:`REGION_KINDS`:
the pass pipeline (find and rewrite passes, in this order), the cost model, the planner's table, the
simulator and the report.  A new kind is one module and one entry here.

Order matters for finding: a kind found earlier claims its nodes, and later kinds skip them (the
LM head's projection is never taken for an MLP's).
"""

from __future__ import annotations

from . import lm_head, mlp, routed_experts
from .base import KindEnum, RegionKind

REGION_KINDS: tuple[RegionKind, ...] = (
    lm_head.KIND,
    routed_experts.KIND,
    mlp.KIND,
)

#: The kinds as an enum (``Kind.MLP``, ``Kind.LM_HEAD``, ...); each member equals its name as a string.
Kind = KindEnum("Kind", [(k.name.upper(), k.name) for k in REGION_KINDS], module=__name__)
