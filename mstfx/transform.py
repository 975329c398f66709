"""transform: one call that makes a model train within a memory budget.

    model = mstfx.transform(model, budget_gb=70)      # plans per input length, compiles through mst

Why buckets: the chunk rule fixes M when a graph is compiled (under dynamic shapes it reads the size
hint), so one dynamic graph for every length would keep the M of the first length seen.  Instead the
sequence length S is rounded up to a power-of-two *bucket*; each bucket gets its own plan and its own
``torch.compile(dynamic=True)`` entry.  Inside a bucket S is symbolic: lengths do not recompile.
Across buckets M follows S by the plan's rule.  So a run over lengths between 1 and S_max compiles
at most ⌈log2(S_max / 256)⌉ + 1 times.

What a bucket is planned for: its top (so every S in it fits with one plan).  When the top does not
fit the budget, the longest length in the bucket that fits, if that covers the input; otherwise the
input's own length, so an input that fits is never refused because a longer one in its bucket would
not, and the error, when one is raised, is for the input's real S.  Planning happens when a bucket's
first input arrives, before anything of it runs.

Without ``seq_len`` nothing is planned for a length no input has: transform checks that some length
fits, logs the longest that does (``TransformState.longest_seq_len``) and plans each bucket as above.
With ``seq_len`` the plan for it is made at once (it must fit) and decides checkpointing up front.

The model is changed in place (its ``forward``; HF gradient checkpointing when a plan needs it) only
after the checks passed: a bad or infeasible budget raises and leaves the model as it was.
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from .planning.planner import (
    MARGIN,
    InfeasibleBudgetError,
    Plan,
    check_budget,
    check_margin,
    longest_fitting,
    plan,
)
from .compat import with_tracing_settings
from .hf_checkpointing import can_checkpoint, disable_checkpointing, enable_checkpointing, is_checkpointing
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
    """What transform did to a model (``model._mstfx_transform``): plans per bucket, compiles.

    ``plan``: the plan for ``seq_len`` when one was given, else None.  ``longest_seq_len``: the longest S
    any plan fits in the budget.  ``buckets``: bucket → (plan, compiled forward, backend) in use.
    """

    plan: Plan | None
    budget_gb: float
    options: dict
    original_forward: Any
    enabled_checkpointing: bool
    longest_seq_len: int = 0
    model: Any = field(default=None, repr=False)
    buckets: dict[int, tuple[Plan, Any, Any]] = field(default_factory=dict)
    backends: list = field(default_factory=list)

    @property
    def compiles(self) -> int:
        """Graphs compiled by the mst backends of all buckets so far."""
        return sum(len(backend.reports) for backend in self.backends)

    def plan_for(self, seq_len: int) -> Plan:
        """The plan an input of length ``seq_len`` gets (raises InfeasibleBudgetError if none fits)."""
        opts = {k: v for k, v in self.options.items() if k != "seq_len"}
        top_len = self.options.get("seq_len")
        b = bucket_of(seq_len, top_len)
        if self.plan is not None and b == top_len:
            return self.plan
        return _bucket_plan(self.model, seq_len, max(b, seq_len), self.budget_gb, opts, self.longest_seq_len)


def _bucket_plan(model, seq_len: int, top: int, budget_gb: float, opts: dict, longest: int) -> Plan:
    """The plan of a bucket whose first (or longest so far) input has ``seq_len`` tokens: for the
    bucket's ``top`` if that fits, else for the longest length below it that fits (``longest``: the
    longest S any plan fits), else for ``seq_len`` itself (which raises, with that S, as it cannot fit)."""
    reach = min(top, longest)
    if reach >= seq_len:
        try:
            return plan(model, reach, budget_gb, **opts)
        except InfeasibleBudgetError:  # the solved longest S, rounded, may miss by a token
            pass
    return plan(model, seq_len, budget_gb, **opts)


def _seq_len_of(args, kwargs) -> int | None:
    x = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        return int(x.shape[-1])
    e = kwargs.get("inputs_embeds")
    if isinstance(e, torch.Tensor) and e.dim() >= 2:
        return int(e.shape[-2])
    return None


def _compiled_forward(forward, name: str, backend):
    """``forward`` without escaping logits, compiled for one plan (its own code object, its own cache)."""

    def mst_forward(*args, **kwargs):
        return without_logits(forward(*args, **kwargs))  # escaping logits cannot be chunked away

    code = mst_forward.__code__.replace(co_name=f"mst_forward_{name}")
    fn = types.FunctionType(code, mst_forward.__globals__, code.co_name, None, mst_forward.__closure__)
    return with_tracing_settings(torch.compile(fn, backend=backend, dynamic=True))


_PLANNED_OPTIONS = ("mini_sequences", "lm_head_chunks", "chunk_mlp", "chunk_lm_head", "offload_checkpoints")


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
    host_budget_gb: float | None = None,
    **backend_options: Any,
) -> torch.nn.Module:
    """Make ``model`` train within ``budget_gb`` GiB through the mst backend (in place; returns it).

    ``budget_gb``: GiB (2**30 bytes), like every memory figure of mstfx.
    ``seq_len``: optional.  Without it each input length is planned when it first arrives (see the
    module doc); the longest S that fits is logged and kept in ``model._mstfx_transform.longest_seq_len``,
    and only an input that cannot fit raises :class:`~mstfx.InfeasibleBudgetError` (before it runs).
    With it, the plan for ``seq_len`` is made now and must fit.  ``optimizer``, ``mixed_precision`` and
    ``margin`` (headroom on the predicted gradients + activations) and ``host_budget_gb`` (host memory for
    offloaded checkpoints, None = not limited) are as in :func:`mstfx.plan`; other keywords go to
    :class:`~mstfx.MstConfig`.
    """
    from .config import MstConfig, positive_int

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transform expects an nn.Module, got {type(model).__name__}")
    check_budget(budget_gb)
    check_margin(margin)
    if seq_len is not None:
        seq_len = positive_int("seq_len", seq_len)
    if getattr(model, _STATE, None) is not None:
        raise ValueError("model was already transformed; call mstfx.untransform(model) first")
    if backend_options.get("per_block"):
        raise ValueError("transform(per_block=True) is not supported: each length bucket has its own plan and M, and "
                         "the blocks would need a compile per bucket; use mstfx.compile(model, per_block=True, "
                         "mini_sequences=...) with the plan's M (mstfx.plan)")
    clash = sorted(set(_PLANNED_OPTIONS) & set(backend_options))
    if clash:
        raise ValueError(f"{clash} are set by the plan; change the budget instead (or use mstfx.backend yourself)")
    MstConfig(**backend_options)  # validate the backend options now
    can_ckpt = can_checkpoint(model)
    opts = dict(batch=batch, optimizer=optimizer, mixed_precision=mixed_precision, allow_checkpointing=can_ckpt,
                margin=margin, host_budget_gb=host_budget_gb)
    if max_chunks is not None:
        opts["max_chunks"] = max_chunks
    top = plan(model, seq_len, budget_gb, **opts) if seq_len is not None else None  # raises before any change
    longest = longest_fitting(model, budget_gb, **opts)
    if longest < 1:
        plan(model, 1, budget_gb, **opts)  # raises with the numbers (parameters + optimizer state too large)
    log.info("mstfx.transform: %.3g GiB (batch %d) fits sequences up to S = %d", budget_gb, batch, longest)

    enabled = False
    if top is not None and top.checkpointing and not is_checkpointing(model):
        enable_checkpointing(model)
        enabled = True
    state = TransformState(top, budget_gb, {**opts, "seq_len": seq_len}, model.forward, enabled, longest, model)
    original = model.forward

    def forward(*args, **kwargs):
        s = _seq_len_of(args, kwargs) or seq_len
        if s is None:
            raise ValueError("mstfx.transform: cannot read the sequence length of this input (no input_ids or "
                             "inputs_embeds); pass seq_len= to transform")
        b = bucket_of(s, seq_len)
        entry = state.buckets.get(b)
        if entry is None or entry[0].seq_len < s:
            p = state.plan_for(s)  # raises InfeasibleBudgetError for this S before anything runs
            if p.checkpointing and not is_checkpointing(model):
                log.warning("mstfx.transform: S = %d needs activation checkpointing within %.3g GiB; enabling it "
                            "(shorter inputs recompile once and are checkpointed too)", s, budget_gb)
                enable_checkpointing(model)
                state.enabled_checkpointing = True
            backend = p.backend(**backend_options)
            state.backends.append(backend)
            state.buckets[b] = (p, _compiled_forward(original, f"bucket_{b}_s{p.seq_len}", backend), backend)
            log.info("mstfx: bucket S<=%d planned for S = %d: mode %s, mini_sequences %s", b, p.seq_len,
                     p.mode, ", ".join(f"{k} {m}" for k, m in p.mini_sequences.items()))
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
        disable_checkpointing(model)
    setattr(model, _STATE, None)
    return model
