"""The words a cost term is written in: the symbols S (tokens per sequence) and B (batch), byte sizes,
:class:`RegionCost` (what a region kind's cost side returns), the fitted per-token coefficients of the
compiled step (:data:`COEF`, shared by the attention block and the MLP and LM-head kinds) and the
bytes a norm keeps (:func:`norm_saved`).  A module of its own so that a kind's cost side and the cost
model that sums the kinds import it, not each other."""

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


#: Per-token element counts of the compiled step (fitted on the reference config, see ``mstfx.planning.cost_model``).
COEF = {
    # saved for backward by one decoder layer, not chunked: attention block
    "attn_saved_h": 3.0,  # layer input, attention output (and its contiguous copy), residual, norm output
    "attn_saved_qkv": 1.0,  # q, k, v after rotary (× their widths)
    # MLP, not chunked: input + (gate, up) or (up) pre-activations
    "mlp_saved_h": 2.0,  # the residual entering the MLP's norm and the norm's output
    "mlp_saved_i": 1.0,  # × number of up-projections: each pre-activation
    "mlp_saved_down_in": 1.0,  # + the down-projection's input (activation, times the up-projection if gated)
    # transient of one layer's backward (gradients of the widest intermediates)
    "bwd_transient_i": 2.0,  # × number of up-projections, per token of the region
    "bwd_transient_h": 4.0,
    # LM head + loss, not chunked: saved and backward transient, in units of V × the activation dtype
    # (HF upcasts the logits to fp32 for the loss, but Inductor fuses the upcast into the loss kernels and
    # saves the logits as the lm_head made them: measured in bf16, 262 MB = S·V·2 B at S = 4096)
    "head_saved_v": 1.0,
    "head_bwd_v": 0.0,  # Inductor writes dlogits in place of the saved logits
    # LM head + loss chunked: per chunk token, in units of V (the fp32 logits chunk: Inductor fuses
    # the softmax and dlogits into it); the forward transient is the larger of that and the V×h fp32
    # weight-gradient buffer made when the accumulator is finished (measured at S = 2048, 4096)
    "head_chunk_v": 1.0,
    # chunked MLP: saved per token in units of h (its input and its output, the residual sum)
    "mlp_chunked_saved_h": 2.0,
    # 1 if the chunked LM head's fp32 weight-gradient accumulator outlives the head's backward
    # (measured 0: it is finished into the weight gradient in forward, see step_cost)
    "acc_alive": 0.0,
    # 1: the chunk buffers of a chunked MLP's backward stay in Inductor's reuse pool (alive) through the
    # attention backward that follows, until the next layer's MLP backward reuses them (measured: 6 of a
    # SwiGLU chunk's 7 I-wide buffers at M = 4; 9 at M = 3, whose uneven chunks pool two sizes)
    "mlp_chunk_pool": 1.0,
    # checkpointed layer keeps only its input (and the rotary tables)
    "ckpt_saved_h": 1.0,
    # the additive causal mask (B × S × S, activation dtype) the compiled HF SDPA path materialises
    # once and keeps until the last attention backward (measured: 16.8 MB at S = 2048, 67.1 MB at 4096)
    "mask_s2": 1.0,
    # 0: a checkpointed layer's MLP is recomputed chunk by chunk, each chunk just before its gradient
    # (checked on the captured backward, tests/cost/test_compiled_program.py).  It was 1 (every chunk's
    # up-projections alive together) while mstfx's chunk tags inside checkpoint bodies read as
    # checkpoint boundaries to the partitioner and the last layer's output was recomputed whole
    "ckpt_mlp_whole": 0.0,
}


def norm_saved(arch: Arch, a: int) -> int:
    """Bytes per token one norm keeps for backward in eager PyTorch, without its output.

    HF Llama's RMSNorm upcasts (``x.to(float32)``: 4·h, kept by ``pow`` and ``mul``), keeps ``rsqrt``
    (4) and the normalised input cast back (a·h, kept by ``weight *``); Gemma's multiplies by
    ``1 + weight`` in fp32, so it keeps the fp32 normalised input (4·h) instead; ``native_layer_norm``
    keeps its input, mean and rstd.
    """
    h = arch.hidden
    return {"rms": 4 * h + 4 + a * h, "rms_fp32": 8 * h + 4, "layer": a * h + 8}[arch.norm]
