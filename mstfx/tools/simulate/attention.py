"""Attention inside the simulation as FlashAttention-2 runs it on a GPU (no S×S tensor, K/V at their own
head count, the backward's workspace; Ulysses all-to-all buffers under sequence parallelism), and HF's
packed-sequence probe answered "not packed" (it cannot read fake position ids)."""

from __future__ import annotations

import contextlib


from .options import ATTN_NAME


@contextlib.contextmanager
def flash_sim_attention(sequence_parallel: int = 1):
    """An HF attention implementation with FlashAttention-2's memory behaviour (fake tensors only),
    registered in transformers' attention and mask registries for the duration of the block and
    removed afterwards (only if this block added it).

    ``sequence_parallel`` N > 1: the attention of one Ulysses rank.  Its q/k/v hold the rank's S/N
    tokens on every head; an all-to-all (a contiguous send buffer, a receive buffer) makes the whole S
    on H/N query heads and the KV heads ``cost_model.kv_heads_per_rank`` counts, the kernel runs there and
    keeps those for backward, and an all-to-all brings the output back to S/N tokens × H heads.  The
    backward does the same for the output gradient and for dq/dk/dv.  No data moves (fake tensors):
    only the allocations a rank makes are simulated."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    from ...planning.cost_model import kv_heads_split
    from ..compiled_program import fa2_backward_workspace

    if ATTN_NAME in AttentionInterface._global_mapping:  # an enclosing block registered it
        yield
        return

    n = sequence_parallel

    def all_to_all(x, tokens: int, heads: int):
        """x [B, s, h, hd] → a new [B, tokens, heads, hd]: its send buffer (a contiguous copy of x)
        exists while the receive buffer is filled."""
        send = torch.empty_like(x, memory_format=torch.contiguous_format)
        recv = x.new_empty(x.shape[0], tokens, heads, x.shape[3])
        del send
        return recv

    class FlashSim(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):  # [B, S, H, hd], [B, S, Hkv, hd]
            if n > 1:  # a rank's S/N tokens × all heads → the whole S × its heads
                s, h, hkv = q.shape[1], q.shape[2], k.shape[2]
                ctx.local = (s, h, hkv)
                kv_rank = kv_heads_split(h, hkv, n) // n  # as the runtime repeats them
                q, k, v = all_to_all(q, s * n, h // n), all_to_all(k, s * n, kv_rank), all_to_all(v, s * n, kv_rank)
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            if n > 1:  # the output back to the rank's tokens (the kernel's own output stays saved)
                s, h, _ = ctx.local
                return all_to_all(out, s, h)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            if n > 1:
                grad_out = all_to_all(grad_out, q.shape[1], q.shape[2])
            b, s, h, hd = q.shape
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            work = torch.empty(fa2_backward_workspace(b, s, h, hd, k.shape[2], q.element_size()), dtype=torch.uint8, device=q.device)
            del work, grad_out
            if n > 1:  # the gradients back to the rank's tokens, one at a time
                s_loc, h_loc, hkv = ctx.local
                dq = all_to_all(dq, s_loc, h_loc)
                dk = all_to_all(dk, s_loc, hkv)
                dv = all_to_all(dv, s_loc, hkv)
            return dq, dk, dv

    def flash_sim_forward(module, query, key, value, attention_mask, **kwargs):
        # HF hands [B, H, S, hd]; flash-attn works on [B, S, H, hd] views of the same storage
        out = FlashSim.apply(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out, None

    AttentionInterface.register(ATTN_NAME, flash_sim_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, flash_attention_mask)
    try:
        yield
    finally:
        AttentionInterface._global_mapping.pop(ATTN_NAME, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(ATTN_NAME, None)


@contextlib.contextmanager
def no_packed_sequences():
    """HF's packed-sequence probe cannot read fake position ids; answer as a real single-sequence run."""
    import transformers.masking_utils as mu

    orig = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = orig
