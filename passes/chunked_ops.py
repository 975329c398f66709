"""Runtime pieces that rewritten graphs call: token splitting and the fused, chunked LM head + loss.

These are ordinary PyTorch functions.  AOT autograd traces straight through them (the autograd
``Function`` included), so Inductor sees and fuses every op of every chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: A logit transform between the LM head matmul and the loss, as plain data:
#: ``("cast", dtype)``, ``("scale", c)`` (logits * c) or ``("tanh",)``.
Transform = tuple


def chunk_sizes(n, chunks: int) -> list:
    """Balanced sizes of ``chunks`` pieces of ``n`` tokens: every token lands in exactly one piece.

    ``n`` may be a SymInt; pieces may be empty when ``n < chunks`` (an empty matmul is fine).
    """
    return [(n * (i + 1)) // chunks - (n * i) // chunks for i in range(chunks)]


def split_tokens(x: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """Split the flattened token dim (dim 0) into ``chunks`` views; its backward is a single cat."""
    return torch.split(x, chunk_sizes(x.shape[0], chunks), dim=0)


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def restore_tokens(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y`` is [tokens, k]; give it the leading (token) dims of ``like``."""
    return y.reshape(*like.shape[:-1], y.shape[-1])


def checkpointed(body, *args):
    """Run one chunk under ``torch.utils.checkpoint``: save its inputs, recompute it in backward."""
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return body(*args)
    return checkpoint(body, *args, use_reentrant=False)


def _apply_transforms(z: torch.Tensor, transforms: Sequence[Transform]) -> tuple[torch.Tensor, list]:
    """Logits -> loss input.  Returns the result and what the backward needs (tanh outputs)."""
    saved = []
    for t in transforms:
        if t[0] == "cast":
            z = z.to(t[1])
        elif t[0] == "scale":
            z = z * t[1]
        elif t[0] == "tanh":
            z = torch.tanh(z)
            saved.append(z)
        else:  # pragma: no cover - guarded by the analysis
            raise ValueError(f"unknown logit transform {t!r}")
    return z, saved


def _transforms_backward(g: torch.Tensor, transforms: Sequence[Transform], saved: list) -> torch.Tensor:
    """Chain rule back through the transforms: d/dz tanh = 1 - tanh², d/dz c·z = c, casts are identity."""
    for t in reversed(transforms):
        if t[0] == "scale":
            g = g * t[1]
        elif t[0] == "tanh":
            y = saved.pop()
            g = g * (1 - y * y)
    return g


@torch.library.custom_op("mstfx::accumulate_matmul", mutates_args=("acc",))
def accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place (a, b upcast to ``acc``'s dtype).

    Written as a mutating custom op so that Inductor keeps it in place: the functional ``acc + a @ b``
    makes Inductor copy the whole vocab×hidden accumulator once per chunk.
    """
    if a.dtype != acc.dtype:
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    acc.addmm_(a, b)


@accumulate_matmul.register_fake
def _(acc, a, b) -> None:
    return None


def _loss_dtype(logits_dtype: torch.dtype, transforms: Sequence[Transform]) -> torch.dtype:
    """The dtype eager's cross-entropy would return: that of its input after the transforms."""
    for t in transforms:
        if t[0] == "cast":
            logits_dtype = t[1]
    return logits_dtype


def _acc_dtype(logits_dtype: torch.dtype, transforms: Sequence[Transform]) -> torch.dtype:
    """Accumulate in fp32 like eager (fp64 stays fp64)."""
    return torch.float64 if _loss_dtype(logits_dtype, transforms) == torch.float64 else torch.float32


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``transforms(h @ Wᵀ + b)`` computed chunk by chunk.

    Each chunk's logits, softmax and logits-gradient live only while that chunk runs: the forward
    pass already computes ``dL/dh`` and ``dL/dW`` for an upstream gradient of 1, and the backward pass
    only scales them.  So no tokens×vocab tensor ever exists, and no matmul is recomputed.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, reduction, transforms, chunks):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        vocab = weight.shape[0]
        acc = _acc_dtype(torch.result_type(h, weight), transforms)
        valid_all = target != ignore_index
        if reduction == "mean":
            scale = 1.0 / valid_all.sum().to(acc)
        else:
            scale = torch.ones((), dtype=acc, device=h.device)
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h_chunks = []
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if (need_b and bias is not None) else None
        classes = torch.arange(vocab, device=h.device)
        for h_c, t_c in zip(split_tokens(h, chunks), torch.split(target, chunk_sizes(target.shape[0], chunks))):
            logits = F.linear(h_c, weight, bias)
            z, saved = _apply_transforms(logits, transforms)
            z32 = z.to(acc)
            valid = t_c != ignore_index
            safe_t = torch.where(valid, t_c, 0)
            lse = torch.logsumexp(z32, dim=-1)
            picked = z32.gather(1, safe_t.unsqueeze(1)).squeeze(1)
            loss = loss + torch.where(valid, lse - picked, 0.0).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(loss)/dz = softmax(z) - onehot(target), zero on ignored rows, times 1/count for a mean
            probs = torch.exp(z32 - lse.unsqueeze(1))
            g = (probs - (classes.unsqueeze(0) == safe_t.unsqueeze(1)).to(probs.dtype)) * (
                valid.unsqueeze(1).to(probs.dtype) * scale
            )
            g = _transforms_backward(g.to(z.dtype), transforms, saved).to(logits.dtype)
            if need_h:
                grad_h_chunks.append(g @ weight)
            if need_w:
                accumulate_matmul(grad_w, g.t(), h_c)
            if grad_b is not None:
                grad_b = grad_b + g.to(acc).sum(0)
        loss = loss * scale
        grad_h = torch.cat(grad_h_chunks) if need_h else None
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss.to(_loss_dtype(torch.result_type(h, weight), transforms))

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_loss.to(grad_w.dtype if grad_w is not None else torch.float32)
        out_h = (grad_h * grad_loss.to(grad_h.dtype)).to(h_dtype) if grad_h is not None else None
        out_w = (grad_w * g).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * g).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    transforms: Sequence[Transform] = (("cast", torch.float32),),
    chunks: int = 8,
) -> torch.Tensor:
    """Exact ``F.cross_entropy(transforms(h @ Wᵀ + b), target)`` without a tokens×vocab tensor.

    ``h`` is [tokens, hidden] and ``target`` [tokens].  Gradients flow to ``h``, ``weight`` and ``bias``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    return _LinearCrossEntropy.apply(h, weight, bias, target, ignore_index, reduction, tuple(transforms), chunks)
