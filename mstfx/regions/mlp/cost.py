"""Cost side of the MLP kind: a dense MLP's bytes in sympy (no torch), for the cost model
(:mod:`mstfx.planning.cost_model`), which also uses :func:`dense` for a MoE layer's shared expert.

Two programs: ``compiled`` (the Inductor step: per-token counts from the fitted coefficients
:data:`mstfx.planning.terms.COEF`, which the MLP shares with the attention block) and ``eager`` (op by
op, each op's saved tensors by autograd's rules).
"""

from __future__ import annotations

from dataclasses import replace

from ...planning.terms import B, COEF, RegionCost, S, norm_saved


def saved_i(arch) -> float:
    """I-wide tensors an unchunked compiled MLP saves per token: each up-projection's output and the
    down-projection's input (SwiGLU: gate, up, silu(gate)·up = 3; GELU: pre-activation, GELU = 2)."""
    return COEF["mlp_saved_i"] * arch.ups + COEF["mlp_saved_down_in"]


def compiled(arch, prec, chunk_mlp: bool, m_mlp, width: int, count: int, kind: str = "mlp"):
    """A dense MLP of ``width`` in ``count`` layers (the compiled step, :data:`COEF`), and its unchunked
    saved bytes: the dense MLP of a layer, or a MoE layer's shared expert."""
    c, a, h, i, t = COEF, prec.act_bytes, arch.hidden, width, B * S
    s_i = saved_i(arch)
    mlp_full_saved = t * a * (c["mlp_saved_h"] * h + s_i * i)
    mlp_full_bwd = t * a * c["bwd_transient_i"] * arch.ups * i
    if chunk_mlp:
        per_chunk = t / m_mlp
        mlp = RegionCost(
            kind, count, f"{h}→{i}→{h}",
            saved=t * a * h * c["mlp_chunked_saved_h"],
            fwd_transient=per_chunk * a * arch.ups * i,
            bwd_transient=per_chunk * a * (s_i + c["bwd_transient_i"] * arch.ups) * i,
            # each chunk's up-projections and activation run again in backward
            recompute_flops=2 * t * h * i * arch.ups,
            chunks=m_mlp,
        )
    else:
        mlp = RegionCost(kind, count, f"{h}→{i}→{h}", mlp_full_saved, 0 * S, mlp_full_bwd)
    return mlp, mlp_full_saved


def eager(arch, prec, chunk_mlp: bool, m_mlp, width: int, count: int, kind: str = "mlp"):
    """A dense MLP of ``width`` in ``count`` layers (the eager step), and its unchunked saved bytes:
    the dense MLP of a layer, or a MoE layer's shared expert (with the block's norm; width 0: the norm
    alone, see ``cost_model.moe_block``).

    Per token: the norm and its output, then gate, act(gate), up and their product (gated: 4·I; plain:
    the up-projection and its activation, 2·I); backward: about 3·I (2·I plain) of gradients.  Chunked
    (each chunk under ``torch.utils.checkpoint``): only the input is kept; backward recomputes one
    chunk (4·I) beside its gradients (3·I)."""
    a, h, i, t = prec.act_bytes, arch.hidden, width, B * S
    kept_i, grad_i = (4, 3) if arch.gated else (2, 2)
    branch_norm = norm_saved(arch, a) if arch.sandwich_norms else 0
    mlp_in = t * (norm_saved(arch, a) + a * h + branch_norm)
    mlp_full_saved = mlp_in + t * a * kept_i * i
    if chunk_mlp:
        per_chunk = t / m_mlp
        mlp = RegionCost(
            kind, count, f"{h}→{i}→{h}", saved=mlp_in,
            fwd_transient=per_chunk * a * (kept_i - 1) * i,
            bwd_transient=per_chunk * a * (kept_i + grad_i) * i + t * a * h,
            recompute_flops=2 * t * h * i * arch.ups, chunks=m_mlp,
        )
    else:
        mlp = RegionCost(kind, count, f"{h}→{i}→{h}", mlp_full_saved, 0 * S, t * a * (grad_i * i + h))
    return mlp, mlp_full_saved


def dense(arch, prec, chunk_mlp: bool, m_mlp, width: int, count: int, program: str, kind: str = "mlp"):
    """:func:`compiled` or :func:`eager`, by ``program``."""
    return (compiled if program == "compiled" else eager)(arch, prec, chunk_mlp, m_mlp, width, count, kind)


def cost(name: str, arch, prec, chunked: bool, m, program: str) -> RegionCost:
    """The dense MLP of the ``arch.dense_layers`` layers that have one (a MoE layer's routed experts
    are a kind of their own)."""
    return dense(arch, prec, chunked, m, arch.intermediate, arch.dense_layers, program, name)[0]


def whole_recompute(mlp: RegionCost, arch, prec, m_mlp, whole: float) -> RegionCost:
    """A chunked compiled MLP in a checkpointed layer whose recompute makes the ``whole`` share of its
    unchunked activations at once (``COEF["ckpt_mlp_whole"]``): a chunk's up-projections are then
    already made, and only its gradients are new in its backward."""
    per_chunk = B * S / m_mlp
    return replace(mlp, bwd_transient=per_chunk * prec.act_bytes * ((1 - whole) * saved_i(arch)
                                                                   + COEF["bwd_transient_i"] * arch.ups) * arch.intermediate)
