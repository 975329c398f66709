"""The profiler peak: what the measured step allocates, whatever earlier measured work leaves behind."""

from __future__ import annotations

import gc, torch
from mstfx.tools.measure import peak_bytes

def test_peak_bytes_is_not_lowered_by_earlier_garbage():
    """Bytes freed in the window that were allocated before it (here a reference cycle the collector
    frees) must not lower the measured peak of what the step itself allocates."""
    class Holder:
        pass

    def earlier_step():  # earlier measured work leaves a 64 MiB tensor reachable only through a cycle
        big = Holder()
        big.self, big.tensor = big, torch.ones(16 * 2**20)

    peak_bytes(earlier_step)

    def step():
        gc.collect()  # what the automatic collector may do at any allocation
        x = torch.ones(2**20)  # 4 MiB
        return float(x.sum())

    peak, out = peak_bytes(step)
    assert out == 2**20
    assert peak >= 4 * 2**20
