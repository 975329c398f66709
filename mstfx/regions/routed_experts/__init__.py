"""Region kind: the routed experts of a mixture-of-experts layer, chunked over tokens.

Routing is per token, so the experts' work on a run of tokens depends only on those tokens' hidden
states and router choices: chunking it over the tokens is exact.  The router itself (its logits and
any load-balancing loss made from them) stays outside the region and unchanged.

The structure, on the torch-level graph (Mixtral, Qwen2/3-MoE, DeepSeek-style shared + routed, as
transformers 5 writes them; ``grouped_mm`` is ``torch._grouped_mm`` or its CPU fallback)::

    x [T, h], top-k weights [T, k], top-k indices [T, k]       the region's inputs (token-major)
    slots sorted by expert → x gathered per slot → grouped_mm (stacked [E, ...] weight) → activation
    → grouped_mm → × weight → slots put back in token order (an index buffer made and written
    inside the region) → view [T, k, h] → sum over k                       the region's output [T, h]

Found from each matmul with a stacked ``[experts, ...]`` weight: the output is the first sum over
dim 1 of a [T, k, h] tensor after it; the region is everything that output needs back to token-major
tensors not computed from the expert matmuls (its inputs).  Every op must be one the routing is made
of (gathers, sorts of the token-slot indices, per-expert counts, pointwise, views); the one side effect
allowed is a write into a buffer the region itself created.  Rewritten like a dense MLP: every input
split into the same M runs of tokens, the region copied per run (shape constants of T rewritten to the
run's size), tagged for recompute in backward, the outputs concatenated.  M: the dense MLP's rule
⌈tokens / hidden⌉ (the same planner knob).
"""

from __future__ import annotations

from ..base import RegionKind


class RoutedExpertsKind(RegionKind):
    name = "routed_experts"
    label = "routed experts"
    amplifier = "amplifier: each token's k expert slots widen tokens×hidden to tokens×k×expert width"
    in_checkpoint_bodies = True
    cost_symbol = "M_mlp"

    def find(self, graph, params, claimed):
        from .graph import find_regions

        return find_regions(graph, params, claimed)

    def mini_sequences(self, region, config) -> int:
        from ..rules import mlp_chunks

        return mlp_chunks(region.tokens, region.hidden, config.mini_sequences_for(self.name, region))

    def rewrite(self, owner, region, m: int, ctx) -> str:
        from .graph import rewrite

        return rewrite(owner, region, m, ctx)

    def report_fields(self, region, m: int) -> dict:
        return self.fields(region, region.top_k * region.width,
                           f"top-{region.top_k} of {region.experts} experts, {len(region.grouped_mms)} grouped matmul(s), "
                           f"{len(region.inputs)} token inputs, recompute in backward")

    def cost(self, arch, prec, chunked, m, program):
        from .cost import cost

        return cost(self.name, arch, prec, chunked, m, program)


KIND = RoutedExpertsKind()
