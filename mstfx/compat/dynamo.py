"""The Dynamo settings a model's step needs to be traced as whole graphs, scoped to mstfx's own calls.

Why: since transformers 5.25 (with the ``kernels`` package it now requires) a checkpointed decoder
layer's forward sets a context variable (``kernels``' ``CompileableContextVar``, set and reset around
each attention forward), and ``torch.utils.checkpoint`` under Dynamo refuses any side effect on an
object from outside the checkpointed function: Dynamo breaks the graph in every checkpointed layer,
each layer becomes a graph of its own, and nothing of mst's saving is left (no MLP chunked, the mask's
construction out of sight of the attention pass, the loss apart from the LM head).  A
``logger.warning_once`` inside a layer (``use_cache`` with checkpointing) breaks the graph the same way.

Dynamo has a setting for each: ``skip_fwd_side_effects_in_bwd_under_checkpoint`` (run the forward's
side effects once, in the forward, not again in the backward's recompute: here a set-and-reset that
leaves nothing behind) and ``ignore_logging_functions`` (a call to the listed logging functions is
dropped from the graph).  Both are process-wide settings of Dynamo, so mstfx never sets them for the
user: :func:`tracing_settings` is a context manager that applies them only while one of mstfx's
compiled calls runs (``mstfx.compile``, ``mstfx.transform``, ``torch._dynamo.optimize(mstfx.backend())``,
the compiled-program simulation) and restores them after.  Plain ``torch.compile(model,
backend="mst")`` gives a backend no way to set them (``torch.compile`` wraps the backend and drops its
``backend_ctx_ctor``): there the backend warns when such a graph break splits the step
(:func:`graph_breaks_since`) and names ``mstfx.compile`` as the fix.

Checked on torch 2.13.0 with transformers 4.57.6, 5.24 and 5.25, and on torch 2.14.1 with transformers
5.25 (``mstfx.compat.CHECKED_ON``).  A side effect of a user's own in a
checkpointed forward (a counter, a list append) runs once per step under these settings, where eager
checkpointing runs it again in the recompute.

The rest of this module are the other Dynamo internals mstfx uses, one small entry each: the
graph-break and ``mstfx`` counters, the compiler registry, the exception that restarts an analysis,
the tracing context a deferred compile re-enters, the fake mode of a graph's values, the compile-time
table of the profiling tool and, for the simulation only, the meta-device autocast trace.  Every entry
imports torch when called, never when this module is imported; a missing one raises
:class:`mstfx.compat.MissingTorchAPI` unless its docstring names a fallback.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
from typing import Any, Callable, Iterator

from .errors import private

#: Logging functions a traced step may call inside a layer: dropped from the graph while
#: :func:`tracing_settings` applies (transformers adds ``warning_once``/``warning_advice`` to
#: ``logging.Logger``).
_LOGGER_METHODS = ("warning_once", "warning_advice", "info_once")


@contextlib.contextmanager
def tracing_settings(nested_graph_breaks: bool = False) -> Iterator[None]:
    """Dynamo settings for tracing checkpointed layers whole, applied only inside this context.

    ``nested_graph_breaks``: a break inside a called function resumes in that function and keeps the
    callers in the same trace.  Per-block compilation breaks the model's trace at the module that runs
    the blocks on purpose; without it the model's own ``forward`` frame is cut there and returns its
    logits from the LM-head graph (a graph output, so the tokens×vocab logits are built even under
    ``mstfx.drop_logits``), with it the wrapper that drops them stays in the graph (the measured peaks
    of both are in docs/per_block.md)."""
    dynamo_config = private("torch._dynamo.config", used_for="the tracing settings of checkpointed layers")
    ignored = set(dynamo_config.ignore_logging_functions)
    ignored.update(f for f in (getattr(logging.Logger, name, None) for name in _LOGGER_METHODS) if f is not None)
    patches = dict(skip_fwd_side_effects_in_bwd_under_checkpoint=True, ignore_logging_functions=ignored)
    if nested_graph_breaks:
        patches["nested_graph_breaks"] = True
    with dynamo_config.patch(**patches):
        yield


def with_tracing_settings(fn: Callable, nested_graph_breaks: bool = False) -> Callable:
    """``fn`` (a compiled callable) run under :func:`tracing_settings` at every call: Dynamo traces on
    the first call of each new shape, inside the call."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with tracing_settings(nested_graph_breaks):
            return fn(*args, **kwargs)

    return call


#: Graph-break reasons (Dynamo's ``counters["graph_break"]``) of HF checkpointed layers that
#: :func:`tracing_settings` resolves.
CHECKPOINT_BREAK_MARKERS = ("HOP: Unsafe side effect", "logging.Logger method not supported")


def graph_break_counts() -> collections.Counter:
    """A copy of Dynamo's graph-break counter (reason → count), read only."""
    return collections.Counter(dynamo_counters()["graph_break"])


def graph_breaks_since(before: collections.Counter) -> list[str]:
    """Graph-break reasons Dynamo recorded after ``before`` (a :func:`graph_break_counts` snapshot)."""
    now = graph_break_counts()
    return [reason for reason, n in now.items() if n > before.get(reason, 0)]


def first_line(reason: str) -> str:
    """A graph-break reason's headline (Dynamo's messages run to many lines)."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    head = lines[0] if lines else str(reason)
    context = next((ln for ln in lines if ln.startswith("Developer debug context:")), "")
    return f"{head} ({context.removeprefix('Developer debug context:').strip()})" if context else head


def is_checkpoint_break(reason: str) -> bool:
    """A break :func:`tracing_settings` resolves (a side effect or a logger call in a checkpointed layer)."""
    return any(marker in reason for marker in CHECKPOINT_BREAK_MARKERS)


@contextlib.contextmanager
def meta_autocast_traced_as_cpu():
    """While Dynamo traces the step on the meta device, ``torch.autocast("meta", enabled=False)`` is
    traced as the same context for ``"cpu"``.

    transformers 4.57's rotary embedding forces fp32 with ``torch.autocast(device_type=x.device.type,
    enabled=False)``; for meta tensors that is ``"meta"``, a device type autocast does not know
    (``torch.get_autocast_dtype("meta")``: "unsupported scalarType"), so the capture stopped there
    (transformers 5's ``maybe_autocast`` skips it on meta instead).  Disabling autocast changes nothing
    for meta tensors, and the graph keeps an autocast context where a real device has one, so the
    passes decide as they would there.  Used only by the compiled-program simulation (mstfx.tools), scoped to its capture's trace: Dynamo's autocast handling is
    restored on exit; an enabled autocast on meta is left to fail as before."""
    AutocastModeVariable = private("torch._dynamo.variables.ctx_manager", "AutocastModeVariable",
                                   used_for="tracing a disabled autocast on the meta device (simulation)")

    create = AutocastModeVariable.__dict__["create"]

    def create_on_cpu(func, args, kwargs):
        var = create.__func__(func, args, kwargs)
        values = list(var.target_values)
        if values[0] == "meta" and values[2] is False:
            values[0] = "cpu"
            var.target_values = values
        return var

    AutocastModeVariable.create = staticmethod(create_on_cpu)
    try:
        yield
    finally:
        AutocastModeVariable.create = create


def dynamo_counters() -> collections.defaultdict:
    """Dynamo's process-wide counters (``torch._dynamo.utils.counters``, name → Counter): read for the
    graph-break reasons, and where the backend keeps its own ``counters["mstfx"]`` beside Dynamo's
    (``torch._dynamo.utils.counters`` is the table ``torch._dynamo.explain`` and the compile logs read).
    Checked on torch 2.13.0 and 2.14.1; missing: :class:`MissingTorchAPI`."""
    return private("torch._dynamo.utils", "counters", used_for="graph-break reasons and the mstfx counters")


def lookup_backend(name: str) -> Callable:
    """The compiler registered under ``name`` with Dynamo (``"aot_eager"``, ``"eager"``, ...): what an
    ``MstConfig(compiler=...)`` other than Inductor compiles the rewritten graph with.
    ``torch._dynamo.backends.registry.lookup_backend``; checked on torch 2.13.0 and 2.14.1; missing:
    :class:`MissingTorchAPI`."""
    return private("torch._dynamo.backends.registry", "lookup_backend", used_for="compilers other than Inductor")(name)


def is_restart_analysis(err: BaseException) -> bool:
    """Whether ``err`` is Dynamo's ``RestartAnalysis`` (raised through a backend on purpose: the backend
    must let it pass, never fall back on it).  Checked on torch 2.13.0 and 2.14.1; missing:
    :class:`MissingTorchAPI`."""
    return isinstance(err, private("torch._dynamo.exc", "RestartAnalysis", used_for="letting Dynamo restart an analysis"))


def current_tracing_context():
    """Dynamo's tracing context of the graph being compiled now (``torch._guards.TracingContext.try_get()``,
    None outside a compile): kept by a backend that compiles a second graph later, on the first call
    that needs it, so that graph is compiled in the same context (fake mode, guards, shape env).
    Checked on torch 2.13.0 and 2.14.1; missing: :class:`MissingTorchAPI`."""
    return private("torch._guards", "TracingContext", used_for="compiling the masked attention graph later").try_get()


def tracing(context) -> contextlib.AbstractContextManager:
    """Re-enter a context from :func:`current_tracing_context` (``torch._guards.tracing``).  Checked on
    torch 2.13.0 and 2.14.1; missing: :class:`MissingTorchAPI`."""
    return private("torch._guards", "tracing", used_for="compiling the masked attention graph later")(context)


def detect_fake_mode(values) -> Any:
    """The fake-tensor mode of ``values`` (None when none is fake): ``torch._guards.detect_fake_mode``.
    Used by the compiled-program simulation to rerun a fallback kernel on its inputs' layouts.
    Checked on torch 2.13.0 and 2.14.1; missing: :class:`MissingTorchAPI`."""
    return private("torch._guards", "detect_fake_mode", used_for="the compiled-program simulation")(values)


def compile_times() -> dict[str, float]:
    """Seconds spent per compile phase so far (Dynamo, AOT autograd, partitioner, Inductor, ...), from
    ``torch._dynamo.utils.compile_times(repr="csv", aggregate=True)``; the compile-time tool reads it.
    Checked on torch 2.13.0 and 2.14.1; missing: :class:`MissingTorchAPI`."""
    names, values = private("torch._dynamo.utils", "compile_times", used_for="the compile-time tool")(repr="csv", aggregate=True)
    return {k: float(v) for k, v in zip(names, values)}
