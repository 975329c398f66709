"""The mstfx torch-level graph passes: analyse and rewrite the FX graph Dynamo hands to the backend.

Level: the torch-level graph, before AOT autograd (the one aten-level pass, which runs inside Inductor
after the partitioner, is :mod:`mstfx.post_grad`).  :func:`run_passes` runs them in the order of
:data:`PASS_ORDER`::

    find_lm_head    analyse: LM head (+ scaling / soft-capping) feeding cross-entropy
    find_mlp        analyse: token-wise MLP regions (up-projection → activation → down-projection),
                    also inside activation-checkpointed bodies; never a projection the head claimed
    chunk_rule      choose M per region (paper's rule, or the user's / planner's numbers)
    rewrite_mlp     chunked loop, tagged for recompute in backward
    rewrite_lm_head fused chunked linear cross-entropy (loss and logits-gradient per chunk)
    attention       SDPA fed HF's in-graph causal mask → is_causal=True (guarded per step when the mask
                    reads a runtime padding mask or position ids); repeat_kv → enable_gqa
    verify          fake-tensor propagation of the rewritten graph; any failure restores the original

Each region is rewritten whole or not at all; a graph whose rewrite fails verification is returned
unchanged and the failure is reported.  No pass removes, moves past, or copies a node with side effects
(:func:`.common.has_side_effects`): a region that contains or crosses one is left unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.fx as fx

from . import chunk_rule
from .attention import GUARD_KEY, MaskGuard, rewrite_attention
from .common import ALREADY_REWRITTEN, REWRITTEN_KEY, CantChunk
from .find_lm_head import LmHeadRegion, find_lm_head_regions
from .find_mlp import MlpRegion, find_mlp_regions
from .report import GraphReport, RegionDecision
from .rewrite_lm_head import rewrite_lm_head
from .rewrite_mlp import refresh_fake_values, rewrite_mlp, rewrite_mlp_compiled_once

log = logging.getLogger("mstfx")

PASS_ORDER = ("find_lm_head", "find_mlp", "chunk_rule", "rewrite_mlp", "rewrite_lm_head", "attention", "verify")

__all__ = [
    "PASS_ORDER",
    "CantChunk",
    "GraphReport",
    "RegionDecision",
    "MlpRegion",
    "LmHeadRegion",
    "find_mlp_regions",
    "find_lm_head_regions",
    "run_passes",
]


def _param_placeholders(gm: fx.GraphModule, example_inputs) -> set[fx.Node]:
    """Placeholders that hold parameters (Dynamo lifts module parameters to graph inputs)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {node for node, ex in zip(phs, example_inputs) if isinstance(ex, torch.nn.Parameter)}


def _grad_flags(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, bool]:
    """``requires_grad`` of what each placeholder receives.  Dynamo's example values leave it unset;
    a compiled-once chunk body needs it (a body traced for a frozen weight must not serve a
    trainable one)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {ph: bool(getattr(ex, "requires_grad", False)) for ph, ex in zip(phs, example_inputs)}


def _chunk_form(config: Any, in_checkpoint: bool) -> tuple[bool, str]:
    """Whether an MLP's chunks become one compiled-once body called M times (``invoke_subgraph``,
    opt-in: ``config.compiled_once_chunks = True``) or M unrolled copies (the default), and the
    report's words for it (nothing for the default).

    The compiled-once form is opt-in because, measured, it is not yet better: on the reference
    config (S = 4096) its peak is 301 MiB against 269 MiB unrolled, and on the 8-layer tiny Llama at
    M = 64 its first step was about 5× plain Inductor's (``mstfx bench --compile-time``; README
    "Compile time").
    Inside a user's checkpointed layer it is never used (AOT autograd's recompute of the layer around
    a called body measured a higher peak than the unrolled copies)."""
    if config.compiler == "eager" or not getattr(config, "compiled_once_chunks", False):
        return False, ""
    if in_checkpoint:
        return False, "; unrolled M copies (inside a checkpointed layer)"
    return True, "; one body compiled once, called M times"


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


def _token_str(tokens) -> str:
    return str(tokens) if isinstance(tokens, torch.SymInt) else str(int(tokens))


def _verify(gm: fx.GraphModule) -> None:
    """Propagate fake tensors through the rewritten graph so every new node has a correct ``meta['val']``."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    mode = next((v.fake_mode for v in inputs if isinstance(v, FakeTensor)), None)
    if mode is None:
        return  # hand-built graphs in tests carry no fake values; their outputs are checked numerically
    with torch.enable_grad(), _private_hop_cache():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


@contextlib.contextmanager
def _private_hop_cache():
    """Verification traces ``invoke_subgraph`` calls (compiled-once chunk bodies) through their
    autograd rule, which caches what it learns per body in the compile's tracing context; AOT
    autograd must not reuse what was cached from verification's detached fake values, so verification
    gets a cache of its own for its duration."""
    from torch._guards import HopDispatchSetCache, TracingContext

    ctx = TracingContext.try_get()
    if ctx is None:
        yield
        return
    saved = ctx.hop_dispatch_set_cache
    ctx.hop_dispatch_set_cache = HopDispatchSetCache()
    try:
        yield
    finally:
        ctx.hop_dispatch_set_cache = saved


def run_passes(gm: fx.GraphModule, example_inputs, config: Any, graph_index: int = 0) -> tuple[fx.GraphModule, GraphReport]:
    """Run the pass pipeline on a copy of ``gm``; return the graph to compile and the report."""
    report = GraphReport(graph_index)
    if gm.meta.get(REWRITTEN_KEY):
        report.error = ALREADY_REWRITTEN
        return gm, report
    new = _copy_graph_module(gm)
    graph = new.graph
    params = _param_placeholders(new, example_inputs)

    heads, head_skipped = find_lm_head_regions(graph) if config.chunk_lm_head else ([], [])
    head_nodes = {h.head.node for h in heads}
    bodies = _checkpoint_bodies(new, params)
    mlps: list[tuple[fx.GraphModule, MlpRegion]] = []
    if config.chunk_mlp:
        for owner, owner_params in [(new, params), *[(body, body_params) for body, body_params, _ in bodies]]:
            found, mlp_skipped = find_mlp_regions(owner.graph, owner_params, head_nodes)
            mlps += [(owner, r) for r in found]
            for where, why in mlp_skipped:
                report.decisions.append(RegionDecision("projection", where, "skipped", f"not an MLP: {why}"))
    for where, why in head_skipped:
        report.decisions.append(RegionDecision("lm_head+loss", where, "skipped", why))

    changed = False
    compiled_bodies: dict = {}  # chunk bodies compiled once, shared by every region and chunk with the same structure
    grad_flags = _grad_flags(new, example_inputs)
    needs_grad = lambda node: grad_flags.get(node, True)  # noqa: E731  (computed values: assume they do)
    for owner, region in mlps:
        m = chunk_rule.mlp_chunks(region.tokens, region.hidden, config.mlp_chunks_for(region))
        common = dict(
            tokens=_token_str(region.tokens),
            hidden=region.hidden,
            width=region.intermediate,
            dtype=str(region.dtype).replace("torch.", ""),
        )
        if m < 2:
            report.decisions.append(
                RegionDecision("mlp", region.name, "skipped", "one mini-sequence: nothing to save", chunks=1, **common)
            )
            continue
        once, form = _chunk_form(config, owner is not new)
        if once:
            rewrite_mlp_compiled_once(owner, region, m, compiled_bodies, needs_grad)
        else:
            rewrite_mlp(owner, region, m, eager=config.compiler == "eager", in_checkpoint=owner is not new)
        if owner is not new:
            owner.recompile()
        changed = True
        report.decisions.append(
            RegionDecision(
                "mlp",
                region.name,
                "chunked",
                "amplifier: up-projection widens tokens×hidden to tokens×intermediate",
                chunks=m,
                detail=f"{region.activation}, {len(region.up_projections)} up-proj, recompute in backward{form}",
                **common,
            )
        )
    for region in heads:
        m = chunk_rule.lm_head_chunks(
            region.tokens, region.hidden, region.vocab, config.lm_head_chunks_for(region), config.min_lm_head_chunk_tokens
        )
        tied = any(u is not region.head.node and u.op != "output" for u in region.head.weight.users)
        rewrite_lm_head(graph, region, m)
        changed = True
        report.logits_escape |= region.logits_escape
        bits = [t[0] if t[0] != "scale" else f"scale {t[1]:.4g}" for t in region.transforms if t[0] != "cast"]
        detail = ", ".join(
            [f"{region.reduction}, ignore_index={region.ignore_index}"]
            + (["tied weight"] if tied else [])
            + ([f"logit transforms: {' → '.join(bits)}"] if bits else [])
            + (["logits escape the graph"] if region.logits_escape else [])
        )
        report.decisions.append(
            RegionDecision(
                "lm_head+loss",
                region.name,
                "chunked",
                "amplifier: tokens×vocab logits, their fp32 softmax and gradient",
                tokens=_token_str(region.tokens),
                hidden=region.hidden,
                width=region.vocab,
                chunks=m,
                dtype=str(region.dtype).replace("torch.", ""),
                detail=detail,
            )
        )
    masked = None
    if config.rewrite_attention:
        masked = _copy_graph_module(new)  # the graph for inputs that fail a run-time check, if any
        masked_bodies = [(body, hop) for body, _, hop in _checkpoint_bodies(masked, set())]
        decisions, guard = rewrite_attention(new, [(body, hop) for body, _, hop in bodies], assume_checks=True)
        report.decisions += decisions
        if any(d.action == "rewritten" for d in decisions):
            changed = True
            for body, _, _ in bodies:
                body.recompile()
        if guard is None:
            masked = None
        else:
            rewrite_attention(masked, masked_bodies, assume_checks=False)
            for body, _ in masked_bodies:
                body.recompile()
            new.meta[GUARD_KEY] = MaskGuard(guard, masked)
    if not changed:
        return gm, report
    try:
        graph.lint()
        new.recompile()
        _verify(new)
        if masked is not None:
            masked.graph.lint()
            masked.recompile()
            _verify(masked)
            masked.meta[REWRITTEN_KEY] = True
        refresh_fake_values(compiled_bodies)
    except Exception as err:  # never hand a half-checked rewrite to the compiler
        log.info("mstfx: rewritten graph failed verification (%s); compiling it unchanged", err)
        report.roll_back(f"verification failed: {type(err).__name__}: {err}")
        return gm, report
    new.meta[REWRITTEN_KEY] = True
    return new, report
