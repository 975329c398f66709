"""A Hugging Face model or config read as the cost model's :class:`~mstfx.planning.cost_model.Arch`.

Sizes, norms, MoE layout and position limit come from the config's fields (and, for a module, from the
shapes of its own weights), read generically: no model class is matched by name."""

from __future__ import annotations

import os
from typing import Any

from ..model_configs import source as config_source
from . import cost_model as cm


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
