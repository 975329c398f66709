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
:func:`longest_seq_len` (used by ``mstfx simulate``; keep their signatures).
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from dataclasses import dataclass, field, replace
from typing import Any

import sympy as sp

from .. import model_configs
from ..config import MAX_USER_CHUNKS, check_mini_sequences, is_positive_int, positive_int
from ..model_configs import source as config_source
from ..regions import rules
from ..vocabulary import ChunkForm, Mode, Program
from . import cost_model as cm
from . import offload_cost as offload

#: The unit of every memory budget and figure in mstfx: GiB (2**30 bytes), MiB below 1 GiB.  Arguments
#: keep the ``budget_gb`` spelling; they mean GiB, as ``mstfx simulate --gpu-gb`` does.
GiB = float(1 << 30)
MiB = float(1 << 20)
GB = GiB  # the unit of ``budget_gb`` (kept under this name for callers that convert with it)
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
    "arch_of",
    "cli_main",
    "longest_fitting",
    "longest_seq_len",
    "plan",
    "predict_peak",
    "warn_past_positions",
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
        kept = (f" ({self.min_planned_bytes / GB:.3g} GiB with the {margin:.0%} planning margin on gradients + "
                f"activations; margin=0 plans to the bare prediction)" if margin else "")
        fits = f"the longest sequence that fits {budget_bytes / GB:.3g} GiB is S = {longest}" if longest > 0 else (
            f"no sequence fits {budget_bytes / GB:.3g} GiB (parameters, gradients and optimizer state alone exceed it)"
        )
        super().__init__(
            f"budget {budget_bytes / GB:.3g} GiB cannot be met at S = {seq_len}, batch {batch}: the smallest "
            f"achievable peak (mst with the most chunks, with or without activation checkpointing) is "
            f"{min_peak_bytes / GB:.3g} GiB{kept}; {fits}; use a shorter sequence, a smaller batch or a larger budget"
        )


class InfeasibleHostBudgetError(InfeasibleBudgetError):
    """The GPU budget can be met only with host memory the host budget does not have.

    Attributes besides :class:`InfeasibleBudgetError`'s: ``host_budget_bytes``, ``host_needed_bytes``
    (host memory of the cheapest plan that fits the GPU), ``pinned_bytes`` (its offloaded checkpoints,
    page-locked) and ``mode``."""

    def __init__(self, budget_bytes: float, host_budget_bytes: float, host_needed_bytes: float, pinned_bytes: float,
                 seq_len: int, mode: Mode, gpu_peak_bytes: float, batch: int = 1):
        self.host_budget_bytes = host_budget_bytes
        self.host_needed_bytes = host_needed_bytes
        self.pinned_bytes = pinned_bytes
        self.mode = mode
        ValueError.__init__(
            self,
            f"host budget {host_budget_bytes / GB:.3g} GiB cannot be met at S = {seq_len}, batch {batch}: the only "
            f"plan that fits {budget_bytes / GB:.3g} GiB of GPU memory (mode {mode}, predicted peak "
            f"{gpu_peak_bytes / GB:.3g} GiB) needs {host_needed_bytes / GB:.3g} GiB of host memory "
            f"({pinned_bytes / GB:.3g} GiB of it pinned, for the offloaded checkpoints); give more host memory "
            f"(host_budget_gb / --host-gb), a larger GPU budget, or a shorter sequence",
        )
        self.budget_bytes = budget_bytes
        self.min_peak_bytes = self.min_planned_bytes = gpu_peak_bytes
        self.seq_len = seq_len
        self.longest_seq_len = 0
        self.batch = batch
        self.margin = 0.0


# ---------------------------------------------------------------------------------------------------
# model description


_UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2", "codegen"}
#: model types with a norm on each branch output as well (four norms per decoder layer)
_SANDWICH = {"gemma2", "gemma3", "gemma3_text"}


def _norm_kind(mtype: str) -> str:
    """How the model's norms keep their input for backward (``cost_model.norm_saved``)."""
    if mtype.startswith("gemma"):
        return "rms_fp32"
    return "layer" if mtype in _UNGATED else "rms"


def _module_structure(module: Any, hidden: int, inter: int, vocab: int, layers: int) -> dict:
    """What the module's own weights say (not its class name): whether it ends in a vocab-wide
    projection (an LM head), and whether its MLPs are gated (three h×I projections per layer, or a
    fused h×2I one) or plain (two).  Keys are left out where the weights do not tell."""
    shapes = [tuple(p.shape) for _, p in module.named_parameters() if p.dim() == 2]
    out: dict = {}
    # an LM head is a 2-D [vocab, hidden] weight besides the input embedding (or the tied embedding,
    # which HF's get_output_embeddings() names)
    get_out = getattr(module, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    vocab_weights = sum(1 for sh in shapes if sorted(sh) == sorted((vocab, hidden)))
    out["lm_head"] = head is not None or vocab_weights >= 2
    if inter != hidden and layers > 0:
        per_layer = sum(1 for sh in shapes if sorted(sh) == sorted((hidden, inter))) / layers
        fused = sum(1 for sh in shapes if sorted(sh) == sorted((hidden, 2 * inter))) / layers  # gate_up_proj
        if per_layer == 3 or (per_layer == 1 and fused == 1):
            out["gated"] = True
        elif per_layer == 2:
            out["gated"] = False
    return out


def _config_dict(source: Any) -> tuple[dict, int | None, str]:
    """A config dict (checked by ``mstfx.model_configs.source.check``, as ``mstfx simulate``'s), the exact
    parameter count if ``source`` is a module, and a name for the model when the config has none."""
    params = None
    if hasattr(source, "parameters") and callable(source.parameters):  # an nn.Module
        seen = {id(p): p.numel() for p in source.parameters()}
        params = sum(seen.values())
        cfg = getattr(source, "config", None)
        if cfg is None:
            raise TypeError("plan() needs a model with a Hugging Face-style .config (or pass a config)")
        fallback = type(source).__name__
        source = cfg
    else:
        fallback = ""
    if hasattr(source, "to_dict"):  # a config object that exists: its model_type need not be transformers'
        label = type(source).__name__
        return config_source.check(source.to_dict(), label, known_model_type=False), params, fallback or label
    if isinstance(source, dict):
        return config_source.check(dict(source), "(dict)"), params, fallback or "model (config dict)"
    if isinstance(source, (str, os.PathLike)):
        d, label = config_source.load(source)
        path = os.fspath(source)
        stem = os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "config.json" else path
        return d, params, fallback or os.path.splitext(os.path.basename(stem.rstrip(os.sep)))[0] or label
    raise TypeError(f"expected an nn.Module, a config (dict or HF config) or a path/name, got {type(source).__name__}")


def _headless(architectures: Any) -> bool:
    """Whether a config's ``architectures`` names only classes without a language-model head (a backbone
    such as ``LlamaModel``, a classifier): none of them a causal/masked LM (``...ForCausalLM``,
    ``...LMHeadModel``, ``...ForMaskedLM``) or a generator (``...ForConditionalGeneration``).  Read from
    the config (what the model *is*), never matched against a model's module classes."""
    if not isinstance(architectures, (list, tuple)) or not architectures:
        return False
    return not any("LM" in str(a) or "ConditionalGeneration" in str(a) for a in architectures)


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
    d, params, fallback_name = _config_dict(source)  # checked: every size field present is a positive integer

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
    inter = get("intermediate_size", "n_inner", "ffn_dim") or 4 * h
    # a module's weights decide (a backbone has no LM head; BERT's MLP is not gated); a config alone
    # is read as a causal LM, gated unless its hidden_act / model type says a plain MLP
    structure = _module_structure(source, int(h), int(inter), int(vocab), int(layers)) if params is not None else {}
    gated = structure.get("gated", mtype not in _UNGATED)
    lm_head = structure.get("lm_head", not _headless(d.get("architectures")))
    attn_impl = get("_attn_implementation", "attn_implementation", default="sdpa")
    experts = _int(get("num_local_experts", "num_experts", "n_routed_experts", default=0))
    expert_inter = _int(get("moe_intermediate_size", default=inter))
    moe_layers, shared, shared_gate = _moe_layout(get, int(layers), experts, expert_inter)
    return cm.Arch(
        hidden=int(h), intermediate=int(inter), layers=int(layers), heads=int(heads),
        kv_heads=int(get("num_key_value_heads", default=heads)), head_dim=int(get("head_dim", default=h // heads)),
        vocab=int(vocab), gated=gated, tied=lm_head and bool(get("tie_word_embeddings", default=mtype == "gpt2")),
        params=params, eager_attention=attn_impl == "eager", norm=_norm_kind(mtype), sandwich_norms=mtype in _SANDWICH,
        logit_softcap=bool(get("final_logit_softcapping")),
        plain_causal=_plain_causal(d), lm_head=lm_head,
        experts=experts,
        experts_per_token=_int(get("num_experts_per_tok", "moe_topk", default=0)),
        expert_intermediate=expert_inter,
        name=str(get("_name_or_path", default=mtype) or mtype or fallback_name),
        moe_layers=moe_layers, shared_intermediate=shared, shared_gate=shared_gate,
        **_positions(d),
    )


#: config fields that give the longest sequence a model's positions cover, in the order read
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")


def _positions(d: dict) -> dict:
    """``max_positions`` / ``positions_field`` of :class:`~mstfx.planning.cost_model.Arch` from a config."""
    for key in POSITION_FIELDS:
        value = d.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return dict(max_positions=value, positions_field=key)
    return {}


def warn_past_positions(arch: cm.Arch, seq_len: int, stacklevel: int = 2) -> None:
    """A UserWarning when ``seq_len`` is past the model's position limit (the config's
    ``max_position_embeddings``): the plan's memory holds, but the model was not made for that length
    (learned position embeddings have no row for it; RoPE models extrapolate, often badly)."""
    if arch.max_positions and seq_len > arch.max_positions:
        import warnings

        warnings.warn(
            f"mstfx: S = {seq_len} is past the model's {arch.positions_field} = {arch.max_positions} "
            f"({arch.name or 'the config'}); the plan is for memory only: a model with learned positions fails "
            "there and RoPE models are untested past it (raise the limit in the config, e.g. with RoPE scaling, "
            "if that is what you mean)",
            UserWarning, stacklevel=stacklevel + 1,
        )


def _int(value: Any) -> int:
    """A config's count or width as an int (0 where absent or not a number)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _moe_layout(get, layers: int, experts: int, expert_inter: int) -> tuple[int | None, int, bool]:
    """``(moe_layers, shared_intermediate, shared_gate)`` of :class:`~mstfx.planning.cost_model.Arch`
    from a config's fields, read generically (no model names):

    * which layers are MoE: all, except those listed in ``mlp_only_layers``, off the sparse step
      (``decoder_sparse_step``: layer i is MoE when (i + 1) is a multiple), among the first
      ``first_k_dense_replace`` or off ``moe_layer_freq`` (layer i is MoE when i is a multiple); the
      rest have a dense MLP of ``intermediate_size``;
    * a MoE layer's shared expert: ``shared_expert_intermediate_size`` wide (with a sigmoid gate), or
      ``n_shared_experts`` experts of ``moe_intermediate_size`` (one dense MLP that wide), or none.
    """
    if not experts:
        return None, 0, False
    dense_only = get("mlp_only_layers", default=()) or ()
    dense_only = {_int(i) for i in dense_only} if isinstance(dense_only, (list, tuple, set)) else set()
    step = max(1, _int(get("decoder_sparse_step", default=1)))
    first_dense = _int(get("first_k_dense_replace", default=0))
    freq = max(1, _int(get("moe_layer_freq", default=1)))
    moe = sum(1 for i in range(layers)
              if i not in dense_only and (i + 1) % step == 0 and i >= first_dense and i % freq == 0)
    shared_width = _int(get("shared_expert_intermediate_size", default=0))
    if shared_width:
        return moe, shared_width, True
    return moe, _int(get("n_shared_experts", "num_shared_experts", default=0)) * expert_inter, False


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
    mode: Mode
    #: M per region kind (``mstfx.regions.registry.REGION_KINDS``) the prediction used; 1 = not chunked
    mini_sequences: dict[str, int]
    phases: dict = field(default_factory=dict)


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
    mode: Mode | str = Mode.STANDARD,
    optimizer: str = "none",
    mixed_precision: str | bool | None = None,
    mini_sequences: int | dict[str, int] | None = None,
    program: Program | str = Program.COMPILED,
    chunk_form: ChunkForm | str = ChunkForm.LOOP,
    gpus: int = 1,
    sequence_parallel: int = 1,
) -> Breakdown:
    """Predicted peak of one fwd+bwd (+ optimizer state) of a compiled training step.

    ``config``: an nn.Module, an HF config, a config dict, a config.json path or a preset name.
    ``mode``: a :class:`~mstfx.vocabulary.Mode` or its spelling ("standard", "checkpointing", "mst",
    "mst+checkpointing", "mst+checkpointing+offload"; ``mstfx simulate``'s "ckpt" too).  In the mst modes M defaults to the
    backend's rule; ``mini_sequences`` sets it as ``MstConfig`` does: an int for every chunked region, or
    a dict per region kind (``{"mlp": 8, "lm_head": 16}``; kinds left out follow the rule; 1 = not
    chunked), e.g. a plan's ``mini_sequences``.
    ``program="eager"`` predicts the same step run op by op with FlashAttention (``mstfx simulate``).
    ``chunk_form``: the backend's form of a chunked region (``MstConfig.chunk_form``; plans use the
    default loop form).
    ``gpus``: FSDP over that many GPUs; ``sequence_parallel``: the Ulysses degree N (dividing ``gpus``
    and ``seq_len``): the peak is one GPU's, with S/N tokens outside attention (``cost_model.step_cost``).
    Stable signature: ``mstfx simulate`` compares against it.
    """
    seq_len = positive_int("seq_len", seq_len)
    batch = positive_int("batch", batch)
    mode, program, chunk_form = Mode.parse(mode), cm.cost_program(program), ChunkForm.parse(chunk_form)
    want_mlp, want_head = symbol_chunks(mini_sequences)
    optimizer, mixed_precision = resolve_setup(optimizer, mixed_precision)
    arch = arch_of(config)
    mixed_precision = precision_of(config, mixed_precision)
    prec = cm.Precision.of(mixed_precision)
    chunked = mode.chunked
    par = parallel(arch, gpus, sequence_parallel, seq_len)
    d_mlp, d_head = default_chunks(arch, seq_len * batch // sequence_parallel)
    m_mlp = (want_mlp or d_mlp) if chunked else 1
    m_head = (want_head or d_head) if chunked and arch.lm_head else 1  # a backbone has no LM head to chunk
    cost = cm.step_cost(arch, mode, optimizer, prec, m_mlp, m_head, program, chunk_form, **par)
    vals = {k: cm.evaluate(v, seq_len, batch) for k, v in cost.phases.items()}
    phase = max(vals, key=vals.get)
    params, grads, opt = (float(x) for x in (cost.params, cost.grads, cost.optimizer))
    return Breakdown(params, grads, opt, vals[phase] - grads, params + opt + vals[phase], phase, mode,
                     per_kind(m_mlp, m_head), vals)


def longest_seq_len(
    config: Any,
    budget_gb: float,
    batch: int = 1,
    mode: Mode | str = Mode.MST,
    optimizer: str = "none",
    mixed_precision: str | bool | None = None,
    mini_sequences: int | dict[str, int] | None = None,
    margin: float = 0.0,
    gpus: int = 1,
    sequence_parallel: int = 1,
    program: Program | str = Program.COMPILED,
    per_block: bool = False,
    optimizer_in_backward: bool = False,
) -> int:
    """Longest S whose predicted peak fits ``budget_gb`` (solved with sympy; 0 if none fits).

    ``per_block``, ``optimizer_in_backward``: the per-block program (:func:`per_block_program`).

    ``gpus``, ``sequence_parallel``: as :func:`predict_peak`; S is the whole sequence (a multiple of the
    degree N), each GPU holding S/N of its tokens.  ``program``: as :func:`predict_peak`.

    ``margin``: the fraction of headroom kept on gradients + activations (as :func:`plan`; 0 here, so
    the answer is the cost model's own).

    ``mini_sequences``: M as in :func:`predict_peak` (an int, or a dict per region kind).  In the mst
    modes, for a region M is not given, M follows S by the backend's rule: an MLP chunk is at most
    ``hidden`` tokens, an LM-head chunk max(t·h/V, 256) tokens; each rule's branch is solved on its own.
    """
    budget = check_budget(budget_gb)
    margin = check_margin(margin)
    batch = positive_int("batch", batch)
    mode, program = Mode.parse(mode), cm.cost_program(program)
    want_mlp, want_head = symbol_chunks(mini_sequences)
    optimizer, program_keys = per_block_program(optimizer, per_block, optimizer_in_backward)
    optimizer, mixed_precision = resolve_setup(optimizer, mixed_precision)
    arch = arch_of(config)
    mixed_precision = precision_of(config, mixed_precision)
    prec = cm.Precision.of(mixed_precision)
    chunked = mode.chunked
    par = {**parallel(arch, gpus, sequence_parallel), **program_keys}
    n = par["sequence_parallel"]
    t = cm.B * cm.S  # the rules count a rank's tokens: step_cost turns S into S/N, in M too
    if not chunked:
        return _multiple(cm.longest_s(cm.step_cost(arch, mode, optimizer, prec, 1, 1, program, **par), budget, batch,
                                      margin), n)
    mlp_options = [want_mlp] if want_mlp else [t / arch.hidden]
    head_options = [want_head] if want_head else [sp.Rational(arch.vocab, arch.hidden), t / MIN_HEAD_CHUNK_TOKENS]
    best = None
    for m_mlp in mlp_options:
        for m_head in head_options:
            cost = cm.step_cost(arch, mode, optimizer, prec, m_mlp, m_head, program, **par)
            s = cm.longest_s(cost, budget, batch, margin)
            best = s if best is None else min(best, s)
    return _multiple(int(best), n)


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


def _multiple(s: int, n: int) -> int:
    """``s`` rounded down to a multiple of ``n`` (a sequence split evenly over N ranks)."""
    return s if n == 1 or s >= 2**62 else s - s % n


def parallel(arch: cm.Arch, gpus: Any = 1, sequence_parallel: Any = 1, seq_len: int | None = None) -> dict:
    """``gpus`` and ``sequence_parallel`` checked (:func:`cost_model.check_sequence_parallel`; ``seq_len``
    a multiple of the degree), as the keywords of ``cost_model.step_cost``."""
    gpus = positive_int("gpus", gpus)
    n = positive_int("sequence_parallel", sequence_parallel)
    cm.check_sequence_parallel(arch, n, gpus)
    if seq_len is not None and seq_len % n:
        raise ValueError(f"seq_len={seq_len} must be a multiple of sequence_parallel={n} (each rank holds S/N tokens)")
    return dict(gpus=gpus, sequence_parallel=n)


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
    mode: Mode
    #: M per region kind (``mstfx.regions.registry.REGION_KINDS``, e.g. ``{"mlp": 2, "lm_head": 4, ...}``);
    #: 1 = not chunked
    mini_sequences: dict[str, int]
    checkpointing: bool
    breakdown: Breakdown
    rows: list[PlanRow]
    longest_seq_len: int
    reason: str
    margin: float = 0.0
    #: host memory: offloaded checkpoints (pinned) + optimizer state kept there; None = not limited
    host_bytes: float = 0.0
    pinned_bytes: float = 0.0
    host_budget_bytes: float | None = None
    #: seconds a step's checkpoint copies take on PCIe at ``pcie_gbps`` (0 without offload)
    transfer_seconds: float = 0.0
    pcie_gbps: float = offload.DEFAULT_PCIE_GBPS
    #: FSDP over ``gpus``; Ulysses sequence parallelism of this degree (S/N tokens per GPU)
    gpus: int = 1
    sequence_parallel: int = 1
    #: host memory of one node (``cost_model.GPUS_PER_NODE`` GPUs): its GPUs' ``host_bytes`` together;
    #: the host budget applies to it
    host_node_bytes: float = 0.0

    @property
    def offload(self) -> bool:
        """Whether the plan keeps the checkpoints in host memory."""
        return offload.is_offload(self.mode)

    @property
    def host_fits(self) -> bool:
        return self.host_budget_bytes is None or max(self.host_bytes, self.host_node_bytes) <= self.host_budget_bytes

    @property
    def predicted_peak(self) -> float:
        return self.breakdown.peak

    @property
    def planned_peak(self) -> float:
        """The predicted peak with the planning margin on gradients + activations (what must fit)."""
        b = self.breakdown
        return with_margin(b.params + b.optimizer, b.peak, self.margin)

    @property
    def gpu_fits(self) -> bool:
        return self.planned_peak <= self.budget_bytes

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.host_fits

    def config(self, **options: Any):
        """The :class:`~mstfx.MstConfig` that applies this plan (M per region kind)."""
        from ..config import MstConfig

        from ..regions.registry import REGION_KINDS

        chunked = Mode.parse(self.mode).chunked
        planned: dict[str, Any] = dict(mini_sequences=dict(self.mini_sequences) if chunked else None)
        # a kind with a switch of its own (chunk_mlp, chunk_lm_head) is on where the plan chunks it
        for k in REGION_KINDS:
            if k.switch is not None:
                planned[k.switch] = chunked and self.mini_sequences.get(k.name, 1) > 1
        planned["offload_checkpoints"] = self.offload
        clash = sorted((set(planned) | {"lm_head_chunks"}) & set(options))
        if clash:
            raise ValueError(f"{clash} are set by the plan; change the budget instead (or build MstConfig yourself)")
        return MstConfig(**planned, **options)

    def backend(self, **options: Any):
        """An mst backend configured by this plan."""
        from ..backend import MstBackend

        return MstBackend(self.config(**options))

    def table(self) -> Any:
        from .text_table import new_table

        b = self.breakdown
        title = (
            f"mstfx plan: {self.model}, S = {self.seq_len}, batch {self.batch}, optimizer {self.optimizer}, "
            f"precision {self.mixed_precision or 'fp32'}, mode {self.mode} (memory in GiB = 2^30 bytes)"
        )
        if self.gpus > 1 or self.sequence_parallel > 1:
            title += (f"; per GPU of {self.gpus} (FSDP"
                      + (f", sequence parallel {self.sequence_parallel}: S/{self.sequence_parallel} tokens per GPU"
                         if self.sequence_parallel > 1 else "") + ")")
        tab = new_table(title=title, caption=self.reason)
        for col, just in (("region", "left"), ("shape", "left"), ("activations before", "right"),
                          ("after", "right"), ("M", "right"), ("extra FLOPs (recompute)", "right")):
            tab.add_column(col, justify=just)
        for r in self.rows:
            name = f"{r.region} ×{r.count}" if r.count > 1 else r.region
            tab.add_row(name, r.shape, _fmt_bytes(r.bytes_before), _fmt_bytes(r.bytes_after),
                        str(r.chunks), f"{r.extra_flops:.3g}" if r.extra_flops else "0")
        rest = b.activations - sum(r.bytes_after for r in self.rows)
        # the peak phase's bytes besides the regions' saved ones: the S×S mask, transients, and (negative)
        # the part of the gradients row not yet made at that phase; so the rows add up to the peak
        tab.add_row(f"rest at the peak ({b.phase})", "mask, transients, − grads not yet made",
                    "", ("+" if rest >= 0 else "−") + _fmt_bytes(abs(rest)), "", "")
        tab.add_section()
        tab.add_row("parameters", "", "", _fmt_bytes(b.params), "", "")
        tab.add_row("gradients", "", "", _fmt_bytes(b.grads), "", "")
        tab.add_row(f"optimizer ({self.optimizer})", "", "", _fmt_bytes(b.optimizer), "", "")
        tab.add_row("activation peak (the rows above)", "", "", _fmt_bytes(b.activations), "", "")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        tab.add_row("predicted peak vs budget", "", "", f"{_fmt_bytes(b.peak)} / {_fmt_bytes(self.budget_bytes)}", "", "")
        tab.add_row(f"with {self.margin:.0%} margin on grads + activations", "", "",
                    f"{_fmt_bytes(self.planned_peak)} / {_fmt_bytes(self.budget_bytes)}", verdict, "")
        if self.host_bytes or self.offload:
            tab.add_section()
            limit = "no host budget" if self.host_budget_bytes is None else _fmt_bytes(self.host_budget_bytes)
            tab.add_row("host memory (offloaded checkpoints + optimizer state)", "", "",
                        f"{_fmt_bytes(self.host_bytes)} / {limit}", "fits" if self.host_fits else "DOES NOT FIT", "")
            tab.add_row("  of it pinned (checkpoints)", "", "", _fmt_bytes(self.pinned_bytes), "", "")
            if self.gpus > 1:
                per_node = min(self.gpus, cm.GPUS_PER_NODE)
                tab.add_row(f"host memory per node ({per_node} GPUs)", "", "", f"{_fmt_bytes(self.host_node_bytes)} / {limit}",
                            "fits" if self.host_fits else "DOES NOT FIT", "")
        if self.offload:
            tab.add_row(f"PCIe copies per step (out + back, at a stated {self.pcie_gbps:g} GB/s)", "", "",
                        f"{self.transfer_seconds:.3g} s", "", "")
        return tab

    def __str__(self) -> str:
        from .text_table import render

        return render(self.table())


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


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
    batch: int = 1,
    optimizer: str = "adamw",
    mixed_precision: str | bool | None = None,
    max_chunks: int = MAX_CHUNKS,
    allow_checkpointing: bool = True,
    margin: float = MARGIN,
    host_budget_gb: float | None = None,
    allow_offload: bool = True,
    pcie_gbps: float = offload.DEFAULT_PCIE_GBPS,
    gpus: int = 1,
    sequence_parallel: int = 1,
    per_block: bool = False,
    optimizer_in_backward: bool = False,
) -> Plan:
    """The cheapest plan whose predicted peak fits ``budget_gb`` (see the module doc for the order).

    ``per_block``: plan the per-block program (``mstfx.compile(model, per_block=True)``);
    ``optimizer_in_backward``: its optimizer steps in post-accumulate-grad hooks, so each block's
    gradients leave when its backward ends (:func:`per_block_program`; ``optimizer="paper"`` implies it).

    ``gpus``: FSDP over that many GPUs (parameters, gradients, optimizer state sharded);
    ``sequence_parallel``: Ulysses degree N dividing ``gpus`` and the query heads (each GPU holds S/N
    tokens; attention on the whole S with H/N heads); ``budget_gb`` is per GPU, ``host_budget_gb`` per
    node of ``cost_model.GPUS_PER_NODE`` GPUs.

    ``margin``: headroom kept on the predicted gradients + activations (default :data:`MARGIN`, the
    cost model's measured error bound); 0 plans to the cost model's exact prediction.
    ``host_budget_gb``: host memory (GiB) a plan may use for offloaded checkpoints and optimizer state
    kept there (None: not limited); ``allow_offload``: whether checkpoints may go to host memory at
    all (needs ``allow_checkpointing``); ``pcie_gbps``: the bandwidth (GB/s) the plan's transfer time
    is computed with.
    Warns (UserWarning) when ``seq_len`` is past the config's ``max_position_embeddings``.
    Raises ValueError for a bad budget/length/option, :class:`InfeasibleBudgetError` when even the
    maximal plan does not fit, :class:`InfeasibleHostBudgetError` when only a plan needing more host
    memory than ``host_budget_gb`` fits the GPU.
    """
    return _plan(model_or_config, seq_len, budget_gb, batch, optimizer, mixed_precision, max_chunks,
                 allow_checkpointing, margin, host_budget_gb, allow_offload, pcie_gbps, gpus, sequence_parallel,
                 positions_stacklevel=2, per_block=per_block, optimizer_in_backward=optimizer_in_backward)


def _plan(model_or_config, seq_len, budget_gb, batch=1, optimizer="adamw", mixed_precision=None,
          max_chunks=MAX_CHUNKS, allow_checkpointing=True, margin=MARGIN, host_budget_gb=None, allow_offload=True,
          pcie_gbps=offload.DEFAULT_PCIE_GBPS, gpus=1, sequence_parallel=1, *,
          positions_stacklevel: int | None = None, per_block: bool = False,
          optimizer_in_backward: bool = False) -> Plan:
    """:func:`plan`; ``positions_stacklevel``: warn past the model's position limit
    (:func:`warn_past_positions`), attributed as ``warnings.warn(stacklevel=...)`` would be from the
    caller of this function (2: that caller's caller); None: do not warn."""
    setup = optimizer
    host_budget = None if host_budget_gb is None else check_budget(host_budget_gb)
    pcie_gbps = offload.check_gbps(pcie_gbps)
    budget = check_budget(budget_gb)
    margin = check_margin(margin)
    seq_len = positive_int("seq_len", seq_len)
    batch = positive_int("batch", batch)
    max_chunks = positive_int("max_chunks", max_chunks, cap=MAX_USER_CHUNKS)  # the backend's own cap
    optimizer, program_keys = per_block_program(optimizer, per_block, optimizer_in_backward)
    optimizer, mixed_precision = resolve_setup(optimizer, mixed_precision)
    mixed_precision = precision_of(model_or_config, mixed_precision)
    prec = cm.Precision.of(mixed_precision)
    arch = arch_of(model_or_config)
    if positions_stacklevel is not None:
        warn_past_positions(arch, seq_len, positions_stacklevel + 1)
    par = {**parallel(arch, gpus, sequence_parallel, seq_len), **program_keys}
    tokens = seq_len * batch // par["sequence_parallel"]  # a rank's: what the backend's chunks divide
    cap = max(1, min(max_chunks, tokens))

    short_of_host: list[Plan] = []  # plans that fit the GPU but not the host budget

    def candidate(mode: Mode, m_mlp: int, m_head: int, reason: str) -> Plan | None:
        p = _make_plan(arch, seq_len, batch, budget, optimizer, mixed_precision, prec, mode, m_mlp, m_head, reason,
                       margin, with_longest=False,  # solved below for the plan chosen only (sympy is slow)
                       setup=setup, host_budget=host_budget, pcie_gbps=pcie_gbps, par=par)
        if p.gpu_fits and not p.host_fits:
            short_of_host.append(p)
        return p if p.fits else None

    steps = [Mode.MST] + ([Mode.MST_CHECKPOINTING] if allow_checkpointing else [])
    if allow_checkpointing and allow_offload:
        steps.append(Mode.MST_CHECKPOINTING_OFFLOAD)
    found = candidate(Mode.STANDARD, 1, 1, "fits without chunking")
    if found is None:
        for mode in steps:
            cost = cm.step_cost(arch, mode, optimizer, prec, cm.M_MLP, cm.M_HEAD, **par)
            room = cm.margin_room(float(cost.params + cost.optimizer), budget, margin)
            ck = (" + activation checkpointing" if mode.checkpointed else "") + (
                " + checkpoints in host memory" if mode.offloaded else "")
            # LM head alone (no recompute), then the MLPs too
            if arch.lm_head:
                cost_head = cm.step_cost(arch, mode, optimizer, prec, 1, cm.M_HEAD, **par)
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
        # the most memory-saving plans: everything chunked, and (if allowed) checkpointed as well
        finals = [Mode.MST] + [m for m in steps if m.checkpointed]
        least = min((_make_plan(arch, seq_len, batch, budget, optimizer, mixed_precision, prec, m, cap, cap, "", margin,
                                with_longest=False, par=par) for m in finals), key=lambda p: p.planned_peak)
        longest = longest_fitting(arch, budget / GB, batch, optimizer, mixed_precision, max_chunks, allow_checkpointing,
                                  margin, allow_offload=allow_offload, **par)
        raise InfeasibleBudgetError(budget, least.predicted_peak, seq_len, longest, batch, margin, least.planned_peak)
    found.longest_seq_len = _plan_longest(arch, budget, batch, found.mode, optimizer, mixed_precision,
                                          found.mini_sequences, margin, par)
    return found


def longest_fitting(
    model_or_config: Any,
    budget_gb: float,
    batch: int = 1,
    optimizer: str = "adamw",
    mixed_precision: str | bool | None = None,
    max_chunks: int = MAX_CHUNKS,
    allow_checkpointing: bool = True,
    margin: float = MARGIN,
    allow_offload: bool = True,
    gpus: int = 1,
    sequence_parallel: int = 1,
    per_block: bool = False,
    optimizer_in_backward: bool = False,
    host_budget_gb: float | None = None,
    pcie_gbps: float = offload.DEFAULT_PCIE_GBPS,
) -> int:
    """Longest S that *some* plan fits in ``budget_gb`` (0 if none): the most memory-saving plans, every
    region with ``max_chunks`` mini-sequences, with and (if allowed) without activation checkpointing,
    and with the checkpoints in host memory (if allowed).  It takes :func:`plan`'s keywords, so one set
    of options serves both; ``host_budget_gb`` and ``pcie_gbps`` are checked but do not change the
    answer (the host budget is not solved for here, the bandwidth is a time, not memory)."""
    if host_budget_gb is not None:
        check_budget(host_budget_gb)
    offload.check_gbps(pcie_gbps)
    modes = [Mode.MST] + ([Mode.MST_CHECKPOINTING] if allow_checkpointing else [])
    modes += [Mode.MST_CHECKPOINTING_OFFLOAD] if allow_checkpointing and allow_offload else []
    arch = arch_of(model_or_config)
    mixed_precision = precision_of(model_or_config, mixed_precision)
    return max(longest_seq_len(arch, budget_gb, batch, m, optimizer, mixed_precision, mini_sequences=max_chunks,
                               margin=margin, gpus=gpus, sequence_parallel=sequence_parallel, per_block=per_block,
                               optimizer_in_backward=optimizer_in_backward) for m in modes)


def _plan_longest(arch, budget, batch, mode, optimizer, mixed_precision, mini_sequences: dict[str, int],
                  margin, par: dict | None = None) -> int:
    """Longest S a plan's mode and M per region kind fit in ``budget`` bytes (an M > 1 is held fixed; a
    kind at 1 follows the backend's rule as S grows)."""
    if mode.chunked:
        fixed = {k: m for k, m in mini_sequences.items() if m > 1}
        return longest_seq_len(arch, budget / GB, batch, mode, optimizer, mixed_precision,
                               mini_sequences=fixed or None, margin=margin, **(par or {}))
    return longest_seq_len(arch, budget / GB, batch, mode, optimizer, mixed_precision, margin=margin, **(par or {}))


def _host_terms(arch: cm.Arch, prec: cm.Precision, mode: Mode, setup: str | None, seq_len: int, batch: int,
                host_budget: float | None, pcie_gbps: float, gpus: int = 1, sequence_parallel: int = 1) -> dict:
    """The plan's host-memory fields: pinned checkpoints (offload mode; a rank's S/N tokens), optimizer
    state kept on the host (``setup`` ``offload``; its 1/gpus shard), per GPU and per node (the node's
    GPUs together), the host budget and the PCIe time of one GPU's checkpoint copies."""
    pinned = 0.0
    if mode.offloaded:
        pinned = cm.evaluate(offload.checkpoint_bytes(arch.hidden, arch.layers, prec.act_bytes, cm.S, cm.B),
                             seq_len // sequence_parallel, batch)
    host = pinned + offload.host_state_bytes(arch.n_params, setup or "") / gpus
    return dict(host_bytes=host, pinned_bytes=pinned, host_budget_bytes=host_budget,
                transfer_seconds=offload.transfer_seconds(pinned, pcie_gbps), pcie_gbps=pcie_gbps,
                gpus=gpus, sequence_parallel=sequence_parallel, host_node_bytes=host * min(gpus, cm.GPUS_PER_NODE))


def _make_plan(arch, seq_len, batch, budget, optimizer, mixed_precision, prec, mode, m_mlp, m_head, reason,
               margin: float = 0.0, with_longest: bool = True, setup: str | None = None,
               host_budget: float | None = None, pcie_gbps: float = offload.DEFAULT_PCIE_GBPS,
               par: dict | None = None) -> Plan:
    par = par or {}
    mode = Mode.parse(mode)
    cost = cm.step_cost(arch, mode, optimizer, prec, m_mlp, m_head, **par)
    base = {r.kind: r for r in cm.step_cost(arch, Mode.STANDARD, optimizer, prec, 1, 1, **par).regions}
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
        kept = offload.checkpoints_on_gpu(arch.layers, mode, Program.COMPILED) / arch.layers
        rows = [replace(r, bytes_after=r.bytes_after * kept, shape=f"{r.shape} (host: the rest)")
                if r.region == "checkpointed layer" else r for r in rows]
    longest = _plan_longest(arch, budget, batch, mode, optimizer, mixed_precision, br.mini_sequences, margin, par) \
        if with_longest else 0
    return Plan(arch.name, seq_len, batch, budget, optimizer, mixed_precision, mode, dict(br.mini_sequences),
                mode.checkpointed, br, rows, longest, reason, margin, **_host_terms(arch, prec, mode, setup, seq_len, batch,
                                                                           host_budget, pcie_gbps, par.get("gpus", 1),
                                                                           par.get("sequence_parallel", 1)))


# ---------------------------------------------------------------------------------------------------
# command line


#: exit codes of ``mstfx plan`` (and ``mstfx simulate``): argparse's convention for bad input
EXIT_OK, EXIT_DOES_NOT_FIT, EXIT_BAD_INPUT = 0, 1, 2

#: ``mstfx simulate``'s optimizer setups, as this cost model's (optimizer, mixed precision); the same
#: bytes per parameter (simulate: ``mstfx/tools/simulate.py`` OPTIMIZERS)
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


def _positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not is_positive_int(value):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {text}")
    return value


EXIT_CODES_HELP = "exit status: 0 fits, 1 does not fit the budget, 2 bad input (unknown model, bad config or option)"


def parser() -> argparse.ArgumentParser:
    """The ``mstfx plan`` argument parser (no torch or sympy import: ``--help`` is fast)."""
    ap = argparse.ArgumentParser(
        prog="mstfx plan", description="What mst would chunk (and whether to checkpoint) so one training step "
        "fits a memory budget, from the cost model. Memory is in GiB (2**30 bytes).", epilog=EXIT_CODES_HELP)
    ap.add_argument("--config", "--model", dest="config", required=True, metavar="NAME_OR_PATH",
                    help="model: a config.json path, a model directory, a cached Hugging Face name, or a built-in "
                    f"name ({', '.join(config_source.names())}); --model is the same option")
    ap.add_argument("--seq-len", type=_positive_int_arg, required=True, help="tokens per sequence S")
    ap.add_argument("--budget-gb", type=_positive_float_arg, required=True,
                    help="memory budget of one training step in GiB (2**30 bytes), parameters included")
    ap.add_argument("--batch", type=_positive_int_arg, default=1, help="sequences per step (default 1)")
    ap.add_argument("--optimizer", choices=list(cm.OPTIMIZERS) + list(SETUPS) + list(UNMODELLED_SETUPS), default="adamw",
                    help="optimizer state: adamw, sgd, none (in the model's precision), or one of mstfx simulate's "
                    f"setups {', '.join(SETUPS)} (they fix --mixed-precision); 'paper' is simulate-only (default adamw)")
    ap.add_argument("--mixed-precision", default=None, choices=["fp32", "bf16", "fp16", "amp"],
                    help="fp32 (default), bf16 or fp16 (2-byte weights and activations), amp (bf16 with fp32 master weights)")
    ap.add_argument("--max-chunks", type=_positive_int_arg, default=MAX_CHUNKS,
                    help=f"most mini-sequences per region a plan may use (default {MAX_CHUNKS})")
    ap.add_argument("--no-checkpointing", action="store_true", help="never plan activation checkpointing")
    ap.add_argument("--no-offload", action="store_true", help="never plan checkpoints in host memory")
    ap.add_argument("--host-gb", type=_positive_float_arg, default=None,
                    help="host memory a plan may use in GiB (offloaded checkpoints, pinned, + optimizer state kept "
                    "there; default: not limited)")
    ap.add_argument("--pcie-gbps", type=_positive_float_arg, default=offload.DEFAULT_PCIE_GBPS,
                    help=f"host-GPU bandwidth in GB/s for the offload transfer time (default {offload.DEFAULT_PCIE_GBPS:g}, "
                    "an assumption: PCIe 4.0 x16)")
    ap.add_argument("--gpus", type=_positive_int_arg, default=1,
                    help="GPUs the step runs on (with --strategy fsdp: parameters, gradients and optimizer state sharded "
                    "over all of them); --budget-gb is per GPU (default 1)")
    ap.add_argument("--strategy", default="fsdp", choices=["fsdp"], help="how state is split over --gpus (default fsdp)")
    ap.add_argument("--sequence-parallel", type=_positive_int_arg, default=1, metavar="N",
                    help="Ulysses sequence parallelism of degree N (dividing --gpus, the query heads and --seq-len): "
                    "each GPU holds S/N tokens, attention runs on the whole S with H/N heads (default 1)")
    ap.add_argument("--margin", type=float, default=MARGIN,
                    help=f"headroom kept on predicted grads + activations, in [0, 1) (default {MARGIN}: the cost model's error bound)")
    return ap


def cli_main(argv: list[str] | None = None) -> int:
    """``mstfx plan --config NAME_OR_PATH --seq-len 65536 --budget-gb 70``; exit codes: :data:`EXIT_CODES_HELP`."""
    import sys

    ap = parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse printed the message to stderr
        return int(e.code or 0)
    if args.gpus % args.sequence_parallel:
        ap.print_usage(sys.stderr)
        print(f"mstfx plan: error: --sequence-parallel {args.sequence_parallel} must divide --gpus {args.gpus}",
              file=sys.stderr)
        return EXIT_BAD_INPUT

    from .text_table import render

    try:
        p = plan(args.config, args.seq_len, args.budget_gb, args.batch, args.optimizer, args.mixed_precision,
                 args.max_chunks, not args.no_checkpointing, args.margin, host_budget_gb=args.host_gb,
                 allow_offload=not args.no_offload, pcie_gbps=args.pcie_gbps, gpus=args.gpus,
                 sequence_parallel=args.sequence_parallel)
    except InfeasibleBudgetError as err:
        print(f"mstfx plan: does not fit: {err}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except (ValueError, TypeError) as err:
        print(f"mstfx plan: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(render(p.table(), width=140))
    print(f"longest S that fits with this plan: {p.longest_seq_len}")
    return EXIT_OK
