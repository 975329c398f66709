"""Region kind: the LM head (+ logit scaling / soft-capping) feeding cross-entropy.

Found by :mod:`.graph`, rewritten by :mod:`.rewrite` into the fused, chunked linear cross-entropy (no
recompute: each chunk's gradients are made in forward), M by ⌈vocab / hidden⌉ with no chunk shorter
than 256 tokens (:mod:`mstfx.regions.rules`), its bytes in :mod:`.cost`.
At M = 1 it is still rewritten: the fused loss keeps no logits for backward.
"""

from __future__ import annotations

from ..base import RegionKind

# The graph side (torch, FX) is imported inside the methods that run on a graph, so that the planner
# reads this kind's name, label and cost symbol without torch.


class LmHeadKind(RegionKind):
    name = "lm_head"
    label = "lm_head+loss"
    amplifier = "amplifier: tokens×vocab logits, their fp32 softmax and gradient"
    switch = "chunk_lm_head"
    in_checkpoint_bodies = False
    cost_symbol = "M_head"
    rewrite_at_one = True

    def find(self, graph, params, claimed):
        import torch

        from .graph import find_escaping_logits, find_lm_head_regions

        regions, skipped = find_lm_head_regions(graph)
        if not regions and not skipped and torch.is_grad_enabled():
            # training, but no loss in the graph: say so when the logits are what leaves it
            skipped = find_escaping_logits(graph, params)
        return regions, skipped

    def claims(self, region) -> set:
        return {region.head.node}

    def mini_sequences(self, region, config) -> int:
        from ..rules import lm_head_chunks

        return lm_head_chunks(
            region.tokens, region.hidden, region.vocab, config.mini_sequences_for(self.name, region),
            config.min_lm_head_chunk_tokens,
        )

    def rewrite(self, owner, region, m: int, ctx) -> str:
        from ...passes.recompute import chunk_form
        from .rewrite import rewrite_lm_head
        from ...vocabulary import ChunkForm

        nodes = [region.head.node, *region.chain, region.loss]
        if chunk_form(ctx.config, ctx.in_checkpoint, ctx.changed_autocast(owner, nodes))[0] is ChunkForm.LOOP:
            head = region.head
            needs = [True, ctx.needs_grad(head.weight), head.bias is not None and ctx.needs_grad(head.bias)]
            rewrite_lm_head(owner.graph, region, m, needs)
            return "; one loop operator"
        rewrite_lm_head(owner.graph, region, m)
        return ""

    def cost(self, arch, prec, chunked, m, program):
        from .cost import cost

        return cost(self.name, arch, prec, chunked, m, program)

    def report_fields(self, region, m: int) -> dict:
        tied = any(u is not region.head.node and u.op != "output" for u in region.head.weight.users)
        bits = [t[0] if t[0] != "scale" else f"scale {t[1]:.4g}" for t in region.transforms if t[0] != "cast"]
        detail = ", ".join(
            [f"{region.reduction}, ignore_index={region.ignore_index}"]
            + (["tied weight"] if tied else [])
            + ([f"logit transforms: {' → '.join(bits)}"] if bits else [])
            + (["logits escape the graph"] if region.logits_escape else [])
            + ([region.after] if region.after else [])
        )
        return self.fields(region, region.vocab, detail)


KIND = LmHeadKind()
