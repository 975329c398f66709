"""A plan as data and as a table: the predicted :class:`Breakdown` of a step, a :class:`PlanRow` per
region (bytes saved before and after chunking, M, recompute FLOPs) and the :class:`Plan` that holds
them, turns into an ``MstConfig`` or backend, and renders the table ``mstfx plan`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..vocabulary import Mode
from . import cost_model as cm
from . import offload_cost as offload
from .units import MiB, GiB

with_margin = cm.with_margin


@dataclass(frozen=True)
class Breakdown:
    """Predicted bytes of one training step.  ``peak = params + grads + optimizer + activations``."""

    params: float
    grads: float
    optimizer: float
    activations: float
    peak: float
    phase: str
    mode: Mode
    #: M per region kind (``mstfx.regions.registry.REGION_KINDS``) the prediction used; 1 = not chunked
    mini_sequences: dict[str, int]
    phases: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PlanRow:
    region: str
    count: int
    shape: str
    bytes_before: float
    bytes_after: float
    chunks: int
    extra_flops: float


@dataclass
class Plan:
    """What mst does for one model, sequence length and budget; pass it to the backend via :meth:`config`."""

    model: str
    seq_len: int
    batch: int
    budget_bytes: float
    optimizer: str
    mixed_precision: Any
    mode: Mode
    #: M per region kind (``mstfx.regions.registry.REGION_KINDS``, e.g. ``{"mlp": 2, "lm_head": 4, ...}``);
    #: 1 = not chunked
    mini_sequences: dict[str, int]
    checkpointing: bool
    breakdown: Breakdown
    rows: list[PlanRow]
    longest_seq_len: int
    reason: str
    margin: float = 0.0
    #: host memory: offloaded checkpoints (pinned) + optimizer state kept there; None = not limited
    host_bytes: float = 0.0
    pinned_bytes: float = 0.0
    host_budget_bytes: float | None = None
    #: seconds a step's checkpoint copies take on PCIe at ``pcie_gbps`` (0 without offload)
    transfer_seconds: float = 0.0
    pcie_gbps: float = offload.DEFAULT_PCIE_GBPS
    #: FSDP over ``gpus``; Ulysses sequence parallelism of this degree (S/N tokens per GPU)
    gpus: int = 1
    sequence_parallel: int = 1
    #: host memory of one node (``cost_model.GPUS_PER_NODE`` GPUs): its GPUs' ``host_bytes`` together;
    #: the host budget applies to it
    host_node_bytes: float = 0.0

    @property
    def offload(self) -> bool:
        """Whether the plan keeps the checkpoints in host memory."""
        return offload.is_offload(self.mode)

    @property
    def host_fits(self) -> bool:
        return self.host_budget_bytes is None or max(self.host_bytes, self.host_node_bytes) <= self.host_budget_bytes

    @property
    def predicted_peak(self) -> float:
        return self.breakdown.peak

    @property
    def planned_peak(self) -> float:
        """The predicted peak with the planning margin on gradients + activations (what must fit)."""
        b = self.breakdown
        return with_margin(b.params + b.optimizer, b.peak, self.margin)

    @property
    def gpu_fits(self) -> bool:
        return self.planned_peak <= self.budget_bytes

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.host_fits

    def config(self, **options: Any):
        """The :class:`~mstfx.MstConfig` that applies this plan (M per region kind)."""
        from ..config import MstConfig

        from ..regions.registry import REGION_KINDS

        chunked = Mode.parse(self.mode).chunked
        planned: dict[str, Any] = dict(mini_sequences=dict(self.mini_sequences) if chunked else None)
        # a kind with a switch of its own (chunk_mlp, chunk_lm_head) is on where the plan chunks it
        for k in REGION_KINDS:
            if k.switch is not None:
                planned[k.switch] = chunked and self.mini_sequences.get(k.name, 1) > 1
        planned["offload_checkpoints"] = self.offload
        clash = sorted(set(planned_options()) & set(options))
        if clash:
            raise ValueError(f"{clash} are set by the plan; change the budget instead (or build MstConfig yourself)")
        return MstConfig(**planned, **options)

    def backend(self, **options: Any):
        """An mst backend configured by this plan."""
        from ..backend import MstBackend

        return MstBackend(self.config(**options))

    def table(self) -> Any:
        from .text_table import new_table

        b = self.breakdown
        title = (
            f"mstfx plan: {self.model}, S = {self.seq_len}, batch {self.batch}, optimizer {self.optimizer}, "
            f"precision {self.mixed_precision or 'fp32'}, mode {self.mode} (memory in GiB = 2^30 bytes)"
        )
        if self.gpus > 1 or self.sequence_parallel > 1:
            title += (f"; per GPU of {self.gpus} (FSDP"
                      + (f", sequence parallel {self.sequence_parallel}: S/{self.sequence_parallel} tokens per GPU"
                         if self.sequence_parallel > 1 else "") + ")")
        tab = new_table(title=title, caption=self.reason)
        for col, just in (("region", "left"), ("shape", "left"), ("activations before", "right"),
                          ("after", "right"), ("M", "right"), ("extra FLOPs (recompute)", "right")):
            tab.add_column(col, justify=just)
        for r in self.rows:
            name = f"{r.region} ×{r.count}" if r.count > 1 else r.region
            tab.add_row(name, r.shape, _fmt_bytes(r.bytes_before), _fmt_bytes(r.bytes_after),
                        str(r.chunks), f"{r.extra_flops:.3g}" if r.extra_flops else "0")
        rest = b.activations - sum(r.bytes_after for r in self.rows)
        # the peak phase's bytes besides the regions' saved ones: the S×S mask, transients, and (negative)
        # the part of the gradients row not yet made at that phase; so the rows add up to the peak
        tab.add_row(f"rest at the peak ({b.phase})", "mask, transients, − grads not yet made",
                    "", ("+" if rest >= 0 else "−") + _fmt_bytes(abs(rest)), "", "")
        tab.add_section()
        tab.add_row("parameters", "", "", _fmt_bytes(b.params), "", "")
        tab.add_row("gradients", "", "", _fmt_bytes(b.grads), "", "")
        tab.add_row(f"optimizer ({self.optimizer})", "", "", _fmt_bytes(b.optimizer), "", "")
        tab.add_row("activation peak (the rows above)", "", "", _fmt_bytes(b.activations), "", "")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        tab.add_row("predicted peak vs budget", "", "", f"{_fmt_bytes(b.peak)} / {_fmt_bytes(self.budget_bytes)}", "", "")
        tab.add_row(f"with {self.margin:.0%} margin on grads + activations", "", "",
                    f"{_fmt_bytes(self.planned_peak)} / {_fmt_bytes(self.budget_bytes)}", verdict, "")
        if self.host_bytes or self.offload:
            tab.add_section()
            limit = "no host budget" if self.host_budget_bytes is None else _fmt_bytes(self.host_budget_bytes)
            tab.add_row("host memory (offloaded checkpoints + optimizer state)", "", "",
                        f"{_fmt_bytes(self.host_bytes)} / {limit}", "fits" if self.host_fits else "DOES NOT FIT", "")
            tab.add_row("  of it pinned (checkpoints)", "", "", _fmt_bytes(self.pinned_bytes), "", "")
            if self.gpus > 1:
                per_node = min(self.gpus, cm.GPUS_PER_NODE)
                tab.add_row(f"host memory per node ({per_node} GPUs)", "", "", f"{_fmt_bytes(self.host_node_bytes)} / {limit}",
                            "fits" if self.host_fits else "DOES NOT FIT", "")
        if self.offload:
            tab.add_row(f"PCIe copies per step (out + back, at a stated {self.pcie_gbps:g} GB/s)", "", "",
                        f"{self.transfer_seconds:.3g} s", "", "")
        return tab

    def __str__(self) -> str:
        from .text_table import render

        return render(self.table())


def planned_options() -> tuple[str, ...]:
    """The ``MstConfig`` fields a plan sets (:meth:`Plan.config`): M per region kind, each kind's own
    switch (``chunk_mlp``, ``chunk_lm_head``), checkpoint offload.  A caller that also gives one of them
    (``Plan.config(**options)``, ``mstfx.transform(**backend_options)``) is refused."""
    from ..regions.registry import REGION_KINDS

    return ("mini_sequences", *(k.switch for k in REGION_KINDS if k.switch is not None), "offload_checkpoints")


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"
