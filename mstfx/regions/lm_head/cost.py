"""Cost side of the LM-head kind: the LM head + loss's bytes in sympy (no torch), once per step.

Two programs: ``compiled`` (the Inductor step: per-token counts from the fitted coefficients
:data:`mstfx.planning.terms.COEF`) and ``eager`` (op by op, each op's saved tensors by autograd's
rules).  The phases only the LM head has (its weight gradient, a tied weight's two gradients) are
the cost model's (``cost_model.step_cost``).
"""

from __future__ import annotations

import sympy as sp

from ...planning.terms import B, COEF, FP32, RegionCost, S, norm_saved


def compiled(name: str, arch, prec, chunk_head: bool, m_head) -> RegionCost:
    """The compiled step's LM head + loss (:data:`COEF`)."""
    c, a, h, v, t = COEF, prec.act_bytes, arch.hidden, arch.vocab, B * S
    if chunk_head:
        per_chunk = t / m_head
        return RegionCost(
            name, 1, f"{h}→{v}",
            # dL/dh (t×h) and the fp32 dL/dW accumulator (V×h) are made in forward, kept for backward
            saved=t * a * h + v * h * FP32,
            # (the V×h fp32 weight-gradient buffer made when the accumulator is finished is its own
            # phase in step_cost: phases stay free of Max so sympy can solve them)
            # in bf16/fp16 the chunk's logits gradient (activation dtype) is upcast to fp32 for the fp32
            # accumulator, and both exist for that matmul (measured in bf16: V×chunk×2 + V×chunk×4)
            fwd_transient=per_chunk * v * (FP32 * c["head_chunk_v"] + (a if a < FP32 else 0)) + t * a * h,
            # backward scales the accumulator into the weight gradient (counted with the grads)
            bwd_transient=t * a * h,
            chunks=m_head,
        )
    return RegionCost(
        name, 1, f"{h}→{v}",
        saved=t * v * a * c["head_saved_v"],
        fwd_transient=0 * S,  # the loss is reduced from the saved logits, no second copy
        bwd_transient=t * v * a * c["head_bwd_v"] + t * a * h,
    )


def eager(name: str, arch, prec, chunk_head: bool, m_head) -> RegionCost:
    """The eager step's LM head + loss.

    Unchunked (HF's loss): the final norm and its output; the fp32 ``log_softmax`` output is saved,
    the activation-dtype logits and their fp32 copy are alive while the loss runs; backward makes
    ``nll_loss``'s and ``log_softmax``'s fp32 gradients (8·V).  Chunked
    (``chunked_ops.linear_cross_entropy``): dL/dh and the fp32 V×h accumulator are kept; at most three
    fp32 chunk×V tensors and a one-hot mask are alive at once (13 bytes per vocab entry: the loop drops
    each dead chunk tensor); backward scales the accumulator in fp32 before the cast."""
    a, h, v, t = prec.act_bytes, arch.hidden, arch.vocab, B * S
    final_norm = t * (norm_saved(arch, a) + a * h)
    cap = t * a * v if arch.logit_softcap else 0  # tanh's output, kept for its backward
    if chunk_head:
        per_chunk = t / m_head
        return RegionCost(
            name, 1, f"{h}→{v}",
            saved=final_norm + t * a * h + v * h * FP32,
            # one chunk's vocab-wide tensors at once: three fp32 ones (logits, softmax, its gradient) and
            # the one-hot mask; soft-capping: the saved tanh output and its chain-rule temporary instead
            fwd_transient=per_chunk * v * (3 * FP32 + (2 * a if arch.logit_softcap else 1)) + t * a * h,
            bwd_transient=t * a * h + (v * h * FP32 if prec.param_bytes < FP32 else 0),
            chunks=m_head,
        )
    upcast = FP32 if a < FP32 else 0  # ``logits.float()`` is a copy only below fp32
    return RegionCost(
        name, 1, f"{h}→{v}",
        saved=final_norm + t * v * FP32 + cap,
        fwd_transient=t * v * (a + upcast) + cap,
        bwd_transient=t * v * 2 * FP32 + t * a * h,
    )


def cost(name: str, arch, prec, chunked: bool, m, program: str) -> RegionCost:
    """The LM head + loss, once per step; a bare backbone (``arch.lm_head`` false) has none (count 0:
    the plan shows no row)."""
    if not arch.lm_head:
        return RegionCost(name, 0, "-", sp.Integer(0), sp.Integer(0), sp.Integer(0))
    return (compiled if program == "compiled" else eager)(name, arch, prec, chunked, m)
