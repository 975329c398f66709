"""The pass pipeline: one list of passes (:func:`pipeline`, names in :data:`PASS_ORDER`) that
:func:`run_passes` runs on a copy of the graph, over the region kinds of
:data:`mstfx.regions.registry.REGION_KINDS` (see :mod:`mstfx.passes` for the list)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..regions import registry
from .attention import GUARD_KEY, MaskGuard, rewrite_attention
from .common import ALREADY_REWRITTEN, REWRITTEN_KEY
from ..vocabulary import Action
from .report import ATTENTION, GraphReport, RegionDecision

log = logging.getLogger("mstfx")


def _param_placeholders(gm: fx.GraphModule, example_inputs) -> set[fx.Node]:
    """Placeholders that hold parameters (Dynamo lifts module parameters to graph inputs)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {node for node, ex in zip(phs, example_inputs) if isinstance(ex, torch.nn.Parameter)}


def _grad_flags(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, bool]:
    """``requires_grad`` of what each placeholder receives.  Dynamo's example values leave it unset;
    the loop operators compute only the gradients their inputs need (a frozen weight gets none)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {ph: bool(getattr(ex, "requires_grad", False)) for ph, ex in zip(phs, example_inputs)}


def _checkpoint_bodies(gm: fx.GraphModule, params: set[fx.Node]) -> list[tuple[fx.GraphModule, set[fx.Node], fx.Node]]:
    """Bodies of activation-checkpointed regions (``model.gradient_checkpointing_enable()``).

    Dynamo turns ``torch.utils.checkpoint`` into ``tag_activation_checkpoint(body, *operands)``; the
    MLP and the attention then live in ``body``.  Each body is replaced by a private copy (the original graph stays
    untouched for the fallback), and its placeholders that receive parameters count as parameters.
    """
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    bodies = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not hop or not node.args:
            continue
        body_ref = node.args[0]
        if not isinstance(body_ref, fx.Node) or body_ref.op != "get_attr":
            continue
        body = getattr(gm, body_ref.target)
        if not isinstance(body, fx.GraphModule):
            continue
        body = _copy_graph_module(body)
        setattr(gm, body_ref.target, body)
        phs = [n for n in body.graph.nodes if n.op == "placeholder"]
        body_params = {ph for ph, arg in zip(phs, node.args[1:]) if isinstance(arg, fx.Node) and arg in params}
        bodies.append((body, body_params, node))
    return bodies


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph (nodes and their meta dicts), sharing attributes."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    return new


def _verify(gm: fx.GraphModule) -> None:
    """Propagate fake tensors through the rewritten graph so every new node has a correct ``meta['val']``."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from ..compat.functorch import fake_tensor

    FakeTensor = fake_tensor()

    inputs = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    mode = next((v.fake_mode for v in inputs if isinstance(v, FakeTensor)), None)
    if mode is None:
        return  # hand-built graphs in tests carry no fake values; their outputs are checked numerically
    with torch.enable_grad():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


@dataclass
class RewriteContext:
    """What a kind's rewrite needs besides the region: the options, where the region lives (a
    checkpointed body or the graph itself) and which inputs need a gradient."""

    config: Any
    in_checkpoint: bool
    needs_grad: Callable[[fx.Node], bool]
    graph: fx.Graph | None = None  # the top-level graph
    hop: fx.Node | None = None  # the checkpoint call of the body the region lives in (None: the top-level graph)

    def changed_autocast(self, owner: fx.GraphModule, nodes: list[fx.Node]) -> bool:
        """Whether ``nodes`` (of ``owner``) run under an in-graph autocast context that changes the state:
        one inside ``owner``, or, for a checkpointed body, one around its call in the top-level graph."""
        from .recompute import under_changed_autocast

        if under_changed_autocast(owner.graph, nodes):
            return True
        return self.hop is not None and self.graph is not None and under_changed_autocast(self.graph, [self.hop])

    @property
    def eager(self) -> bool:
        return self.config.compiler == "eager"


@dataclass
class _Run:
    """The state the passes of one :func:`run_passes` call share."""

    gm: fx.GraphModule  # the graph as Dynamo gave it (returned on any failure)
    new: fx.GraphModule  # the copy being rewritten
    config: Any
    report: GraphReport
    params: set
    bodies: list  # checkpointed bodies: (body, body params, hop node)
    grad_flags: dict
    claimed: set = field(default_factory=set)
    found: list = field(default_factory=list)  # (kind, owner, region)
    chunks: dict = field(default_factory=dict)  # id(region) -> M
    changed: bool = False
    masked: fx.GraphModule | None = None


def _find(kind, run: _Run) -> None:
    """Find ``kind``'s regions in the graph (and in checkpointed bodies, where the kind looks there)."""
    if not kind.enabled(run.config):
        return
    owners = [(run.new, run.params)]
    if kind.in_checkpoint_bodies:
        owners += [(body, body_params) for body, body_params, _ in run.bodies]
    for owner, owner_params in owners:
        regions, skipped = kind.find(owner.graph, owner_params, run.claimed)
        for region in regions:
            run.claimed |= kind.claims(region)
            run.found.append((kind, owner, region))
        for where, why in skipped:
            run.report.decisions.append(RegionDecision(kind.kind, where, Action.SKIPPED, why))


def _chunk_rule(run: _Run) -> None:
    """M for every region found: the user's or the plan's number, else the kind's default rule."""
    for kind, _, region in run.found:
        run.chunks[id(region)] = kind.mini_sequences(region, run.config)


def _rewrite(kind, run: _Run) -> None:
    """Rewrite every region of ``kind`` into its chunked form and record the decision."""
    needs_grad = lambda node: run.grad_flags.get(node, True)  # noqa: E731  (computed values: assume they do)
    for k, owner, region in run.found:
        if k is not kind:
            continue
        m = run.chunks[id(region)]
        fields = kind.report_fields(region, m)
        if m < 2 and not kind.rewrite_at_one:
            fields.pop("detail", None)
            run.report.decisions.append(
                RegionDecision(kind.kind, action=Action.SKIPPED, reason="one mini-sequence: nothing to save", chunks=1, **fields)
            )
            continue
        in_checkpoint = owner is not run.new
        hop = next((h for body, _, h in run.bodies if body is owner), None) if in_checkpoint else None
        ctx = RewriteContext(run.config, in_checkpoint, needs_grad, run.new.graph, hop)
        fields["detail"] = fields.get("detail", "") + kind.rewrite(owner, region, m, ctx)
        if in_checkpoint:
            owner.recompile()
        run.changed = True
        run.report.logits_escape |= bool(getattr(region, "logits_escape", False))
        run.report.decisions.append(RegionDecision(kind.kind, action=Action.CHUNKED, reason=kind.amplifier, chunks=m, **fields))


def _attention(run: _Run) -> None:
    """Hand SDPA ``is_causal=True`` / the unexpanded K/V; keep a masked copy when that needs a run-time check."""
    if not run.config.rewrite_attention:
        return
    new, bodies = run.new, run.bodies
    masked = _copy_graph_module(new)  # the graph for inputs that fail a run-time check, if any
    masked_bodies = [(body, hop) for body, _, hop in _checkpoint_bodies(masked, set())]
    decisions, guard = rewrite_attention(new, [(body, hop) for body, _, hop in bodies], assume_checks=True)
    run.report.decisions += decisions
    if any(d.action is Action.REWRITTEN for d in decisions):
        run.changed = True
        for body, _, _ in bodies:
            body.recompile()
    if guard is not None:
        rewrite_attention(masked, masked_bodies, assume_checks=False)
        for body, _ in masked_bodies:
            body.recompile()
        new.meta[GUARD_KEY] = MaskGuard(guard, masked)
        run.masked = masked


def _sequence_parallel(run: _Run) -> None:
    """Split every attention call across the sequence-parallel group (Ulysses); refuse the masked twin."""
    group = getattr(run.config, "sequence_parallel", None)
    if group is None:
        return
    from .sequence_parallel import refusing_graph, rewrite_sequence_parallel

    decisions = rewrite_sequence_parallel(run.new, [body for body, _, _ in run.bodies], group)
    for d in decisions:  # one line per call: what the attention pass did, then the split
        earlier = next((e for e in run.report.decisions if e.kind == ATTENTION and e.where == d.where), None)
        if earlier is not None:
            run.report.decisions.remove(earlier)
            if earlier.action is Action.REWRITTEN:
                before = earlier.detail.replace("the masked graph otherwise", "refused otherwise: sequence parallel")
                d = dataclasses.replace(d, detail=f"{before}; {d.detail}")
        run.report.decisions.append(d)
    if decisions:
        run.changed = True
    if run.masked is not None:  # inputs failing the causal check would need the mask: refused at run time
        guard = run.new.meta[GUARD_KEY]
        run.new.meta[GUARD_KEY] = MaskGuard(guard.guard, refusing_graph(run.new))
        run.masked = None


def _verify_all(run: _Run) -> None:
    """Lint, recompile and fake-propagate the rewritten graph (and its masked twin)."""
    if not run.changed:
        return
    run.new.graph.lint()
    run.new.recompile()
    _verify(run.new)
    if run.masked is not None:
        run.masked.graph.lint()
        run.masked.recompile()
        _verify(run.masked)
        run.masked.meta[REWRITTEN_KEY] = True


def pipeline(kinds=None) -> list[tuple[str, Callable[[_Run], None]]]:
    """The passes :func:`run_passes` runs, in order, as ``(name, pass)``: two per kind of
    ``registry.REGION_KINDS`` as it is when called (default)."""
    kinds = registry.REGION_KINDS if kinds is None else kinds
    return (
        [(f"find_{k.name}", functools.partial(_find, k)) for k in kinds]
        + [("chunk_rule", _chunk_rule)]
        + [(f"rewrite_{k.name}", functools.partial(_rewrite, k)) for k in kinds]
        + [("attention", _attention), ("sequence_parallel", _sequence_parallel), ("verify", _verify_all)]
    )


#: The names of the passes :func:`run_passes` runs, in order (``python -m mstfx.passes`` prints them).
PASS_ORDER: tuple[str, ...] = tuple(name for name, _ in pipeline())


def run_passes(gm: fx.GraphModule, example_inputs, config: Any, graph_index: int = 0) -> tuple[fx.GraphModule, GraphReport]:
    """Run the pass pipeline on a copy of ``gm``; return the graph to compile and the report."""
    report = GraphReport(graph_index)
    if gm.meta.get(REWRITTEN_KEY):
        report.error = ALREADY_REWRITTEN
        return gm, report
    new = _copy_graph_module(gm)
    params = _param_placeholders(new, example_inputs)
    run = _Run(gm, new, config, report, params, _checkpoint_bodies(new, params), _grad_flags(new, example_inputs))
    for name, step in pipeline():
        if name == "verify":
            try:
                step(run)
            except Exception as err:  # never hand a half-checked rewrite to the compiler
                if getattr(config, "sequence_parallel", None) is not None:
                    raise  # the unchanged graph would attend within each rank's shard only: wrong
                log.info("mstfx: rewritten graph failed verification (%s); compiling it unchanged", err)
                report.roll_back(f"verification failed: {type(err).__name__}: {err}")
                return gm, report
        else:
            step(run)
    if not run.changed:
        return gm, report
    new.meta[REWRITTEN_KEY] = True
    return new, report
