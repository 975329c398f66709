"""Ulysses sequence parallelism in the ``mst`` backend: each rank of a group holds S/N tokens.

    batch = mstfx.sequence_parallel.shard_batch(input_ids, labels, group)  # this rank's tokens, global positions
    model = mstfx.compile(model, sequence_parallel=group)
    loss = model(**batch).loss           # this rank's summed loss / the global token count
    loss.backward(); mstfx.sequence_parallel.reduce_gradients(model.parameters(), group)

**Attention.**  With ``MstConfig(sequence_parallel=group)`` the backend replaces every SDPA call of
the torch-level graph (``mstfx/passes/sequence_parallel.py``) by :func:`ulysses_attention`: q/k/v
``[B, H, S/N, D]`` go through one all-to-all each (``torch.distributed._functional_collectives``, traceable
by Dynamo, AOT autograd and Inductor, with an autograd rule) to ``[B, H/N, S, D]`` (every token,
this rank's H/N heads), attention runs over the whole sequence (``is_causal`` as the graph had it) and
one more all-to-all brings the output back to ``[B, H, S/N, D]``.  Everything else (MLPs, LM head and
loss, chunked by mst) runs per rank on its own S/N tokens.  Grouped-query K/V are split by their own
heads when N divides them; otherwise each K/V head is repeated for its query heads first (exact,
more K/V traffic).  Refused (:class:`SequenceParallelError`): H not divisible by N, an attention that
keeps a mask (padding, sliding windows, a caller's 4-D mask), attention computed without SDPA (a
softmax or flex attention in the graph: ``attn_implementation="eager"``), and at run time inputs that
fail the causal check of the attention rewrite (padding).

**Positions and loss.**  :func:`shard_batch` takes the *full* batch (every rank of the group holds
it) and returns this rank's slice with the tokens' global ``position_ids`` and labels shifted over
the *whole* sequence (the label of a shard's last token is the next rank's first token; ``-100``
after the very last).  They are passed to Hugging Face's causal-LM loss as ``shift_labels`` (it
then skips its own shift) with ``num_items_in_batch`` = the global count of labelled tokens, so it
computes ``sum(this rank's token losses) / global count``.  The sum of these over the group is the
global mean, exactly: :func:`global_loss` all-reduces it for logging, and the parameter gradients
summed over the group (:func:`reduce_gradients`) are the gradients of the global mean.  (A
data-parallel wrapper that *averages* gradients over all DP·N ranks needs each rank's loss times N.)

The room's modules, one job each: :mod:`.errors` (:class:`SequenceParallelError` and the head rule
:func:`check_heads`, torch-free), :mod:`.ulysses` (the attention op :func:`ulysses_attention` and its
all-to-alls), :mod:`.batch` (:func:`shard_batch`, :func:`global_loss`, :func:`reduce_gradients`).  The
graph rewrite is a pass of the pipeline and lives with the others (``mstfx/passes/sequence_parallel.py``).
"""

from __future__ import annotations

from .batch import global_loss, reduce_gradients, shard_batch
from .errors import SequenceParallelError, check_heads
from .ulysses import ulysses_attention

__all__ = ["SequenceParallelError", "check_heads", "global_loss", "reduce_gradients", "shard_batch",
           "ulysses_attention"]
