"""Runtime pieces that rewritten graphs call: token splitting and the fused, chunked LM head + loss.

These are ordinary PyTorch functions.  AOT autograd traces straight through them (the autograd
``Function`` included), so Inductor sees and fuses every op of every chunk.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .validate import positive_int

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


def _valid(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    return target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)


def _token_chunks(h: torch.Tensor, chunks: int, *per_token: torch.Tensor):
    """``(h_c, t_c, ...)`` per chunk: ``h`` and each per-token tensor split at the same token boundaries."""
    sizes = chunk_sizes(h.shape[0], chunks)
    return zip(split_tokens(h, chunks), *(torch.split(t, sizes) for t in per_token))


def _chunk_logits(h_c, weight, bias, transforms, acc):
    """One chunk's logits, the loss input ``z`` (after the transforms), what their backward needs, and ``z`` in ``acc``."""
    logits = F.linear(h_c, weight, bias)
    z, saved = _apply_transforms(logits, transforms)
    return logits, z, saved, z.to(acc)


class _HeadGradients:
    """dL/dh, dL/dW and dL/db of the LM head, accumulated chunk by chunk from each chunk's dL/dlogits.

    dL/dW accumulates in place in ``acc`` precision (:func:`accumulate_matmul`); dL/dh is kept per chunk
    and concatenated at the end.  Only the gradients that are needed are computed.
    """

    def __init__(self, weight, bias, acc, need_h: bool, need_w: bool, need_b: bool) -> None:
        self.weight = weight
        self.h_chunks: list[torch.Tensor] | None = [] if need_h else None
        self.acc = acc
        self.w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        self.b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_b and bias is not None) else None

    def add(self, g_logits: torch.Tensor, h_c: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        """Add one chunk's share.  ``scratch``: a tensor of ``g_logits``' shape that is no longer needed
        (code run op by op only): when ``g_logits`` must be upcast to the accumulators' precision, the
        upcast is written into it instead of a new tokens×vocab buffer (the same values)."""
        if self.h_chunks is not None:
            self.h_chunks.append(g_logits @ self.weight)
        needs_upcast = (self.w is not None or self.b is not None) and g_logits.dtype != self.acc
        if needs_upcast and scratch is not None and scratch.dtype == self.acc:
            up = scratch.copy_(g_logits)
            if self.w is not None:
                self.w.addmm_(up.t(), h_c.to(self.acc))
            if self.b is not None:
                self.b = self.b + up.sum(0)
            return
        if self.w is not None:
            accumulate_matmul(self.w, g_logits.t(), h_c)
        if self.b is not None:
            self.b = self.b + g_logits.to(self.b.dtype).sum(0)

    def h(self) -> torch.Tensor | None:
        return torch.cat(self.h_chunks) if self.h_chunks is not None else None


def _exp_shifted(z: torch.Tensor, saved: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(exp(z - m), row sums, logsumexp)`` with ``m`` the row maxima (infinite ones taken as 0, as
    ``torch.logsumexp`` does), holding at most one more tokens×vocab buffer than ``z`` (op by op,
    ``torch.logsumexp`` holds two); ``z`` is overwritten unless the transforms' backward keeps it."""
    m = z.amax(dim=-1, keepdim=True)
    m = m.masked_fill(m.isinf(), 0.0)
    e = z - m if any(t is z for t in saved) else z.sub_(m)
    e.exp_()
    total = e.sum(dim=-1, keepdim=True)
    return e, total, (total.log() + m).squeeze(1)


def _fused_loss_and_grads(
    h, weight, bias, target, ignore_index, reduction, transforms, chunks, need_h, need_w, need_b, in_place=False
):
    """The chunked loss and, for an upstream gradient of 1, dL/dh, dL/dW and dL/db (``None`` where not
    needed): each chunk's logits, softmax and logits-gradient live only while that chunk runs.

    ``in_place``: turn the chunk's fp32 logits into its logits-gradient in place (the same values),
    for code that runs op by op (the loop operator), where each out-of-place step would hold one more
    tokens×vocab buffer; compiled code fuses those steps anyway."""
    acc = _acc_dtype(torch.result_type(h, weight), transforms)
    valid_all = _valid(target, ignore_index)
    if reduction == "mean":
        scale = 1.0 / valid_all.sum().to(acc)
    else:
        scale = torch.ones((), dtype=acc, device=h.device)
    loss = torch.zeros((), dtype=acc, device=h.device)
    grads = _HeadGradients(weight, bias, acc, need_h, need_w, need_b)
    classes = torch.arange(weight.shape[0], device=h.device)
    for h_c, t_c in _token_chunks(h, chunks, target):
        logits, z, saved, z32 = _chunk_logits(h_c, weight, bias, transforms, acc)
        # each chunk tensor is dropped as soon as it is dead (``del``): run op by op (eager, aot_eager,
        # the FakeTensor simulation, the loop operator), a loop variable would otherwise keep the
        # previous chunk's vocab-wide tensors alive into the next chunk
        logits_dtype, z_dtype = logits.dtype, z.dtype
        del logits, z
        valid = _valid(t_c, ignore_index)
        safe_t = torch.where(valid, t_c, 0)
        picked = z32.gather(1, safe_t.unsqueeze(1)).squeeze(1)
        if in_place:
            g, total, lse = _exp_shifted(z32, saved)
            del z32
        else:
            lse = torch.logsumexp(z32, dim=-1)
        loss = loss + torch.where(valid, lse - picked, 0.0).sum()
        if not (need_h or need_w or need_b):
            continue
        # d(loss)/dz = softmax(z) - onehot(target), zero on ignored rows, times 1/count for a mean
        if in_place:  # one pass: exp(z - m) · (scale / row sum), 0 on ignored rows; then -scale at the target
            row = torch.where(valid, scale, 0.0).unsqueeze(1)
            g.mul_(row / total).scatter_add_(1, safe_t.unsqueeze(1), -row)
        else:
            probs = torch.exp(z32 - lse.unsqueeze(1))
            del z32
            # (where, not a multiply: with every target ignored the mean's 1/0 must give 0, as in eager)
            g = torch.where(
                valid.unsqueeze(1),
                (probs - (classes.unsqueeze(0) == safe_t.unsqueeze(1)).to(probs.dtype)) * scale,
                0.0,
            )
            del probs
        g_z = _transforms_backward(g.to(z_dtype), transforms, saved)
        del g, saved
        g_logits = g_z.to(logits_dtype)  # the logits' gradient as eager has it (rounded to their dtype)
        # op by op, the dead pre-rounding buffer takes dL/dW's upcast instead of a new tokens×vocab one
        grads.add(g_logits, h_c, scratch=g_z if in_place and g_logits is not g_z else None)
        del g_z, g_logits
    loss = loss * scale
    return loss.to(_loss_dtype(torch.result_type(h, weight), transforms)), grads.h(), grads.w, grads.b


def _scale_head_grads(grad_loss, grad_h, grad_w, grad_b, dtypes):
    """The backward of the fused loss: the gradients made in forward times the upstream gradient."""
    h_dtype, w_dtype, b_dtype = dtypes
    g = grad_loss.to(grad_w.dtype if grad_w is not None else torch.float32)
    out_h = (grad_h * grad_loss.to(grad_h.dtype)).to(h_dtype) if grad_h is not None else None
    out_w = (grad_w * g).to(w_dtype) if grad_w is not None else None
    out_b = (grad_b * g).to(b_dtype) if grad_b is not None else None
    return out_h, out_w, out_b


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``transforms(h @ Wᵀ + b)`` computed chunk by chunk.

    Each chunk's logits, softmax and logits-gradient live only while that chunk runs: the forward
    pass already computes ``dL/dh`` and ``dL/dW`` for an upstream gradient of 1, and the backward pass
    only scales them.  So no tokens×vocab tensor ever exists, and no matmul is recomputed.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, reduction, transforms, chunks):
        loss, grad_h, grad_w, grad_b = _fused_loss_and_grads(
            h, weight, bias, target, ignore_index, reduction, transforms, chunks, *ctx.needs_input_grad[:3]
        )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_scale_head_grads(grad_loss, *ctx.saved_tensors, ctx.dtypes), None, None, None, None, None)


# The same loss as one opaque operator: a compiled graph calls it once whatever M is (its loop runs
# op by op inside), so compile work does not grow with the number of chunks.
def encode_transforms(transforms: Sequence[Transform]) -> str:
    """Logit transforms as the string the operator takes (``"cast:float32;scale:0.5;tanh"``)."""
    parts = []
    for t in transforms:
        if t[0] == "cast":
            parts.append(f"cast:{str(t[1]).replace('torch.', '')}")
        elif t[0] == "scale":
            parts.append(f"scale:{float(t[1])!r}")
        else:
            parts.append(t[0])
    return ";".join(parts)


def decode_transforms(text: str) -> tuple:
    """Inverse of :func:`encode_transforms`."""
    out = []
    for part in filter(None, text.split(";")):
        name, _, arg = part.partition(":")
        out.append((name, getattr(torch, arg)) if name == "cast" else (name, float(arg)) if name == "scale" else (name,))
    return tuple(out)


_NOTHING = (0,)  # the shape of an output the caller did not ask for (an operator returns tensors only)


@torch.library.custom_op("mstfx::linear_cross_entropy_loop", mutates_args=())
def linear_cross_entropy_loop(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, ignore_index: int | None,
    reduction: str, transforms: str, chunks: int, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, dL/dh, dL/dW, dL/db)`` of :func:`linear_cross_entropy` for an upstream gradient of 1;
    a gradient not in ``needs`` comes back empty."""
    return linear_cross_entropy_loop_run(h, weight, bias, target, ignore_index, reduction, transforms, chunks, needs)


def linear_cross_entropy_loop_run(h, weight, bias, target, ignore_index, reduction, transforms, chunks, needs):
    """The operator's loop itself (also run by the compiled-program simulation to size its working set)."""
    loss, gh, gw, gb = _fused_loss_and_grads(
        h, weight, bias, target, ignore_index, reduction, decode_transforms(transforms), chunks, *needs, in_place=True
    )
    def out(g):  # an operator's outputs must not alias each other: a fresh empty tensor each
        return h.new_empty(_NOTHING) if g is None else g

    return loss, out(gh), out(gw), out(gb)


@linear_cross_entropy_loop.register_fake
def _(h, weight, bias, target, ignore_index, reduction, transforms, chunks, needs):
    tf = decode_transforms(transforms)
    acc = _acc_dtype(torch.result_type(h, weight), tf)
    loss = h.new_empty((), dtype=_loss_dtype(torch.result_type(h, weight), tf))
    gh = torch.empty_like(h, memory_format=torch.contiguous_format) if needs[0] else h.new_empty(_NOTHING)
    gw = weight.new_empty(weight.shape, dtype=acc) if needs[1] else h.new_empty(_NOTHING)
    gb = weight.new_empty(weight.shape[:1], dtype=acc) if needs[2] and bias is not None else h.new_empty(_NOTHING)
    return loss, gh, gw, gb


def _lce_setup(ctx, inputs, output):
    h, weight, bias, _, _, _, _, _, needs = inputs
    _, gh, gw, gb = output
    ctx.needs = needs
    ctx.has_bias = bias is not None
    ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.save_for_backward(gh, gw, gb)


def _lce_backward(ctx, grad_loss, *_):
    gh, gw, gb = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs
    out_h, out_w, out_b = _scale_head_grads(
        grad_loss, gh if need_h else None, gw if need_w else None, gb if need_b and ctx.has_bias else None, ctx.dtypes
    )
    return out_h, out_w, out_b, None, None, None, None, None, None


linear_cross_entropy_loop.register_autograd(_lce_backward, setup_context=_lce_setup)


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


# --------------------------------------------------------------------------------------------------
# Per-token log-probabilities (DPO, GRPO, distillation) without a tokens×vocab tensor
# --------------------------------------------------------------------------------------------------
class _LinearLogProbs(torch.autograd.Function):
    """``log_softmax(transforms(h @ Wᵀ + b))[t]`` per token, chunk by chunk.

    Unlike the loss, the upstream gradient is a tensor (one value per token) that is only known in
    backward, so backward recomputes each chunk's logits from the saved ``h`` (one extra matmul per
    chunk) instead of keeping them: at most one chunk of logits is alive in either pass.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, transforms, chunks):
        acc = _acc_dtype(torch.result_type(h, weight), transforms)
        out = []
        for h_c, t_c in _token_chunks(h, chunks, target):
            z32 = _chunk_logits(h_c, weight, bias, transforms, acc)[3]
            valid = _valid(t_c, ignore_index)
            safe_t = torch.where(valid, t_c, 0)
            picked = z32.gather(1, safe_t.unsqueeze(1)).squeeze(1)
            out.append(torch.where(valid, picked - torch.logsumexp(z32, dim=-1), 0.0))
        ctx.save_for_backward(h, weight, bias, target)
        ctx.ignore_index, ctx.transforms, ctx.chunks, ctx.acc = ignore_index, transforms, chunks, acc
        return torch.cat(out) if out else h.new_zeros(0, dtype=acc)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, target = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc, transforms, chunks = ctx.acc, ctx.transforms, ctx.chunks
        grads = _HeadGradients(weight, bias, acc, need_h, need_w, need_b)
        classes = torch.arange(weight.shape[0], device=h.device)
        for h_c, t_c, g_c in _token_chunks(h, chunks, target, grad_out):
            logits, z, saved, z32 = _chunk_logits(h_c, weight, bias, transforms, acc)
            logits_dtype, z_dtype = logits.dtype, z.dtype
            del logits, z  # dead chunk tensors dropped at once (see _LinearCrossEntropy.forward)
            valid = _valid(t_c, ctx.ignore_index)
            safe_t = torch.where(valid, t_c, 0)
            probs = torch.softmax(z32, dim=-1)
            del z32
            # d logp_t / dz = onehot(t) - softmax(z), times the upstream gradient; zero on ignored rows
            w_c = torch.where(valid, g_c.to(acc), 0.0).unsqueeze(1)
            g = ((classes.unsqueeze(0) == safe_t.unsqueeze(1)).to(acc) - probs) * w_c
            del probs
            grads.add(_transforms_backward(g.to(z_dtype), transforms, saved).to(logits_dtype), h_c)
            del g, saved
        grad_h = grads.h()
        out_h = grad_h.to(h.dtype) if grad_h is not None else None
        out_w = grads.w.to(weight.dtype) if grads.w is not None else None
        out_b = grads.b.to(bias.dtype) if grads.b is not None else None
        return out_h, out_w, out_b, None, None, None, None


def linear_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    transforms: Sequence[Transform] = (),
    chunks: int = 8,
) -> torch.Tensor:
    """Exact ``log_softmax(transforms(h @ Wᵀ + b), -1).gather(-1, target)`` for [tokens, hidden] ``h``.

    Returns fp32 (fp64 for fp64 inputs) log-probabilities of shape [tokens]; 0 where ``target ==
    ignore_index``.  Never holds more than one chunk of logits, forward or backward.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if h.dim() != 2 or target.dim() != 1 or h.shape[0] != target.shape[0]:
        raise ValueError(f"expected h [tokens, hidden] and target [tokens], got {tuple(h.shape)} and {tuple(target.shape)}")
    return _LinearLogProbs.apply(h, weight, bias, target, ignore_index, tuple(transforms), chunks)


def _finite_positive(value: Any) -> bool:
    """A real number, finite and > 0; bools are not numbers here (``temperature=True`` is a mistake)."""
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and math.isfinite(float(value)) and float(value) > 0)


def chunked_logprobs(
    hidden: torch.Tensor,
    lm_head,
    labels: torch.Tensor,
    *,
    chunks: int | None = None,
    ignore_index: int | None = -100,
    temperature: float | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log-probabilities ``log p(labels | hidden)`` without materialising the logits.

    For losses that need them (DPO, GRPO, distillation on the sampled tokens)::

        hidden = model.model(input_ids).last_hidden_state          # [B, S, H] (final norm applied)
        logp = mstfx.chunked_logprobs(hidden[:, :-1], model.lm_head, input_ids[:, 1:])   # [B, S-1]

    Args:
        hidden: [..., H] final hidden states (the LM head's input).
        lm_head: an ``nn.Linear`` (its bias is used) or a [vocab, H] weight tensor.
        labels: [...] token ids, same leading shape as ``hidden``; positions equal to ``ignore_index``
            get log-probability 0 and no gradient.
        chunks: number of mini-sequences; default ⌈vocab / H⌉ (the LM head's rule,
            ``mstfx.regions.rules``), capped by the tokens.
        temperature: divide logits by it (GRPO sampling temperature).
        logit_scale: multiply logits by it (Cohere, Granite's ``1/logits_scaling``).
        softcap: final-logit soft-capping ``c·tanh(z/c)`` (Gemma 2).
        Each of the three is a finite positive number when given (ValueError otherwise; bools refused).
    Order of the transforms, as the models apply them: scale, soft-capping, then temperature.

    Exact: values and gradients (w.r.t. ``hidden``, the weight and the bias) equal
    ``torch.log_softmax(logits.float(), -1).gather(-1, labels)`` up to float rounding.
    """
    if chunks is not None:
        positive_int("chunked_logprobs: chunks", chunks)
    for name, value in (("temperature", temperature), ("logit_scale", logit_scale), ("softcap", softcap)):
        if value is not None and not _finite_positive(value):
            raise ValueError(f"chunked_logprobs: {name} must be a finite positive number (a Python or NumPy "
                             f"int/float, not a bool), got {value!r}")
    if isinstance(lm_head, torch.nn.Module):
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None) if bias is None else bias
    else:
        weight = lm_head
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("lm_head must be an nn.Linear or a [vocab, hidden] weight tensor")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the token dims")
    transforms: list = []
    if logit_scale is not None:
        transforms.append(("scale", float(logit_scale)))
    if softcap is not None:
        transforms += [("scale", 1.0 / float(softcap)), ("tanh",), ("scale", float(softcap))]
    if temperature is not None:
        transforms.append(("scale", 1.0 / float(temperature)))
    h = flatten_tokens(hidden)
    tokens = h.shape[0]
    if chunks is None:  # the LM head's rule, without a shortest chunk (the caller may use few tokens)
        from .regions.rules import lm_head_rule

        chunks = lm_head_rule(tokens if isinstance(tokens, int) else 2**62, weight.shape[1], weight.shape[0], 1)
    if isinstance(tokens, int):
        chunks = max(1, min(chunks, tokens))
    out = linear_logprobs(h, weight, bias, labels.reshape(-1), ignore_index=ignore_index, transforms=transforms, chunks=chunks)
    return out.reshape(labels.shape)
