"""Supported Hugging Face causal-LM architectures: tiny builders and the generated support table.

Every entry builds a tiny, randomly initialised model from its config (no download), so the same list
drives the parametrised test (``tests/model/test_architectures.py``) and the table in
``docs/architectures.md``::

    python -m mstfx.tools.architectures            # writes docs/architectures.md
    python -m mstfx.tools.architectures --stdout   # prints it

The table is measured, not typed: each model runs one training step through the ``mst`` backend
(``aot_eager`` compiler), its loss and every gradient are compared with eager, and the regions the
backend chunked or left alone (with the reason) are read from the backend's report.
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mstfx.vocabulary import Action

VOCAB = 256
HIDDEN = 64
#: M for every region in the tests and the table (uneven split of the 96 tokens, so tails are exercised)
MINI_SEQUENCES = 5


def _common(**kw) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        use_cache=False,
        attn_implementation="sdpa",
    )
    base.update(kw)
    return base


@dataclass(frozen=True)
class Architecture:
    """One architecture: how to build it tiny, and what mstfx is expected to do with it."""

    name: str
    family: str  # what is special about it, for the table
    build: Callable[[], torch.nn.Module]
    #: regions expected to be chunked, by kind, in the graph that holds the loss
    expect: dict = field(default_factory=dict)
    #: regions expected to be reported as skipped: list of (kind, substring of the reason)
    expect_skipped: tuple = ()
    note: str = ""


def _hf(config_name: str, model_name: str, seed: int = 0, post: Callable | None = None, **cfg):
    def build():
        import transformers

        config = getattr(transformers, config_name)(**cfg)
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
        if post is not None:
            post(model)
        return model

    return build


def tiny_llama(vocab: int = VOCAB, hidden: int = HIDDEN, inter: int = 176, layers: int = 2, tie: bool = False, **cfg):
    """The tiny Llama of the tests and of the table's ``llama`` rows (4 query / 2 KV heads, seed 0)."""
    return _hf(
        "LlamaConfig",
        "LlamaForCausalLM",
        **_common(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_key_value_heads=2, tie_word_embeddings=tie, **cfg),
    )()


def _gpt2_post(model):
    # HF GPT-2 defaults to loss_type=None and logs a warning inside forward: a Dynamo graph break
    # between the LM head and the loss.  Naming the loss type removes the break.
    model.loss_type = "ForCausalLM"


def _moe_post(model):
    model.config.output_router_logits = False


ARCHITECTURES: list[Architecture] = [
    Architecture("llama", "SwiGLU, untied head", tiny_llama, {"mlp": 2, "lm_head": 1}),
    Architecture("llama-tied", "SwiGLU, tied embeddings", lambda: tiny_llama(tie=True), {"mlp": 2, "lm_head": 1}),
    Architecture(
        "mistral",
        "SwiGLU, sliding window",
        _hf("MistralConfig", "MistralForCausalLM", **_common(intermediate_size=176, num_key_value_heads=2, sliding_window=16)),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "qwen2",
        "SwiGLU, qkv bias",
        _hf("Qwen2Config", "Qwen2ForCausalLM", **_common(intermediate_size=176, num_key_value_heads=2)),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "qwen3",
        "SwiGLU, q/k norm",
        _hf("Qwen3Config", "Qwen3ForCausalLM", **_common(intermediate_size=176, num_key_value_heads=2, head_dim=16)),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "gemma",
        "GeGLU (tanh GELU), tied, scaled embeddings",
        _hf("GemmaConfig", "GemmaForCausalLM", **_common(intermediate_size=176, num_key_value_heads=2, head_dim=16)),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "gemma2",
        "GeGLU, final-logit soft-capping c·tanh(z/c), tied",
        _hf(
            "Gemma2Config",
            "Gemma2ForCausalLM",
            **_common(intermediate_size=176, num_key_value_heads=2, head_dim=16, sliding_window=16, final_logit_softcapping=30.0, attn_implementation="eager"),
        ),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "phi3",
        "fused gate_up projection (chunk on last dim)",
        _hf("Phi3Config", "Phi3ForCausalLM", **_common(intermediate_size=176, num_key_value_heads=2, pad_token_id=0)),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "gpt2",
        "Conv1D (addmm), GELU with bias, tied",
        _hf(
            "GPT2Config",
            "GPT2LMHeadModel",
            post=_gpt2_post,
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=4,
            n_positions=512,
            use_cache=False,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation="sdpa",
        ),
        {"mlp": 2, "lm_head": 1},
        note="needs `model.loss_type = \"ForCausalLM\"` (else HF's warning breaks the graph before the loss)",
    ),
    Architecture(
        "gpt-neox",
        "GELU with bias, parallel residual, untied",
        _hf(
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            **_common(intermediate_size=256, hidden_dropout=0.0, attention_dropout=0.0),
        ),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "olmo2",
        "SwiGLU, post-norm, q/k norm",
        _hf("Olmo2Config", "Olmo2ForCausalLM", **_common(intermediate_size=176, num_key_value_heads=2, pad_token_id=0)),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "cohere",
        "SwiGLU, parallel block, logit scale, tied",
        _hf("CohereConfig", "CohereForCausalLM", **_common(intermediate_size=176, num_key_value_heads=2, logit_scale=0.25, pad_token_id=0)),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "starcoder2",
        "GELU with bias (c_fc/c_proj), untied",
        _hf(
            "Starcoder2Config",
            "Starcoder2ForCausalLM",
            **_common(intermediate_size=256, num_key_value_heads=2, residual_dropout=0.0, embedding_dropout=0.0, tie_word_embeddings=False),
        ),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "granite",
        "SwiGLU, logits divided by logits_scaling, residual multiplier",
        _hf(
            "GraniteConfig",
            "GraniteForCausalLM",
            **_common(intermediate_size=176, num_key_value_heads=2, logits_scaling=4.0, residual_multiplier=0.5, embedding_multiplier=2.0),
        ),
        {"mlp": 2, "lm_head": 1},
    ),
    Architecture(
        "mixtral",
        "sparse MoE (top-2 of 4 experts)",
        _hf(
            "MixtralConfig",
            "MixtralForCausalLM",
            post=_moe_post,
            **_common(intermediate_size=96, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        ),
        {"lm_head": 1, "routed_experts": 2},
    ),
    Architecture(
        "qwen2-moe",
        "sparse MoE + shared expert",
        _hf(
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            post=_moe_post,
            **_common(
                intermediate_size=176,
                moe_intermediate_size=48,
                shared_expert_intermediate_size=176,
                num_key_value_heads=2,
                num_experts=4,
                num_experts_per_tok=2,
            ),
        ),
        {"mlp": 2, "lm_head": 1, "routed_experts": 2},
        note="the shared expert is an MLP region; the routed experts are their own",
    ),
    Architecture(
        "deepseek-v3",
        "MLA attention (low-rank q/kv), routed + shared experts, dense first layer",
        _hf(
            "DeepseekV3Config",
            "DeepseekV3ForCausalLM",
            **_common(
                intermediate_size=176,
                moe_intermediate_size=32,
                num_key_value_heads=4,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                n_group=1,
                topk_group=1,
                first_k_dense_replace=1,
                q_lora_rank=32,
                kv_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
            ),
        ),
        {"mlp": 1, "lm_head": 1, "routed_experts": 1},
        note="its graph writes buffers in place (copy_, scatter_) with unused results: kept, never removed",
    ),
]

BY_NAME = {a.name: a for a in ARCHITECTURES}


# --------------------------------------------------------------------------------------------------
# One step, eager vs mst
# --------------------------------------------------------------------------------------------------
def sample_batch(batch: int = 2, seq: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, ::5] = -100
    return ids, labels


def loss_and_grads(model, ids, labels, compile_backend=None, attention_mask=None):
    model.zero_grad(set_to_none=True)
    fn = lambda i, l, a: model(input_ids=i, labels=l, attention_mask=a).loss  # noqa: E731
    if compile_backend is not None:
        from .measure import fresh_code

        from ..compat import with_tracing_settings

        fn = with_tracing_settings(torch.compile(fresh_code(fn), backend=compile_backend))  # as mstfx.compile
    loss = fn(ids, labels, attention_mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def variant_peaks(model, ids, ref, variants: dict) -> dict:
    """One compiled training step of ``model`` on ``ids`` per variant (label → torch.compile backend), all
    in this process: ``out[label]`` the profiler's peak bytes above the step's start, ``out[label + "
    max|Δ|"]`` the largest difference of the loss and every gradient from ``ref`` (:func:`loss_and_grads`
    of eager), ``out[label + " chunked"]`` the region kinds an mst backend chunked."""
    from .measure import fresh_code, peak_bytes, training_step

    out = {}
    for label, backend in variants.items():
        fn = torch.compile(fresh_code(lambda i: model(input_ids=i, labels=i).loss), backend=backend)
        step = training_step(model, lambda: fn(ids))
        step()  # compile
        out[label], loss = peak_bytes(step)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        out[f"{label} max|Δ|"] = max_diff(ref, (torch.tensor(loss, dtype=ref[0].dtype), grads))
        if not isinstance(backend, str):
            out[f"{label} chunked"] = sorted(str(d.kind) for r in backend.reports for d in r.chunked)
    return out


def max_diff(ref, got) -> float:
    (rl, rg), (gl, gg) = ref, got
    if rg.keys() != gg.keys():
        return float("inf")
    d = (rl - gl).abs().item()
    for k in rg:
        d = max(d, (rg[k] - gg[k]).abs().max().item())
    return d


def run_arch(arch: Architecture, compiler: str = "aot_eager", mini_sequences: int = MINI_SEQUENCES, padding: int = 0, **options):
    """Eager reference and one mst step on the same weights: ``(ref, got, backend)``.

    The batch carries an ``attention_mask``, as every data collator's does: all ones, or with the
    last ``padding`` tokens of the second sequence masked out.
    """
    import mstfx

    model = arch.build()
    model.train()
    ids, labels = sample_batch()
    mask = torch.ones_like(ids)
    if padding:
        mask[1, -padding:] = 0
        labels = labels.clone()
        labels[1, -padding:] = -100
    ref = loss_and_grads(model, ids, labels, attention_mask=mask)
    be = mstfx.backend(compiler=compiler, mini_sequences=mini_sequences, **options)
    got = loss_and_grads(model, ids, labels, be, attention_mask=mask)
    return ref, got, be


def summarize(be) -> tuple[collections.Counter, list]:
    """Chunked region counts by kind, and the skipped decisions, over every graph of one backend."""
    chunked = collections.Counter(d.kind for r in be.reports for d in r.chunked)
    skipped = [d for r in be.reports for d in r.skipped]
    return chunked, skipped


# --------------------------------------------------------------------------------------------------
# The generated table
# --------------------------------------------------------------------------------------------------
def _skip_summary(skipped) -> str:
    """Group skipped decisions by reason (reasons carry node names; keep the part after the node)."""
    reasons = collections.Counter()
    for d in skipped:
        why = d.reason.replace("not an MLP: ", "")
        # drop the leading node name ("linear_3: ...", "mul_2 (mul) is ...") so equal reasons group
        head, sep, rest = why.partition(" ")
        if sep and (":" in head or rest.startswith("(") or rest.startswith("is ") or rest.startswith("feeds ")):
            why = rest.lstrip(": ")
        reasons[f"{d.kind}: {why}"] += 1
    return "; ".join(f"{n}× {r}" for r, n in reasons.most_common())


def _kind_cell(be, kind) -> str:
    """One kind's column: how many of its regions were chunked (and found); "(tied)" for a tied head."""
    # regions found carry their M (rejected candidates of the kind carry none)
    decided = [d for r in be.reports for d in r.decisions if d.kind == kind.name and d.chunks is not None]
    chunked = [d for d in decided if d.action is Action.CHUNKED]
    if kind.name == "lm_head":  # one per model: yes / no
        tied = " (tied)" if any("tied" in d.detail for d in chunked) else ""
        return f"yes{tied}" if chunked else "no"
    return f"{len(chunked)} of {len(decided)} found" if decided else "-"


def table(archs=ARCHITECTURES, compiler: str = "aot_eager") -> str:
    """The support table: a column per region kind of the registry, read from each model's report."""
    import transformers

    from ..regions.registry import REGION_KINDS

    kinds = [k for k in REGION_KINDS if k.name != "lm_head"] + [k for k in REGION_KINDS if k.name == "lm_head"]
    heads = [f"{k.label} chunked" if k.name != "lm_head" else "LM head + loss" for k in kinds]
    rows = [
        "| architecture | what is special | " + " | ".join(heads) + " | logit transforms | max \\|Δ\\| vs eager | left unchanged (reason) |",
        "|---|---|" + "---|" * len(kinds) + "---|---|---|",
    ]
    for arch in archs:
        try:
            ref, got, be = run_arch(arch, compiler)
        except Exception as err:  # noqa: BLE001 - the table must say what failed
            rows.append(f"| {arch.name} | {arch.family} | " + "error | " * len(kinds) + f" | | {type(err).__name__}: {err} |")
            continue
        _, skipped = summarize(be)
        head_chunks = [d for r in be.reports for d in r.chunked if d.kind == "lm_head"]
        transforms = ", ".join(
            sorted({part.split("logit transforms: ")[1] for d in head_chunks for part in d.detail.split(", ") if "logit transforms" in part})
        ) or "-"
        cells = " | ".join(_kind_cell(be, k) for k in kinds)
        left = _skip_summary(skipped)
        if arch.note:
            left = f"{left}<br>note: {arch.note}" if left else f"note: {arch.note}"
        rows.append(
            f"| {arch.name} | {arch.family} | {cells} | {transforms} | {max_diff(ref, got):.1e} | {left.replace('|', '/') or '-'} |"
        )
    header = f"""# Supported architectures

Generated by `python -m mstfx.tools.architectures` (do not edit by hand) with torch {torch.__version__.split('+')[0]},
transformers {transformers.__version__}. Each row is a tiny model built from its Hugging Face config
(hidden {HIDDEN}, 2 layers, vocab {VOCAB}, batch 2 × 48 tokens, every 5th label ignored), run for one
training step through `mstfx.backend(compiler="{compiler}")`; loss and all gradients are compared with eager
on the same weights, and the regions come from the backend's report (`mstfx.explain`). Detection is by
graph structure only; nothing is matched by module or class name.

"""
    return header + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/architectures.md")
    parser.add_argument("--stdout", action="store_true")
    parser.add_argument("--only", nargs="*", help="architecture names (default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    archs = [BY_NAME[n] for n in args.only] if args.only else ARCHITECTURES
    text = table(archs)
    if args.stdout:
        sys.stdout.write(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
