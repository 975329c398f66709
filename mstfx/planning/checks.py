"""The planner's argument checks: budget, margin, precision, optimizer setup, mini-sequences and
parallelism, each turned into what the cost model takes or rejected with a ValueError that says why."""

from __future__ import annotations

import math
import numbers
from typing import Any

from ..config import check_mini_sequences, positive_int
from . import cost_model as cm
from .units import GB


def symbol_chunks(mini_sequences: int | dict[str, int] | None) -> tuple[int | None, int | None]:
    """``(M_mlp, M_head)`` that ``mini_sequences`` asks for (``None``: the backend's rule for that symbol).

    ``mini_sequences`` means what it means in ``MstConfig``: an int is M for every chunked region; a
    dict maps region-kind names to M, and each kind's M feeds the cost-model symbol it follows (its
    ``cost_symbol``); kinds left out follow their rule.  ValueError for an unknown kind, an M that is
    not a positive integer, or kinds of one symbol given different M (the cost model has one M each).
    """
    ms = check_mini_sequences(mini_sequences)
    if ms is None:
        return None, None
    if not isinstance(ms, dict):
        return ms, ms
    from ..regions.registry import REGION_KINDS

    out: dict[str, int | None] = {}
    for symbol in ("M_mlp", "M_head"):
        given = {k.name: ms[k.name] for k in REGION_KINDS if k.cost_symbol == symbol and k.name in ms}
        if len(set(given.values())) > 1:
            raise ValueError(
                f"mini_sequences gives the region kinds {sorted(given)} different M ({given}); the cost model "
                f"counts them with one symbol {symbol}: give them the same M"
            )
        out[symbol] = next(iter(given.values()), None)
    return out["M_mlp"], out["M_head"]


def check_budget(budget_gb: Any) -> float:
    """Bytes of a budget in GiB; ValueError for a non-numeric, NaN, infinite or non-positive one."""
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, numbers.Real):
        raise ValueError(f"budget_gb must be a positive number of GiB (2**30 bytes), got {budget_gb!r}")
    value = float(budget_gb)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"budget_gb must be a positive, finite number of GiB (2**30 bytes), got {budget_gb!r}")
    return value * GB


def check_margin(margin: Any) -> float:
    """The planning margin as a fraction in [0, 1); ValueError otherwise."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not 0 <= float(margin) < 1:
        raise ValueError(f"margin must be a fraction in [0, 1) (0.1 = plan with 10% headroom), got {margin!r}")
    return float(margin)

def precision_of(model_or_config: Any, mixed_precision: str | bool | None) -> str | bool | None:
    """``mixed_precision`` as given; if None and the model is an nn.Module whose floating parameters are
    all bf16 or fp16, "bf16" (its weights, gradients and activations are 2-byte: planning it as fp32
    would double every predicted byte)."""
    if mixed_precision is not None or not hasattr(model_or_config, "parameters"):
        return mixed_precision
    dtypes = {p.dtype for p in model_or_config.parameters() if p.is_floating_point()}
    import torch

    if dtypes and dtypes <= {torch.bfloat16, torch.float16}:
        return "bf16"
    return mixed_precision


def per_block_program(optimizer: str, per_block: bool, optimizer_in_backward: bool) -> tuple[str, dict]:
    """The cost model's optimizer and program keywords (``cost_model.step_cost``) for a plan of the
    per-block program (``mstfx.compile(model, per_block=True)``): ``optimizer_in_backward`` says an
    optimizer step runs in ``register_post_accumulate_grad_hook``, freeing each block's gradients when
    its backward ends.  The ``paper`` setup (AdamW, bf16 states, stepped in backward) is modelled for the
    per-block program only: the whole-model program keeps every gradient until its backward returns."""
    if optimizer_in_backward and not per_block:
        raise ValueError("optimizer_in_backward needs per_block=True: the whole-model program's one backward graph "
                         "returns every gradient at once, so a step in backward frees none earlier")
    if per_block and optimizer == "paper":
        return "adamw-bf16", {"per_block": True, "optimizer_in_backward": True}
    return optimizer, ({"per_block": True, "optimizer_in_backward": bool(optimizer_in_backward)} if per_block else {})


def parallel(arch: cm.Arch, gpus: Any = 1, sequence_parallel: Any = 1, seq_len: int | None = None) -> dict:
    """``gpus`` and ``sequence_parallel`` checked (:func:`cost_model.check_sequence_parallel`; ``seq_len``
    a multiple of the degree), as the keywords of ``cost_model.step_cost``."""
    gpus = positive_int("gpus", gpus)
    n = positive_int("sequence_parallel", sequence_parallel)
    cm.check_sequence_parallel(arch, n, gpus)
    if seq_len is not None and seq_len % n:
        raise ValueError(f"seq_len={seq_len} must be a multiple of sequence_parallel={n} (each rank holds S/N tokens)")
    return dict(gpus=gpus, sequence_parallel=n)


#: ``mstfx simulate``'s optimizer setups, as this cost model's (optimizer, mixed precision); the same
#: bytes per parameter (simulate: ``mstfx/tools/simulate/options.py`` OPTIMIZERS)
SETUPS = {
    "adamw-master": ("adamw", "amp", "AdamW, fp32 states + fp32 master weights, bf16 weights and grads (12 B/param)"),
    "adamw-bf16": ("adamw", "bf16", "AdamW, bf16 states, bf16 weights and grads (4 B/param)"),
    "offload": ("none", "bf16", "AdamW with states and master weights offloaded to CPU: bf16 weights and grads"),
}
#: simulate setups the cost model cannot express, with the reason
UNMODELLED_SETUPS = {
    "paper": "gradients freed as they are made (optimizer in backward) are not in the cost model; "
             "use `mstfx simulate --optimizer paper`",
    "zero-offload": "gradients copied to the host as they are made are not in the cost model; "
                    "use `mstfx simulate --optimizer zero-offload`",
}


def resolve_setup(optimizer: str, mixed_precision: Any) -> tuple[str, Any]:
    """``optimizer`` as a cost-model optimizer and the precision it implies (a simulate setup name such
    as ``adamw-master`` fixes both; then ``mixed_precision`` must be unset)."""
    if optimizer in UNMODELLED_SETUPS:
        raise ValueError(f"optimizer {optimizer!r}: {UNMODELLED_SETUPS[optimizer]}")
    if optimizer in SETUPS:
        opt, prec, _ = SETUPS[optimizer]
        if mixed_precision not in (None, prec):
            raise ValueError(f"optimizer {optimizer!r} implies mixed_precision={prec!r}; leave mixed_precision unset")
        return opt, prec
    if optimizer not in cm.OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(cm.OPTIMIZERS) + list(SETUPS)}, got {optimizer!r}")
    return optimizer, mixed_precision
