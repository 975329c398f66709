"""The table ``mstfx simulate`` prints: the longest sequence per mode and optimizer setup."""

from __future__ import annotations

from ...vocabulary import Mode
from .options import MODE_LABELS


def print_table(out: dict) -> None:
    """Print the table of ``out`` (:func:`.cli.run_cli`'s result): per mode the longest S, its peak
    broken down, host memory and M; then the notes and the time taken."""
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{out['model']} ({out['params_billion']}B params) on "
        + (f"{out['gpus']} × " if out["gpus"] > 1 else "")
        + f"{out['gpu_gib']:g} GiB, batch {out['batch']}, optimizer {out['optimizer']}, {out.get('program', 'eager')} program"
        + (f", {out['strategy']} (per-GPU)" if out["strategy"] else "")
        + (f", sequence parallel {out['sequence_parallel']} (S/{out['sequence_parallel']} tokens per GPU)"
           if out.get("sequence_parallel", 1) > 1 else "")
    )
    node = out["gpus"] > 1
    t = Table(title=title)
    cols = ["mode", "max S", "× standard", "params", "grads", "optimizer", "activations", "peak GiB", "host GiB"]
    cols += [f"host/node GiB ({out.get('gpus_per_node', 1)} GPUs)"] if node else []
    for col in cols + ["M (mlp/head)"]:
        t.add_column(col, justify="right" if col != "mode" else "left")
    for mode, r in out["modes"].items():
        pk = r["peak_gib"]
        if not pk:
            t.add_row(MODE_LABELS[Mode.parse(mode)], "0", *["-"] * (len(cols) - 2), r["note"][:60])
            continue
        ch = r["chunks"]
        t.add_row(
            MODE_LABELS[Mode.parse(mode)],
            f"{r['max_seq_len']:,}",
            f"{r['vs_standard']:.2f}" if r["vs_standard"] else "-",
            f"{pk['params']:.2f}",
            f"{pk['grads']:.2f}",
            f"{pk['optimizer_state']:.2f}",
            f"{pk['activations']:.2f}",
            f"{pk['total']:.2f}",
            f"{pk.get('host', 0.0):.2f}",
            *([f"{pk.get('host_node', 0.0):.2f}"] if node else []),
            f"{ch.get('mlp', '-')}/{ch.get('lm_head', '-')}" if ch else "-",
        )
    console = Console(width=max(120, Console().width))
    console.print(t)
    notes = {r["note"] for r in out["modes"].values() if r["note"]}
    for n in notes:
        console.print(f"[bold red]{n}[/]")
    console.print(f"simulated in {out['seconds']} s")
