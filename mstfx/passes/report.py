"""What the passes decided and why, as plain data (rendered by ``mstfx.explain`` and the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..vocabulary import Action


#: the report's kind for an attention call (SDPA rewrites, sequence parallelism): not a region kind
ATTENTION = "attention"


@dataclass(frozen=True)
class RegionDecision:
    """One region found (or rejected) in one graph."""

    kind: str  # a region kind (``mstfx.regions.registry.Kind``, equal to its name) or ATTENTION
    where: str  # module path or node name, for humans
    #: chunked (an LM head at M = 1: fused, shown so), rewritten (attention) or skipped
    action: Action
    reason: str
    tokens: int | str | None = None
    hidden: int | None = None
    width: int | None = None  # intermediate size (MLP) or vocab (LM head)
    chunks: int | None = None
    dtype: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        # passes hand the member; a spelling here would be a pass skipping the vocabulary
        if not isinstance(self.action, Action):
            raise TypeError(f"RegionDecision.action must be an Action member, got {self.action!r}")

    @property
    def label(self) -> str:
        """The kind as the report shows it (``lm_head+loss`` for the ``lm_head`` kind)."""
        from ..regions.registry import REGION_KINDS

        return next((k.label for k in REGION_KINDS if k.name == self.kind), str(self.kind))

    @property
    def fused_only(self) -> bool:
        """A region rewritten with one mini-sequence (the LM head: the fused loss, logits not kept for
        backward), but nothing chunked; the report says so instead of "chunked"."""
        return self.action is Action.CHUNKED and self.chunks == 1

    def row(self) -> list[str]:
        shape = f"{self.tokens}×{self.hidden}→{self.width}" if self.hidden else "-"
        if self.fused_only:
            why = "M = 1: fused loss (logits not kept for backward), not chunked; " + (self.detail or self.reason)
            return [self.label, self.where, "fused (M = 1)", shape, "1", why]
        return [self.label, self.where, str(self.action), shape, str(self.chunks or "-"), self.detail or self.reason]


@dataclass
class GraphReport:
    """Every decision made for one graph that Dynamo handed to the backend."""

    graph_index: int
    decisions: list[RegionDecision] = field(default_factory=list)
    logits_escape: bool = False
    error: str | None = None
    #: Dynamo graph-break reasons recorded since the previous mst graph (the step was split near here:
    #: regions across the break are seen in pieces).
    graph_breaks: list[str] = field(default_factory=list)

    def roll_back(self, error: str) -> None:
        """The graph is compiled unchanged after all: every "chunked" or "rewritten" decision becomes
        "skipped" with ``error``."""
        self.error = error
        self.decisions = [
            RegionDecision(d.kind, d.where, Action.SKIPPED, error) if d.action is not Action.SKIPPED else d
            for d in self.decisions
        ]

    @property
    def chunked(self) -> list[RegionDecision]:
        return [d for d in self.decisions if d.action is Action.CHUNKED]

    @property
    def skipped(self) -> list[RegionDecision]:
        return [d for d in self.decisions if d.action is Action.SKIPPED]

    @property
    def rewritten(self) -> list[RegionDecision]:
        return [d for d in self.decisions if d.action is Action.REWRITTEN]

    def __str__(self) -> str:
        header = ["region", "where", "action", "tokens×in→width", "M", "why"]
        rows = [header] + [d.row() for d in self.decisions]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        fused = sum(d.fused_only for d in self.chunked)
        lines = [f"mstfx graph {self.graph_index}: {len(self.chunked) - fused} region(s) chunked, "
                 + (f"{fused} fused at M = 1, " if fused else "")
                 + f"{len(self.rewritten)} attention call(s) rewritten, {len(self.skipped)} left unchanged"]
        if self.error:
            lines.append(f"  graph left unchanged: {self.error}")
        if self.graph_breaks:
            from ..compat import first_line
            from ..per_block import is_per_block_break

            lines.extend("  block boundary (per_block: the block runs its own compiled graph)" if is_per_block_break(r)
                         else f"  graph break (step split near here): {first_line(r)}" for r in self.graph_breaks)
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if self.logits_escape:
            lines.append(
                "  note: the full logits are a graph output, so a tokens×vocab tensor is still materialised; "
                "train through mstfx.drop_logits(model) (or read only .loss inside the compiled function) to avoid it"
            )
        return "\n".join(lines)
