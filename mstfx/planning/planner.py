"""Plan: what mst must chunk (and whether to checkpoint) so a training step fits a memory budget.

The planner asks the symbolic cost model (``mstfx.planning.cost_model``) and picks the *cheapest* plan
that fits, in this order of cost:

1. nothing (plain compile),
2. the LM head + loss chunked (no recompute: it is free in FLOPs, a little slower per chunk),
3. the MLPs chunked too (each chunk's up-projection recomputed in backward),
4. activation checkpointing of every layer as well (the whole layer recomputed): first with only the
   LM head chunked, then with the MLPs *inside* the checkpointed layers chunked too (the pass rewrites
   the checkpoint bodies, so a layer's recompute in backward runs its MLP chunk by chunk),
5. the same with the checkpoints in host memory (``mst+checkpointing+offload``: two PCIe copies of each
   a step, and pinned host memory; ``mstfx/planning/offload_cost.py``), only when nothing above fits.  A
   ``host_budget_gb`` bounds the host memory a plan may use (offloaded checkpoints + optimizer state
   kept there); a plan that fits the GPU but not the host raises :class:`InfeasibleBudgetError`.

Within a step, each chunked region gets the *fewest* mini-sequences that fit (more chunks, more
kernel launches and passes over the weights), found by solving ``peak(M) <= budget`` for M with sympy,
then rounded up to a count that divides the tokens (equal chunks, see :func:`_even_chunks`).
A budget that even step 4 with the most chunks cannot meet raises :class:`InfeasibleBudgetError`,
whose message gives the smallest achievable peak and the longest S that fits.

Also the stable entry points other tools compare against: :func:`predict_peak` and
:func:`longest_seq_len` (used by ``mstfx simulate``; keep their signatures).  Every public function
takes the training step as one :class:`~mstfx.planning.setup.TrainingSetup` or as its fields given
as keywords (one is made of them); the functions below pass the object down.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import sympy as sp

from ..config import MAX_USER_CHUNKS, positive_int
from ..regions import rules
from ..vocabulary import ChunkForm, Mode, Program
from . import cost_model as cm
from . import offload_cost as offload
from .checks import check_budget, check_margin, symbol_chunks
from .errors import InfeasibleBudgetError, InfeasibleHostBudgetError
from .hf_config import arch_of, warn_past_positions
from .plan_table import Breakdown, Plan, PlanRow
from .setup import TrainingSetup, training_setup
from .units import GB, GiB, MiB  # noqa: F401  (the units callers convert with, read as planner.GiB)

#: The most mini-sequences a plan gives one region: the largest M a user may ask for.  With the
#: default loop form (``MstConfig.chunk_form = "loop"``) compile work does not depend on M, so the
#: plan is not held back for compile time (it was 64 while every form unrolled M copies).
MAX_CHUNKS = MAX_USER_CHUNKS
#: The default LM-head rule never makes chunks shorter than this (as ``MstConfig``).
MIN_HEAD_CHUNK_TOKENS = rules.MIN_LM_HEAD_CHUNK_TOKENS
#: Headroom a plan keeps on the predicted gradients + activations (the part the cost model estimates;
#: parameters and optimizer state are exact): the model's measured CPU error is within 10% (9.8% worst,
#: docs/planning.md).
MARGIN = 0.10

__all__ = [
    "Breakdown",
    "InfeasibleBudgetError",
    "InfeasibleHostBudgetError",
    "Plan",
    "PlanRow",
    "TrainingSetup",
    "arch_of",
    "longest_fitting",
    "longest_seq_len",
    "plan",
    "plan_with_setup",
    "predict_peak",
    "warn_past_positions",
]


# ---------------------------------------------------------------------------------------------------
# prediction


def default_chunks(arch: cm.Arch, tokens: int) -> tuple[int, int]:
    """M of the backend's default rules (``mstfx.regions.rules``): MLP ⌈t/h⌉, LM head ⌈V/h⌉ (no chunk under 256 tokens),
    capped at the tokens as the backend does."""
    mlp = min(rules.mlp_rule(tokens, arch.hidden), tokens)
    head = min(rules.lm_head_rule(tokens, arch.hidden, arch.vocab), tokens)
    return max(1, mlp), max(1, head)


def per_kind(m_mlp: int, m_head: int) -> dict[str, int]:
    """M per region kind from the cost model's two M symbols: each kind of
    ``mstfx.regions.registry.REGION_KINDS`` takes the M of its ``cost_symbol`` ("M_mlp" or "M_head")."""
    from ..regions.registry import REGION_KINDS

    return {k.name: m_head if k.cost_symbol == "M_head" else m_mlp for k in REGION_KINDS}

def predict_peak(
    config: Any,
    seq_len: int,
    setup: TrainingSetup | None = None,
    *,
    mode: Mode | str = Mode.STANDARD,
    mini_sequences: int | dict[str, int] | None = None,
    chunk_form: ChunkForm | str = ChunkForm.LOOP,
    **setup_fields: Any,
) -> Breakdown:
    """Predicted peak of one fwd+bwd (+ optimizer state) of a compiled training step.

    ``config``: an nn.Module, an HF config, a config dict, a config.json path or a preset name.
    ``setup``: the :class:`TrainingSetup`, or its fields as keywords (``batch=2, optimizer="adamw"``;
    here ``optimizer`` defaults to ``"none"``): ``program="eager"`` predicts the step run op by op with
    FlashAttention (``mstfx simulate``); ``gpus``: FSDP over that many GPUs; ``sequence_parallel``: the
    Ulysses degree N (dividing ``gpus`` and ``seq_len``): the peak is one GPU's, with S/N tokens outside
    attention (``cost_model.step_cost``); ``per_block``, ``optimizer_in_backward``: the per-block program
    (as :func:`plan`).
    ``mode``: a :class:`~mstfx.vocabulary.Mode` or its spelling ("standard", "checkpointing", "mst",
    "mst+checkpointing", "mst+checkpointing+offload"; ``mstfx simulate``'s "ckpt" too).  In the mst modes M defaults to the
    backend's rule; ``mini_sequences`` sets it as ``MstConfig`` does: an int for every chunked region, or
    a dict per region kind (``{"mlp": 8, "lm_head": 16}``; kinds left out follow the rule; 1 = not
    chunked), e.g. a plan's ``mini_sequences``.
    ``chunk_form``: the backend's form of a chunked region (``MstConfig.chunk_form``; plans use the
    default loop form).
    Stable entry point: ``mstfx simulate`` compares against it.
    """
    setup = training_setup(setup, setup_fields, "predict_peak", optimizer="none")
    seq_len = positive_int("seq_len", seq_len)
    mode, chunk_form = Mode.parse(mode), ChunkForm.parse(chunk_form)
    want_mlp, want_head = symbol_chunks(mini_sequences)
    arch = arch_of(config)
    setup = setup.for_model(config)
    setup.check_parallel(arch, seq_len)
    chunked = mode.chunked
    d_mlp, d_head = default_chunks(arch, setup.tokens(seq_len))
    m_mlp = (want_mlp or d_mlp) if chunked else 1
    m_head = (want_head or d_head) if chunked and arch.lm_head else 1  # a backbone has no LM head to chunk
    cost = setup.step_cost(arch, mode, m_mlp, m_head, chunk_form)
    vals = {k: cm.evaluate(v, seq_len, setup.batch) for k, v in cost.phases.items()}
    phase = max(vals, key=vals.get)
    params, grads, opt = (float(x) for x in (cost.params, cost.grads, cost.optimizer))
    return Breakdown(params, grads, opt, vals[phase] - grads, params + opt + vals[phase], phase, mode,
                     per_kind(m_mlp, m_head), vals)


def longest_seq_len(
    config: Any,
    budget_gb: float,
    setup: TrainingSetup | None = None,
    *,
    mode: Mode | str = Mode.MST,
    mini_sequences: int | dict[str, int] | None = None,
    margin: float = 0.0,
    **setup_fields: Any,
) -> int:
    """Longest S whose predicted peak fits ``budget_gb`` (solved with sympy; 0 if none fits).

    ``setup``: the :class:`TrainingSetup`, or its fields as keywords, as in :func:`predict_peak`
    (``optimizer`` defaults to ``"none"``); with ``sequence_parallel`` N, S is the whole sequence (a
    multiple of N), each GPU holding S/N of its tokens.

    ``margin``: the fraction of headroom kept on gradients + activations (as :func:`plan`; 0 here, so
    the answer is the cost model's own).

    ``mini_sequences``: M as in :func:`predict_peak` (an int, or a dict per region kind).  In the mst
    modes, for a region M is not given, M follows S by the backend's rule: an MLP chunk is at most
    ``hidden`` tokens, an LM-head chunk max(t·h/V, 256) tokens; each rule's branch is solved on its own.
    """
    setup = training_setup(setup, setup_fields, "longest_seq_len", optimizer="none")
    budget = check_budget(budget_gb)
    margin = check_margin(margin)
    arch = arch_of(config)
    return _longest_seq_len(arch, budget, setup.for_model(config), Mode.parse(mode), mini_sequences, margin)


def _longest_seq_len(arch: cm.Arch, budget: float, setup: TrainingSetup, mode: Mode,
                     mini_sequences: int | dict[str, int] | None, margin: float) -> int:
    """:func:`longest_seq_len` of ``budget`` bytes for a checked setup (its precision the model's)."""
    want_mlp, want_head = symbol_chunks(mini_sequences)
    setup.check_parallel(arch)
    n, batch = setup.sequence_parallel, setup.batch
    t = cm.B * cm.S  # the rules count a rank's tokens: step_cost turns S into S/N, in M too
    if not mode.chunked:
        return _multiple(cm.longest_s(setup.step_cost(arch, mode, 1, 1), budget, batch, margin), n)
    mlp_options = [want_mlp] if want_mlp else [t / arch.hidden]
    head_options = [want_head] if want_head else [sp.Rational(arch.vocab, arch.hidden), t / MIN_HEAD_CHUNK_TOKENS]
    best = None
    for m_mlp in mlp_options:
        for m_head in head_options:
            s = cm.longest_s(setup.step_cost(arch, mode, m_mlp, m_head), budget, batch, margin)
            best = s if best is None else min(best, s)
    return _multiple(int(best), n)

def _multiple(s: int, n: int) -> int:
    """``s`` rounded down to a multiple of ``n`` (a sequence split evenly over N ranks)."""
    return s if n == 1 or s >= 2**62 else s - s % n

def _fewest_chunks(cost: cm.StepCost, symbol: sp.Symbol, room: float, seq_len: int, batch: int, cap: int,
                   tokens: int | None = None) -> int | None:
    """Smallest integer M in [2, cap] with every phase that depends on M within ``room`` (None if none),
    rounded up to equal chunks (:func:`_even_chunks`).

    Each such phase is a(S) + k(S)/M; at a given S, solving ``phase = room`` for M gives the bound.
    """
    need = 2
    for expr in cost.phases.values():
        e = expr.subs({cm.S: seq_len, cm.B: batch})
        if symbol not in e.free_symbols:
            continue
        others = e.free_symbols - {symbol}
        e = e.subs({o: cap for o in others})  # other region at its most: only this one's bound matters here
        if float(e.subs(symbol, cap)) > room:
            return None
        if float(e.subs(symbol, need)) <= room:
            continue
        roots = [complex(r).real for r in sp.solve(sp.Eq(e, room), symbol) if abs(complex(r).imag) < 1e-9]
        need = max(need, math.ceil(max(roots) - 1e-9))
    return _even_chunks(min(need, cap), seq_len * batch if tokens is None else tokens, cap)


def _even_chunks(m: int, tokens: int, cap: int) -> int:
    """The smallest M >= m that divides ``tokens`` (equal chunks), if one is within ``cap``; else m.

    Uneven chunks come in two sizes, and Inductor's buffer-reuse pool then keeps the buffers of both
    alive through the next attention backward (measured: 9 chunk buffers at M = 3 for S = 4096 instead
    of 6 at M = 4), which the cost model does not count.
    """
    return next((k for k in range(m, cap + 1) if tokens % k == 0), m)


def plan(
    model_or_config: Any,
    seq_len: int,
    budget_gb: float,
    setup: TrainingSetup | None = None,
    *,
    max_chunks: int = MAX_CHUNKS,
    allow_checkpointing: bool = True,
    margin: float = MARGIN,
    host_budget_gb: float | None = None,
    allow_offload: bool = True,
    pcie_gbps: float = offload.DEFAULT_PCIE_GBPS,
    **setup_fields: Any,
) -> Plan:
    """The cheapest plan whose predicted peak fits ``budget_gb`` (see the module doc for the order).

    ``setup``: what is trained and how, a :class:`TrainingSetup`; or its fields as keywords
    (``batch=1, optimizer="adamw", mixed_precision=None, gpus=1, sequence_parallel=1, per_block=False,
    optimizer_in_backward=False``), from which one is made.  ``per_block``: plan the per-block program
    (``mstfx.compile(model, per_block=True)``); ``optimizer_in_backward``: its optimizer steps in
    post-accumulate-grad hooks, so each block's gradients leave when its backward ends
    (``checks.per_block_program``; ``optimizer="paper"`` implies it).  ``gpus``: FSDP over that many GPUs
    (parameters, gradients, optimizer state sharded); ``sequence_parallel``: Ulysses degree N dividing
    ``gpus`` and the query heads (each GPU holds S/N tokens; attention on the whole S with H/N heads);
    ``budget_gb`` is per GPU, ``host_budget_gb`` per node of ``cost_model.GPUS_PER_NODE`` GPUs.  A plan
    is for the compiled program (``program="compiled"``).

    ``max_chunks``: the most mini-sequences a region may get.
    ``margin``: headroom kept on the predicted gradients + activations (default :data:`MARGIN`, the
    cost model's measured error bound); 0 plans to the cost model's exact prediction.
    ``host_budget_gb``: host memory (GiB) a plan may use for offloaded checkpoints and optimizer state
    kept there (None: not limited); ``allow_offload``: whether checkpoints may go to host memory at
    all (needs ``allow_checkpointing``); ``pcie_gbps``: the bandwidth (GB/s) the plan's transfer time
    is computed with.
    Warns (UserWarning) when ``seq_len`` is past the config's ``max_position_embeddings``.
    Raises ValueError for a bad budget/length/option, TypeError for ``setup`` and setup fields given
    together, :class:`InfeasibleBudgetError` when even the maximal plan does not fit,
    :class:`InfeasibleHostBudgetError` when only a plan needing more host memory than ``host_budget_gb``
    fits the GPU.
    """
    setup = training_setup(setup, setup_fields, "plan")
    return plan_with_setup(model_or_config, seq_len, budget_gb, setup, max_chunks=max_chunks,
                 allow_checkpointing=allow_checkpointing, margin=margin, host_budget_gb=host_budget_gb,
                 allow_offload=allow_offload, pcie_gbps=pcie_gbps, positions_stacklevel=2)


def _planned_program(setup: TrainingSetup, caller: str) -> None:
    """ValueError unless ``setup`` is of the compiled program: a plan configures the mst backend."""
    if setup.program is not Program.COMPILED:
        raise ValueError(f"{caller}() plans the compiled program (program='compiled'), got program="
                         f"{str(setup.program)!r}; predict_peak and longest_seq_len take the eager one")


def plan_with_setup(model_or_config, seq_len, budget_gb, setup: TrainingSetup, *, max_chunks=MAX_CHUNKS,
                    allow_checkpointing=True, margin=MARGIN, host_budget_gb=None, allow_offload=True,
                    pcie_gbps=offload.DEFAULT_PCIE_GBPS, positions_stacklevel: int | None = None) -> Plan:
    """:func:`plan` of a checked ``setup`` (what ``mstfx.transform`` calls per bucket: one setup, no
    keyword fields to sort out); ``positions_stacklevel``: warn past the model's position limit
    (:func:`warn_past_positions`), attributed as ``warnings.warn(stacklevel=...)`` would be from the
    caller of this function (2: that caller's caller); None: do not warn."""
    _planned_program(setup, "plan")
    host_budget = None if host_budget_gb is None else check_budget(host_budget_gb)
    pcie_gbps = offload.check_gbps(pcie_gbps)
    budget = check_budget(budget_gb)
    margin = check_margin(margin)
    seq_len = positive_int("seq_len", seq_len)
    max_chunks = positive_int("max_chunks", max_chunks, cap=MAX_USER_CHUNKS)  # the backend's own cap
    setup = setup.for_model(model_or_config)
    arch = arch_of(model_or_config)
    if positions_stacklevel is not None:
        warn_past_positions(arch, seq_len, positions_stacklevel + 1)
    setup.check_parallel(arch, seq_len)
    batch = setup.batch
    tokens = setup.tokens(seq_len)  # a rank's: what the backend's chunks divide
    cap = max(1, min(max_chunks, tokens))

    short_of_host: list[Plan] = []  # plans that fit the GPU but not the host budget

    def candidate(mode: Mode, m_mlp: int, m_head: int, reason: str) -> Plan | None:
        p = _make_plan(arch, seq_len, budget, setup, mode, m_mlp, m_head, reason, margin,
                       with_longest=False,  # solved below for the plan chosen only (sympy is slow)
                       host_budget=host_budget, pcie_gbps=pcie_gbps)
        if p.gpu_fits and not p.host_fits:
            short_of_host.append(p)
        return p if p.fits else None

    steps = _chunked_modes(allow_checkpointing, allow_offload)
    found = candidate(Mode.STANDARD, 1, 1, "fits without chunking")
    if found is None:
        for mode in steps:
            cost = setup.step_cost(arch, mode, cm.M_MLP, cm.M_HEAD)
            room = cm.margin_room(float(cost.params + cost.optimizer), budget, margin)
            ck = (" + activation checkpointing" if mode.checkpointed else "") + (
                " + checkpoints in host memory" if mode.offloaded else "")
            # LM head alone (no recompute), then the MLPs too
            if arch.lm_head:
                cost_head = setup.step_cost(arch, mode, 1, cm.M_HEAD)
                m_head = _fewest_chunks(cost_head, cm.M_HEAD, room, seq_len, batch, cap, tokens)
                if m_head is not None and (found := candidate(mode, 1, m_head, f"LM head chunked{ck}")):
                    break
                m_head = _fewest_chunks(cost, cm.M_HEAD, room, seq_len, batch, cap, tokens)
            else:
                m_head = 1  # a backbone: no LM head to chunk
            what = "LM head and MLPs" if arch.lm_head else "MLPs"
            m_mlp = _fewest_chunks(cost, cm.M_MLP, room, seq_len, batch, cap, tokens)
            if m_head is not None and m_mlp is not None:
                if found := candidate(mode, m_mlp, m_head, f"{what} chunked{ck}"):
                    break
            # the solve treats regions one at a time; fall back to the most chunks before giving up
            if found := candidate(mode, cap, cap if arch.lm_head else 1, f"{what} maximally chunked{ck}"):
                break
    if found is None and short_of_host:
        p = min(short_of_host, key=lambda p: p.host_bytes)
        raise InfeasibleHostBudgetError(budget, host_budget, p.host_bytes, p.pinned_bytes, seq_len, p.mode,
                                        p.predicted_peak, batch)
    if found is None:
        # the most memory-saving plans: everything chunked, in every mode tried
        least = min((_make_plan(arch, seq_len, budget, setup, m, cap, cap, "", margin, with_longest=False)
                     for m in steps), key=lambda p: p.planned_peak)
        longest = _longest_fitting(arch, budget, setup, max_chunks, allow_checkpointing, margin, allow_offload)
        raise InfeasibleBudgetError(budget, least.predicted_peak, seq_len, longest, batch, margin, least.planned_peak)
    found.longest_seq_len = _plan_longest(arch, budget, setup, found.mode, found.mini_sequences, margin)
    return found


def longest_fitting(
    model_or_config: Any,
    budget_gb: float,
    setup: TrainingSetup | None = None,
    *,
    max_chunks: int = MAX_CHUNKS,
    allow_checkpointing: bool = True,
    margin: float = MARGIN,
    allow_offload: bool = True,
    host_budget_gb: float | None = None,
    pcie_gbps: float = offload.DEFAULT_PCIE_GBPS,
    **setup_fields: Any,
) -> int:
    """Longest S that *some* plan fits in ``budget_gb`` (0 if none): the most memory-saving plans, every
    region with ``max_chunks`` mini-sequences, with and (if allowed) without activation checkpointing,
    and with the checkpoints in host memory (if allowed).  It takes :func:`plan`'s setup and keywords, so
    one set of options serves both; ``host_budget_gb`` and ``pcie_gbps`` are checked but do not change
    the answer (the host budget is not solved for here, the bandwidth is a time, not memory)."""
    setup = training_setup(setup, setup_fields, "longest_fitting")
    _planned_program(setup, "longest_fitting")
    if host_budget_gb is not None:
        check_budget(host_budget_gb)
    offload.check_gbps(pcie_gbps)
    budget = check_budget(budget_gb)
    margin = check_margin(margin)
    arch = arch_of(model_or_config)
    return _longest_fitting(arch, budget, setup.for_model(model_or_config), max_chunks, allow_checkpointing, margin,
                            allow_offload)


def _longest_fitting(arch: cm.Arch, budget: float, setup: TrainingSetup, max_chunks: int, allow_checkpointing: bool,
                     margin: float, allow_offload: bool) -> int:
    """:func:`longest_fitting` of ``budget`` bytes for a checked setup (its precision the model's)."""
    return max(_longest_seq_len(arch, budget, setup, m, max_chunks, margin)
               for m in _chunked_modes(allow_checkpointing, allow_offload))


def _chunked_modes(allow_checkpointing: bool, allow_offload: bool) -> list[Mode]:
    """The chunked modes a plan tries, cheapest first: mst, then with checkpointing, then with the
    checkpoints in host memory (offload needs checkpointing)."""
    modes = [Mode.MST] + ([Mode.MST_CHECKPOINTING] if allow_checkpointing else [])
    return modes + ([Mode.MST_CHECKPOINTING_OFFLOAD] if allow_checkpointing and allow_offload else [])


def _plan_longest(arch: cm.Arch, budget: float, setup: TrainingSetup, mode: Mode, mini_sequences: dict[str, int],
                  margin: float) -> int:
    """Longest S a plan's mode and M per region kind fit in ``budget`` bytes (an M > 1 is held fixed; a
    kind at 1 follows the backend's rule as S grows)."""
    fixed = {k: m for k, m in mini_sequences.items() if m > 1} if mode.chunked else {}
    return _longest_seq_len(arch, budget, setup, mode, fixed or None, margin)


def _host_terms(arch: cm.Arch, setup: TrainingSetup, mode: Mode, seq_len: int, host_budget: float | None,
                pcie_gbps: float) -> dict:
    """The plan's host-memory fields: pinned checkpoints (offload mode; a rank's S/N tokens), optimizer
    state kept on the host (optimizer setup ``offload``; its 1/gpus shard), per GPU and per node (the
    node's GPUs together), the host budget and the PCIe time of one GPU's checkpoint copies."""
    gpus, n = setup.gpus, setup.sequence_parallel
    pinned = 0.0
    if mode.offloaded:
        pinned = cm.evaluate(offload.checkpoint_bytes(arch.hidden, arch.layers, setup.element_bytes.act_bytes, cm.S,
                                                      cm.B), seq_len // n, setup.batch)
    host = pinned + offload.host_state_bytes(arch.n_params, setup.optimizer) / gpus
    return dict(host_bytes=host, pinned_bytes=pinned, host_budget_bytes=host_budget,
                transfer_seconds=offload.transfer_seconds(pinned, pcie_gbps), pcie_gbps=pcie_gbps,
                gpus=gpus, sequence_parallel=n, host_node_bytes=host * min(gpus, cm.GPUS_PER_NODE))


def _make_plan(arch: cm.Arch, seq_len: int, budget: float, setup: TrainingSetup, mode: Mode, m_mlp: int, m_head: int,
               reason: str, margin: float = 0.0, with_longest: bool = True, host_budget: float | None = None,
               pcie_gbps: float = offload.DEFAULT_PCIE_GBPS) -> Plan:
    batch = setup.batch
    cost = setup.step_cost(arch, mode, m_mlp, m_head)
    base = {r.kind: r for r in setup.step_cost(arch, Mode.STANDARD, 1, 1).regions}
    vals = {k: cm.evaluate(v, seq_len, batch) for k, v in cost.phases.items()}
    phase = max(vals, key=vals.get)
    params, grads, opt = (float(x) for x in (cost.params, cost.grads, cost.optimizer))
    br = Breakdown(params, grads, opt, vals[phase] - grads, params + opt + vals[phase], phase, mode,
                   per_kind(m_mlp, m_head), vals)
    rows = []
    for r in cost.regions:
        if r.count == 0:  # a region kind the model does not have (a backbone's LM head)
            continue
        before = base.get(r.kind)
        ev = lambda e: cm.evaluate(e, seq_len, batch) * r.count  # noqa: E731
        # a checkpointed layer's "before": what every layer's regions save (each by its count of layers)
        layers_before = sum(cm.evaluate(b.saved, seq_len, batch) * b.count for b in base.values() if b.kind != "lm_head")
        rows.append(PlanRow(
            r.kind, r.count, r.shape,
            ev(before.saved) if before is not None else layers_before,
            ev(r.saved), int(cm.evaluate(r.chunks, seq_len, batch, m_mlp, m_head)), ev(r.recompute_flops),
        ))
    if mode.checkpointed:  # a layer's regions' saved bytes are inside the checkpointed layer
        rows = [replace(r, bytes_after=0.0) if r.region not in ("checkpointed layer", "lm_head") else r for r in rows]
    if mode.offloaded:  # the GPU keeps only the checkpoints in use; the rest are in host memory
        kept = offload.checkpoints_on_gpu(arch.layers, mode, setup.program) / arch.layers
        rows = [replace(r, bytes_after=r.bytes_after * kept, shape=f"{r.shape} (host: the rest)")
                if r.region == "checkpointed layer" else r for r in rows]
    longest = _plan_longest(arch, budget, setup, mode, br.mini_sequences, margin) if with_longest else 0
    return Plan(arch.name, seq_len, batch, budget, setup.cost_optimizer, setup.cost_precision, mode,
                dict(br.mini_sequences), mode.checkpointed, br, rows, longest, reason, margin,
                **_host_terms(arch, setup, mode, seq_len, host_budget, pcie_gbps))
