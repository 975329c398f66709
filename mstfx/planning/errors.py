"""What :func:`mstfx.planning.planner.plan` raises when no plan fits: the budget cannot be met on the GPU,
or only with more host memory than the host budget allows.  Each error carries the figures a caller
needs to choose a shorter sequence, a smaller batch or a larger budget."""

from __future__ import annotations

from ..vocabulary import Mode
from .units import GB


class InfeasibleBudgetError(ValueError):
    """No plan fits the budget, not even every region maximally chunked and every layer checkpointed.

    Attributes: ``budget_bytes``, ``min_peak_bytes`` (smallest achievable peak at ``seq_len``),
    ``seq_len`` and ``longest_seq_len`` (longest S that fits the budget with that maximal plan).
    """

    def __init__(self, budget_bytes: float, min_peak_bytes: float, seq_len: int, longest: int, batch: int = 1,
                 margin: float = 0.0, min_planned_bytes: float | None = None):
        self.budget_bytes = budget_bytes
        self.min_peak_bytes = min_peak_bytes
        self.seq_len = seq_len
        self.longest_seq_len = longest
        self.batch = batch
        self.margin = margin
        self.min_planned_bytes = min_peak_bytes if min_planned_bytes is None else min_planned_bytes
        kept = (f" ({self.min_planned_bytes / GB:.3g} GiB with the {margin:.0%} planning margin on gradients + "
                f"activations; margin=0 plans to the bare prediction)" if margin else "")
        fits = f"the longest sequence that fits {budget_bytes / GB:.3g} GiB is S = {longest}" if longest > 0 else (
            f"no sequence fits {budget_bytes / GB:.3g} GiB (parameters, gradients and optimizer state alone exceed it)"
        )
        super().__init__(
            f"budget {budget_bytes / GB:.3g} GiB cannot be met at S = {seq_len}, batch {batch}: the smallest "
            f"achievable peak (mst with the most chunks, with or without activation checkpointing) is "
            f"{min_peak_bytes / GB:.3g} GiB{kept}; {fits}; use a shorter sequence, a smaller batch or a larger budget"
        )


class InfeasibleHostBudgetError(InfeasibleBudgetError):
    """The GPU budget can be met only with host memory the host budget does not have.

    Attributes besides :class:`InfeasibleBudgetError`'s: ``host_budget_bytes``, ``host_needed_bytes``
    (host memory of the cheapest plan that fits the GPU), ``pinned_bytes`` (its offloaded checkpoints,
    page-locked) and ``mode``."""

    def __init__(self, budget_bytes: float, host_budget_bytes: float, host_needed_bytes: float, pinned_bytes: float,
                 seq_len: int, mode: Mode, gpu_peak_bytes: float, batch: int = 1):
        self.host_budget_bytes = host_budget_bytes
        self.host_needed_bytes = host_needed_bytes
        self.pinned_bytes = pinned_bytes
        self.mode = mode
        ValueError.__init__(
            self,
            f"host budget {host_budget_bytes / GB:.3g} GiB cannot be met at S = {seq_len}, batch {batch}: the only "
            f"plan that fits {budget_bytes / GB:.3g} GiB of GPU memory (mode {mode}, predicted peak "
            f"{gpu_peak_bytes / GB:.3g} GiB) needs {host_needed_bytes / GB:.3g} GiB of host memory "
            f"({pinned_bytes / GB:.3g} GiB of it pinned, for the offloaded checkpoints); give more host memory "
            f"(host_budget_gb / --host-gb), a larger GPU budget, or a shorter sequence",
        )
        self.budget_bytes = budget_bytes
        self.min_peak_bytes = self.min_planned_bytes = gpu_peak_bytes
        self.seq_len = seq_len
        self.longest_seq_len = 0
        self.batch = batch
        self.margin = 0.0
