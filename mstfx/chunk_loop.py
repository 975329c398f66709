"""The mini-sequence loop as one opaque operator: ``mstfx::chunk_loop`` and its backward.

Unrolling M copies of a region into the graph makes Dynamo, AOT autograd and Inductor work grow with
M × layers.  Here a region's chunk body (a small FX graph ``body(x_chunk, *params) -> y_chunk``) is
registered once under a content hash, and the graph calls it through two custom operators
(``torch.library``): the forward runs the body chunk by chunk without autograd and keeps only its
inputs; the backward recomputes each chunk with autograd on and takes its gradient right away, so at
most one chunk's intermediates are alive in either direction.  Inductor sees one extern call per
region in each direction, so compile work no longer depends on M.

The body runs op by op (PyTorch eager kernels): the matmuls are the same kernels Inductor calls; the
activation's pointwise ops are not fused.
"""

from __future__ import annotations

import hashlib

import torch
import torch.fx as fx

from .chunked_ops import chunk_sizes

#: Chunk bodies by content hash.  The hash covers the body's ops and wiring, so an identifier names one
#: program in every process (a cached compiled graph that calls it finds the same body again, since
#: the backend's passes register it before Inductor's cache is consulted).  It holds one entry per
#: distinct body structure, not per graph or step, and stays strong: compiled code names a body only by
#: its identifier, so an entry that went with its graph would leave that code unable to run.
_BODIES: dict[str, fx.GraphModule] = {}


def _fingerprint(body: fx.GraphModule) -> str:
    """The body's ops, targets, constants and wiring, with nodes named by position (two layers' MLPs
    of the same structure have the same fingerprint whatever Dynamo named their nodes)."""
    index = {node: i for i, node in enumerate(body.graph.nodes)}
    rows = []
    for node in body.graph.nodes:
        target = node.target if isinstance(node.target, str) else (
            f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', node.target)}")
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        rows.append(f"{node.op} {target} {args!r}")
    return "\n".join(rows)


def register_body(body: fx.GraphModule) -> str:
    """Register ``body`` (``body(x_chunk, *params) -> y_chunk``) and return its identifier."""
    ident = "mst_body_" + hashlib.sha256(_fingerprint(body).encode()).hexdigest()[:20]
    _BODIES.setdefault(ident, body)
    return ident


def body_of(ident: str) -> fx.GraphModule:
    """The chunk body registered under ``ident``."""
    try:
        return _BODIES[ident]
    except KeyError:
        raise RuntimeError(
            f"mstfx: chunk body {ident} is not registered in this process; the graph that calls it was "
            "built by the mst backend in another process (clear the compile cache, or compile again)"
        ) from None


def _autograd_on():
    """Autograd inside the operator's kernel (:func:`mstfx.compat.functorch.autograd_inside_operator`)."""
    from .compat.functorch import autograd_inside_operator

    return autograd_inside_operator()


def _bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    out, start = [], 0
    for size in chunk_sizes(tokens, chunks):
        out.append((start, start + size))
        start += size
    return out


@torch.library.custom_op("mstfx::chunk_loop", mutates_args=())
def chunk_loop(body: str, chunks: int, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``body`` applied to each of ``chunks`` row blocks of ``x`` (2-D: tokens × features), joined."""
    return run_forward(body_of(body), chunks, x, params)


def run_forward(fn, chunks: int, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The forward loop itself (also run by the compiled-program simulation to size its working set)."""
    out = None
    with torch.no_grad():
        for start, end in _bounds(x.shape[0], chunks):
            y = fn.forward(x[start:end], *params)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[start:end] = y
            del y  # not alive into the next chunk
    return out


@chunk_loop.register_fake
def _(body, chunks, x, params):
    fn = body_of(body)
    with torch.no_grad():
        return torch.empty_like(fn(x, *params), memory_format=torch.contiguous_format)


@torch.library.custom_op("mstfx::chunk_loop_backward", mutates_args=())
def chunk_loop_backward(
    body: str, chunks: int, x: torch.Tensor, params: list[torch.Tensor], grad: torch.Tensor, needs: list[bool]
) -> list[torch.Tensor]:
    """Gradients of :func:`chunk_loop` for ``[x, *params]`` where ``needs`` says so, in that order.

    Each chunk is recomputed with autograd on and differentiated at once; parameter gradients
    accumulate in leaves that live across the chunks (autograd's own accumulation, one parameter-sized
    term at a time)."""
    return run_backward(body_of(body), chunks, x, params, grad, needs)


def run_backward(fn, chunks: int, x, params, grad, needs) -> list[torch.Tensor]:
    """The backward loop itself (also run by the compiled-program simulation to size its working set)."""
    need_x, need_params = needs[0], needs[1:]
    leaves = [p.detach().requires_grad_(n) for p, n in zip(params, need_params)]
    grad_x = torch.empty_like(x) if need_x else None
    for start, end in _bounds(x.shape[0], chunks):
        xc = x[start:end].detach().requires_grad_(need_x)
        with _autograd_on():
            y = fn.forward(xc, *leaves)
            inputs = ([xc] if need_x else []) + [p for p in leaves if p.requires_grad]
            torch.autograd.backward(y, grad[start:end], inputs=inputs)
        if need_x:
            grad_x[start:end] = xc.grad
        del y, xc  # not alive into the next chunk
    out = [grad_x] if need_x else []
    for p in leaves:
        if p.requires_grad:
            out.append(p.grad if p.grad is not None else torch.zeros_like(p))
    return out


@chunk_loop_backward.register_fake
def _(body, chunks, x, params, grad, needs):
    return [torch.empty_like(t) for t, n in zip([x, *params], needs) if n]


def _setup_context(ctx, inputs, output):
    body, chunks, x, params = inputs
    ctx.body, ctx.chunks = body, chunks
    ctx.save_for_backward(x, *params)


def _backward(ctx, grad):
    x, *params = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[2]), *map(bool, ctx.needs_input_grad[3])]  # [3]: one flag per param
    grads = iter(torch.ops.mstfx.chunk_loop_backward(ctx.body, ctx.chunks, x, params, grad.contiguous(), needs))
    grad_x = next(grads) if needs[0] else None
    grad_params = [next(grads) if n else None for n in needs[1:]]
    return None, None, grad_x, grad_params


chunk_loop.register_autograd(_backward, setup_context=_setup_context)
