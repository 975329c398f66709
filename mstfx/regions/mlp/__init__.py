"""Region kind: the token-wise MLP (up-projection → activation → down-projection).

Found by :mod:`.graph`, chunked by :mod:`.rewrite` (each chunk recomputed in backward), M by the
paper's rule ⌈tokens / hidden⌉ (:mod:`mstfx.regions.rules`), its bytes in :mod:`.cost` (per-token
formulas; the fitted coefficients they share with the attention block stay in
:data:`mstfx.planning.terms.COEF`).
"""

from __future__ import annotations

from ..base import RegionKind

# The graph side (torch, FX) is imported inside the methods that run on a graph, so that the planner
# reads this kind's name, label and cost symbol without torch.


class MlpKind(RegionKind):
    name = "mlp"
    label = "mlp"
    amplifier = "amplifier: up-projection widens tokens×hidden to tokens×intermediate"
    switch = "chunk_mlp"
    in_checkpoint_bodies = True
    cost_symbol = "M_mlp"

    def find(self, graph, params, claimed):
        from .graph import find_mlp_regions

        regions, skipped = find_mlp_regions(graph, params, claimed)
        return regions, [(where, f"not an MLP: {why}") for where, why in skipped]

    def mini_sequences(self, region, config) -> int:
        from ..rules import mlp_chunks

        return mlp_chunks(region.tokens, region.hidden, config.mini_sequences_for(self.name, region))

    def rewrite(self, owner, region, m: int, ctx) -> str:
        from ...passes.recompute import chunk_form
        from .rewrite import rewrite_mlp, rewrite_mlp_looped
        from ...vocabulary import ChunkForm

        form, words = chunk_form(ctx.config, ctx.in_checkpoint, ctx.changed_autocast(owner, region.nodes))
        if form is ChunkForm.LOOP:
            if rewrite_mlp_looped(owner, region, m) is not None:
                return words
            words = "; unrolled M copies (reads a symbolic size or module state, which the loop operator cannot take)"
        rewrite_mlp(owner, region, m, eager=ctx.eager, in_checkpoint=ctx.in_checkpoint)
        return words

    def cost(self, arch, prec, chunked, m, program):
        from .cost import cost

        return cost(self.name, arch, prec, chunked, m, program)

    def report_fields(self, region, m: int) -> dict:
        return self.fields(region, region.intermediate,
                           f"{region.activation}, {len(region.up_projections)} up-proj{_adapters(region)}, recompute in backward")


KIND = MlpKind()


def _adapters(region) -> str:
    """The report's words for the low-rank adapters on the region's projections (none: nothing)."""
    n = region.extra.get("adapters", 0)
    return f", {n} low-rank adapter(s)" if n else ""
