"""Capture: the ``mst`` torch.compile backend.

Dynamo hands the backend a torch-level FX graph per compiled frame.  The backend runs the pass
pipeline (``mstfx.passes``) on a copy of it, records the report, and compiles the result with
Inductor (``compile_fx``), so the rest of the model is compiled exactly as with plain Inductor.  If
the rewritten graph fails to compile, the original graph is compiled instead and the failure is
reported: an unsupported region is never miscompiled.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import warnings
from typing import Any

import torch

from .compat import first_line, graph_break_counts, graph_breaks_since, is_checkpoint_break, tracing_settings
from .compat.dynamo import current_tracing_context, is_restart_analysis, tracing
from .config import MstConfig
from .passes.attention import GUARD_KEY

log = logging.getLogger("mstfx")

#: Inductor options the mst backend compiles with.  ``reorder_for_peak_memory`` is off: its estimate
#: moves the chunk recomputes (matmuls whose inputs are all saved tensors) to the start of the
#: backward, so every layer's chunks are recomputed before the first gradient and chunking's saving
#: in backward is lost (the partitioner's order already places each chunk's recompute just before its
#: gradient; the measured peaks with and without are in docs/planning.md).
INDUCTOR_CONFIG_PATCHES = {"reorder_for_peak_memory": False}


def inductor_config_patches(offload_checkpoints: bool = False) -> dict:
    """:data:`INDUCTOR_CONFIG_PATCHES` plus mstfx's aten-level passes, each chained before any pass
    the user set: the joint-graph pass that saves checkpointed regions' outputs instead of recomputing
    them (``mstfx/post_grad/checkpoint_outputs.py``; with ``offload_checkpoints``, followed by the one
    that marks checkpointed layers' inputs for host offload, ``mstfx/post_grad/offload_checkpoints.py``)
    and the post-grad passes that add each chunk's partial gradient to the running sum with its chunk
    (``mstfx/post_grad/partial_sum_order.py``), then keep each chunk's bias-gradient reduction with
    its chunk (``mstfx/post_grad/bias_grad_order.py``)."""
    from mstfx.compat.inductor import inductor_config
    from mstfx.post_grad.bias_grad_order import BiasGradOrderPass
    from mstfx.post_grad.checkpoint_outputs import SaveCheckpointOutputsPass
    from mstfx.post_grad.offload_checkpoints import OffloadCheckpointInputsPass
    from mstfx.post_grad.partial_sum_order import PartialSumOrderPass

    config = inductor_config()
    user_post = config.post_grad_custom_post_pass
    if isinstance(user_post, PartialSumOrderPass):
        user_post = user_post.then
    if isinstance(user_post, BiasGradOrderPass):
        user_post = user_post.then
    user_joint = config.joint_custom_pre_pass
    if isinstance(user_joint, SaveCheckpointOutputsPass):
        user_joint = user_joint.then
    if isinstance(user_joint, OffloadCheckpointInputsPass):
        user_joint = user_joint.then
    if offload_checkpoints:
        user_joint = OffloadCheckpointInputsPass(then=user_joint)
    return {
        **INDUCTOR_CONFIG_PATCHES,
        "post_grad_custom_post_pass": PartialSumOrderPass(then=BiasGradOrderPass(then=user_post)),
        "joint_custom_pre_pass": SaveCheckpointOutputsPass(then=user_joint),
    }


class MstFallbackWarning(UserWarning):
    """A graph whose regions were found was compiled unchanged: its memory saving is lost."""


class MstGraphBreakWarning(UserWarning):
    """Dynamo split the step into several graphs: mst sees each alone, so a region cut by the break
    (a checkpointed layer, an LM head apart from its loss) keeps its full memory."""


#: Dynamo's graph-break counter as the last mst graph saw it (read when this module is imported, i.e.
#: when torch.compile looks the backend up), and the reasons already warned about (once each).
_breaks_seen = graph_break_counts()
_breaks_warned: set[str] = set()


def _new_graph_breaks() -> list[str]:
    """Graph-break reasons Dynamo recorded since the previous mst graph of this process was recorded
    (Dynamo counts a break when it resumes after it, so a reason may arrive with the graph after the
    split)."""
    return graph_breaks_since(_breaks_seen)


def _mark_graph_breaks_seen() -> None:
    """Called when a graph is recorded: breaks up to now belong to it (a restarted attempt records none)."""
    global _breaks_seen
    _breaks_seen = graph_break_counts()


def _warn_graph_breaks(report) -> None:
    """Each new graph-break reason once, as a warning that names the cause and what to do."""
    from .per_block import is_per_block_break

    for reason in report.graph_breaks:
        if is_per_block_break(reason):
            continue  # mstfx's own break before each separately compiled block (per_block=True)
        head = first_line(reason)
        if head in _breaks_warned:
            continue
        _breaks_warned.add(head)
        if is_checkpoint_break(reason):
            advice = ("Dynamo cannot trace a checkpointed layer whole (transformers' gradient checkpointing), so "
                      "each layer becomes its own graph and mst chunks nothing in it. Compile with "
                      "mstfx.compile(model) (or mstfx.transform), which applies the Dynamo settings that trace it "
                      "whole, scoped to the model's calls.")
        else:
            advice = ("mst rewrites each graph alone: a region cut by the break keeps its full memory. Remove the "
                      "break (torch._dynamo.explain(model)(...) shows where) or see mstfx.explain().")
        warnings.warn(f"mstfx: Dynamo split the step into several graphs (graph break: {head}; seen at mst graph "
                      f"{report.graph_index}). {advice}",
                      MstGraphBreakWarning, stacklevel=3)


def _count_and_warn(report) -> None:
    """Count the graph's final outcome in ``counters["mstfx"]``; a fallback (analysis, verification or
    compile failure) is also a warning the user sees, not only a report line."""
    from .compat.dynamo import dynamo_counters
    from .passes.common import ALREADY_REWRITTEN

    counters = dynamo_counters()

    counters["mstfx"]["regions_chunked"] += len(report.chunked)
    counters["mstfx"]["regions_left_unchanged"] += len(report.skipped)
    counters["mstfx"]["attention_rewritten"] += len(report.rewritten)
    for d in report.chunked:
        counters["mstfx"][f"chunked_{d.kind}"] += 1
    if report.error is None or report.error == ALREADY_REWRITTEN:
        return
    counters["mstfx"]["fallbacks"] += 1
    warnings.warn(
        f"mstfx: graph {report.graph_index} was compiled WITHOUT chunking ({report.error}); "
        "its memory saving is lost. Run mstfx.explain() for the regions, and report the graph if it "
        "should be supported (compiler='aot_eager' narrows down a compile failure).",
        MstFallbackWarning,
        stacklevel=3,
    )


#: How many graph reports :data:`REPORTS` keeps.  A long run that recompiles (new lengths, dynamic
#: shapes) would otherwise grow it without end; each backend keeps all of its own (``backend.reports``).
MAX_REPORTS = 256
#: Reports of the graphs compiled by any mst backend in this process, newest last: the newest
#: :data:`MAX_REPORTS` (``mstfx.explain()`` reads them).
REPORTS: collections.deque = collections.deque(maxlen=MAX_REPORTS)
_graph_ids = itertools.count()


class MstBackend:
    """A ``torch.compile`` backend: ``torch.compile(model, backend=MstBackend(MstConfig(...)))``."""

    def __init__(self, config: MstConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("pass either a MstConfig or keyword options, not both")
        if config is not None and not isinstance(config, MstConfig):
            raise TypeError(f"MstBackend takes a MstConfig or keyword options, got {config!r}; e.g. MstBackend(mini_sequences=8)")
        self.config = config if config is not None else MstConfig(**options)
        self.reports: list = []
        self._warned_region_names: set[str] = set()
        # Entered by ``torch._dynamo.optimize(backend)`` around every call of the compiled function (an
        # instance attribute: Dynamo's backend wrapper copies the instance's __dict__, not the class's).
        # ``torch.compile`` drops it; ``mstfx.compile`` applies the same settings itself.
        self.backend_ctx_ctor = tracing_settings

    def __repr__(self) -> str:
        return f"MstBackend({self.config})"

    def _compiler(self, example_inputs=()):
        if self.config.compiler == "inductor":
            from .compat.inductor import compile_fx

            # (compile_fx applies the patches to the backward too, which AOT compiles lazily)
            compiler = functools.partial(compile_fx(), config_patches=inductor_config_patches(self.config.offload_checkpoints))
            if self.config.offload_checkpoints:
                from .offload import offloading_compiler

                compiler = offloading_compiler(compiler, example_inputs)
            return compiler
        from .compat.dynamo import lookup_backend

        return lookup_backend(self.config.compiler)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None):
        """Compile one Dynamo graph.  ``options`` and ``mode`` are what ``torch.compile(model, backend=...,
        options=..., mode=...)`` passes: ``options`` are :class:`MstConfig` fields (over this backend's
        config), ``mode`` is Inductor's (``"max-autotune"``, ...)."""
        if options or mode:
            return self._with_compile_args(options, mode)(gm, example_inputs)
        from mstfx.passes import GraphReport, run_passes

        breaks = _new_graph_breaks()
        try:
            new_gm, report = run_passes(gm, example_inputs, self.config, -1)
        except Exception as err:  # a bug in analysis must not break the user's training
            if _is_dynamo_control_flow(err) or self.config.sequence_parallel is not None:
                raise
            log.warning("mstfx: analysis failed (%s); compiling the graph unchanged", err, exc_info=True)
            new_gm, report = gm, GraphReport(-1, error=f"analysis failed: {type(err).__name__}: {err}")
        compiler = self._compiler(example_inputs)
        compiled = None
        if new_gm is not gm:
            try:
                compiled = compiler(new_gm, example_inputs)
                mask_guard = new_gm.meta.get(GUARD_KEY)
                if mask_guard is not None:
                    compiled = GuardedGraph(mask_guard, compiled, compiler, example_inputs)
            except Exception as err:
                if _is_dynamo_control_flow(err) or self.config.sequence_parallel is not None:
                    raise  # e.g. TensorifyScalarRestartAnalysis: Dynamo re-traces and calls us again; under
                    # sequence parallelism the unchanged graph would attend within each rank's shard only
                log.warning("mstfx: compiling the rewritten graph failed (%s); compiling it unchanged", err, exc_info=True)
                report.roll_back(f"compile of rewritten graph failed: {type(err).__name__}: {err}")
        if compiled is None:
            compiled = compiler(gm, example_inputs)  # a restart raised here, too, records nothing
        report.graph_breaks = breaks
        # Recorded only now: when Dynamo restarts its analysis (it raises through the compiler, e.g. to
        # specialise a float under dynamic=True) it calls the backend again for the same graph, and only
        # the attempt whose code is returned is a graph of the program.
        self._record(report)
        return compiled

    def _with_compile_args(self, options: dict | None, mode: str | None) -> "MstBackend":
        """This backend with ``torch.compile``'s ``options`` (MstConfig fields) and ``mode`` (Inductor's)
        applied; reports go to this backend."""
        import dataclasses

        fields = {f.name for f in dataclasses.fields(MstConfig)}
        unknown = sorted(set(options or {}) - fields)
        if unknown:
            raise ValueError(f"torch.compile(..., backend='mst', options=...) takes MstConfig fields; {unknown} are "
                             f"not among them ({sorted(fields)})")
        if mode is not None:
            from .compat.inductor import mode_options

            mode_options(mode)  # raises on an unknown mode
        return _ModeBackend(dataclasses.replace(self.config, **(options or {})), mode, self)

    def _record(self, report) -> None:
        """Number, keep, log, count and (on a fallback) warn about one compiled graph's report."""
        from .distributed import warn_if_ddp_split

        report.graph_index = next(_graph_ids)
        self.reports.append(report)
        REPORTS.append(report)
        warn_if_ddp_split(report)
        log.info("%s", report)
        _mark_graph_breaks_seen()
        _warn_graph_breaks(report)
        _count_and_warn(report)
        _warn_unknown_region_names(self, report)


class _ModeBackend(MstBackend):
    """An :class:`MstBackend` for one ``torch.compile(..., options=, mode=)`` call: its own config, Inductor's
    mode options added to the compile, reports shared with the backend it came from."""

    def __init__(self, config: MstConfig, mode: str | None, parent: MstBackend) -> None:
        super().__init__(config)
        self.mode = mode
        self.reports = parent.reports
        self._warned_region_names = parent._warned_region_names

    def _compiler(self, example_inputs=()):
        compiler = super()._compiler(example_inputs)
        if self.mode is None or self.config.compiler != "inductor":
            return compiler
        from .compat.inductor import inductor_config, mode_options

        options = mode_options(self.mode)

        def compile_with_mode(gm, example_inputs):
            with inductor_config().patch(options):
                return compiler(gm, example_inputs)

        return compile_with_mode


def _warn_unknown_region_names(backend: MstBackend, report) -> None:
    """``region_chunks`` names that match no region of any graph this backend compiled so far: a typo
    would otherwise silently keep the default M.  Warned once per name."""
    asked = set(backend.config.region_chunks)
    if not asked:
        return
    from .regions.registry import REGION_KINDS

    kinds = {k.name for k in REGION_KINDS}
    seen = {d.where for r in backend.reports for d in r.decisions if d.kind in kinds}
    warned = backend._warned_region_names
    unknown = sorted(asked - seen - warned)
    if not unknown:
        return
    warned.update(unknown)
    here = sorted({d.where for d in report.decisions if d.kind in kinds})
    warnings.warn(
        f"mstfx: region_chunks names {unknown} match no region in graph {report.graph_index} (nor in an "
        f"earlier graph of this backend); its regions are {here or 'none'}. Use the names mstfx.explain() "
        "shows in its 'where' column (a region in a later graph is matched when that graph compiles).",
        UserWarning,
        stacklevel=3,
    )


class GuardedGraph:
    """The compiled graph whose attention rewrite relies on run-time checks, and its exact fallback.

    Each call first runs the small guard graph (it reads only B×S inputs such as the padding mask):
    when every check holds the rewritten graph runs, otherwise the graph that keeps the mask, compiled
    on the first call that needs it.  The guard's answer is a host-side bool (one device sync).
    """

    def __init__(self, mask_guard, compiled, compiler, example_inputs) -> None:
        self.guard = mask_guard.guard
        # Dynamo's example inputs (fake tensors, symbolic sizes under dynamic shapes): the masked graph is
        # compiled for the same input shapes as the rewritten one, not specialised to the first failing call.
        self.example_inputs = list(example_inputs)
        self.tracing_context = current_tracing_context()
        self.masked_gm = mask_guard.masked
        self.compiled = compiled
        self.compiler = compiler
        self.masked = None
        self.calls = {"causal": 0, "masked": 0}

    def __call__(self, *args):
        if bool(self.guard(*args)):
            self.calls["causal"] += 1
            return self.compiled(*args)
        self.calls["masked"] += 1
        if self.masked is None:
            log.info("mstfx: inputs fail the attention guard; compiling the graph that keeps the mask")
            with tracing(self.tracing_context):
                self.masked = self.compiler(self.masked_gm, self.example_inputs)
        return self.masked(*args)


def _is_dynamo_control_flow(err: BaseException) -> bool:
    """Exceptions Dynamo raises through a backend on purpose (restart the analysis): never swallow them."""
    return is_restart_analysis(err)


def backend(config: MstConfig | None = None, **options: Any) -> MstBackend:
    """A configured backend: ``torch.compile(model, backend=mstfx.backend(mini_sequences=8))``."""
    return MstBackend(config, **options)


def mst(gm: torch.fx.GraphModule, example_inputs, **compile_args):
    """The ``"mst"`` backend with default options (registered by entry point ``torch_dynamo_backends``);
    ``torch.compile``'s ``options`` (MstConfig fields) and ``mode`` (Inductor's) are taken."""
    return MstBackend()(gm, example_inputs, **compile_args)


mst.backend_ctx_ctor = tracing_settings  # for torch._dynamo.optimize("mst"); see MstBackend.__init__
