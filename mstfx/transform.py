"""transform: one call that makes a model train within a memory budget.

    model = mstfx.transform(model, budget_gb=70)      # plans, then compiles through the mst backend

Why buckets: the chunk rule fixes M when a graph is compiled (under dynamic shapes it reads the size
hint), so one dynamic graph for every length would keep the M of the first length seen.  Instead the
sequence length S is rounded up to a power-of-two *bucket*; each bucket gets its own plan (made for
the bucket's longest S, so every S in it fits) and its own ``torch.compile(dynamic=True)`` entry.
Inside a bucket S is symbolic: lengths do not recompile.  Across buckets M follows S by the plan's
rule.  So a run over lengths between 1 and S_max compiles at most ⌈log2(S_max / 256)⌉ + 1 times.

The model is changed in place (its ``forward``; HF gradient checkpointing when the plan needs it) only
after planning succeeded: a bad or infeasible budget raises and leaves the model as it was.
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from .planning.planner import MARGIN, InfeasibleBudgetError, Plan, check_budget, check_margin, plan
from .wrappers import without_logits

log = logging.getLogger("mstfx")

MIN_BUCKET = 256
_STATE = "_mstfx_transform"

__all__ = ["transform", "untransform", "bucket_of", "TransformState"]


def bucket_of(seq_len: int, max_seq_len: int | None = None) -> int:
    """The bucket of a length: the next power of two ≥ max(S, 256), capped at ``max_seq_len`` when S fits it."""
    b = max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(1, seq_len)))))
    if max_seq_len is not None and seq_len <= max_seq_len:
        b = min(b, max_seq_len)
    return b


@dataclass
class TransformState:
    """What transform did to a model (``model._mstfx_transform``): the plan, per-bucket plans, compiles."""

    plan: Plan
    budget_gb: float
    options: dict
    original_forward: Any
    enabled_checkpointing: bool
    buckets: dict[int, tuple[Plan, Any, Any]] = field(default_factory=dict)

    @property
    def compiles(self) -> int:
        """Graphs compiled by the mst backends of all buckets so far."""
        return sum(len(backend.reports) for _, _, backend in self.buckets.values())


def _seq_len_of(args, kwargs) -> int | None:
    x = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        return int(x.shape[-1])
    e = kwargs.get("inputs_embeds")
    if isinstance(e, torch.Tensor) and e.dim() >= 2:
        return int(e.shape[-2])
    return None


def _compiled_forward(forward, bucket: int, backend):
    """``forward`` without escaping logits, compiled for one bucket (its own code object, its own cache)."""

    def mst_forward(*args, **kwargs):
        return without_logits(forward(*args, **kwargs))  # escaping logits cannot be chunked away

    code = mst_forward.__code__.replace(co_name=f"mst_forward_bucket_{bucket}")
    fn = types.FunctionType(code, mst_forward.__globals__, code.co_name, None, mst_forward.__closure__)
    return torch.compile(fn, backend=backend, dynamic=True)


def transform(
    model: torch.nn.Module,
    budget_gb: float,
    *,
    seq_len: int | None = None,
    batch: int = 1,
    optimizer: str = "adamw",
    mixed_precision: str | bool | None = None,
    max_chunks: int | None = None,
    margin: float = MARGIN,
    **backend_options: Any,
) -> torch.nn.Module:
    """Plan for ``budget_gb`` and make ``model`` train through the mst backend (in place; returns it).

    ``seq_len``: the longest sequence to plan for (default: the config's ``max_position_embeddings``);
    the plan must fit there, so every shorter sequence fits too.  Longer inputs are planned when they
    arrive and raise :class:`~mstfx.InfeasibleBudgetError` if they cannot fit.  ``optimizer`` and
    ``mixed_precision`` and ``margin`` (headroom on the predicted gradients + activations) are as in
    :func:`mstfx.plan`; other keywords go to :class:`~mstfx.MstConfig`.
    ``model._mstfx_transform`` (a :class:`TransformState`) holds the plan and the compile count.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transform expects an nn.Module, got {type(model).__name__}")
    check_budget(budget_gb)
    check_margin(margin)
    if getattr(model, _STATE, None) is not None:
        raise ValueError("model was already transformed; call mstfx.untransform(model) first")
    cfg = getattr(model, "config", None)
    if seq_len is None:
        seq_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if seq_len is None:
            raise ValueError("pass seq_len=: the model's config does not give a maximum length")
    can_ckpt = callable(getattr(model, "gradient_checkpointing_enable", None))
    opts = dict(batch=batch, optimizer=optimizer, mixed_precision=mixed_precision, allow_checkpointing=can_ckpt,
                margin=margin)
    if max_chunks is not None:
        opts["max_chunks"] = max_chunks
    top = plan(model, seq_len, budget_gb, **opts)  # raises before anything is changed
    from .config import MstConfig

    top.config(**backend_options)  # validate the backend options now, too
    MstConfig(**backend_options)

    enabled = False
    if top.checkpointing and not getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enabled = True
    state = TransformState(top, budget_gb, {**opts, "seq_len": seq_len}, model.forward, enabled)
    original = model.forward

    def forward(*args, **kwargs):
        s = _seq_len_of(args, kwargs) or seq_len
        b = bucket_of(s, seq_len)
        if b not in state.buckets:
            p = plan(model, max(b, s), budget_gb, **opts) if b != seq_len else top
            if p.checkpointing and not getattr(model, "is_gradient_checkpointing", False):
                raise InfeasibleBudgetError(p.budget_bytes, p.predicted_peak, s, top.longest_seq_len, batch,
                                            p.margin, p.planned_peak)
            backend = p.backend(**backend_options)
            state.buckets[b] = (p, _compiled_forward(original, b, backend), backend)
            log.info("mstfx: bucket S<=%d: mode %s, M mlp %d, M lm_head %d", b, p.mode, p.mlp_chunks, p.lm_head_chunks)
        return state.buckets[b][1](*args, **kwargs)

    model.forward = forward
    setattr(model, _STATE, state)
    return model


def untransform(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`transform`: the original forward, and checkpointing off if transform turned it on."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    model.__dict__.pop("forward", None)
    if state.enabled_checkpointing:
        model.gradient_checkpointing_disable()
    setattr(model, _STATE, None)
    return model
