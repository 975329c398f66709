"""Longest sequence against the number of GPUs with Ulysses sequence parallelism, from the cost model.

For each GPU count the sequence-parallel degree is the GPU count, or the largest divisor of it that
Ulysses allows for the model's heads (``cost_model.check_sequence_parallel``); FSDP shards the state
over every GPU.  Each point is ``planner.longest_seq_len`` (sympy, seconds), the longest whole sequence
whose per-GPU peak fits the budget.  Published figures of other systems are drawn beside it, marked
as theirs; simulated points (``mstfx simulate ... --json``) can be added with ``--simulated``.

    python examples/sequence_parallel_sweep.py --model llama3-8b --gpu-gb 80 --gpus 1,2,4,8,16,32 \\
        --plot docs/sequence_parallel.png --json docs/sequence_parallel.json \\
        --simulated docs/simulate-llama3-8b-8xsp8-zero-offload-compiled.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mstfx.planning import cost_model as cm
from mstfx.planning import planner

#: published longest sequences (tokens) of other systems; (label, GPUs, tokens, source)
PUBLISHED = [
    ("ALST (Llama-8B, Ulysses + tiling + ckpt offload + ZeRO-3 offload)", 1, 500_000, "arXiv 2506.13996"),
    ("ALST (Llama-8B, Ulysses + tiling + ckpt offload + ZeRO-3 offload)", 8, 3_700_000, "arXiv 2506.13996"),
    ("ALST (Llama-8B, Ulysses + tiling + ckpt offload + ZeRO-3 offload)", 32, 15_000_000, "arXiv 2506.13996"),
    ("TRL (Qwen3-8B, context parallel + chunked NLL + ckpt offload)", 8, 1_000_000, "TRL docs"),
    ("torchtitan (Llama3-8B, context parallel 8)", 8, 262_144, "torchtitan CP docs"),
]
MODES = ("standard", "checkpointing", "mst", "mst+checkpointing", "mst+checkpointing+offload")
LABELS = {"standard": "standard", "checkpointing": "checkpointing", "mst": "MsT", "mst+checkpointing": "MsT + ckpt",
          "mst+checkpointing+offload": "MsT + ckpt + offload"}


def degree(arch: cm.Arch, gpus: int) -> int:
    """The largest sequence-parallel degree ≤ ``gpus`` dividing it that the heads allow."""
    for n in range(gpus, 0, -1):
        if gpus % n == 0:
            try:
                return cm.check_sequence_parallel(arch, n, gpus)
            except ValueError:
                continue
    return 1


def sweep(model: str, gpu_gb: float, gpus: list[int], optimizer: str, program: str) -> list[dict]:
    arch = planner.arch_of(model)
    rows = []
    for g in gpus:
        n = degree(arch, g)
        row = {"gpus": g, "sequence_parallel": n, "kv_replication": cm.kv_replication(arch, n)}
        for mode in MODES:
            row[mode] = planner.longest_seq_len(arch, gpu_gb, mode=mode, optimizer=optimizer, gpus=g,
                                                sequence_parallel=n, program=program)
        # host memory per node at the offload mode's longest S (bf16 checkpoints, the optimizer's host state)
        s = row["mst+checkpointing+offload"]
        per_gpu = cm.evaluate(cm.offload.checkpoint_bytes(arch.hidden, arch.layers, 2, cm.S, cm.B), s // n, 1)
        per_gpu += cm.offload.host_state_bytes(arch.n_params, optimizer) / g
        row["host_node_gib_offload"] = round(per_gpu * min(g, cm.GPUS_PER_NODE) / 2**30, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict], path: str, title: str, simulated: list[tuple[str, int, int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [r["gpus"] for r in rows]
    for mode in MODES:
        ax.plot(xs, [r[mode] for r in rows], marker="o", label=f"mstfx cost model: {LABELS[mode]}")
    for label, g, s in simulated:
        ax.plot([g], [s], marker="*", markersize=14, linestyle="none", label=label)
    markers = {"ALST": "s", "TRL": "^", "torchtitan": "D"}
    seen = set()
    for label, g, s, _ in PUBLISHED:
        first = label not in seen
        seen.add(label)
        ax.plot([g], [s], marker=markers[label.split()[0]], color="k", markerfacecolor="none", markersize=9,
                linestyle="none", label=f"theirs, published: {label}" if first else None)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("GPUs (sequence-parallel degree = GPUs; FSDP over all)")
    ax.set_ylabel("longest sequence (tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--gpus", default="1,2,4,8,16,32")
    ap.add_argument("--optimizer", default="offload", help="a cost-model setup (default offload: AdamW state on the host)")
    ap.add_argument("--program", default="compiled", choices=cm.PROGRAMS)
    ap.add_argument("--plot", default="docs/sequence_parallel.png")
    ap.add_argument("--json", default=None)
    ap.add_argument("--simulated", nargs="*", default=[], help="mstfx simulate --json outputs to mark on the plot")
    args = ap.parse_args()
    gpus = [int(x) for x in args.gpus.split(",")]
    rows = sweep(args.model, args.gpu_gb, gpus, args.optimizer, args.program)
    simulated = []
    for path in args.simulated:
        out = json.loads(Path(path).read_text())
        for mode, r in out["modes"].items():
            simulated.append((f"mstfx simulate ({out['program']}, {out['optimizer']}): {mode}", out["gpus"], r["max_seq_len"]))
    title = (f"{args.model}, {args.gpu_gb:g} GiB per GPU, optimizer {args.optimizer}, {args.program} program: "
             f"longest sequence with Ulysses SP")
    plot(rows, args.plot, title, simulated)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "gpu_gib": args.gpu_gb, "optimizer": args.optimizer,
                                               "program": args.program, "rows": rows, "published": PUBLISHED,
                                               "simulated": simulated}, indent=2) + "\n")
    print("| GPUs | SP | " + " | ".join(LABELS[m] for m in MODES) + " | host/node GiB (offload) |")
    print("|---|---|" + "---|" * len(MODES) + "---|")
    for r in rows:
        print(f"| {r['gpus']} | {r['sequence_parallel']} | " + " | ".join(f"{r[m]:,}" for m in MODES)
              + f" | {r['host_node_gib_offload']:,} |")


if __name__ == "__main__":
    main()
