"""``mstfx bench --compile-time``: how long the first training step takes to compile, Inductor vs mst.

Every case runs in a fresh Python process with cold compiler caches (an empty
``TORCHINDUCTOR_CACHE_DIR``, the FX-graph and AOT-autograd caches off, a fresh Triton cache), so the
number is what a user waits for before the first step of a new model or a new length bucket.  The
model is an 8-layer tiny GQA Llama (hidden 64) whose MLPs the paper's rule chunks into
``M = S / 64`` mini-sequences, so ``S = 64·M`` sets M (``--compile-layers`` changes the depth: the
Python side of a whole-model compile grows with the layers, the C++ build of its kernels does not,
since Inductor builds each distinct kernel once).  The child process also reports where the
time went (``torch._dynamo.utils.compile_times``: Dynamo, AOT autograd, partitioner, Inductor
lowering and code generation), and with ``profile=True`` a cProfile of the first step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

HIDDEN = 64

#: compile_times() keys summarised in the table (the remaining time is Dynamo tracing, the mst passes
#: and the run itself; all of them are in ``phases``).
PHASES = {
    "dynamo": "_compile.compile_inner",
    "aot": "create_aot_dispatcher_function",
    "partition": "min_cut_rematerialization_partition",
    "inductor fw+bw": "compile_fx_inner",
    "codegen+build": "PyCodeCache.load_by_key_path",
}


@dataclass
class CompileTimeRow:
    variant: str
    mini_sequences: int
    seq_len: int
    first_step_s: float
    loss: float
    phases: dict[str, float] = field(default_factory=dict)
    report: str = ""
    layers: int = 8
    #: distinct C++ kernels Inductor built (files in the case's fresh cache): a fixed cost per kernel,
    #: shared by identical layers of one graph and by identical blocks compiled per block
    kernels: int = 0


def tiny_llama_config(seq_len: int, layers: int = 8):
    """``layers`` layers (8), hidden 64, intermediate 256, 4 query / 2 KV heads, vocab 2000: cheap to run,
    many regions."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2000, max_position_embeddings=max(seq_len, 4096), use_cache=False,
        attn_implementation="sdpa",
    )


def _child(variant: str, seq_len: int, layers: int, profile_path: str | None) -> dict:
    """One case, in this (fresh) process: build, compile the loss function, time the first step."""
    import torch
    from transformers import LlamaForCausalLM

    import mstfx
    from mstfx.tools.measure import training_step

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(seq_len, layers)).train()
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    fn = lambda i, l: model(input_ids=i, labels=l).loss  # noqa: E731
    if variant == "inductor":
        compiled = torch.compile(fn)
    elif variant == "mst-per-block":  # each decoder layer its own graph, shared by all 8; the rest its own
        mstfx.compile(model, per_block=True)
        compiled = fn
    else:
        config = mstfx.MstConfig()
        config.chunk_form = {"mst": "loop", "mst-unrolled": "unrolled"}[variant]
        compiled = torch.compile(fn, backend=mstfx.backend(config))
    step = training_step(model, lambda: compiled(ids, ids))
    prof = None
    if profile_path:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    start = time.perf_counter()
    loss = step()
    first = time.perf_counter() - start
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile_path)
    from ..compat.dynamo import compile_times

    phases = compile_times()
    report = "" if variant == "inductor" else mstfx.explain(model) if variant == "mst-per-block" else mstfx.explain(last=1)
    return {"first_step_s": first, "loss": loss, "phases": phases, "report": report}


def run_case(variant: str, m: int, profile_path: str | None = None, timeout: float = 3600,
             layers: int = 8) -> CompileTimeRow:
    """Run one case in a fresh process with empty compiler caches."""
    seq_len = HIDDEN * m
    with tempfile.TemporaryDirectory(prefix="mstfx-compile-time-") as tmp:
        env = dict(os.environ)
        env.update(
            TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
            TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
            TORCHINDUCTOR_FX_GRAPH_CACHE="0",
            TORCHINDUCTOR_AUTOGRAD_CACHE="0",
            TORCHINDUCTOR_BUNDLED_AUTOTUNE_CACHE="0",
        )
        args = [sys.executable, "-m", "mstfx.tools.compile_time", "--child", variant, str(seq_len), str(layers)]
        if profile_path:
            args.append(profile_path)
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
        kernels = sum(name.endswith(".cpp") for _, _, names in os.walk(tmp) for name in names)
    if out.returncode != 0:
        raise RuntimeError(f"compile-time case {variant} M={m} failed:\n{out.stderr[-4000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return CompileTimeRow(variant, m, seq_len, data["first_step_s"], data["loss"], data["phases"], data["report"],
                          layers, kernels)


def run(ms: list[int], variants: list[str], repeats: int = 1, progress: bool = True,
        layers: int = 8) -> list[CompileTimeRow]:
    """Cases interleaved (each variant at each M, then again) so that load changes hit all of them."""
    rows = []
    for r in range(repeats):
        for m in ms:
            for v in variants:
                if progress:
                    print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{repeats}: {v} at M={m} ...", file=sys.stderr, flush=True)
                rows.append(run_case(v, m, layers=layers))
                if progress:
                    print(f"    first step {rows[-1].first_step_s:.1f} s", file=sys.stderr, flush=True)
    return rows


def summarise(rows: list[CompileTimeRow]) -> list[dict]:
    """Median first-step time per (variant, M) and the phase times of the median run."""
    import statistics

    out = []
    keys = list(dict.fromkeys((r.variant, r.mini_sequences) for r in rows))
    for v, m in keys:
        runs = sorted((r for r in rows if (r.variant, r.mini_sequences) == (v, m)), key=lambda r: r.first_step_s)
        med = runs[len(runs) // 2]
        out.append({
            "variant": v, "M": m, "seq_len": med.seq_len, "runs": [round(r.first_step_s, 1) for r in runs],
            "first_step_s": statistics.median(r.first_step_s for r in runs), "loss": med.loss,
            **{name: med.phases.get(key, 0.0) for name, key in PHASES.items()},
            "layers": med.layers, "kernels": med.kernels,
        })
    return out


def markdown(rows: list[CompileTimeRow]) -> str:
    summary = summarise(rows)
    base = {s["M"]: s["first_step_s"] for s in summary if s["variant"] == "inductor"}
    lines = [
        "| variant | M | S | first step s (runs) | vs Inductor | " + " | ".join(PHASES) + " | kernels built |",
        "|---|---|---|---|---|" + "---|" * len(PHASES) + "---|",
    ]
    for s in summary:
        ratio = s["first_step_s"] / base[s["M"]] if s["M"] in base else float("nan")
        runs = ", ".join(f"{t:.0f}" for t in s["runs"])
        phases = " | ".join(f"{s[name]:.1f}" for name in PHASES)
        lines.append(f"| {s['variant']} | {s['M']} | {s['seq_len']} | {s['first_step_s']:.1f} ({runs}) | {ratio:.2f} | {phases} "
                     f"| {s['kernels']} |")
    lines.append("")
    whole = {s["M"]: s["first_step_s"] for s in summary if s["variant"] == "mst"}
    for s in summary:
        if s["variant"] == "mst-per-block" and s["M"] in whole:
            lines.append(f"mst-per-block / mst (whole model), {s['layers']} layers, M = {s['M']}: "
                         f"{s['first_step_s'] / whole[s['M']]:.2f}")
    for v in dict.fromkeys(s["variant"] for s in summary):
        times = {s["M"]: s["first_step_s"] for s in summary if s["variant"] == v}
        if len(times) > 1:
            lo, hi = min(times), max(times)
            lines.append(f"{v}: first step at M = {hi} / at M = {lo}: {times[hi] / times[lo]:.2f}")
    return "\n".join(lines)


VARIANTS = ["inductor", "mst", "mst-unrolled", "mst-per-block"]


def add_arguments(parser) -> None:
    """The compile-time options on ``mstfx bench`` (``--compile-time`` switches the bench to them)."""
    parser.add_argument("--compile-time", action="store_true",
                        help="first-step (compile) time of Inductor and mst in fresh processes with cold caches, "
                             "8-layer tiny Llama at S = 64·M; --variants from " + ",".join(VARIANTS) + " (default inductor,mst; "
                             "mst-unrolled: the other chunk form; mst-per-block: "
                             "mstfx.compile(model, per_block=True))")
    parser.add_argument("--compile-ms", default="8,64", metavar="M1,M2,...",
                        help="compile time: the mini-sequence counts M to measure (S = 64·M; default 8,64)")
    parser.add_argument("--compile-layers", type=int, default=8,
                        help="compile time: decoder layers of the tiny Llama (default 8)")
    parser.add_argument("--compile-runs", type=int, default=1,
                        help="compile time: fresh-process runs per case, interleaved (median is shown; default 1)")


def cli_compile_time(args) -> int:
    """``mstfx bench --compile-time``."""
    variants = [v.strip() for v in (args.variants or "inductor,mst").split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"mstfx bench --compile-time: unknown variant(s) {unknown}; choose from {VARIANTS}", file=sys.stderr)
        return 2
    try:
        ms = [int(m) for m in args.compile_ms.split(",") if m.strip()]
    except ValueError:
        ms = []
    if not ms or min(ms) < 1 or args.compile_runs < 1 or args.compile_layers < 1:
        print("mstfx bench --compile-time: --compile-ms must be positive integers (e.g. 8,64), "
              "--compile-runs and --compile-layers positive", file=sys.stderr)
        return 2
    rows = run(ms, variants, args.compile_runs, progress=not args.json, layers=args.compile_layers)
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "summary": summarise(rows)}, indent=2))
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--child":
        result = _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
        print(json.dumps(result))
    else:
        raise SystemExit("run through `mstfx bench --compile-time`")
