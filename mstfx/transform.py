"""transform: one call that makes a model train within a memory budget.

    model = mstfx.transform(model, budget_gb=70)      # plans per input length, compiles through mst

Why buckets: the chunk rule fixes M when a graph is compiled (under dynamic shapes it reads the size
hint), so one dynamic graph for every length would keep the M of the first length seen.  Instead the
sequence length S is rounded up to a power-of-two *bucket*; each bucket gets its own plan and its own
``torch.compile(dynamic=True)`` entry.  Inside a bucket S is symbolic: lengths do not recompile.
Across buckets M follows S by the plan's rule.  So a run over lengths between 1 and S_max compiles
at most ⌈log2(S_max / 256)⌉ + 1 times.

The batch B matters as much as S (the activations grow with B·S), so it is bucketed too, read from
the input (``input_ids.shape[0]``, or ``inputs_embeds``): B rounds up to a power of two, capped at
transform's ``batch`` when B is at most that (as S is capped at ``seq_len``), and a bucket is the pair
(batch bucket, length bucket).  A plan made for one batch is never reused for a larger one: an input
with B = 3 after B = 1 gets a plan of its own, and one whose batch cannot fit raises before it runs.
Powers of two rather than each exact B: a run whose last batch is smaller recompiles at most
⌈log2 B⌉ times, not once per distinct size.

What a bucket is planned for: its top (so every S in it fits with one plan).  When the top does not
fit the budget, the longest length in the bucket that fits, if that covers the input; otherwise the
input's own length, so an input that fits is never refused because a longer one in its bucket would
not, and the error, when one is raised, is for the input's real S.  The batch likewise: the bucket's
top batch when some plan for it fits, else the input's own B (an error names that B).  Planning
happens when a bucket's first input arrives, before anything of it runs.

Without ``seq_len`` nothing is planned for a length no input has: transform checks that some length
fits, logs the longest that does (``TransformState.longest_seq_len``) and plans each bucket as above.
With ``seq_len`` the plan for it is made at once (it must fit) and decides checkpointing up front.

The model is changed in place (its ``forward``; HF gradient checkpointing when a plan needs it) only
after the checks passed: a bad or infeasible budget raises and leaves the model as it was.

``per_block=True``: the per-block program (``mstfx.compile(model, per_block=True)``), planned as such
(no S×S mask for the blocks; with ``optimizer_in_backward``, or ``optimizer="paper"``, each block's
gradients counted only while its backward runs), and each bucket compiles the blocks once with its own
backend, so the blocks get the bucket's M (:mod:`mstfx.per_block.buckets`).
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .planning.checks import check_budget, check_margin
from .planning.errors import InfeasibleBudgetError
from .planning.hf_config import arch_of, warn_past_positions
from .planning.plan_table import Plan, planned_options
from .planning.planner import MARGIN, longest_fitting, plan, plan_with_setup
from .planning.setup import TrainingSetup
from .compat import with_tracing_settings
from .hf_checkpointing import can_checkpoint, disable_checkpointing, enable_checkpointing, is_checkpointing
from .wrappers import without_logits

log = logging.getLogger("mstfx")

MIN_BUCKET = 256
_STATE = "_mstfx_transform"

__all__ = ["transform", "untransform", "bucket_of", "batch_bucket_of", "TransformState"]


def _power_of_two_bucket(n: int, cap: int | None, least: int = 1) -> int:
    """The next power of two ≥ max(n, least), capped at ``cap`` when n fits it."""
    b = max(least, 1 << max(0, math.ceil(math.log2(max(1, n)))))
    return min(b, cap) if cap is not None and n <= cap else b


def bucket_of(seq_len: int, max_seq_len: int | None = None) -> int:
    """The bucket of a length: the next power of two ≥ max(S, 256), capped at ``max_seq_len`` when S fits it."""
    return _power_of_two_bucket(seq_len, max_seq_len, MIN_BUCKET)


def batch_bucket_of(batch: int, max_batch: int | None = None) -> int:
    """The bucket of a batch size: the next power of two ≥ B, capped at ``max_batch`` when B fits it."""
    return _power_of_two_bucket(batch, max_batch)


@dataclass
class TransformState:
    """What transform did to a model (``model._mstfx_transform``): plans per bucket, compiles.

    ``plan``: the plan for ``seq_len`` when one was given, else None.  ``longest_seq_len``: the longest S
    any plan fits in the budget at transform's ``batch``.  ``buckets``: (batch bucket, length bucket) →
    (plan, compiled forward, backend) in use.  ``options``: the planner's own keywords (and ``seq_len``);
    ``setup``: what is trained (each batch bucket's plan replaces its ``batch``).
    """

    plan: Plan | None
    budget_gb: float
    options: dict
    original_forward: Any
    enabled_checkpointing: bool
    longest_seq_len: int = 0
    model: Any = field(default=None, repr=False)
    buckets: dict[tuple[int, int], tuple[Plan, Any, Any]] = field(default_factory=dict)
    backends: list = field(default_factory=list)
    #: batch → the longest S any plan fits at that batch (solved once per batch that is planned)
    longest_by_batch: dict[int, int] = field(default_factory=dict)
    #: ``per_block``: the blocks, compiled per bucket (:class:`mstfx.per_block.BucketedBlocks`)
    blocks: Any = field(default=None, repr=False)
    setup: TrainingSetup = field(default_factory=TrainingSetup)

    @property
    def compiles(self) -> int:
        """Graphs compiled by the mst backends of all buckets so far."""
        return sum(len(backend.reports) for backend in self.backends)

    def plan_for(self, seq_len: int, batch: int | None = None) -> Plan:
        """The plan an input of ``batch`` × ``seq_len`` tokens gets (batch None: transform's ``batch``);
        raises InfeasibleBudgetError, for this batch and length, if none fits."""
        opts = {k: v for k, v in self.options.items() if k != "seq_len"}
        top_len, top_batch = self.options.get("seq_len"), self.setup.batch
        batch = top_batch if batch is None else batch
        b = bucket_of(seq_len, top_len)
        bb = batch_bucket_of(batch, top_batch)
        if self.plan is not None and b == top_len and bb == top_batch:
            return self.plan
        if bb > batch:  # the bucket's top batch when some plan fits it, else the input's own
            try:
                return self._plan_at(seq_len, max(b, seq_len), bb, opts)
            except InfeasibleBudgetError:
                pass
        return self._plan_at(seq_len, max(b, seq_len), batch, opts)

    def _plan_at(self, seq_len: int, top: int, batch: int, opts: dict) -> Plan:
        setup = replace(self.setup, batch=batch)
        longest = self.longest_by_batch.get(batch)
        if longest is None:
            longest = longest_fitting(self.model, self.budget_gb, setup, **opts)
            self.longest_by_batch[batch] = longest
        return _bucket_plan(self.model, seq_len, top, self.budget_gb, setup, opts, longest)


def _bucket_plan(model, seq_len: int, top: int, budget_gb: float, setup: TrainingSetup, opts: dict,
                 longest: int) -> Plan:
    """The plan of a bucket whose first (or longest so far) input has ``seq_len`` tokens: for the
    bucket's ``top`` if that fits, else for the longest length below it that fits (``longest``: the
    longest S any plan fits), else for ``seq_len`` itself (which raises, with that S, as it cannot fit)."""
    reach = min(top, longest)
    if reach >= seq_len:
        try:  # (a bucket's top may be past the model's position limit where its inputs are not: no warning)
            return plan_with_setup(model, reach, budget_gb, setup, **opts)
        except InfeasibleBudgetError:  # the solved longest S, rounded, may miss by a token
            pass
    return plan_with_setup(model, seq_len, budget_gb, setup, **opts)


def _shape_of(args, kwargs) -> tuple[int | None, int | None]:
    """``(batch, seq_len)`` of an input from ``input_ids`` ([B, S] or [S]) or ``inputs_embeds``
    ([B, S, H] or [S, H]); None where it cannot be read."""
    x = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        return (int(x.shape[0]) if x.dim() >= 2 else 1), int(x.shape[-1])
    e = kwargs.get("inputs_embeds")
    if isinstance(e, torch.Tensor) and e.dim() >= 2:
        return (int(e.shape[0]) if e.dim() >= 3 else 1), int(e.shape[-2])
    return None, None


def _compiled_forward(forward, name: str, backend, per_block: bool = False):
    """``forward`` without escaping logits, compiled for one plan (its own code object, its own cache).
    ``per_block``: its trace breaks at the blocks' owner, so nested graph breaks keep the wrapper that
    drops the logits in the LM head's graph (as ``mstfx.compile(per_block=True)`` does)."""

    def mst_forward(*args, **kwargs):
        return without_logits(forward(*args, **kwargs))  # escaping logits cannot be chunked away

    code = mst_forward.__code__.replace(co_name=f"mst_forward_{name}")
    fn = types.FunctionType(code, mst_forward.__globals__, code.co_name, None, mst_forward.__closure__)
    return with_tracing_settings(torch.compile(fn, backend=backend, dynamic=True), nested_graph_breaks=per_block)


def default_per_block(optimizer: str, optimizer_in_backward: bool) -> bool:
    """``transform``'s program when ``per_block`` is not given: per block when the optimizer steps in
    backward (``optimizer_in_backward``, or the ``paper`` setup, which does), since only then are a
    block's gradients freed as its backward ends; otherwise the whole model, whose one graph has the lower
    peak when every gradient is kept until the step (see :func:`transform`)."""
    return bool(optimizer_in_backward) or optimizer == "paper"


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
    config: Any = None,
    per_block: bool | None = None,
    optimizer_in_backward: bool = False,
    **backend_options: Any,
) -> torch.nn.Module:
    """Make ``model`` train within ``budget_gb`` GiB through the mst backend (in place; returns it).

    ``budget_gb``: GiB (2**30 bytes), like every memory figure of mstfx.
    ``seq_len``: optional.  Without it each input length is planned when it first arrives (see the
    module doc); the longest S that fits is logged and kept in ``model._mstfx_transform.longest_seq_len``,
    and only an input that cannot fit raises :class:`~mstfx.InfeasibleBudgetError` (before it runs).
    With it, the plan for ``seq_len`` is made now and must fit.  ``batch``: the batch size checked (and
    planned for, with ``seq_len``) now; inputs of another batch size get plans of their own as they
    arrive (see the module doc).  A length past the config's ``max_position_embeddings`` (``seq_len``,
    or an input's) gives a UserWarning.  ``optimizer``, ``mixed_precision`` and
    ``margin`` (headroom on the predicted gradients + activations) and ``host_budget_gb`` (host memory for
    offloaded checkpoints, None = not limited) are as in :func:`mstfx.plan`; other keywords go to
    :class:`~mstfx.MstConfig`.

    ``config``: the architecture to plan with, for a model without a Hugging Face ``.config`` (a model
    written by hand): a dict or config object with ``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads`` (``num_key_value_heads``) and ``vocab_size``.  The
    model's own parameters still give the parameter count and dtype.  Without either, transform refuses
    (TypeError naming both ways out): a plan it cannot read the shapes for could not hold the budget.

    Called with labels, the transformed model returns ``logits=None`` with its loss: the logits are
    never built (building them is the LM head's memory peak, which chunking removes).  Use
    :func:`mstfx.chunked_logprobs` for per-token log-probabilities, or call the model without labels
    (inference keeps its logits).

    ``per_block``: compile each repeated block on its own, as ``mstfx.compile(model, per_block=True)``,
    once per bucket with the bucket's plan, and plan that program.  ``optimizer_in_backward``: the
    optimizer steps in ``register_post_accumulate_grad_hook``, so the budget is checked with each block's
    gradients alive only during its backward (``optimizer="paper"`` implies it).

    Default (``per_block=None``): per block exactly when the optimizer steps in backward, the whole model
    otherwise (:func:`default_per_block`).  Measured (docs/per_block.md): per block the gradients leave
    with each block's backward, which is the saving an 8B model needs past 200K tokens, but only if
    something consumes them then; with the step after ``backward()`` the whole-model graph's peak is the
    lower one (reference config 246 against 256 MiB), while step time (0.94×) and cold compile (0.66×)
    favour per block by less than the measurements' noise on a loaded machine.
    """
    from .config import MstConfig, positive_int

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transform expects an nn.Module, got {type(model).__name__}")
    check_budget(budget_gb)
    check_margin(margin)
    if seq_len is not None:
        seq_len = positive_int("seq_len", seq_len)
    batch = positive_int("batch", batch)
    if getattr(model, _STATE, None) is not None:
        raise ValueError("model was already transformed; call mstfx.untransform(model) first")
    clash = sorted(set(planned_options()) & set(backend_options))
    if clash:
        raise ValueError(f"{clash} are set by the plan; change the budget instead (or use mstfx.backend yourself)")
    MstConfig(**backend_options)  # validate the backend options now
    planned = _planning_view(model, config)
    if per_block is None:
        per_block = default_per_block(optimizer, optimizer_in_backward)
    can_ckpt = can_checkpoint(model)
    setup = TrainingSetup(batch=batch, optimizer=optimizer, mixed_precision=mixed_precision, per_block=bool(per_block),
                          optimizer_in_backward=bool(optimizer_in_backward))
    opts = dict(allow_checkpointing=can_ckpt, margin=margin, host_budget_gb=host_budget_gb)
    blocks = None
    if per_block:
        from .per_block import BucketedBlocks

        # finds the blocks now (NoRepeatedBlocksError before any change); installed once the plans fit
        blocks = BucketedBlocks(model, lambda n, s: (batch_bucket_of(n, batch), bucket_of(s, seq_len)))
    if max_chunks is not None:
        opts["max_chunks"] = max_chunks
    # raises before any change; warns (from the caller's line) past the model's position limit
    top = plan_with_setup(planned, seq_len, budget_gb, setup, **opts, positions_stacklevel=2) if seq_len is not None else None
    longest = longest_fitting(planned, budget_gb, setup, **opts)
    if longest < 1:
        plan(planned, 1, budget_gb, setup, **opts)  # raises with the numbers (parameters + optimizer state too large)
    log.info("mstfx.transform: %.3g GiB (batch %d) fits sequences up to S = %d", budget_gb, batch, longest)

    enabled = False
    if blocks is not None:
        blocks.install()
    if top is not None and top.checkpointing and not is_checkpointing(model):
        enable_checkpointing(model)
        enabled = True
    state = TransformState(top, budget_gb, {**opts, "seq_len": seq_len}, model.forward, enabled, longest, planned,
                           longest_by_batch={batch: longest}, blocks=blocks, setup=setup)
    original = model.forward

    def forward(*args, **kwargs):
        n, s = _shape_of(args, kwargs)
        s, n = s or seq_len, n or batch
        if s is None:
            raise ValueError("mstfx.transform: cannot read the sequence length of this input (no input_ids or "
                             "inputs_embeds); pass seq_len= to transform")
        key = (batch_bucket_of(n, batch), bucket_of(s, seq_len))
        entry = state.buckets.get(key)
        if entry is None or entry[0].seq_len < s or entry[0].batch < n:
            p = state.plan_for(s, n)  # raises InfeasibleBudgetError for this B and S before anything runs
            if seq_len is None or s > seq_len:  # the input's own length (not its bucket's top) past the limit
                warn_past_positions(arch_of(planned), s)
            if p.checkpointing and not is_checkpointing(model):
                log.warning("mstfx.transform: B = %d, S = %d needs activation checkpointing within %.3g GiB; "
                            "enabling it (smaller inputs recompile once and are checkpointed too)", n, s, budget_gb)
                enable_checkpointing(model)
                state.enabled_checkpointing = True
            backend = p.backend(**backend_options)
            state.backends.append(backend)
            name = f"bucket_b{key[0]}_{key[1]}_s{p.seq_len}"
            if blocks is not None:
                blocks.add_bucket(key, name, backend)
            state.buckets[key] = (p, _compiled_forward(original, name, backend, per_block=blocks is not None), backend)
            log.info("mstfx: bucket B<=%d, S<=%d planned for B = %d, S = %d: mode %s, mini_sequences %s", key[0],
                     key[1], p.batch, p.seq_len, p.mode, ", ".join(f"{k} {m}" for k, m in p.mini_sequences.items()))
        return state.buckets[key][1](*args, **kwargs)

    model.forward = forward
    setattr(model, _STATE, state)
    return model


class _PlanningView:
    """A model as the planner sees it when its architecture comes from a ``config`` hint: the model's own
    parameters (count, dtype, structure), the hint as its ``.config``."""

    def __init__(self, model: torch.nn.Module, config: Any) -> None:
        self._model = model
        self.config = config if hasattr(config, "to_dict") else _DictConfig(dict(config))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class _DictConfig:
    """A config dict with the ``to_dict`` a config object has (so it is read as a model's own config)."""

    def __init__(self, values: dict) -> None:
        self.values = values

    def to_dict(self) -> dict:
        return dict(self.values)


def _planning_view(model: torch.nn.Module, config: Any) -> Any:
    """What transform plans with: the model itself, or the model with ``config`` as its architecture."""
    if config is not None:
        if not (isinstance(config, dict) or hasattr(config, "to_dict")):
            raise TypeError(f"config must be a dict or a config object with to_dict(), got {type(config).__name__}")
        return _PlanningView(model, config)
    if getattr(model, "config", None) is None:
        raise TypeError(
            f"mstfx.transform cannot read the architecture of this {type(model).__name__}: it has no Hugging Face "
            "'.config'. Pass config={'hidden_size': ..., 'intermediate_size': ..., 'num_hidden_layers': ..., "
            "'num_attention_heads': ..., 'num_key_value_heads': ..., 'vocab_size': ...} to plan from it, or choose "
            "M yourself with mstfx.compile(model, mini_sequences=M) (mstfx.plan(config, seq_len, budget_gb) shows "
            "what a budget needs)")
    return model


def untransform(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`transform`: the original forward, and checkpointing off if transform turned it on."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    model.__dict__.pop("forward", None)
    if state.blocks is not None:
        state.blocks.uninstall()
    if state.enabled_checkpointing:
        disable_checkpointing(model)
    setattr(model, _STATE, None)
    return model
