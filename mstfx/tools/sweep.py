"""``mstfx bench --sweep``: peak memory and step time against the sequence length, for every technique.

The trade-off across lengths: what each way of saving memory costs in step time, especially at short
sequences where nothing needs saving, and at which length each stops fitting a stated budget.
Techniques, all on the same model, weights and data at each S:

* ``eager``, ``eager+ckpt`` (HF gradient checkpointing), ``inductor`` (the loss function compiled);
* ``inductor+mem_budget``: Inductor with its own memory-budget partitioner
  (``torch._functorch.config.activation_memory_budget``, default 0.5: it recomputes the cheapest
  activations until those saved are at most that fraction of the default);
* ``inductor+auto_chunker``: Inductor's ``auto_chunker`` pass;
* ``inductor+linear_ce``: the loss as ``torch.nn.functional.linear_cross_entropy`` with its chunked
  path (``LinearCrossEntropyOptions()``), n/a where torch lacks it;
* ``mst``, ``mst+ckpt``: the mst backend with its default chunk rule;
* ``mst(planned)``: ``mstfx.transform(model, budget_gb=...)`` for the stated budget -- the planner
  chunks only what the budget needs, so at short S it must cost what plain Inductor costs.

Memory is the step's footprint: parameters + the profiler's peak above them (gradients and
activations; no optimizer state), in MiB, compared with the budget in GiB (binary units throughout).
A planned model whose budget cannot be met at some S is reported "infeasible" there (transform raises
before anything runs).  Results are kept in a JSON file so a long sweep can be resumed and redrawn.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass

import torch

from .measure import peak_bytes, step_seconds, training_step
from .progress import Progress, quiet_library_warnings

SWEEP_VARIANTS = [
    "eager", "eager+ckpt", "inductor", "inductor+mem_budget", "inductor+auto_chunker", "inductor+linear_ce",
    "mst", "mst+ckpt", "mst(planned)",
]
DEFAULT_BUDGET_GIB = 1.0
DEFAULT_MEM_BUDGET = 0.5
MIB = 2**20
GIB = 2**30


class SweepDataError(ValueError):
    """A ``--data`` file that does not belong to this sweep (another budget, config or batch), or is missing."""


@dataclass
class SweepPoint:
    """One technique at one S: memory in MiB (parameters + peak above them), median step seconds."""

    seq_len: int
    variant: str
    step_mib: float | None
    step_s: float | None
    loss: float | None
    note: str = ""


def parse_lengths(text: str) -> list[int]:
    """``"512,1024,...,16384"`` (``...`` doubles up to the last) or ``"512,2048,4096"`` → sorted lengths."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--sweep: give sequence lengths, e.g. 512,1024,...,8192")
    out: list[int] = []
    for i, p in enumerate(parts):
        if p == "...":
            if len(out) < 1 or i + 1 >= len(parts):
                raise ValueError("--sweep: '...' needs a length before and after it, e.g. 512,...,8192")
            continue
        try:
            s = int(p)
        except ValueError:
            raise ValueError(f"--sweep: {p!r} is not a whole number of tokens") from None
        if s < 2:
            raise ValueError(f"--sweep: sequence lengths must be at least 2 tokens, got {s}")
        if i > 0 and parts[i - 1] == "...":
            if s <= out[-1]:
                raise ValueError(f"--sweep: after '...' the length must grow, got {out[-1]},...,{s}")
            if (s / out[-1]) != 2 ** round(math.log2(s / out[-1])):
                raise ValueError(f"--sweep: '...' doubles; {s} is not {out[-1]} times a power of two")
            while out[-1] * 2 < s:
                out.append(out[-1] * 2)
        out.append(s)
    return sorted(set(out))


def parse_variants(text: str | None) -> list[str]:
    if not text:
        return list(SWEEP_VARIANTS)
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in SWEEP_VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; with --sweep choose from {SWEEP_VARIANTS}")
    return variants


def unavailable(variant: str) -> str | None:
    """Why a technique cannot run with this torch, or None."""
    if variant == "inductor+linear_ce":
        import torch.nn as nn
        import torch.nn.functional as F

        if not hasattr(F, "linear_cross_entropy") or not hasattr(nn, "LinearCrossEntropyOptions"):
            return f"n/a: torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    if variant == "inductor+auto_chunker":
        from ..compat.inductor import has_auto_chunker

        if not has_auto_chunker():
            return f"n/a: torch {torch.__version__} has no Inductor auto_chunker"
    if variant == "inductor+mem_budget":
        from ..compat.functorch import has_activation_memory_budget

        if not has_activation_memory_budget():
            return f"n/a: torch {torch.__version__} has no activation_memory_budget"
    return None


def _patched_calls(compiled, patch):
    """``compiled`` called inside a config patch: compilation happens on the first call, under it."""

    def call(*args):
        with patch():
            return compiled(*args)

    return call


def _linear_ce_loss(model):
    """The decoder compiled, then the chunked ``linear_cross_entropy`` on the shifted hidden states."""
    import torch.nn as nn
    import torch.nn.functional as F

    options = nn.LinearCrossEntropyOptions()

    def loss(ids):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        return F.linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, ids[:, 1:].reshape(-1), options=options
        )

    return torch.compile(loss)


def prepare(variant: str, base, ids, budget_gib: float, mem_budget: float):
    """A private copy of the model set up for ``variant``, its warmed-up (compiled) training step, and a note
    (for ``mst(planned)``: what the plan chose and predicted)."""
    import copy

    from . import bench

    if variant in bench.VARIANTS:
        return bench.prepare_variant(variant, base, ids), ""
    note = ""
    model = copy.deepcopy(base)
    model.train()
    if variant == "inductor+mem_budget":
        from ..compat.functorch import activation_memory_budget

        inner = torch.compile(lambda i, l: model(input_ids=i, labels=l).loss)
        call = _patched_calls(inner, lambda: activation_memory_budget(mem_budget))
        loss = lambda: call(ids, ids)  # noqa: E731
    elif variant == "inductor+linear_ce":
        compiled = _linear_ce_loss(model)
        loss = lambda: compiled(ids)  # noqa: E731
    elif variant == "mst(planned)":
        import mstfx
        from mstfx.planning import planner

        # The planner's unit (planner.GB) converts the budget, whichever convention it uses.
        mstfx.transform(model, budget_gb=budget_gib * GIB / planner.GB, seq_len=ids.shape[-1],
                        batch=ids.shape[0], optimizer="none")
        plan = model._mstfx_transform.plan
        ms = ", ".join(f"{k} {m}" for k, m in plan.mini_sequences.items())
        note = (f"plan at S={ids.shape[-1]}: {plan.mode}, mini_sequences {ms}"
                f"{', checkpointing' if plan.checkpointing else ''}; predicted {plan.predicted_peak / MIB:.0f} MiB")
        loss = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    else:
        raise ValueError(f"unknown sweep variant {variant!r}; choose from {SWEEP_VARIANTS}")
    step = training_step(model, loss)
    step()
    return step, note


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_length(make_config, seq_len: int, variants: list[str], repeats: int, *, budget_gib: float,
                   mem_budget: float, batch: int = 1, seed: int = 0, progress: Progress | None = None, on_point=None):
    """All ``variants`` at one S: peaks one by one, then step times interleaved (robust to changing load).

    ``on_point(point)`` is called as each peak is known (its step time still None), so a long run that is
    stopped keeps its peaks."""
    from transformers import LlamaForCausalLM

    from mstfx.planning.planner import InfeasibleBudgetError

    torch.compiler.reset()  # a fresh cache per length: the recompile limit is per code object
    torch.manual_seed(seed)
    base = LlamaForCausalLM(make_config(seq_len))
    ids = torch.randint(0, base.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    params = _param_bytes(base)
    steps, points = {}, {}
    for v in variants:
        if progress:
            progress.step(f"S={seq_len}: compiling {v} and measuring its peak")
        reason = unavailable(v)
        if reason:
            points[v] = SweepPoint(seq_len, v, None, None, None, reason)
            continue
        try:
            steps[v], note = prepare(v, base, ids, budget_gib, mem_budget)
        except InfeasibleBudgetError as e:
            points[v] = SweepPoint(seq_len, v, None, None, None, f"infeasible: {str(e).splitlines()[0]}")
            continue
        except Exception as e:  # one technique failing (a compile error) must not lose the others' points
            points[v] = SweepPoint(seq_len, v, None, None, None, f"error: {type(e).__name__}: {str(e)[:200]}")
            print(f"mstfx bench: {v} at S={seq_len} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        peak, loss = peak_bytes(steps[v])
        points[v] = SweepPoint(seq_len, v, (params + peak) / MIB, None, float(loss), note)
        if on_point:
            on_point(points[v])
    times = {v: [] for v in steps}
    for r in range(repeats):
        if progress:
            progress.step(f"S={seq_len}: timing round {r + 1}/{repeats} ({len(steps)} variants interleaved)")
        for v in steps:
            times[v].append(step_seconds(steps[v], 1))
    for v in steps:
        points[v].step_s = statistics.median(times[v])
    del steps
    gc.collect()
    return [points[v] for v in variants]


def load(path: str | None) -> dict:
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def run(make_config, lengths: list[int], variants: list[str], repeats: int, *, budget_gib: float = DEFAULT_BUDGET_GIB,
        mem_budget: float = DEFAULT_MEM_BUDGET, batch: int = 1, data_path: str | None = None,
        progress: bool = True, meta: dict | None = None) -> list[SweepPoint]:
    """Measure every (S, variant) not already in ``data_path`` (saved after each S); return all points."""
    data = load(data_path)
    setup = {"budget_gib": budget_gib, "mem_budget": mem_budget, "batch": batch, **(meta or {})}
    if data and {k: data.get("setup", {}).get(k) for k in setup} != setup:
        raise SweepDataError(f"{data_path} was measured with {data.get('setup')}, not {setup}: use another --data file")
    have = {(p["seq_len"], p["variant"]): SweepPoint(**p) for p in data.get("points", [])}
    done = {k for k, p in have.items() if p.step_s is not None or p.step_mib is None}  # timed, n/a or infeasible
    todo = [s for s in lengths if any((s, v) not in done for v in variants)]

    def keep(point):
        have[(point.seq_len, point.variant)] = point
        if data_path:
            save(data_path, setup, have.values())

    with Progress(len(todo) * (len(variants) + repeats), enabled=progress) as bar, quiet_library_warnings():
        for s in todo:
            missing = [v for v in variants if (s, v) not in done]
            for p in measure_length(make_config, s, missing, repeats, budget_gib=budget_gib, mem_budget=mem_budget,
                                    batch=batch, progress=bar, on_point=keep):
                keep(p)
    return [have[(s, v)] for s in lengths for v in variants if (s, v) in have]


def save(path: str, setup: dict, points) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pts = sorted((asdict(p) for p in points), key=lambda p: (p["seq_len"], SWEEP_VARIANTS.index(p["variant"])))
    with open(path, "w") as f:
        json.dump({"setup": {**setup, "torch": torch.__version__}, "points": pts}, f, indent=1)


def _by(points):
    lengths = sorted({p.seq_len for p in points})
    variants = [v for v in SWEEP_VARIANTS if any(p.variant == v for p in points)]
    return lengths, variants, {(p.seq_len, p.variant): p for p in points}


def longest_measured(points, variant: str, budget_gib: float) -> int | None:
    """The longest measured S at which ``variant`` is within the budget, every shorter S fitting too."""
    lengths, _, at = _by(points)
    best = None
    for s in lengths:
        p = at.get((s, variant))
        if p is None or p.step_mib is None or p.step_mib > budget_gib * 1024:
            break
        best = s
    return best


def markdown(points, budget_gib: float) -> str:
    """Two tables: memory (MiB, ✗ above the budget) and step time (s, and × plain Inductor at that S)."""
    lengths, variants, at = _by(points)
    head = "| technique | " + " | ".join(f"S={s}" for s in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    mem = [f"Step memory, MiB (parameters + peak above them; ✗ = over the {budget_gib:g} GiB budget):", "",
           head[:-1] + "| longest S within budget |", rule + "---:|"]
    tim = ["Step time, s (× plain Inductor's at the same S, same run):", "", head, rule]
    for v in variants:
        cells_m, cells_t = [], []
        for s in lengths:
            p = at.get((s, v))
            if p is None:
                cells_m.append("")
                cells_t.append("")
            elif p.step_mib is None:
                short = "n/a" if p.note.startswith("n/a") else "infeasible" if p.note.startswith("infeasible") else "error"
                cells_m.append(short)
                cells_t.append(short)
            else:
                over = " ✗" if p.step_mib > budget_gib * 1024 else ""
                cells_m.append(f"{p.step_mib:.0f}{over}")
                ref = at.get((s, "inductor"))
                ratio = f" ({p.step_s / ref.step_s:.2f}×)" if ref and ref.step_s and p.step_s else ""
                cells_t.append(f"{p.step_s:.2f}{ratio}" if p.step_s is not None else "-")
        fit = longest_measured(points, v, budget_gib)
        mem.append(f"| {v} | " + " | ".join(cells_m) + f" | {fit if fit else '-'} |")
        tim.append(f"| {v} | " + " | ".join(cells_t) + " |")
    notes = sorted({p.note for p in points if p.note and p.note.startswith(("n/a", "error"))})
    notes += [f"mst(planned) {p.note}" for p in points if p.variant == "mst(planned)" and p.note.startswith("plan")]
    return "\n".join(mem + [""] + tim + ([""] + [f"* {n}" for n in notes] if notes else []))


def plot(points, budget_gib: float, path: str, title: str) -> None:
    """Memory and step time against S (log axes), the budget as a horizontal line; ✗ marks over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, variants, at = _by(points)
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = "osD^v<>ph*"
    ref = {s: at[(s, "inductor")].step_s for s in lengths if (s, "inductor") in at and at[(s, "inductor")].step_s}
    relative = bool(ref)  # without an inductor row, absolute seconds
    for i, v in enumerate(variants):
        pts = [at[(s, v)] for s in lengths if (s, v) in at and at[(s, v)].step_mib is not None]
        if not pts:
            continue
        xs = [p.seq_len for p in pts]
        fit = longest_measured(points, v, budget_gib)
        label = f"{v} (fits up to S={fit})" if fit else f"{v} (over the budget)"
        line, = ax_m.plot(xs, [p.step_mib for p in pts], marker=markers[i % len(markers)], label=label, alpha=0.85)
        over = [p for p in pts if p.step_mib > budget_gib * 1024]
        if over:
            ax_m.scatter([p.seq_len for p in over], [p.step_mib for p in over], marker="x", s=90, color="red", zorder=5)
        # times at different S come from different runs (loads): plot each against plain Inductor's, same run
        timed = [p for p in pts if p.step_s is not None and (not relative or p.seq_len in ref)]
        ax_t.plot([p.seq_len for p in timed], [p.step_s / (ref[p.seq_len] if relative else 1) for p in timed],
                  marker=markers[i % len(markers)], label=v, color=line.get_color(), alpha=0.85)
    ax_m.axhline(budget_gib * 1024, color="red", linestyle="--", linewidth=1.2, label=f"budget {budget_gib:g} GiB")
    for ax, ylabel in ((ax_m, "step memory, MiB (params + grads + activations)"),
                       (ax_t, "step time ÷ plain Inductor's (same S, same run)" if relative else "step time, s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(s) for s in lengths])
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.set_title("peak memory (red ✗: over the budget)")
    ax_t.set_title("step time (fwd + bwd)" + (" relative to plain Inductor" if relative else ""))
    ax_m.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's options on ``mstfx bench`` (``--sweep`` switches the bench to a sweep)."""
    parser.add_argument("--sweep", metavar="S1,S2,...", default=None,
                        help="sweep these sequence lengths instead of one --seq-len ('...' doubles: 512,1024,...,16384); "
                             f"variants default to all of {SWEEP_VARIANTS}")
    parser.add_argument("--budget-gib", type=float, default=DEFAULT_BUDGET_GIB,
                        help="sweep: the stated memory budget in GiB (2^30 bytes) for mst(planned) and the plot's line "
                             f"(default {DEFAULT_BUDGET_GIB:g})")
    parser.add_argument("--mem-budget", type=float, default=DEFAULT_MEM_BUDGET,
                        help="sweep: torch._functorch.config.activation_memory_budget for inductor+mem_budget, in (0, 1] "
                             f"(default {DEFAULT_MEM_BUDGET:g})")
    parser.add_argument("--data", metavar="JSON", default=None,
                        help="sweep: keep results in this JSON file; points already in it are not measured again")
    parser.add_argument("--plot", metavar="PNG", default=None, help="sweep: draw memory and step time against S into this PNG")
    parser.add_argument("--plot-only", action="store_true", help="sweep: draw and print from --data without measuring")


def cli_sweep(args, configs: dict) -> int:
    """Run the sweep for parsed ``mstfx bench`` arguments; print the Markdown tables."""
    try:
        lengths = parse_lengths(args.sweep)
        variants = parse_variants(args.variants)
    except ValueError as e:
        print(f"mstfx bench: {e}", file=sys.stderr)
        return 2
    if not args.budget_gib > 0:
        print(f"mstfx bench: --budget-gib must be a positive number of GiB, got {args.budget_gib}", file=sys.stderr)
        return 2
    if not 0 < args.mem_budget <= 1:
        print(f"mstfx bench: --mem-budget is a fraction in (0, 1], got {args.mem_budget}", file=sys.stderr)
        return 2
    if args.plot_only and not args.data:
        print("mstfx bench: --plot-only needs --data (the JSON of an earlier sweep)", file=sys.stderr)
        return 2
    from .output_paths import check_writable

    # checked before measuring (minutes); both writers create missing directories
    problem = check_writable({"--plot": args.plot, "--data": None if args.plot_only else args.data}, make_dirs=True)
    if problem is not None:
        print(f"mstfx bench: {problem}", file=sys.stderr)
        return 2
    meta = {"config": args.config}
    try:
        if args.plot_only:
            data = load(args.data)
            if not data:
                raise SweepDataError(f"--data {args.data}: no such sweep file")
            setup = data.get("setup", {})  # draw with the setup the points were measured with
            for key in ("budget_gib", "mem_budget", "config", "batch"):
                setattr(args, key, setup.get(key, getattr(args, key)))
            pts = [SweepPoint(**p) for p in data.get("points", []) if p["seq_len"] in lengths and p["variant"] in variants]
        else:
            pts = run(configs[args.config], lengths, variants, args.repeats, budget_gib=args.budget_gib,
                      mem_budget=args.mem_budget, batch=args.batch, data_path=args.data, meta=meta)
    except SweepDataError as e:
        print(f"mstfx bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(p) for p in pts], indent=1))
    else:
        print(markdown(pts, args.budget_gib))
    if args.plot:
        title = (f"one training step, {args.config} Llama config, batch {args.batch}, fp32, CPU; "
                 f"mst(planned) = mstfx.transform(budget {args.budget_gib:g} GiB); "
                 f"inductor+mem_budget = activation_memory_budget {args.mem_budget:g}")
        plot(pts, args.budget_gib, args.plot, title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
