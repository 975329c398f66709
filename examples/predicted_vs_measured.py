"""Predicted (cost model) vs measured (profiler) peak memory of one training step on CPU.

Measures, with the profiler method of ``mstfx.tools.measure`` (bytes above the parameters during one
fwd+bwd, gradients set to ``None`` beforehand so they count), the peak of the compiled loss function
``lambda ids, lab: model(input_ids=ids, labels=lab).loss`` for

    standard            plain Inductor (``backend="inductor"``)
    mst                 the mst backend, default chunk rule
    mst+checkpointing   the mst backend and HF gradient checkpointing (non-reentrant)

on the reference Llama config and on a GELU model (GPT-2 from a small config), for S in
{1024, 2048, 4096, 8192}, and on an 8-layer GQA Llama, a tied GQA Qwen2 (a hold-out) and the reference
model in bf16 (``llama-deep``, ``qwen2-tied``, ``llama-bf16``).  It compares each with :func:`mstfx.planning.planner.predict_peak` (gradients +
activations, the part the profiler sees), prints a table, and draws ``docs/predicted_vs_measured.png``.

Measurements are cached in ``docs/predicted_vs_measured.json`` (one key per model/mode/S), so an
interrupted run resumes and ``--plot-only`` redraws without measuring.  Slow on 2 CPU cores:

    nice -n 10 python examples/predicted_vs_measured.py                 # everything missing
    python examples/predicted_vs_measured.py --plot-only                # table + PNG from the cache
    nice -n 10 python examples/predicted_vs_measured.py --models llama --modes mst --seq-lens 1024
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "docs", "predicted_vs_measured.json")
SIM_CACHE = os.path.join(ROOT, "docs", "predicted_vs_measured_compiled.json")
PNG = os.path.join(ROOT, "docs", "predicted_vs_measured.png")
#: the mst backend's chunk form for the mst modes (``MstConfig.chunk_form``): the table is measured with
#: the default loop form; ``--chunk-form unrolled`` keeps its own caches and plot (``*_unrolled.*``)
CHUNK_FORM = "loop"


def _use_chunk_form(form: str) -> None:
    global CHUNK_FORM, CACHE, SIM_CACHE, PNG
    CHUNK_FORM = form
    if form != "loop":
        CACHE, SIM_CACHE, PNG = (path.replace("predicted_vs_measured", f"predicted_vs_measured_{form}")
                                 for path in (CACHE, SIM_CACHE, PNG))
MODES = ("standard", "mst", "mst+checkpointing")
SEQ_LENS = (1024, 2048, 4096, 8192)
MB = 1e6


def build(name: str):
    """The two models of the comparison, built from configs (no downloads), fp32, dropout 0."""
    import torch

    torch.manual_seed(0)
    if name == "llama":
        from transformers import LlamaForCausalLM

        from mstfx.tools.bench import reference_config

        return LlamaForCausalLM(reference_config(max(SEQ_LENS)))
    if name == "llama-bf16":  # the reference model in bf16 (weights, grads, activations)
        import torch

        return build("llama").to(torch.bfloat16)
    if name == "llama-deep":  # depth check: 8 narrower layers, GQA (predictions only, never fitted on)
        from transformers import LlamaForCausalLM

        from mstfx.tools.bench import reference_config

        cfg = reference_config(max(SEQ_LENS))
        cfg.update(dict(hidden_size=256, intermediate_size=896, num_hidden_layers=8, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=8000))
        return LlamaForCausalLM(cfg)
    if name == "qwen2-tied":  # hold-out check: GQA 6/2, qkv biases, tied embeddings, I = 2.67 h
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(
            hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=2, vocab_size=16000, tie_word_embeddings=True, use_cache=False,
            max_position_embeddings=max(SEQ_LENS), attn_implementation="sdpa",
        )
        return Qwen2ForCausalLM(cfg)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=32000, n_embd=512, n_layer=2, n_head=8, n_positions=8192, use_cache=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        )
        model = GPT2LMHeadModel(cfg)
        model.loss_type = "ForCausalLM"
        return model
    raise ValueError(f"unknown model {name!r}")


def profile_peak(step) -> int:
    """Peak bytes above what is live when ``step()`` starts (profiler method, ``mstfx.tools.measure``)."""
    from mstfx.tools.measure import peak_bytes

    return peak_bytes(step)[0]


def measure(name: str, mode: str, seq_len: int) -> int:
    """Measured peak (bytes, gradients included) of one compiled fwd+bwd."""
    import torch

    import mstfx
    from mstfx.compat import with_tracing_settings

    torch._dynamo.reset()
    model = build(name).train()
    if mode.endswith("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backend = "inductor" if mode in ("standard", "checkpointing") else mstfx.backend(chunk_form=CHUNK_FORM)
    # under the Dynamo settings mstfx.compile applies: without them, transformers >= 5.25 breaks the graph
    # in every checkpointed layer and nothing in it is chunked
    fn = with_tracing_settings(torch.compile(lambda i, l: model(input_ids=i, labels=l).loss, backend=backend))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=g)

    def step():
        fn(ids, ids).backward()

    step()  # compile
    for p in model.parameters():
        p.grad = None
    step()  # warm
    for p in model.parameters():
        p.grad = None
    gc.collect()
    peak = profile_peak(step)
    del model, fn
    torch._dynamo.reset()
    gc.collect()
    return peak


def predict(name: str, mode: str, seq_len: int) -> float:
    """Predicted peak (bytes) of the part the profiler sees: gradients + activations."""
    from mstfx.planning.planner import predict_peak

    b = predict_peak(built(name), seq_len, batch=1, mode=mode, optimizer="none", chunk_form=CHUNK_FORM)
    return b.grads + b.activations


def simulate_compiled(name: str, mode: str, seq_len: int) -> int:
    """The compiled-program simulation's peak (bytes above parameters, gradients included): the model
    built on the meta device, the same passes and AOT partition as the real step, liveness of the
    forward and backward graphs (``mstfx simulate --program compiled``, CPU attention kernels)."""
    import torch

    import mstfx
    from mstfx.tools.compiled_program import capture_program, program_peak
    from mstfx.vocabulary import Mode

    mst, ckpt = Mode.parse(mode).chunked, Mode.parse(mode).checkpointed
    with torch.device("meta"):
        model = build(name)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    program = capture_program(model.train(), ids, mstfx.MstConfig(chunk_form=CHUNK_FORM) if mst else None)
    return program_peak(program, device="cpu").total


_BUILT: dict = {}


def built(name: str):
    """The model itself (for its exact parameter count), built once."""
    if name not in _BUILT:
        _BUILT[name] = build(name)
    return _BUILT[name]


def load() -> dict:
    if os.path.exists(CACHE):
        with open(CACHE) as f:
            return json.load(f)
    return {}


def save(cache: dict, path: str | None = None) -> None:
    path = path or CACHE  # read at call time: --chunk-form moves the caches
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cache, f, indent=1, sort_keys=True)


def load_sim() -> dict:
    if os.path.exists(SIM_CACHE):
        with open(SIM_CACHE) as f:
            return json.load(f)
    return {}


def table(cache: dict, models, modes, seq_lens, sim: dict | None = None) -> tuple[str, float]:
    """Measured vs the cost model's prediction, and, where ``sim`` has the point, vs the compiled-program
    simulation (``--compiled-sim``)."""
    sim = sim or {}
    rows = ["| model | mode | S | measured MB | predicted MB | error | compiled sim MB | error |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for name in models:
        for mode in modes:
            for s in seq_lens:
                key = f"{name}|{mode}|{s}"
                if key not in cache:
                    continue
                got = cache[key]
                pred = predict(name, mode, s)
                err = (pred - got) / got
                worst = max(worst, abs(err))
                simulated = sim.get(key)
                sim_cols = f"{simulated / MB:.0f} | {(simulated - got) / got:+.1%}" if simulated else "– | –"
                rows.append(f"| {name} | {mode} | {s} | {got / MB:.0f} | {pred / MB:.0f} | {err:+.1%} | {sim_cols} |")
    return "\n".join(rows), worst


def plot(cache: dict, models, modes, seq_lens) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 if len(models) > 2 else len(models)
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    colors = dict(zip(MODES + ("checkpointing",), ("tab:red", "tab:blue", "tab:green", "tab:orange")))
    for ax, name in zip(axes.flat, models):
        for mode in modes:
            pts = [(s, cache[f"{name}|{mode}|{s}"]) for s in seq_lens if f"{name}|{mode}|{s}" in cache]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ax.plot(xs, [v / MB for _, v in pts], "o", color=colors[mode], label=f"{mode} measured")
            fine = list(range(min(seq_lens), max(seq_lens) + 1, 256))
            ax.plot(fine, [predict(name, mode, s) / MB for s in fine], "-", color=colors[mode], alpha=0.7,
                    label=f"{mode} predicted")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length S (batch 1)")
        ax.set_ylabel("peak MB above parameters (grads included)")
        ax.set_title({"llama": "Llama (ref. config, SwiGLU)", "gpt2": "GPT-2 (GELU)",
                      "llama-deep": "Llama, 8 layers, GQA", "qwen2-tied": "Qwen2, 4 layers, tied (not fitted on)",
                      "llama-bf16": "Llama (ref. config) in bf16"}.get(name, name))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("mstfx cost model: predicted vs measured peak (CPU, profiler method)")
    fig.tight_layout()
    fig.savefig(PNG, dpi=120)
    print(f"wrote {PNG}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama", "gpt2", "llama-deep", "qwen2-tied", "llama-bf16"])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--seq-lens", nargs="+", type=int, default=list(SEQ_LENS))
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--chunk-form", default="loop", choices=["loop", "unrolled"],
                    help="chunk form of the mst modes (default loop, the backend's default: the main table; "
                         "unrolled: its own caches)")
    ap.add_argument("--remeasure", action="store_true", help="ignore cached measurements")
    ap.add_argument("--compiled-sim", action="store_true",
                    help="also simulate each measured point's compiled program (cached in "
                         "docs/predicted_vs_measured_compiled.json) and show it beside the measurement")
    ap.add_argument("--resimulate", action="store_true",
                    help="re-run the compiled-program simulation of every cached measurement (measures nothing)")
    args = ap.parse_args(argv)
    args.compiled_sim |= args.resimulate
    _use_chunk_form(args.chunk_form)
    cache = load()
    sim = load_sim()
    if not (args.plot_only or args.resimulate):
        for s in args.seq_lens:  # short sequences first: the cheap points land before the slow ones
            for name in args.models:
                for mode in args.modes:
                    key = f"{name}|{mode}|{s}"
                    if key in cache and not args.remeasure:
                        continue
                    t0 = time.time()
                    cache[key] = measure(name, mode, s)
                    save(cache)
                    print(f"{key}: {cache[key] / MB:.1f} MB measured ({time.time() - t0:.0f} s)", flush=True)
    if args.compiled_sim:
        for key in sorted(k for k in cache if k.split("|")[0] in args.models and k.split("|")[1] in args.modes
                          and int(k.split("|")[2]) in args.seq_lens):
            if key in sim and not (args.remeasure or args.resimulate):
                continue
            name, mode, s = key.split("|")
            t0 = time.time()
            sim[key] = simulate_compiled(name, mode, int(s))
            save(sim, SIM_CACHE)
            print(f"{key}: {sim[key] / MB:.1f} MB simulated ({time.time() - t0:.0f} s)", flush=True)
    text, worst = table(cache, args.models, args.modes, args.seq_lens, sim)
    print(text)
    print(f"worst |error| of the cost model: {worst:.1%}")
    sim_errors = [abs(sim[k] - cache[k]) / cache[k] for k in sim if k in cache]
    if sim_errors:
        print(f"worst |error| of the compiled-program simulation: {max(sim_errors):.1%} over {len(sim_errors)} points")
    plot(cache, args.models, args.modes, args.seq_lens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
