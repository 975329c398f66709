"""Measuring: the real CPU peak of a training step (compiled code included) and its step time.

``torch.cuda.max_memory_allocated`` has no CPU twin, and RSS blurs the allocator.  The profiler records
every CPU allocation and free, Inductor's generated kernels included; the running sum of those
events is the exact number of bytes live above what existed when profiling began.
"""

from __future__ import annotations

import gc
import statistics
import time
import types
from collections.abc import Callable

import torch


def fresh_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own, to hand to ``torch.compile``.

    Dynamo keeps compiled graphs per code object, so a lambda written once and compiled many times
    (with new models or backends) would meet the graphs and guards of its earlier calls.  A copy with
    its own code object compiles afresh, and its graphs die with it; ``torch._dynamo.reset()`` would do
    the same by clearing every compiled graph in the process, the user's included."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def peak_bytes(step: Callable[[], object]) -> tuple[int, object]:
    """Bytes above the starting point at the peak of ``step()``, and what ``step`` returned.

    Only blocks the step allocates count, and a free counts only for such a block.  The profiler also
    reports the free of a block allocated before the window (at an address an earlier profiling session
    saw), and summing every event read peaks low by such bytes: a sweep measuring S = 512 then 1024 in
    one process read 63 MiB low for plain Inductor and 125 MiB for mst at 1024 (old gradients freed at
    the step's start).  Garbage is collected first and the cyclic collector paused during the step, so
    earlier work is not freed in the window either."""
    from torch.profiler import ProfilerActivity, profile

    from ..compat.memory import allocation_event_type
    from .progress import quiet_profiler

    allocation = allocation_event_type()

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
    finally:
        if was_enabled:
            gc.enable()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == allocation:
            events.append((node.start_time_ns, node.typed[1].ptr, node.typed[1].alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    mine: dict[int, int] = {}  # address → bytes of the blocks allocated in the window, still alive
    live = peak = 0
    for _, ptr, size in events:
        if size > 0:
            mine[ptr] = size
            live += size
            peak = max(peak, live)
        elif ptr in mine:
            live -= mine.pop(ptr)
    return peak, result


def step_seconds(step: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls of ``step`` (call it once before to warm up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], float]:
    """One forward + backward from fresh gradients (``p.grad = None``), returning the loss value."""

    def step() -> float:
        for p in model.parameters():
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    return step
