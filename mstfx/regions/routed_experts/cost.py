"""Cost side of the routed-experts kind: its bytes per MoE layer in sympy (no torch)."""

from __future__ import annotations


def cost(name: str, arch, prec, chunked: bool, m, program: str):
    """Bytes per MoE layer (``arch.routed_layers`` of them; the layer's norm and any shared expert
    are the cost model's, ``cost_model.moe_block``), derived from the ops (not fitted), per token and
    each of its k slots:
    unchunked, the gathered input (h), the gate/up output (2·I), the activation (I) and the down
    output (h) are saved, with three int64 slot indices; chunked, only the router's weights and
    indices are kept for the recompute, and one run's slots are alive in backward.

    Chunked and compiled, the region's backward also holds the runs' partial gradients: each
    run's grouped matmuls give their own gradient of the stacked ``[E, ...]`` weights, which the
    post-grad pass ``mstfx/post_grad/partial_sum_order.py`` adds to the running sum right after
    the run (an opaque ``mstfx::accumulate``; fused by Inductor, the chain kept all M copies until
    the last run), so the running sum, one run's partial and the new sum are alive: 3 copies of
    the experts' weights (``ups + 1`` matrices of E × h × I, activation dtype).  Each run's
    ``narrow`` input gradients (h, and k for the top-k weights) are pointwise terms that
    Inductor still sums in one kernel after the last run, so all tokens' input gradients are
    alive with the joined input gradient (h) being made (measured on the tiny Mixtral at S = 4096,
    M = 8).  One run's buffers (``pooled``) then stay in Inductor's reuse pool through the
    attention backward that follows, as a chunked dense MLP's do
    (``cost_model.COEF["mlp_chunk_pool"]``; measured on the tiny Qwen2-MoE)."""
    if not (arch.experts and arch.experts_per_token and arch.routed_layers):
        return None
    from ...planning.terms import B, FP32, RegionCost, S

    a, h, i, k = prec.act_bytes, arch.hidden, arch.expert_intermediate, arch.experts_per_token
    t = B * S
    slot = a * (2 * h + 3 * i) + 3 * 8
    kept = k * (a + 8)  # the top-k weights and indices the chunks read again
    shape = f"{h}→top-{k}×{i}→{h}"
    if chunked:
        run = t / m
        one_run = run * k * (slot + a * (2 * h + 3 * i))
        # compiled: the weights' running sum, one run's partial and the new sum; every run's input
        # gradients, summed by one fused kernel after the last run
        partials = 3 * arch.experts * (arch.ups + 1) * h * i * a + t * a * (2 * h + k) if program == "compiled" else 0
        return RegionCost(
            name, arch.routed_layers, shape, saved=t * kept, fwd_transient=run * k * slot,
            bwd_transient=one_run + partials,
            recompute_flops=2 * t * k * h * i * 2, chunks=m,
            pooled=one_run if program == "compiled" else None,
        )
    return RegionCost(name, arch.routed_layers, shape, saved=t * (k * slot + kept), fwd_transient=0 * S,
                      bwd_transient=t * k * a * (h + 3 * i))
