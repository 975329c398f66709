"""Plan: what mst must chunk (and whether to checkpoint) so a training step fits a memory budget.

The planner asks the symbolic cost model (``mstfx.planning.cost_model``) and picks the *cheapest* plan
that fits, in this order of cost:

1. nothing (plain compile),
2. the LM head + loss chunked (no recompute: it is free in FLOPs, a little slower per chunk),
3. the MLPs chunked too (each chunk's up-projection recomputed in backward),
4. activation checkpointing of every layer as well (the whole layer recomputed): first with only the
   LM head chunked, then with the MLPs *inside* the checkpointed layers chunked too (the pass rewrites
   the checkpoint bodies, so a layer's recompute in backward runs its MLP chunk by chunk).

Within a step, each chunked region gets the *fewest* mini-sequences that fit (more chunks, more
kernel launches and passes over the weights), found by solving ``peak(M) <= budget`` for M with sympy,
then rounded up to a count that divides the tokens (equal chunks, see :func:`_even_chunks`).
A budget that even step 4 with the most chunks cannot meet raises :class:`InfeasibleBudgetError`,
whose message gives the smallest achievable peak and the longest S that fits.

Also the stable entry points other tools compare against: :func:`predict_peak` and
:func:`longest_seq_len` (used by ``mstfx simulate``; keep their signatures).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import numbers
import os
from dataclasses import dataclass, field, replace
from typing import Any

import sympy as sp

from .. import model_configs
from ..config import positive_int
from . import cost_model as cm

GB = 1e9
#: The most mini-sequences a plan gives one region: the rewrite unrolls M copies into the graph.
MAX_CHUNKS = 64
#: The default LM-head rule never makes chunks shorter than this (as ``MstConfig``).
MIN_HEAD_CHUNK_TOKENS = 256
#: Headroom a plan keeps on the predicted gradients + activations (the part the cost model estimates;
#: parameters and optimizer state are exact): the model's error over 42 measured CPU points is at most
#: 8.7% (docs/predicted_vs_measured.md), so a plan that fits with 10% to spare fits when measured.
MARGIN = 0.10

__all__ = [
    "Breakdown",
    "InfeasibleBudgetError",
    "Plan",
    "PlanRow",
    "arch_of",
    "cli_main",
    "longest_seq_len",
    "plan",
    "predict_peak",
]


class InfeasibleBudgetError(ValueError):
    """No plan fits the budget, not even every region maximally chunked and every layer checkpointed.

    Attributes: ``budget_bytes``, ``min_peak_bytes`` (smallest achievable peak at ``seq_len``),
    ``seq_len`` and ``longest_seq_len`` (longest S that fits the budget with that maximal plan).
    """

    def __init__(self, budget_bytes: float, min_peak_bytes: float, seq_len: int, longest: int, batch: int = 1,
                 margin: float = 0.0, min_planned_bytes: float | None = None):
        self.budget_bytes = budget_bytes
        self.min_peak_bytes = min_peak_bytes
        self.seq_len = seq_len
        self.longest_seq_len = longest
        self.batch = batch
        self.margin = margin
        self.min_planned_bytes = min_peak_bytes if min_planned_bytes is None else min_planned_bytes
        kept = (f" ({self.min_planned_bytes / GB:.3g} GB with the {margin:.0%} planning margin on gradients + "
                f"activations; margin=0 plans to the bare prediction)" if margin else "")
        fits = f"the longest sequence that fits {budget_bytes / GB:.3g} GB is S = {longest}" if longest > 0 else (
            f"no sequence fits {budget_bytes / GB:.3g} GB (parameters, gradients and optimizer state alone exceed it)"
        )
        super().__init__(
            f"budget {budget_bytes / GB:.3g} GB cannot be met at S = {seq_len}, batch {batch}: the smallest "
            f"achievable peak (mst with the most chunks, with or without activation checkpointing) is "
            f"{min_peak_bytes / GB:.3g} GB{kept}; {fits}; use a shorter sequence, a smaller batch or a larger budget"
        )


# ---------------------------------------------------------------------------------------------------
# model description


_PRESETS = {
    "reference": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=2, num_attention_heads=8,
                      vocab_size=32000, model_type="llama"),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, model_type="gpt2", tie_word_embeddings=True),
}
_UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2", "codegen"}
#: model types with a norm on each branch output as well (four norms per decoder layer)
_SANDWICH = {"gemma2", "gemma3", "gemma3_text"}


def _norm_kind(mtype: str) -> str:
    """How the model's norms keep their input for backward (``cost_model.norm_saved``)."""
    if mtype.startswith("gemma"):
        return "rms_fp32"
    return "layer" if mtype in _UNGATED else "rms"


def _config_dict(source: Any) -> tuple[dict, int | None]:
    """A config dict (and the exact parameter count if ``source`` is a module)."""
    params = None
    if hasattr(source, "parameters") and callable(source.parameters):  # an nn.Module
        seen = {id(p): p.numel() for p in source.parameters()}
        params = sum(seen.values())
        cfg = getattr(source, "config", None)
        if cfg is None:
            raise TypeError("plan() needs a model with a Hugging Face-style .config (or pass a config)")
        source = cfg
    if hasattr(source, "to_dict"):
        return source.to_dict(), params
    if isinstance(source, dict):
        return dict(source), params
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f), params
        if path.lower() in _PRESETS:
            return dict(_PRESETS[path.lower()]), params
        embedded = model_configs.config_text(path)
        if embedded is not None:
            return json.loads(embedded), params
        try:  # a name in the local Hugging Face cache (never downloads)
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(path, local_files_only=True).to_dict(), params
        except Exception as err:
            raise ValueError(
                f"unknown model {path!r}: give a config.json path, a model directory, a cached Hugging Face "
                f"name, or one of {sorted(_PRESETS) + list(model_configs.NAMES)} ({type(err).__name__})"
            ) from None
    raise TypeError(f"expected an nn.Module, a config (dict or HF config) or a path/name, got {type(source).__name__}")


def _plain_causal(d: dict) -> bool:
    """No sliding window or chunked attention on any layer (the attention pass leaves those masks)."""
    types = d.get("layer_types") or []
    if any("sliding" in str(t) or "chunk" in str(t) for t in types):
        return False
    if d.get("attention_chunk_size"):
        return False
    window = d.get("sliding_window")
    return not window or d.get("use_sliding_window") is False


def arch_of(source: Any) -> cm.Arch:
    """:class:`~mstfx.planning.cost_model.Arch` of a model, HF config, config dict, config path or name."""
    if isinstance(source, cm.Arch):
        return source
    d, params = _config_dict(source)
    d = {**d.get("text_config", {}), **{k: v for k, v in d.items() if k != "text_config"}} if "text_config" in d else d

    def get(*keys, default=None):
        for k in keys:
            if d.get(k) is not None:
                return d[k]
        return default

    h = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head")
    vocab = get("vocab_size")
    if None in (h, layers, heads, vocab):
        raise ValueError("config lacks hidden size, layer count, head count or vocab size")
    mtype = str(get("model_type", default=""))
    gated = mtype not in _UNGATED
    inter = get("intermediate_size", "n_inner", "ffn_dim") or 4 * h
    attn_impl = get("_attn_implementation", "attn_implementation", default="sdpa")
    return cm.Arch(
        hidden=int(h), intermediate=int(inter), layers=int(layers), heads=int(heads),
        kv_heads=int(get("num_key_value_heads", default=heads)), head_dim=int(get("head_dim", default=h // heads)),
        vocab=int(vocab), gated=gated, tied=bool(get("tie_word_embeddings", default=mtype == "gpt2")),
        params=params, eager_attention=attn_impl == "eager", norm=_norm_kind(mtype), sandwich_norms=mtype in _SANDWICH,
        logit_softcap=bool(get("final_logit_softcapping")),
        plain_causal=_plain_causal(d),
        name=str(get("_name_or_path", default=mtype) or mtype),
    )


# ---------------------------------------------------------------------------------------------------
# prediction


@dataclass(frozen=True)
class Breakdown:
    """Predicted bytes of one training step.  ``peak = params + grads + optimizer + activations``."""

    params: float
    grads: float
    optimizer: float
    activations: float
    peak: float
    phase: str
    mode: str
    mlp_chunks: int
    lm_head_chunks: int
    phases: dict = field(default_factory=dict)


def default_chunks(arch: cm.Arch, tokens: int) -> tuple[int, int]:
    """M of the backend's default rule (``mstfx.passes.chunk_rule``): MLP ⌈t/h⌉, LM head ⌈V/h⌉ (≥256 tokens)."""
    mlp = max(1, min(math.ceil(tokens / arch.hidden), tokens))
    head = max(1, min(math.ceil(arch.vocab / arch.hidden), math.ceil(tokens / MIN_HEAD_CHUNK_TOKENS), tokens))
    return mlp, head


def check_budget(budget_gb: Any) -> float:
    """Bytes of a budget in GB; ValueError for a non-numeric, NaN, infinite or non-positive one."""
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, numbers.Real):
        raise ValueError(f"budget_gb must be a positive number of gigabytes, got {budget_gb!r}")
    value = float(budget_gb)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"budget_gb must be a positive, finite number of gigabytes, got {budget_gb!r}")
    return value * GB


def check_margin(margin: Any) -> float:
    """The planning margin as a fraction in [0, 1); ValueError otherwise."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not 0 <= float(margin) < 1:
        raise ValueError(f"margin must be a fraction in [0, 1) (0.1 = plan with 10% headroom), got {margin!r}")
    return float(margin)


with_margin = cm.with_margin


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


def predict_peak(
    config: Any,
    seq_len: int,
    batch: int = 1,
    mode: str = "standard",
    optimizer: str = "none",
    mixed_precision: str | bool | None = None,
    mlp_chunks: int | None = None,
    lm_head_chunks: int | None = None,
    program: str = "compiled",
) -> Breakdown:
    """Predicted peak of one fwd+bwd (+ optimizer state) of a compiled training step.

    ``config``: an nn.Module, an HF config, a config dict, a config.json path or a preset name.
    ``mode``: "standard", "checkpointing", "mst", "mst+checkpointing".  In the mst modes M defaults to the
    backend's rule; pass ``mlp_chunks`` / ``lm_head_chunks`` for a plan's numbers (1 = not chunked).
    ``program="eager"`` predicts the same step run op by op with FlashAttention (``mstfx simulate``).
    Stable signature: ``mstfx simulate`` compares against it.
    """
    seq_len = positive_int("seq_len", seq_len)
    batch = positive_int("batch", batch)
    arch = arch_of(config)
    mixed_precision = precision_of(config, mixed_precision)
    prec = cm.Precision.of(mixed_precision)
    chunked, _ = cm.mode_flags(mode)
    d_mlp, d_head = default_chunks(arch, seq_len * batch)
    m_mlp = (mlp_chunks or d_mlp) if chunked else 1
    m_head = (lm_head_chunks or d_head) if chunked else 1
    cost = cm.step_cost(arch, mode, optimizer, prec, m_mlp, m_head, program)
    vals = {k: cm.evaluate(v, seq_len, batch) for k, v in cost.phases.items()}
    phase = max(vals, key=vals.get)
    params, grads, opt = (float(x) for x in (cost.params, cost.grads, cost.optimizer))
    return Breakdown(params, grads, opt, vals[phase] - grads, params + opt + vals[phase], phase, mode, m_mlp, m_head, vals)


def longest_seq_len(
    config: Any,
    budget_gb: float,
    batch: int = 1,
    mode: str = "mst",
    optimizer: str = "none",
    mixed_precision: str | bool | None = None,
    mlp_chunks: int | None = None,
    lm_head_chunks: int | None = None,
    margin: float = 0.0,
) -> int:
    """Longest S whose predicted peak fits ``budget_gb`` (solved with sympy; 0 if none fits).

    ``margin``: the fraction of headroom kept on gradients + activations (as :func:`plan`; 0 here, so
    the answer is the cost model's own).

    In the mst modes with M left ``None``, M follows S by the backend's rule: an MLP chunk is at most
    ``hidden`` tokens, an LM-head chunk max(t·h/V, 256) tokens; each rule's branch is solved on its own.
    """
    budget = check_budget(budget_gb)
    margin = check_margin(margin)
    batch = positive_int("batch", batch)
    arch = arch_of(config)
    mixed_precision = precision_of(config, mixed_precision)
    prec = cm.Precision.of(mixed_precision)
    chunked, _ = cm.mode_flags(mode)
    t = cm.B * cm.S
    if not chunked:
        return cm.longest_s(cm.step_cost(arch, mode, optimizer, prec, 1, 1), budget, batch, margin)
    mlp_options = [mlp_chunks] if mlp_chunks else [t / arch.hidden]
    head_options = [lm_head_chunks] if lm_head_chunks else [sp.Rational(arch.vocab, arch.hidden), t / MIN_HEAD_CHUNK_TOKENS]
    best = None
    for m_mlp in mlp_options:
        for m_head in head_options:
            cost = cm.step_cost(arch, mode, optimizer, prec, m_mlp, m_head)
            s = cm.longest_s(cost, budget, batch, margin)
            best = s if best is None else min(best, s)
    return int(best)


# ---------------------------------------------------------------------------------------------------
# plan


@dataclass(frozen=True)
class PlanRow:
    region: str
    count: int
    shape: str
    bytes_before: float
    bytes_after: float
    chunks: int
    extra_flops: float


@dataclass
class Plan:
    """What mst does for one model, sequence length and budget; pass it to the backend via :meth:`config`."""

    model: str
    seq_len: int
    batch: int
    budget_bytes: float
    optimizer: str
    mixed_precision: Any
    mode: str
    mlp_chunks: int
    lm_head_chunks: int
    checkpointing: bool
    breakdown: Breakdown
    rows: list[PlanRow]
    longest_seq_len: int
    reason: str
    margin: float = 0.0

    @property
    def predicted_peak(self) -> float:
        return self.breakdown.peak

    @property
    def planned_peak(self) -> float:
        """The predicted peak with the planning margin on gradients + activations (what must fit)."""
        b = self.breakdown
        return with_margin(b.params + b.optimizer, b.peak, self.margin)

    @property
    def fits(self) -> bool:
        return self.planned_peak <= self.budget_bytes

    def config(self, **options: Any):
        """The :class:`~mstfx.MstConfig` that applies this plan (M per region kind)."""
        from ..config import MstConfig

        chunked = self.mode.startswith("mst")
        planned = dict(
            mini_sequences=self.mlp_chunks if chunked else None,
            lm_head_chunks=self.lm_head_chunks if chunked else None,
            chunk_mlp=chunked and self.mlp_chunks > 1,
            chunk_lm_head=chunked and self.lm_head_chunks > 1,
        )
        clash = sorted(set(planned) & set(options))
        if clash:
            raise ValueError(f"{clash} are set by the plan; change the budget instead (or build MstConfig yourself)")
        return MstConfig(**planned, **options)

    def backend(self, **options: Any):
        """An mst backend configured by this plan."""
        from ..backend import MstBackend

        return MstBackend(self.config(**options))

    def table(self) -> Any:
        from rich.table import Table

        b = self.breakdown
        title = (
            f"mstfx plan: {self.model}, S = {self.seq_len}, batch {self.batch}, optimizer {self.optimizer}"
            f", mode {self.mode}"
        )
        tab = Table(title=title, caption=self.reason)
        for col, just in (("region", "left"), ("shape", "left"), ("activations before", "right"),
                          ("after", "right"), ("M", "right"), ("extra FLOPs (recompute)", "right")):
            tab.add_column(col, justify=just)
        for r in self.rows:
            name = f"{r.region} ×{r.count}" if r.count > 1 else r.region
            tab.add_row(name, r.shape, _fmt_bytes(r.bytes_before), _fmt_bytes(r.bytes_after),
                        str(r.chunks), f"{r.extra_flops:.3g}" if r.extra_flops else "0")
        tab.add_section()
        tab.add_row("parameters", "", "", _fmt_bytes(b.params), "", "")
        tab.add_row("gradients", "", "", _fmt_bytes(b.grads), "", "")
        tab.add_row(f"optimizer ({self.optimizer})", "", "", _fmt_bytes(b.optimizer), "", "")
        tab.add_row(f"activation peak ({b.phase})", "", "", _fmt_bytes(b.activations), "", "")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        tab.add_row("predicted peak vs budget", "", "", f"{_fmt_bytes(b.peak)} / {_fmt_bytes(self.budget_bytes)}", "", "")
        tab.add_row(f"with {self.margin:.0%} margin on grads + activations", "", "",
                    f"{_fmt_bytes(self.planned_peak)} / {_fmt_bytes(self.budget_bytes)}", verdict, "")
        return tab

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=120, force_terminal=False, color_system=None).print(self.table())
        return buf.getvalue().rstrip()


def _fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.1f} MB"


def _fewest_chunks(cost: cm.StepCost, symbol: sp.Symbol, room: float, seq_len: int, batch: int, cap: int) -> int | None:
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
    return _even_chunks(min(need, cap), seq_len * batch, cap)


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
    batch: int = 1,
    optimizer: str = "adamw",
    mixed_precision: str | bool | None = None,
    max_chunks: int = MAX_CHUNKS,
    allow_checkpointing: bool = True,
    margin: float = MARGIN,
) -> Plan:
    """The cheapest plan whose predicted peak fits ``budget_gb`` (see the module doc for the order).

    ``margin``: headroom kept on the predicted gradients + activations (default :data:`MARGIN`, the
    cost model's measured error bound); 0 plans to the cost model's exact prediction.
    Raises ValueError for a bad budget/length/option and :class:`InfeasibleBudgetError` when even the
    maximal plan does not fit.
    """
    budget = check_budget(budget_gb)
    margin = check_margin(margin)
    seq_len = positive_int("seq_len", seq_len)
    batch = positive_int("batch", batch)
    max_chunks = positive_int("max_chunks", max_chunks)
    if optimizer not in cm.OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {cm.OPTIMIZERS}, got {optimizer!r}")
    mixed_precision = precision_of(model_or_config, mixed_precision)
    prec = cm.Precision.of(mixed_precision)
    arch = arch_of(model_or_config)
    tokens = seq_len * batch
    cap = max(1, min(max_chunks, tokens))

    def candidate(mode: str, m_mlp: int, m_head: int, reason: str) -> Plan | None:
        p = _make_plan(arch, seq_len, batch, budget, optimizer, mixed_precision, prec, mode, m_mlp, m_head, reason, margin)
        return p if p.fits else None

    steps = [("mst", False), ("mst+checkpointing", True)] if allow_checkpointing else [("mst", False)]
    found = candidate("standard", 1, 1, "fits without chunking")
    if found is None:
        for mode, _ in steps:
            cost = cm.step_cost(arch, mode, optimizer, prec, cm.M_MLP, cm.M_HEAD)
            room = cm.margin_room(float(cost.params + cost.optimizer), budget, margin)
            ck = " + activation checkpointing" if mode.endswith("checkpointing") else ""
            # LM head alone (no recompute), then the MLPs too
            cost_head = cm.step_cost(arch, mode, optimizer, prec, 1, cm.M_HEAD)
            m_head = _fewest_chunks(cost_head, cm.M_HEAD, room, seq_len, batch, cap)
            if m_head is not None and (found := candidate(mode, 1, m_head, f"LM head chunked{ck}")):
                break
            m_head = _fewest_chunks(cost, cm.M_HEAD, room, seq_len, batch, cap)
            m_mlp = _fewest_chunks(cost, cm.M_MLP, room, seq_len, batch, cap)
            if m_head is not None and m_mlp is not None:
                if found := candidate(mode, m_mlp, m_head, f"LM head and MLPs chunked{ck}"):
                    break
            # the solve treats regions one at a time; fall back to the most chunks before giving up
            if found := candidate(mode, cap, cap, f"LM head and MLPs maximally chunked{ck}"):
                break
    if found is None:
        # the most memory-saving plans: everything chunked, and (if allowed) checkpointed as well
        finals = [("mst", cap)] + ([("mst+checkpointing", cap)] if allow_checkpointing else [])
        least = min((_make_plan(arch, seq_len, batch, budget, optimizer, mixed_precision, prec, m, mm, cap, "", margin)
                     for m, mm in finals), key=lambda p: p.planned_peak)
        longest = max(longest_seq_len(arch, budget / GB, batch, m, optimizer, mixed_precision, max_chunks, max_chunks,
                                      margin) for m, _ in finals)
        raise InfeasibleBudgetError(budget, least.predicted_peak, seq_len, longest, batch, margin, least.planned_peak)
    return found


def _make_plan(arch, seq_len, batch, budget, optimizer, mixed_precision, prec, mode, m_mlp, m_head, reason,
               margin: float = 0.0) -> Plan:
    cost = cm.step_cost(arch, mode, optimizer, prec, m_mlp, m_head)
    base = {r.kind: r for r in cm.regions(arch, prec, "standard", 1, 1)}
    vals = {k: cm.evaluate(v, seq_len, batch) for k, v in cost.phases.items()}
    phase = max(vals, key=vals.get)
    params, grads, opt = (float(x) for x in (cost.params, cost.grads, cost.optimizer))
    br = Breakdown(params, grads, opt, vals[phase] - grads, params + opt + vals[phase], phase, mode, m_mlp, m_head, vals)
    rows = []
    for r in cost.regions:
        before = base.get(r.kind)
        ev = lambda e: cm.evaluate(e, seq_len, batch) * r.count  # noqa: E731
        rows.append(PlanRow(
            r.kind, r.count, r.shape,
            ev(before.saved) if before is not None else ev(base["attention"].saved + base["mlp"].saved),
            ev(r.saved), int(cm.evaluate(r.chunks, seq_len, batch, m_mlp, m_head)), ev(r.recompute_flops),
        ))
    if mode.endswith("checkpointing"):  # attention/MLP saved bytes are inside the checkpointed layer
        rows = [replace(r, bytes_after=0.0) if r.region in ("attention", "mlp") else r for r in rows]
    longest = longest_seq_len(arch, budget / GB, batch, mode, optimizer, mixed_precision,
                              m_mlp if m_mlp > 1 else None, m_head if m_head > 1 else None, margin) if mode.startswith("mst") \
        else longest_seq_len(arch, budget / GB, batch, mode, optimizer, mixed_precision, margin=margin)
    return Plan(arch.name, seq_len, batch, budget, optimizer, mixed_precision, mode, m_mlp, m_head,
                mode.endswith("checkpointing"), br, rows, longest, reason, margin)


# ---------------------------------------------------------------------------------------------------
# command line


def cli_main(argv: list[str] | None = None) -> int:
    """``mstfx plan --config path/or/name --seq-len 65536 --budget-gb 70``."""
    ap = argparse.ArgumentParser(prog="mstfx plan", description="what mst would chunk to fit a memory budget")
    ap.add_argument("--config", required=True, help=f"config.json, model directory, cached HF name, or {sorted(_PRESETS) + list(model_configs.NAMES)}")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--budget-gb", type=float, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--optimizer", choices=cm.OPTIMIZERS, default="adamw")
    ap.add_argument("--mixed-precision", default=None, help="fp32 (default), bf16, fp16 or amp (fp32 master weights)")
    ap.add_argument("--max-chunks", type=int, default=MAX_CHUNKS)
    ap.add_argument("--no-checkpointing", action="store_true", help="never plan activation checkpointing")
    ap.add_argument("--margin", type=float, default=MARGIN,
                    help=f"headroom on predicted grads + activations (default {MARGIN}: the cost model's error bound)")
    args = ap.parse_args(argv)
    from rich.console import Console

    console = Console(width=140)
    try:
        p = plan(args.config, args.seq_len, args.budget_gb, args.batch, args.optimizer, args.mixed_precision,
                 args.max_chunks, not args.no_checkpointing, args.margin)
    except InfeasibleBudgetError as err:
        console.print(f"[red]infeasible:[/red] {err}")
        return 1
    except (ValueError, TypeError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    console.print(p.table())
    console.print(f"longest S that fits with this plan: {p.longest_seq_len}")
    return 0
