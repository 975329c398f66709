"""The plot ``mstfx simulate --plot`` writes: peak memory against S per mode, with the GPU size."""

from __future__ import annotations

from ...vocabulary import Mode
from .options import MODE_LABELS


def default_plot_name(out: dict) -> str:
    """``simulate-<model>-[<gpus>x]<GiB>gib-<optimizer>[-compiled].png``: runs of one model with another GPU,
    optimizer or program do not overwrite each other's plot."""
    gpus = f"{out['gpus']}x" if out["gpus"] > 1 else ""
    gpus += f"sp{out['sequence_parallel']}-" if out.get("sequence_parallel", 1) > 1 else ""
    program = f"-{out['program']}" if out.get("program", "eager") != "eager" else ""
    return f"simulate-{out['model']}-{gpus}{out['gpu_gib']:g}gib-{out['optimizer']}{program}.png"


def save_plot(out: dict, path: str) -> None:
    """Write the plot of ``out`` (:func:`.cli.run_cli`'s result) to ``path`` as a PNG: each mode's peak
    against S (host memory dotted) and the GPU size as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, r in out["modes"].items():
        if r["runs"]:
            s, v = zip(*r["runs"])
            line, = ax.plot(s, v, marker="o", label=f"{MODE_LABELS[Mode.parse(mode)]} (max {r['max_seq_len']:,})")
            host = [(hs, hv) for hs, hv in r.get("host_runs", []) if hv > 0]
            if host:  # host memory of the same runs, dashed, in the mode's colour
                hs, hv = zip(*host)
                ax.plot(hs, hv, marker="x", linestyle=":", color=line.get_color(), label=f"{MODE_LABELS[Mode.parse(mode)]}: host memory")
    ax.axhline(out["gpu_gib"], color="k", linestyle="--", label=f"GPU {out['gpu_gib']:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length S (tokens)")
    ax.set_ylabel("peak GPU memory per GPU (GiB); dotted: host memory")
    gp = f"{out['gpus']}×" if out["gpus"] > 1 else ""
    ax.set_title(f"{out['model']}, {gp}{out['gpu_gib']:g} GiB, optimizer {out['optimizer']}, batch {out['batch']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
