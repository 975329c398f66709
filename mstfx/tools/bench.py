"""``mstfx bench``: peak memory and step time of one training step, for every way users train today.

Variants, all on the same model and weights, in one process: eager, eager + gradient checkpointing,
Inductor on the model (logits escape), Inductor on the loss function, Inductor with its
``auto_chunker``, mst, mst + gradient checkpointing.  Ratios are to Inductor on the loss function
(time) and to Inductor on the model (memory).  Memory in MiB (2^20 bytes).  ``--sweep`` measures
against the sequence length instead (:mod:`mstfx.tools.sweep`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..hf_checkpointing import enable_checkpointing
from ..vocabulary import ChunkForm
from .measure import peak_bytes, step_seconds, training_step
from .progress import Progress, quiet_library_warnings

VARIANTS = ["eager", "eager+ckpt", "eager-mst", "inductor(model)", "inductor", "inductor+auto_chunker", "mst", "mst+ckpt",
            "mst-unrolled", "mst-unrolled+ckpt"]
#: the unrolled form (``MstConfig(chunk_form="unrolled")``) only on request, to compare it with the default loop form
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "eager-mst" and not v.startswith("mst-unrolled")]


@dataclass
class BenchRow:
    variant: str
    peak_mib: float
    step_s: float
    loss: float
    report: str = ""


def _llama_config(seq_len: int, **sizes):
    """An HF Llama config for CPU measurements: SDPA attention, no cache, positions for ``seq_len``."""
    from transformers import LlamaConfig

    return LlamaConfig(**sizes, max_position_embeddings=max(seq_len, 4096), use_cache=False, attn_implementation="sdpa")


def mlp_heavy_config(seq_len: int = 8192):
    """A CPU configuration where the MLPs dominate (HF Llama hidden 256, intermediate 1024, 4 layers,
    8 query / 2 KV heads, vocab 2000): the one to compare with a hand-written eager MsT."""
    return _llama_config(
        seq_len, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=2000,
    )


def reference_config(seq_len: int = 4096):
    """The reference CPU configuration (HF Llama, 2 layers, vocab 32000): the ``reference`` preset."""
    from ..model_configs.source import PRESETS

    sizes = {k: v for k, v in PRESETS["reference"].items() if k != "model_type"}
    return _llama_config(seq_len, **sizes, num_key_value_heads=sizes["num_attention_heads"])


CONFIGS = {"reference": reference_config, "mlp-heavy": mlp_heavy_config}


def hand_written_mst(model, ids):
    """MsT written by hand in eager, as a careful user would: each MLP runs its tokens in M chunks, each
    under ``torch.utils.checkpoint`` (recomputed in backward), and the loss is the chunked linear
    cross-entropy on the final hidden states.  M follows the paper's rule, as the backend's default."""
    import types

    from torch.utils.checkpoint import checkpoint

    from mstfx import linear_cross_entropy
    from mstfx.regions import rules

    cfg = model.config
    tokens = ids.numel()
    m_mlp = rules.mlp_chunks(tokens, cfg.hidden_size, None)
    m_head = rules.lm_head_chunks(tokens, cfg.hidden_size, cfg.vocab_size)
    for layer in model.model.layers:
        mlp, plain = layer.mlp, type(layer.mlp).forward

        def chunked(self, x, plain=plain):
            flat = x.reshape(-1, x.shape[-1])
            outs = [checkpoint(plain, self, piece, use_reentrant=False) for piece in flat.tensor_split(m_mlp)]
            return torch.cat(outs).view(*x.shape[:-1], -1)

        mlp.forward = types.MethodType(chunked, mlp)

    def loss():
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        return linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, None, ids[:, 1:].reshape(-1), chunks=m_head
        )

    return loss


def _loss_callable(variant: str, model, ids):
    import mstfx

    if variant == "eager-mst":
        return hand_written_mst(model, ids)
    if variant in ("eager", "eager+ckpt"):
        return lambda: model(input_ids=ids, labels=ids).loss
    if variant == "inductor(model)":
        compiled = torch.compile(model)
        return lambda: _traced_whole(lambda: compiled(input_ids=ids, labels=ids).loss)
    fn = lambda i, l: model(input_ids=i, labels=l).loss  # noqa: E731
    if variant in ("mst", "mst+ckpt"):
        compiled = torch.compile(fn, backend=mstfx.backend())
    elif variant.startswith("mst-unrolled"):
        compiled = torch.compile(fn, backend=mstfx.backend(mstfx.MstConfig(chunk_form=ChunkForm.UNROLLED)))
    elif variant == "inductor+auto_chunker":
        from ..compat.inductor import auto_chunker_enabled

        inner = torch.compile(fn)

        def compiled(i, l):
            with auto_chunker_enabled():
                return inner(i, l)
    else:
        compiled = torch.compile(fn)
    return lambda: _traced_whole(compiled, ids, ids)


def _traced_whole(compiled, *args):
    """Every compiled variant runs under the Dynamo settings that trace checkpointed layers whole (what
    mstfx.compile applies), so no variant is measured split by a graph break the others do not have."""
    from ..compat import tracing_settings

    with tracing_settings():
        return compiled(*args)


def prepare_variant(variant: str, base, ids):
    """A private copy of the model set up for ``variant``, its compiled step, warmed up (compiled)."""
    import copy

    model = copy.deepcopy(base)
    if variant.endswith("ckpt"):
        enable_checkpointing(model)
    model.train()
    step = training_step(model, _loss_callable(variant, model, ids))
    step()  # compile and warm up
    return step


def run(
    seq_len: int, variants: list[str], repeats: int, batch: int = 1, seed: int = 0, progress: bool = True, config: str = "reference"
) -> list[BenchRow]:
    """Peaks variant by variant, then step times *interleaved* (A, B, C, A, B, C, ...).

    Interleaving makes the time ratios robust to load that changes over the run (shared machines).
    ``progress``: a spinner on a terminal, flushed lines on stderr otherwise.
    """
    from transformers import LlamaForCausalLM

    import mstfx

    torch.manual_seed(seed)
    base = LlamaForCausalLM(CONFIGS[config](seq_len))
    ids = torch.randint(0, base.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    steps, peaks, losses, reports = {}, {}, {}, {}

    def measure(v):
        steps[v] = prepare_variant(v, base, ids)
        peak, loss = peak_bytes(steps[v])
        peaks[v], losses[v] = peak / 2**20, loss
        reports[v] = mstfx.explain(last=1) if v.startswith("mst") else ""

    with Progress(len(variants) + repeats, enabled=progress) as bar, quiet_library_warnings():
        for v in variants:
            bar.step(f"compiling {v} and measuring its peak")
            measure(v)
        times = {v: [] for v in variants}
        for r in range(repeats):
            bar.step(f"timing round {r + 1}/{repeats} (all variants interleaved)")
            for v in variants:
                times[v].append(step_seconds(steps[v], 1))
    return [
        BenchRow(v, peaks[v], statistics.median(times[v]), losses[v], reports[v]) for v in variants
    ]


def ratios(rows: list[BenchRow]) -> dict[str, dict[str, float]]:
    by = {r.variant: r for r in rows}
    mem_base = by.get("inductor(model)") or by.get("inductor")
    time_base = by.get("inductor") or by.get("inductor(model)")
    out = {}
    for r in rows:
        out[r.variant] = {
            "peak_vs_inductor_model": r.peak_mib / mem_base.peak_mib if mem_base else float("nan"),
            "time_vs_inductor": r.step_s / time_base.step_s if time_base else float("nan"),
        }
    return out


def render(rows: list[BenchRow], seq_len: int, config: str = "reference") -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    rat = ratios(rows)
    table = Table(title=f"one training step, {config} Llama config, S={seq_len}, fp32, CPU")
    for col in ["variant", "peak MiB", "peak / inductor(model)", "step s", "time / inductor", "loss"]:
        table.add_column(col, justify="right" if col != "variant" else "left")
    for r in rows:
        table.add_row(
            r.variant,
            f"{r.peak_mib:.0f}",
            f"{rat[r.variant]['peak_vs_inductor_model']:.2f}",
            f"{r.step_s:.2f}",
            f"{rat[r.variant]['time_vs_inductor']:.2f}",
            f"{r.loss:.5f}",
        )
    buf = StringIO()
    Console(file=buf, width=120).print(table)
    return buf.getvalue()


def markdown(rows: list[BenchRow]) -> str:
    rat = ratios(rows)
    lines = ["| variant | peak MiB | peak / Inductor(model) | step s | time / Inductor(loss fn) | loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.peak_mib:.0f} | {rat[r.variant]['peak_vs_inductor_model']:.2f} | {r.step_s:.2f} "
            f"| {rat[r.variant]['time_vs_inductor']:.2f} | {r.loss:.5f} |"
        )
    return "\n".join(lines)
