"""The peak memory of the *compiled* training step, found without a GPU.

The eager simulation (:mod:`mstfx.tools.simulate`) runs the model op by op.  What a user runs is the
program ``torch.compile(..., backend="mst")`` builds: Dynamo's graph, the mst passes, AOT autograd's
joint graph and min-cut partition (what the forward saves, what the backward recomputes), then
Inductor's kernels.  This module builds exactly that program for the real config:

1. the model is made on the ``meta`` device (no weights) and captured by Dynamo;
2. the graph goes through :func:`mstfx.passes.run_passes` (or not, for plain Inductor);
3. AOT autograd traces forward + backward with Inductor's decompositions and partitions them with
   Inductor's partitioner; the forward and backward graphs are kept;
4. :func:`graph_peak` walks both graphs in order and tracks every buffer from the node that makes it
   to its last reader, the way Inductor's generated code allocates and frees.

SDPA is replaced, after the passes, by an op with FlashAttention-2's memory behaviour (output and
log-sum-exp saved; the backward's fp32 dq accumulator and, with GQA, H-head dk/dv workspace), since on
the meta device SDPA would fall back to the math kernel and its S×S weights.  Pointwise ops whose
readers are all pointwise or reductions are fused by Inductor and make no buffer.  Identical decoder
layers make the peak linear in the layer count, so models are captured with 2 and 3 layers and the
peak is extrapolated (:func:`compiled_peak`), which keeps an 8B capture to seconds.  The estimate is
checked against the profiler's CPU peaks of Inductor-compiled steps (``tests/cost/test_compiled_program.py``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from ..compat.dynamo import detect_fake_mode
from ..compat.functorch import is_op_overload, op_name
from ..hf_checkpointing import enable_checkpointing
from ..post_grad import DENSE_MATMULS
from ..vocabulary import Mode

# ---------------------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=None)
def _flash_ops():
    """``mstfx_sim::flash_attention`` (+ backward): shapes and memory of FlashAttention-2, no maths."""
    from torch.library import custom_op

    # seeded like the real flash kernel (its dropout), so that AOT autograd wraps a checkpointed layer's
    # call and its recompute in the same rng-state operators (``functionalize_rng_ops``)
    @custom_op("mstfx_sim::flash_attention", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
    def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("mstfx_sim::flash_attention only runs on fake/meta tensors (memory simulation)")

    @flash_attention.register_fake
    def _(q, k, v, mask):
        b, h, s, _ = q.shape
        return torch.empty_like(q), q.new_empty(b, h, s, dtype=torch.float32)

    @custom_op("mstfx_sim::flash_attention_backward", mutates_args=())
    def flash_attention_backward(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise RuntimeError("mstfx_sim::flash_attention_backward only runs on fake/meta tensors (memory simulation)")

    @flash_attention_backward.register_fake
    def _(dout, q, k, v, out, lse, mask):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, mask = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], mask)

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, mask)
        return dq, dk, dv, None

    flash_attention.register_autograd(backward, setup_context=setup_context)
    return flash_attention, flash_attention_backward


@functools.lru_cache(maxsize=None)
def _all_to_all_op():
    """``mstfx_sim::all_to_all``: Ulysses' exchange of a [B, heads, tokens, hd] tensor for a new
    [B, heads', tokens', hd] one (shapes only; its backward is the exchange the other way)."""
    from torch.library import custom_op

    @custom_op("mstfx_sim::all_to_all", mutates_args=())
    def all_to_all(x: torch.Tensor, heads: int, tokens: int) -> torch.Tensor:
        raise RuntimeError("mstfx_sim::all_to_all only runs on fake/meta tensors (memory simulation)")

    @all_to_all.register_fake
    def _(x, heads, tokens):
        return x.new_empty(x.shape[0], heads, tokens, x.shape[3])

    def setup_context(ctx, inputs, output):
        ctx.back = (inputs[0].shape[1], inputs[0].shape[2])

    def backward(ctx, grad):
        return all_to_all(grad, *ctx.back), None, None

    all_to_all.register_autograd(backward, setup_context=setup_context)
    return all_to_all


def simulated_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   sequence_parallel: int = 1):
    """Drop-in for ``F.scaled_dot_product_attention`` in a captured graph (simulation only).

    A boolean mask is turned into an additive one first, in the query's dtype, as SDPA itself does
    before its fused kernels: that S×S tensor is made, and saved for the backward.

    ``sequence_parallel`` N > 1: one Ulysses rank's attention.  The graph holds the rank's S/N tokens
    on every head; all-to-alls (``mstfx_sim::all_to_all``, whose send buffer is its workspace) make the
    whole S on H/N query heads and the KV heads ``cost_model.kv_heads_per_rank`` counts (repeated as
    the runtime repeats them), the kernel runs
    causal there without a mask (a rank's mask is of its own tokens only), and an all-to-all brings
    the output back."""
    flash_attention, _ = _flash_ops()
    n = sequence_parallel
    if n > 1:
        a2a = _all_to_all_op()
        _, h, s, _ = query.shape
        from ..planning.cost_model import kv_heads_split

        kv = kv_heads_split(h, key.shape[1], n) // n
        out = flash_attention(a2a(query, h // n, s * n), a2a(key, kv, s * n), a2a(value, kv, s * n), None)[0]
        return a2a(out, h, s)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.where(attn_mask, 0.0, float("-inf")).to(query.dtype)
    return flash_attention(query, key, value, attn_mask)[0]


def fa2_backward_workspace(batch: int, seq: int, heads: int, head_dim: int, kv_heads: int, itemsize: int) -> int:
    """Bytes FlashAttention-2's backward holds beyond its outputs: the fp32 dq accumulator, softmax_d,
    and with GQA dk/dv at every query head (both simulators count this)."""
    work = batch * seq * heads * head_dim * 4 + batch * heads * seq * 4
    if kv_heads != heads:
        work += 2 * batch * seq * heads * head_dim * itemsize
    return int(work)


def _flash_backward_workspace(node: fx.Node) -> int:
    q, k = (node.args[1].meta["val"], node.args[2].meta["val"])
    b, h, s, d = q.shape
    return fa2_backward_workspace(b, s, h, d, k.shape[1], q.element_size())


_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def simulated_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean", label_smoothing=0.0):
    """``F.cross_entropy`` as log-softmax and ``nll_loss_forward``, the ops Inductor's decomposition
    compiles it into.  On the meta device ``aten::nll_loss`` reaches autograd's not-implemented
    fallback under AOT tracing, which drops the loss gradient (the backward would be traced from
    zeros); ``nll_loss_forward`` has its derivative."""
    if label_smoothing or size_average is not None or reduce is not None or input.dim() != 2:
        return torch.nn.functional.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    logp = torch.log_softmax(input, dim=-1)
    return torch.ops.aten.nll_loss_forward(logp, target, weight, _REDUCTION[reduction], ignore_index)[0]


def use_simulated_ops(gm: fx.GraphModule, sequence_parallel: int = 1) -> int:
    """In ``gm`` and its submodules, call :func:`simulated_sdpa` instead of SDPA (a Ulysses rank's with
    ``sequence_parallel`` > 1) and :func:`simulated_cross_entropy` instead of ``F.cross_entropy``;
    returns how many calls changed."""
    from mstfx.passes.attention import SDPA_FUNCS

    swaps = {**{f: simulated_sdpa for f in SDPA_FUNCS}, torch.nn.functional.cross_entropy: simulated_cross_entropy}
    n = 0
    for mod in gm.modules():
        if not isinstance(mod, fx.GraphModule):
            continue
        for node in mod.graph.nodes:
            if node.op == "call_function" and node.target in swaps:
                node.target = swaps[node.target]
                if node.target is simulated_sdpa and sequence_parallel > 1:
                    node.kwargs = {**node.kwargs, "sequence_parallel": sequence_parallel}
                n += 1
        mod.recompile()
    return n


# ---------------------------------------------------------------------------------------- capture


@dataclass
class Program:
    """The forward and backward graphs AOT autograd made for one compiled step, and the mst report."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    report: Any = None


def capture_program(model: torch.nn.Module, ids: torch.Tensor, mst_config=None, offload: bool = False,
                    sequence_parallel: int = 1) -> Program:
    """Build the compiled step of ``model(input_ids=ids, labels=ids).loss`` (``mst_config=None``: plain
    Inductor) and run it once forward and backward on ``ids``' device (``meta``: no maths at all).

    ``offload``: the checkpointed layers' inputs go to host memory as the mst backend's offload mode
    does (its joint pass, then AOT autograd's activation offloading); the graphs kept for analysis copy
    them to the CPU, the ones run here keep them on ``ids``' device (a meta tensor has no data to copy).
    ``sequence_parallel`` N > 1: ``ids`` are one rank's S/N tokens; its attention is Ulysses'
    (:func:`simulated_sdpa`)."""
    from ..compat.functorch import aot_autograd_api
    from ..compat.inductor import decomposition_table, inductor_config, joint_graph_passes

    aot_module_simplified, min_cut_rematerialization_partition, make_boxed_func = aot_autograd_api()

    from mstfx.backend import inductor_config_patches

    # mst: the backend's Inductor options and its joint / post-grad passes; plain Inductor: none
    patches = {"joint_custom_pre_pass": None, "post_grad_custom_post_pass": None, "joint_graph_constant_folding": False}
    if mst_config is not None:
        patches = {**patches, **inductor_config_patches(), "joint_custom_pre_pass": None}  # the joint passes are run here, on the meta graph

    from mstfx.passes import run_passes
    from mstfx.post_grad.checkpoint_outputs import save_checkpoint_outputs
    from mstfx.post_grad.offload_checkpoints import mark_checkpoint_inputs

    def partition(joint, joint_inputs, **kwargs):
        """Inductor's: its joint-graph passes (the mst backend's joint passes first), then its partitioner."""
        with inductor_config().patch(patches):
            if mst_config is not None:
                save_checkpoint_outputs(joint.graph)
                if offload:
                    mark_checkpoint_inputs(joint.graph)
            joint = joint_graph_passes(joint)
            if not offload:
                return min_cut_rematerialization_partition(joint, joint_inputs, compiler="inductor", **kwargs)
            from mstfx.offload import offloading_partition

            with offloading_partition():
                return min_cut_rematerialization_partition(joint, joint_inputs, compiler="inductor", **kwargs)

    got: dict[str, Any] = {}

    def keep(name):
        def compiler(gm, example_inputs):
            # of the post-grad passes, the mst backend's (it orders each chunk's bias gradient); Inductor's
            # own ``addmm`` pattern is applied by :func:`with_addmm_fused` (its device decides)
            post = patches.get("post_grad_custom_post_pass")
            if post is not None:
                post(gm.graph)
                gm.recompile()
            got[name] = gm
            return make_boxed_func(_without_rng_wrappers(_host_copies_on(gm, ids.device) if offload else gm))

        return compiler

    def backend(gm, example_inputs):
        if mst_config is not None:
            gm, got["report"] = run_passes(gm, example_inputs, mst_config, 0)
            if got["report"].error:
                raise RuntimeError(f"the mst passes left the graph unchanged: {got['report'].error}")
        else:
            gm = copy.copy(gm)
        use_simulated_ops(gm, sequence_parallel)
        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=keep("forward"),
            bw_compiler=keep("backward"),
            partition_fn=partition,
            decompositions=decomposition_table(),
        )

    from .measure import fresh_code

    step = fresh_code(lambda i: model(input_ids=i, labels=i).loss)
    from ..compat import tracing_settings

    from ..compat import meta_autocast_traced_as_cpu

    meta_autocast = meta_autocast_traced_as_cpu() if ids.device.type == "meta" else contextlib.nullcontext()
    with tracing_settings(), meta_autocast:  # checkpointed layers traced whole, as mstfx.compile does
        loss = torch.compile(step, backend=backend, dynamic=False, fullgraph=True)(ids)
    loss.backward()
    if "forward" not in got or "backward" not in got:
        raise RuntimeError("AOT autograd produced no forward/backward pair")
    return Program(got["forward"], got["backward"], got.get("report"))


def _without_rng_wrappers(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` itself, or, where AOT autograd wrapped a seeded op of a checkpointed layer in
    ``run_and_save_rng_state`` / ``run_with_rng_state``, a copy that calls the op directly: the graph
    run during capture on the meta device, which has no rng state to save (the state saved is an empty
    tensor).  The graphs kept for analysis keep the wrappers, as Inductor sees them."""
    run_and_save_rng_state, run_with_rng_state = _rng_wrappers()
    wrapped = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (run_and_save_rng_state, run_with_rng_state)]
    if not wrapped:
        return gm
    run = copy.deepcopy(gm)
    for node in run.graph.nodes:
        if node.op != "call_function" or node.target not in (run_and_save_rng_state, run_with_rng_state):
            continue
        with run.graph.inserting_before(node):
            if node.target is run_with_rng_state:
                direct = run.graph.call_function(node.args[1], node.args[2:], node.kwargs)
            else:
                state = run.graph.call_function(torch.empty, ((0,),), {"device": "meta"})
                call = run.graph.call_function(node.args[0], node.args[1:], node.kwargs)
                direct = run.graph.call_function(tuple, ([state, call],))
        node.replace_all_uses_with(direct)
        run.graph.erase_node(node)
    run.recompile()
    return run


def _host_copies_on(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of ``gm`` whose device copies (offload to the CPU, reload) all target ``device``: the
    graph that runs during capture on the meta device, where a copy to the CPU has no data to move."""
    run = copy.deepcopy(gm)
    for node in run.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.prims.device_put.default:
            node.args = (node.args[0], device, *node.args[2:])
    run.recompile()
    return run


# ---------------------------------------------------------------------------------------- liveness

_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "var_mean", "prod", "any", "all", "argmax", "argmin"}
_WORKSPACE = {"mstfx_sim.flash_attention_backward.default": _flash_backward_workspace,
              # the all-to-all's send buffer (a contiguous copy of its input) while its receive buffer fills
              "mstfx_sim.all_to_all.default": lambda node: _nbytes(node.args[0].meta.get("val"))}


_LOOP_OPS = ("mstfx.chunk_loop.default", "mstfx.chunk_loop_backward.default", "mstfx.linear_cross_entropy_loop.default")
_loop_cache: dict = {}


def _loop_workspace(node: fx.Node) -> int:
    """What a loop operator (``mstfx::chunk_loop`` and its backward, ``mstfx::linear_cross_entropy_loop``)
    holds while it runs beyond its outputs: its chunks run op by op inside one extern call, so one
    chunk's eager working set (plus the running gradient sums).  Measured by running the operator's
    own loop on fake tensors under ``MemTracker``, once per distinct call."""
    from mstfx import chunk_loop, chunked_ops

    from ..compat.functorch import fake_tensor_mode
    from ..compat.memory import mem_tracker_api

    FakeTensorMode, (MemTracker, _) = fake_tensor_mode(), mem_tracker_api()

    def spec(a):
        v = a.meta.get("val") if isinstance(a, fx.Node) else None
        return (tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else repr(a)

    key = (str(node.target), repr(fx.node.map_aggregate(node.args, spec)))
    if key in _loop_cache:
        return _loop_cache[key]
    with FakeTensorMode(allow_non_fake_inputs=True):
        def fresh(a):
            v = a.meta.get("val") if isinstance(a, fx.Node) else None
            if isinstance(v, torch.Tensor):
                return torch.empty(v.shape, dtype=v.dtype, device=v.device)
            return a
        args = fx.node.map_aggregate(node.args, fresh)
        inputs = []
        fx.node.map_aggregate(args, lambda a: inputs.append(a) if isinstance(a, torch.Tensor) else None)
        tracker = MemTracker()
        tracker.track_external(*inputs)  # counted from the start (views of them are not new memory) ...
        with tracker:
            name = str(node.target)
            if name == "mstfx.chunk_loop.default":
                outs = [chunk_loop.run_forward(chunk_loop.body_of(args[0]), *args[1:])]
            elif name == "mstfx.chunk_loop_backward.default":
                outs = chunk_loop.run_backward(chunk_loop.body_of(args[0]), *args[1:])
            else:
                h, w, b, t, ignore, reduction, transforms, chunks, needs = args
                outs = chunked_ops.linear_cross_entropy_loop_run(h, w, b, t, ignore, reduction, transforms, chunks, needs)
        peak = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
        out_bytes = sum(_nbytes(o) for o in outs if isinstance(o, torch.Tensor))
        in_bytes = sum(_nbytes(t) for t in inputs)  # ... and taken off: the caller owns them
    _loop_cache[key] = max(0, int(peak - in_bytes - out_bytes))
    return _loop_cache[key]


def _op_name(node: fx.Node) -> str:
    return str(node.target)


def _is_view(node: fx.Node) -> bool:
    """A node whose value aliases its first input's buffer: view ops, and the pieces of a view op with
    several outputs (``split``)."""
    target = node.target
    if node.op != "call_function":
        return False
    if target is operator.getitem:
        base = node.args[0]
        return not isinstance(base.meta.get("val"), (tuple, list)) or getattr(base.target, "is_view", False)
    return getattr(target, "is_view", False)


#: lowered by Inductor as pointwise code: fills and scalars (constants in the kernel), and loads
#: through an index (``gather``, ``index``)
_INDIRECT_POINTWISE = {
    torch.ops.aten.full.default, torch.ops.aten.scalar_tensor.default, torch.ops.aten.gather.default, torch.ops.aten.index.Tensor,
}


#: functional scatters that Inductor lowers as a copy of their first input mutated in place: a fresh
#: fill as that input is the copy itself, and an input read for the last time is written in place
_SCATTER_INTO = {
    torch.ops.aten._unsafe_masked_index_put_accumulate.default, torch.ops.aten.index_put.default,
    torch.ops.aten._unsafe_index_put.default, torch.ops.aten.scatter_add.default, torch.ops.aten.scatter.src,
    torch.ops.aten.scatter_reduce.two, torch.ops.aten.index_add.default,
}


#: matmuls Inductor runs as extern kernels whose output buffer a later kernel may reuse
_MATMUL_KERNELS = DENSE_MATMULS | {torch.ops.aten.bmm.default}


def _reusable(buf: fx.Node) -> bool:
    """Whether Inductor may write a kernel's output into ``buf``: a graph input (the backward's saved
    tensors are donated), or the output of a generated kernel or a matmul.  A buffer written by a
    mutation (a scatter into a copy, a custom op that accumulates in place) is not."""
    if buf.op == "placeholder":
        return True
    return buf.op == "call_function" and (buf.target in _MATMUL_KERNELS or (_fusible(buf) and buf.target not in _SCATTER_INTO))


def _pointwise(node: fx.Node) -> bool:
    """Ops Inductor compiles as pointwise code: pointwise-tagged ops, constant fills, indexed loads, and a scatter of
    a scalar into a constant fill (its ``scatter_upon_const_tensor`` pass makes that an ``index ==
    iota`` select, e.g. the one-hot of cross-entropy's backward)."""
    target = node.target
    if node.op != "call_function" or not is_op_overload(target):
        return False
    if torch.Tag.pointwise in target.tags or target in _INDIRECT_POINTWISE:
        return True
    return target is torch.ops.aten.scatter.value and isinstance(node.args[0], fx.Node) and node.args[0].target is torch.ops.aten.full.default


def _fusible(node: fx.Node) -> bool:
    """Pointwise ops and reductions: Inductor fuses their pointwise producers into their kernel."""
    target = node.target
    if node.op != "call_function" or not is_op_overload(target):
        return False
    return _pointwise(node) or op_name(target) in _REDUCTIONS


def _inlined_into(user: fx.Node) -> bool:
    """Whether ``user`` reads a pointwise producer inside its own kernel: a fusible op, a scatter (its
    lowering loads the values and indices it scatters through their loaders, ``ir.Scatter``'s
    ``inner_fn``), or a view whose readers all do (a view of an unrealised pointwise value is an index
    change in its readers)."""
    if user.op == "call_function" and _is_view(user) and user.target is not operator.getitem:
        return all(_inlined_into(u) for u in user.users)
    return _fusible(user) or user.target in _SCATTER_INTO


def _nbytes(val: Any) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    return int(val.untyped_storage().nbytes()) if val.numel() else 0


def _pointwise_use(node: fx.Node) -> bool:
    """Inductor's ``is_pointwise_use``: a pointwise op, or a view all of whose readers are."""
    if node.op == "call_function" and _is_view(node) and node.target is not operator.getitem:
        return all(_pointwise_use(u) for u in node.users)
    return _pointwise(node)


def with_addmm_fused(gm: fx.GraphModule, device: str) -> fx.GraphModule:
    """A copy of ``gm`` with Inductor's post-grad ``addmm`` pattern applied: ``add(mm(a, b), c)`` (the
    mm read by nothing else, same dtypes, ``c`` broadcastable) becomes ``addmm(c, a, b)``, one matmul
    writing the sum, so the product never has a buffer of its own.  This is how a weight used by every
    mini-sequence gets its gradient: each chunk's product is added into the running sum by the matmul.
    On a GPU Inductor keeps the add apart when all its readers are pointwise (it fuses the add there
    instead: ``should_prefer_unfused_addmm``)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))  # graph_copy copies all but the output node
    add = torch.ops.aten.add.Tensor
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not add or node.kwargs or len(node.args) != 2:
            continue
        found = [(i, *_mm_through_pointless_permutes(a)) for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
        found = [(i, mm, chain) for i, mm, chain in found if mm is not None]
        if not found:
            continue
        i, mm, chain = found[0]
        inp = node.args[1 - i]
        val, mm_val = (inp.meta.get("val") if isinstance(inp, fx.Node) else None), mm.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(mm_val, torch.Tensor):
            continue
        a, b = mm.args
        if val.dtype != a.meta["val"].dtype or val.dtype != b.meta["val"].dtype:
            continue
        try:
            if torch.broadcast_shapes(val.shape, mm_val.shape) != mm_val.shape:
                continue
        except RuntimeError:
            continue
        if device != "cpu" and all(_pointwise_use(u) for u in node.users):
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(torch.ops.aten.addmm.default, (inp, a, b))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        for dead in (*chain, mm):
            graph.erase_node(dead)
    return fx.GraphModule(gm, graph)


@functools.lru_cache(maxsize=None)
def _rng_wrappers() -> tuple:
    """The operators AOT autograd wraps a checkpointed layer's seeded op in (its call and its recompute):
    fallbacks in Inductor, with no layout constraint of their own."""
    from ..compat.functorch import rng_state_wrappers

    return rng_state_wrappers()



def _rng_state(node: fx.Node) -> bool:
    """Whether ``node`` is the generator state an rng wrapper saves for the recompute (a few KB of host
    memory, not an activation): ``run_and_save_rng_state``'s first output, or the backward's input
    that only ``run_with_rng_state`` reads as its state."""
    save, run = _rng_wrappers()
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and node.args[0].target is save and node.args[1] == 0
    return node.op == "placeholder" and bool(node.users) and all(u.target is run and u.args[0] is node for u in node.users)

#: extern kernels Inductor calls with every tensor input in the stride order it was traced with
#: (``lowering.sdpa_constraint`` → ``ExternKernel.require_stride_order``); the simulated flash kernels
#: stand for the CPU/GPU flash-attention kernels it is registered for
_STRIDE_CONSTRAINED = {"mstfx_sim.flash_attention.default", "mstfx_sim.flash_attention_backward.default"}


def _lowered(node: fx.Node) -> bool:
    """Whether Inductor lowers ``node`` itself (generated kernels, ``out=`` matmuls) rather than calling
    it as a fallback: a fallback or custom op (the flash-attention kernels, mstfx's own ops) makes its
    outputs inside the op, in the layout its inputs give it."""
    from ..compat.inductor import lowering_tables

    lowerings, fallbacks = lowering_tables()

    if node.op != "call_function":
        return False
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    target = node.target
    return is_op_overload(target) and target in lowerings and target not in fallbacks


def _wrapped_call(node: fx.Node) -> tuple[Any, tuple, dict] | None:
    """(op, tensor-or-constant args, kwargs) of a fallback call: the op itself, or the op an rng wrapper
    runs; None for anything else."""
    target = node.target
    if node.op != "call_function":
        return None
    if target in _rng_wrappers():
        skip = 2 if target is _rng_wrappers()[1] else 1  # run_with_rng_state(state, op, ...), run_and_save_rng_state(op, ...)
        return node.args[skip - 1], node.args[skip:], node.kwargs
    if is_op_overload(target) and not _lowered(node) and target not in _MATMUL_KERNELS:
        return target, node.args, node.kwargs
    return None


def _with_tuple_vals(gm: fx.GraphModule) -> None:
    """Give a multi-output call traced without a value (an rng wrapper) the tuple of its ``getitem``s'
    values, so that its outputs are counted as the buffers they are."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or "val" in node.meta or not node.users:
            continue
        if not all(u.target is operator.getitem for u in node.users):
            continue
        vals: list[Any] = [None] * (1 + max(u.args[1] for u in node.users))
        for u in node.users:
            vals[u.args[1]] = u.meta.get("val")
        node.meta["val"] = tuple(vals)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides wherever a dimension has more than one element (a size-1 dimension's stride is free)."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _extern_readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s buffer through views and are not fused into a kernel: matmuls,
    fallback kernels, rng wrappers."""
    found: list[fx.Node] = []
    for u in node.users:
        if u.op != "call_function":
            continue
        if _is_view(u) and u.target is not operator.getitem:
            found += _extern_readers(u)
        elif not _fusible(u):
            found.append(u)
    return found


def _inductor_layouts(gm: fx.GraphModule, outputs: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Values whose buffer Inductor lays out differently from the traced strides, as fake tensors with
    Inductor's strides.  A generated kernel's output has a flexible layout: the first extern kernel
    that reads it fixes it, to the traced stride order for a stride-constrained kernel and row-major
    otherwise (``FlexibleLayout``, frozen by ``ExternKernel.realize_input``); a graph output keeps its
    traced strides (``keep_output_stride``).  A fallback's outputs are what its op returns for inputs
    laid out so; a view of a relaid value is replayed on it when it can be, and keeps the traced strides
    when it cannot (its extern readers then get a copy, see :func:`with_layout_copies`)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    actual: dict[fx.Node, torch.Tensor] = {}

    def laid(a: Any) -> Any:
        return actual.get(a, a.meta.get("val")) if isinstance(a, fx.Node) else a

    for node in nodes:
        val = node.meta.get("val")
        if node.op != "call_function":
            continue
        if isinstance(val, torch.Tensor) and _fusible(node) and node not in outputs and not val.is_contiguous():
            readers = sorted(_extern_readers(node), key=lambda r: pos[r])
            if readers and _op_name(readers[0]) not in _STRIDE_CONSTRAINED:
                actual[node] = torch.empty_like(val, memory_format=torch.contiguous_format)
        elif _is_view(node) and node.target is not operator.getitem and node.args[0] in actual:
            try:
                actual[node] = node.target(laid(node.args[0]), *node.args[1:], **node.kwargs)
            except (RuntimeError, ValueError):
                pass  # not a view of the relaid buffer: a copy where an extern kernel reads it
        elif node.target is operator.getitem and node.args[0] in actual:
            out = actual[node.args[0]][node.args[1]]
            if isinstance(out, torch.Tensor) and isinstance(val, torch.Tensor) and not _same_layout(out, val):
                actual[node] = out
        else:
            call = _wrapped_call(node)
            if call is None or not any(isinstance(a, fx.Node) and a in actual for a in call[1]):
                continue
            op, args, kwargs = call
            mode = detect_fake_mode([laid(a) for a in args if isinstance(a, fx.Node)])
            if mode is None:
                continue
            with mode:
                actual[node] = op(*fx.node.map_arg(args, laid), **fx.node.map_arg(kwargs, laid))
    return actual


def with_layout_copies(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with the copies Inductor makes to give an extern kernel an input in the layout it needs:
    a stride-constrained kernel (flash attention) reading a value laid out otherwise than traced
    (``require_stride_order`` → ``copy_input``), and a matmul reading, through a reshape, a buffer whose
    layout the reshape is not a view of.  A copy of a generated kernel's output is a pointwise kernel
    over the same elements, which Inductor's scheduler fuses into that kernel: it is made with its
    source.  A copy of anything else is made just before its first reader.  Each copy lives until its
    last reader, as a separate buffer.  This is what a checkpointed layer costs beyond its recompute:
    its attention's rng wrapper fixes q and k row-major, so the flash backward reads copies of q, k and
    the output in the traced layout, made at the start of the layer's backward."""
    _with_tuple_vals(gm)
    graph = gm.graph
    outputs = set(graph.output_node().all_input_nodes)
    actual = _inductor_layouts(gm, outputs)
    if not actual:
        return gm
    copies: dict[fx.Node, fx.Node] = {}
    for reader in list(graph.nodes):
        constrained = _op_name(reader) in _STRIDE_CONSTRAINED
        if not (constrained or reader.target in _MATMUL_KERNELS):
            continue
        for arg in dict.fromkeys(a for a in reader.all_input_nodes):
            val = arg.meta.get("val")
            if not isinstance(val, torch.Tensor) or not _relaid(arg, actual):
                continue
            if constrained:
                needs = arg not in actual or not _same_layout(actual[arg], val)
            else:
                needs = _is_view(arg) and arg not in actual  # a reshape that is no view of the relaid buffer
            if not needs:
                continue
            if arg not in copies:
                with graph.inserting_before(reader):
                    copies[arg] = graph.call_function(torch.ops.aten.clone.default, (arg,))
                copies[arg].meta["val"] = val
                source = _relaid_source(arg, actual)
                if _fusible(source):
                    _move_next_to(source, copies[arg])
            reader.replace_input_with(arg, copies[arg])
    gm.recompile()
    return gm


def _relaid(node: fx.Node, actual: dict[fx.Node, torch.Tensor]) -> bool:
    """Whether ``node`` is, or is a view of, a value Inductor lays out otherwise than traced."""
    return _relaid_source(node, actual) is not None


def _relaid_source(node: fx.Node, actual: dict[fx.Node, torch.Tensor]) -> fx.Node | None:
    """The relaid value ``node`` is or views (through view ops), or None."""
    while node is not None:
        if node in actual and not _is_view(node):
            return node
        if not (node.op == "call_function" and _is_view(node) and node.target is not operator.getitem):
            return None
        node = node.args[0] if isinstance(node.args[0], fx.Node) else None
    return None


def _move_next_to(source: fx.Node, copy: fx.Node) -> None:
    """Put ``copy`` right after ``source``, with the views between them (free, read only from
    ``source``) moved up before it, keeping the graph in topological order."""
    chain = []
    a = copy.args[0]
    while a is not source:
        chain.append(a)
        a = a.args[0]
    cursor = source
    for v in [*reversed(chain), copy]:
        cursor.append(v)
        cursor = v


def _mm_through_pointless_permutes(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """The ``mm`` that ``node`` is, directly or through permutes that compose to the identity (a
    weight gradient's transpose of a transpose, which Inductor's lowering reads as the mm itself), with
    every node on the way read only by the next; ``(None, [])`` otherwise."""
    chain: list[fx.Node] = []
    order: list[int] | None = None
    while node.op == "call_function" and node.target is torch.ops.aten.permute.default and len(node.users) == 1:
        dims = list(node.args[1])
        order = dims if order is None else [dims[d] for d in order]
        chain.append(node)
        node = node.args[0]
    if node.op != "call_function" or node.target is not torch.ops.aten.mm.default or len(node.users) != 1:
        return None, []
    if order is not None and order != sorted(order):
        return None, []
    return node, chain


#: ops Inductor's CPU code treats as expensive: a value computed with one of them and read by
#: several kernels is stored once rather than recomputed in each (``should_realize_on_reuse``)
_CPU_HEAVY_OPS = {"exp", "log", "log10", "log1p", "log2", "sigmoid", "tanh"}


@dataclass(frozen=True)
class InlineRule:
    """When Inductor stores an unrealised pointwise value in a buffer instead of inlining its expression
    into every reader (``GraphLowering.run_node``: ``mark_reuse`` and ``has_exceeded_max_reads``).

    A value read by several nodes is realised when its expression reads more than
    ``reads_on_reuse`` buffers, is larger than ``max_ops`` ops, or (CPU) computes an expensive op; any
    value is realised when its expression reads more than ``max_reads`` buffers or exceeds ``max_ops``.
    The thresholds are Inductor's own config values for the device."""

    reads_on_reuse: int
    max_reads: int
    max_ops: int
    cpu: bool

    @classmethod
    def for_device(cls, device: str) -> "InlineRule":
        from ..compat.inductor import realize_thresholds

        cpu = device == "cpu"
        return cls(*realize_thresholds(cpu), cpu)

    def realised(self, users: int, reads: frozenset, expression: frozenset) -> bool:
        """``reads``: the buffers the inlined expression loads; ``expression``: its FX nodes (about one
        op each, plus one load per buffer read)."""
        large = len(expression) + len(reads) > self.max_ops
        if users > 1:
            heavy = self.cpu and any(_aten_name(e) in _CPU_HEAVY_OPS for e in expression)
            if heavy or large or len(reads) > self.reads_on_reuse:
                return True
        return large or len(reads) > self.max_reads


def _aten_name(node: fx.Node) -> str:
    target = node.target
    return op_name(target)


@dataclass
class GraphPeak:
    """The peak of one graph: bytes alive (beyond its inputs' owners), and the node where it happens."""

    peak: int
    at: str
    grads_at_peak: int = 0
    host: int = 0  # the most bytes held in host memory at once (offloaded checkpoints)
    #: the most bytes alive that are not gradient outputs (the peak when each gradient is consumed as it
    #: is made; it may sit at another node than ``peak``)
    without_grads: int = 0
    live: tuple[tuple[str, int], ...] = ()  # the buffers alive at the peak, largest first (name, bytes)


def graph_peak(
    gm: fx.GraphModule, *, inputs_owned: bool, grad_outputs: set[int] = frozenset(), attention_workspace: bool = True,
    input_groups: dict[str, tuple[str, int]] | None = None, device: str = "cuda",
) -> GraphPeak:
    """Walk ``gm`` in order: each materialised node allocates its value, each buffer is freed after its
    last reader (fused readers read on behalf of their own readers).  ``inputs_owned``: the graph frees
    its inputs after their last use and counts them from the start (the backward's saved tensors;
    parameters, named ``primals_*`` by AOT autograd, are never counted).
    ``grad_outputs``: output positions that are gradients (reported separately at the peak).
    ``input_groups``: placeholder name → (buffer, bytes) for inputs that are views of one storage
    (the forward saved several pieces of one tensor): counted once, freed after the last piece.
    ``device``: whose code Inductor generates ("cpu" or a GPU): its thresholds for inlining differ
    (:class:`InlineRule`)."""
    gm = with_layout_copies(with_addmm_fused(gm, device))
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    output = nodes[-1]
    flat_outs = []
    fx.node.map_aggregate(output.args[0], lambda a: flat_outs.append(a) if isinstance(a, fx.Node) else None)
    out_set = set(flat_outs)
    grad_nodes = {flat_outs[i] for i in grad_outputs if i < len(flat_outs)}

    # which nodes make a buffer
    def materialised(n: fx.Node) -> bool:
        if _rng_state(n):
            return False
        if n.op == "placeholder":
            return inputs_owned and not n.name.startswith("primals")
        if n.op != "call_function" or _is_view(n):
            return False
        if n.target is operator.getitem:  # an element of a multi-output op: its own buffer
            return True
        if isinstance(n.meta.get("val"), (tuple, list)):
            return False  # the elements are counted through their getitems
        if n in out_set or not _pointwise(n):
            return True
        if not all(_inlined_into(u) for u in n.users):
            return True
        return rule.realised(len(n.users), reads[n], expression[n])

    rule = InlineRule.for_device(device)
    real: dict[fx.Node, bool] = {}
    reads: dict[fx.Node, frozenset] = {}  # buffers an inlined node's expression reads
    expression: dict[fx.Node, frozenset] = {}  # the inlined nodes an unrealised node's expression is made of
    kernel_reads: dict[fx.Node, frozenset] = {}  # buffers a materialised node's kernel reads
    for n in nodes:
        inlined = [a for a in n.all_input_nodes if not (real.get(a) or a.op == "placeholder")]
        inputs = frozenset().union(*[
            (frozenset([a]) if real.get(a) or a.op == "placeholder" else reads.get(a, frozenset())) for a in n.all_input_nodes
        ]) if n.all_input_nodes else frozenset()
        reads[n] = inputs
        expression[n] = frozenset([n]).union(*[expression.get(a, frozenset()) for a in inlined])
        real[n] = materialised(n)
        if real[n]:
            kernel_reads[n] = inputs
            reads[n] = frozenset([n])
            expression[n] = frozenset()

    @functools.lru_cache(maxsize=None)
    def read_until(n: fx.Node) -> int:
        """The last position at which ``n``'s value is read (through fused readers and views)."""
        last = pos[n]
        for u in n.users:
            if u.op == "output":
                last = max(last, len(nodes))
            elif real[u] or not (_is_view(u) or _fusible(u) or u.target is operator.getitem):
                last = max(last, pos[u])
            else:
                last = max(last, read_until(u))
        return last

    def owner(n: fx.Node) -> fx.Node | None:
        while n is not None and not real.get(n, False):
            if (_is_view(n) or getattr(n.target, "is_view", False)) and n.args and isinstance(n.args[0], fx.Node):
                n = n.args[0]
            else:
                return None
        return n

    # buffers: each materialised node is one, except inputs that share a storage (``input_groups``)
    groups = input_groups or {}
    key = {n: groups.get(n.name, (n.name, None))[0] if n.op == "placeholder" else n.name for n in nodes if real[n]}
    size: dict[str, int] = {}
    for n, k in key.items():
        given = groups.get(n.name, (None, None))[1] if n.op == "placeholder" else None
        size[k] = max(size.get(k, 0), given if given is not None else _nbytes(n.meta.get("val")))
    first: dict[str, int] = {}
    last_read: dict[str, int] = {}
    for n, k in key.items():
        # the outputs of a multi-output kernel (its ``getitem`` nodes) exist while it runs; a functionalised
        # mutation's (``auto_functionalized``) are its inputs, written in place
        made = n
        if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and (
                is_op_overload(n.args[0].target) or n.args[0].target in _rng_wrappers()):
            made = n.args[0]
        first.setdefault(k, pos[made])
        last_read[k] = max(last_read.get(k, 0), read_until(n))
    for n in nodes:  # views and fused readers keep their owner alive
        if not real[n] and n.op == "call_function":
            o = owner(n)
            if o is not None:
                last_read[key[o]] = max(last_read[key[o]], read_until(n))
    # Inductor writes a pointwise kernel's output into an input buffer of the same size that the kernel
    # reads for the last time (``inplace_buffers``; the backward's saved tensors are donated to it):
    # that output costs nothing new, and the input's bytes are freed when the output is
    reuses: dict[str, str] = {}  # output buffer → the input buffer it is written into
    taken: set[str] = set()
    outputs_keys = {key[o] for o in (a if real.get(a) else owner(a) for a in flat_outs) if o is not None and o in key}
    for n in nodes:
        scatter = n.op == "call_function" and n.target in _SCATTER_INTO and isinstance(n.args[0], fx.Node)
        if not real[n] or not (_pointwise(n) or scatter):
            continue
        k = key[n]
        sources = [n.args[0]] if scatter else sorted(kernel_reads.get(n, ()), key=lambda a: pos[a])
        for src in sources:
            if not real.get(src) or src.op == "placeholder" and not inputs_owned or not _reusable(src):
                continue
            ks = key[src]
            if ks in taken or ks in outputs_keys or last_read[ks] != pos[n] or size[ks] != size[k]:
                continue
            reuses[k] = ks
            taken.add(ks)
            break
    alloc_at: dict[int, list[str]] = {}
    free_at: dict[int, list[str]] = {}
    for k in size:
        if k not in reuses:
            alloc_at.setdefault(first[k], []).append(k)
        if k not in taken:  # a buffer handed to an in-place output is freed as that output
            free_at.setdefault(last_read[k], []).append(k)
    grad_keys = {key[o] for o in (n if real.get(n) else owner(n) for n in grad_nodes) if o is not None and o in key}
    # buffers in host memory (the program runs on another device; offloaded checkpoints are CPU tensors)
    host_keys = {k for n, k in key.items() if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device.type == "cpu"}

    live = grads = host = host_peak = without_grads = 0
    alive: set[str] = set()
    peak = GraphPeak(0, "start")
    in_place_at: dict[int, list[tuple[str, str]]] = {}
    for k, ks in reuses.items():
        in_place_at.setdefault(first[k], []).append((k, ks))
    for i, n in enumerate(nodes):
        for k in alloc_at.get(i, ()):
            if k in host_keys:
                host += size[k]
                host_peak = max(host_peak, host)
                continue
            live += size[k]
            alive.add(k)
            grads += size[k] if k in grad_keys else 0
        for k, ks in in_place_at.get(i, ()):  # same bytes, now holding the output
            alive.discard(ks)
            alive.add(k)
            grads += size[k] * ((k in grad_keys) - (ks in grad_keys))
        work = _WORKSPACE.get(_op_name(n)) if attention_workspace else None
        transient = work(n) if work is not None else 0
        if n.target is torch.ops.higher_order.invoke_subgraph:  # a called body (nested_compile_region): its own peak
            transient += _body_peak(gm, n, attention_workspace)
        elif _op_name(n) in _LOOP_OPS:
            transient += _loop_workspace(n)
        without_grads = max(without_grads, live + transient - grads)
        if live + transient > peak.peak:
            peak = GraphPeak(live + transient, n.name, grads)
            peak_alive = set(alive)
        for k in free_at.get(i, ()):
            if k in host_keys:
                host -= size[k]
                continue
            live -= size[k]
            alive.discard(k)
            grads -= size[k] if k in grad_keys else 0
    if peak.peak:
        peak = replace(peak, live=tuple(sorted(((k, size[k]) for k in peak_alive), key=lambda kv: -kv[1])))
    return replace(peak, host=host_peak, without_grads=without_grads)


def _body_peak(gm: fx.GraphModule, call: fx.Node, attention_workspace: bool) -> int:
    """Bytes a called body (``invoke_subgraph``) holds at its peak, outputs included; its inputs belong
    to the caller.  The caller's buffers for the outputs are its ``getitem`` nodes, made after the call."""
    body = getattr(gm, call.args[0].target)
    return graph_peak(body, inputs_owned=False, attention_workspace=attention_workspace).peak


def saved_storages(forward: fx.GraphModule) -> dict[str, tuple[str, int]]:
    """Forward output name → (the forward node owning its storage, that storage's bytes): the saved
    tensors reach the backward as placeholders of the same names."""
    out: dict[str, tuple[str, int]] = {}
    for node in forward.graph.output_node().all_input_nodes:
        base = node
        while base.op == "call_function" and (_is_view(base) or getattr(base.target, "is_view", False)):
            if not (base.args and isinstance(base.args[0], fx.Node)):
                break
            base = base.args[0]
        if base.op == "placeholder":
            out[node.name] = (f"input:{base.name}", 0)  # a view of a parameter or input: not new memory
        else:
            out[node.name] = (base.name, _nbytes(base.meta.get("val")))
    return out


@dataclass
class StepPeak:
    """Peak bytes of one compiled step above parameters (activations, and gradients made so far), and
    the peaks of its two graphs (the backward's with the gradients alive at it)."""

    total: int
    activations: int
    grads: int
    where: str
    forward: int = 0
    backward: int = 0
    backward_grads: int = 0
    host: int = 0  # host memory the step holds at most (offloaded checkpoints)
    #: the backward's peak of bytes that are not gradients (:attr:`GraphPeak.without_grads`)
    backward_without_grads: int = 0


def program_peak(program: Program, *, device: str = "cuda") -> StepPeak:
    """The step's peak: the forward's, or the saved tensors plus the backward's, whichever is higher.

    The backward's outputs are the gradients; all are counted as gradients, as autograd keeps them in
    ``.grad``.  ``device="cpu"`` drops FlashAttention-2's backward workspace (CPU's flash kernel keeps
    only small per-thread buffers), for checks against CPU profiler peaks."""
    fw = graph_peak(program.forward, inputs_owned=False, device=device)
    groups = saved_storages(program.forward)
    bw_out = program.backward.graph.output_node().args[0]
    n_out = len(bw_out) if isinstance(bw_out, (tuple, list)) else 1
    bw = graph_peak(program.backward, inputs_owned=True, grad_outputs=set(range(n_out)), attention_workspace=device != "cpu", input_groups=groups,
                    device=device)
    phases = dict(forward=fw.peak, backward=bw.peak, backward_grads=bw.grads_at_peak, host=max(fw.host, bw.host),
                  backward_without_grads=bw.without_grads)
    if fw.peak >= bw.peak:
        return StepPeak(fw.peak, fw.peak, 0, f"forward at {fw.at}", **phases)
    return StepPeak(bw.peak, bw.peak - bw.grads_at_peak, bw.grads_at_peak, f"backward at {bw.at}", **phases)


# ---------------------------------------------------------------------------------------- whole models



def _meta_model(config, layers: int | None = None):
    """``config``'s causal LM on the meta device, bf16, SDPA attention, no cache (optionally fewer layers)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    cfg.dtype = torch.bfloat16
    if layers is not None:
        cfg.num_hidden_layers = layers
        for name in ("layer_types", "mlp_layer_types"):  # per-layer lists must match the layer count
            if isinstance(getattr(cfg, name, None), list):
                setattr(cfg, name, getattr(cfg, name)[:layers])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def step_peak(config, seq_len: int, mode: Mode | str, batch: int = 1, *, layers: int | None = None, device: str = "cuda",
              mst_config=None, sequence_parallel: int = 1) -> StepPeak:
    """The compiled step's peak for ``config`` with ``layers`` decoder layers (default: all) in ``mode``
    (a :class:`~mstfx.vocabulary.Mode` or a spelling of one); ``sequence_parallel`` N > 1: one Ulysses
    rank's step on ``seq_len`` (its S/N) tokens."""
    import warnings

    mode = Mode.parse(mode)
    mst, ckpt = mode.chunked, mode.checkpointed
    model = _meta_model(config, layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if ckpt:
            enable_checkpointing(model)
    model.train()
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    from mstfx.config import MstConfig

    offload = mode.offloaded
    if mst and mst_config is None and offload:  # the offload mode's LM-head chunks (``offload_sim.lm_head_chunks``)
        from .offload_sim import lm_head_chunks

        mst_config = MstConfig(mini_sequences={"lm_head": lm_head_chunks(config.hidden_size, config.vocab_size, seq_len * batch)})
    program = capture_program(model, ids, (mst_config or MstConfig()) if mst else None, offload=offload,
                              sequence_parallel=sequence_parallel)
    return program_peak(program, device=device)


def compiled_peak(config, seq_len: int, mode: Mode | str, batch: int = 1, *, device: str = "cuda",
                  sequence_parallel: int = 1) -> StepPeak:
    """The compiled step's peak for the whole model.  Decoder layers are identical, so the forward's
    peak and the backward's peak are each linear in their number: both are measured with 2 and 3
    layers and extrapolated separately (the step's peak may sit in the backward at 3 layers and in the
    forward at 32), then the larger is taken (exact below 4 layers)."""
    layers = config.num_hidden_layers
    kw = dict(device=device, sequence_parallel=sequence_parallel)
    if layers <= 3:
        return step_peak(config, seq_len, mode, batch, **kw)
    two = step_peak(config, seq_len, mode, batch, layers=2, **kw)
    three = step_peak(config, seq_len, mode, batch, layers=3, **kw)
    extra = layers - 3

    def line(a: int, b: int) -> int:
        return b + extra * (b - a)

    forward = line(two.forward, three.forward)
    backward = line(two.backward, three.backward)
    grads = line(two.backward_grads, three.backward_grads)
    host = line(two.host, three.host)
    without_grads = line(two.backward_without_grads, three.backward_without_grads)
    note = "(extrapolated from 2 and 3 layers)"
    if forward >= backward:
        return StepPeak(forward, forward, 0, f"forward {note}", forward, backward, grads, host, without_grads)
    return StepPeak(backward, backward - grads, grads, f"backward {note}", forward, backward, grads, host, without_grads)


def eager_body_extra(model: torch.nn.Module, batch: int, seq_len: int) -> int:
    """Bytes the per-block program's eager decoder body holds beyond what the whole-model compiled
    program holds at the same point: what autograd saves for the modules after the blocks (the final
    norm), less the norm's input, which the compiled program keeps for its norm's backward.

    Per block, the module that runs the blocks runs eagerly (:mod:`mstfx.per_block`), so its final norm
    is Hugging Face's eager code: an RMSNorm in bf16 saves an fp32 copy of its input and the bf16
    normalised value (6 bytes per element, where the compiled norm keeps the 2-byte input and recomputes
    the rest); in fp32 the copy is the input itself and one normalised value is added.  These are alive
    from the norm's forward (the end of the forward) to the norm's backward, which follows the LM head's
    backward at once.  Counted from the saved tensors of the norm run once on a meta tensor of the
    hidden states' shape and dtype (parameters excluded, each storage once).  The embedding's output
    (the first block's input) and the rotary cos/sin (computed once, saved by every block graph) are
    held by both programs and not counted."""
    from ..per_block import find_blocks

    path, container = find_blocks(model)
    owner = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    embedding = model.get_input_embeddings()
    hidden = embedding.weight.shape[-1]
    dtype = embedding.weight.dtype
    after = [m for m in owner.children()
             if m is not container and m is not embedding and any(True for _ in m.parameters())]
    extra = 0
    for module in after:
        params = {p.untyped_storage()._cdata for p in module.parameters()}
        h = torch.empty(batch, seq_len, hidden, device="meta", dtype=dtype, requires_grad=True)
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(h)
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in saved}
        held = sum(n for key, n in storages.items() if key not in params)
        extra += max(held - h.untyped_storage().nbytes(), 0)
    return extra


def eager_body_extra_of(config, seq_len: int, batch: int = 1) -> int:
    """:func:`eager_body_extra` of ``config``'s model as the simulator builds it (bf16; two layers, the
    fewest that make a list of repeated blocks)."""
    return eager_body_extra(_meta_model(config, layers=2), batch, seq_len)


def per_block_peak(whole: StepPeak, largest_module_grads: int, grads_freed: bool, body_extra: int = 0) -> StepPeak:
    """The peak of the per-block program (``mstfx.compile(model, per_block=True)``), composed from the
    whole-model program ``whole`` and the eager decoder body's extra bytes ``body_extra``
    (:func:`eager_body_extra`); ``mstfx simulate --program compiled-per-block`` counts it so.

    Why this composition: a block graph saves, and its backward recomputes, what the same layer does in
    the whole program (its inputs are the residual stream the whole program saves too), and the LM-head
    graph saves what the whole program's head does, so the blocks' and the head's bytes are the whole
    program's.  What differs: (1) the final norm runs in eager, and its autograd saves ``body_extra``
    from the end of the forward to its backward, which runs right after the head's backward: added to
    the forward's peak (it sits at the head's chunked loop, the forward's end).  The head's backward
    adds none to it (the chunked head makes its gradients in its forward; the backward scales them);
    a block's backward comes after the norm's and holds none of it.  (2) Each block's backward is a
    graph of its own: with gradients kept until the optimizer step they accumulate as the whole
    program's do; freed as made (an optimizer step in ``register_post_accumulate_grad_hook``) only the
    module in backward holds gradients: the most non-gradient bytes plus the largest module's gradients
    (a block's, the embedding's or the LM head's).  Checked against the profiler's peaks of real
    per-block steps (``tests/cost/test_compiled_program.py``, slow)."""
    forward = whole.forward + body_extra
    if grads_freed:
        activations = max(forward, whole.backward_without_grads)
        return StepPeak(activations + largest_module_grads, activations, largest_module_grads,
                        "forward (per block)" if forward >= whole.backward_without_grads else f"{whole.where} (per block)",
                        forward, whole.backward, largest_module_grads, whole.host, whole.backward_without_grads)
    if forward >= whole.backward:
        return StepPeak(forward, forward, 0, "forward (per block)", forward, whole.backward, whole.backward_grads,
                        whole.host, whole.backward_without_grads)
    return replace(whole, forward=forward)
