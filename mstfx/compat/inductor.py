"""Inductor internals mstfx uses: its config module, its compile entry point, the custom-pass base
class of the aten-level passes and, for the compiled-program simulation only, its joint-graph passes,
decomposition table, lowering tables and realize thresholds.

Every entry imports Inductor when called, never when this module is imported (the simulation's
tables stay out of ``import mstfx``).  Checked on torch 2.13.0 and 2.14.1 (``mstfx.compat.CHECKED_ON``);
a missing entry raises :class:`mstfx.compat.MissingTorchAPI` unless its docstring names a fallback.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import private


def inductor_config():
    """Inductor's config module (``torch._inductor.config``): read for the user's custom passes (mstfx
    chains its own before them), and patched, never set, for one compile (``.patch(...)``)."""
    return private("torch._inductor.config", used_for="Inductor options and custom passes")


def compile_fx() -> Callable:
    """Inductor's compile entry point (``torch._inductor.compile_fx.compile_fx``), what the mst backend
    hands the rewritten graph to with its config patches."""
    return private("torch._inductor.compile_fx", "compile_fx", used_for="compiling with Inductor")


def mode_options(mode: str) -> dict:
    """The Inductor options of ``torch.compile``'s ``mode`` (``torch._inductor.list_mode_options``);
    raises for an unknown mode."""
    return private("torch._inductor", "list_mode_options", used_for="torch.compile(mode=...) with the mst backend")(mode)


def custom_graph_pass_api() -> tuple[type, Callable]:
    """``(CustomGraphPass, get_hash_for_files)`` of ``torch._inductor.custom_graph_pass``: the base class
    Inductor requires of a custom pass (its ``uuid`` keys the FX graph cache) and the hash of the
    source files a pass's ``uuid`` is made of."""
    used_for = "mstfx's aten-level passes inside Inductor"
    return (private("torch._inductor.custom_graph_pass", "CustomGraphPass", used_for=used_for),
            private("torch._inductor.custom_graph_pass", "get_hash_for_files", used_for=used_for))


def joint_graph_passes(joint) -> Any:
    """Inductor's joint-graph passes on ``joint`` (``torch._inductor.compile_fx._recursive_joint_graph_passes``,
    bodies of ``invoke_subgraph`` skipped): the compiled-program simulation partitions the joint graph
    Inductor would."""
    run = private("torch._inductor.compile_fx", "_recursive_joint_graph_passes", used_for="the compiled-program simulation")
    return run(joint, skip_invoke_subgraph=True)


def decomposition_table() -> dict:
    """Inductor's decompositions (``torch._inductor.decomposition.select_decomp_table()``), what AOT
    autograd lowers the graph with in the compiled-program simulation."""
    return private("torch._inductor.decomposition", "select_decomp_table", used_for="the compiled-program simulation")()


def lowering_tables() -> tuple[Any, Any]:
    """``(lowerings, fallbacks)`` of ``torch._inductor.lowering``: the operators Inductor generates code
    for, and those among them it calls as an extern kernel instead.  The compiled-program simulation
    reads from them which outputs Inductor lays out itself."""
    used_for = "the compiled-program simulation"
    return (private("torch._inductor.lowering", "lowerings", used_for=used_for),
            private("torch._inductor.lowering", "fallbacks", used_for=used_for))


def realize_thresholds(cpu: bool) -> tuple[int, int, int]:
    """``(reads_on_reuse, max_reads, max_ops)``: when Inductor stores a value instead of inlining it into
    its readers (``realize_reads_threshold``, ``realize_acc_reads_threshold``,
    ``realize_opcount_threshold``; an unset one takes Inductor's per-device default, the CPU one or the
    private ``_realize_*_default``).  The compiled-program simulation follows the same rule."""
    c = inductor_config()
    try:
        max_reads = c.realize_acc_reads_threshold
        if max_reads is None:
            max_reads = c.realize_cpu_acc_reads_threshold if cpu else c._realize_acc_reads_threshold_default
        max_ops = c.realize_opcount_threshold
        if max_ops is None:
            max_ops = c.realize_cpu_opcount_threshold if cpu else c._realize_opcount_threshold_default
        return c.realize_reads_threshold, max_reads, max_ops
    except AttributeError:
        # each name again through private(), so the error names the one that is gone
        for name in ("realize_reads_threshold", "realize_acc_reads_threshold", "realize_opcount_threshold",
                     "realize_cpu_acc_reads_threshold", "_realize_acc_reads_threshold_default",
                     "realize_cpu_opcount_threshold", "_realize_opcount_threshold_default"):
            private("torch._inductor.config", name, used_for="the compiled-program simulation's realize rule")
        raise


def has_auto_chunker() -> bool:
    """Whether this Inductor has the ``auto_chunker`` pass (``inductor_config().auto_chunker``), a
    baseline of the benchmarks.  Fallback: False where the config (or the option) is missing, and the
    benchmark reports the variant as not available."""
    try:
        return hasattr(inductor_config(), "auto_chunker")
    except ImportError:
        return False


def auto_chunker_enabled():
    """A config patch that turns Inductor's ``auto_chunker`` on for the compiles inside it (benchmarks
    only); check :func:`has_auto_chunker` first."""
    return inductor_config().patch({"auto_chunker.enable": True})
