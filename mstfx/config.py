"""The one options object of mstfx, validated when it is made."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

#: Largest M a user may ask for.  The rewrite unrolls one copy of a region per mini-sequence, so
#: compile time grows with M (measured: M = 64 compiles about 2.5× longer than M = 8); past this the
#: first step waits tens of minutes for no further memory saving once a chunk is a few tokens long.
#: Kept with the opt-in compiled-once MLP chunks too: the LM head and checkpointed layers still unroll,
#: and the graph around the M calls still grows with M (README "Compile time").
MAX_USER_CHUNKS = 256


@dataclass
class MstConfig:
    """Options of the ``mst`` backend.

    Attributes:
        mini_sequences: M for every chunked region; ``None`` uses the paper's rule
            (MLP: ⌈tokens/hidden⌉, LM head: ⌈vocab/hidden⌉), see ``mstfx.passes.chunk_rule``.
        lm_head_chunks: M for the LM head + loss only (overrides ``mini_sequences`` there).
        chunk_mlp / chunk_lm_head: turn a region kind off.
        rewrite_attention: hand SDPA ``is_causal=True`` instead of an in-graph causal mask and the
            unexpanded K/V of grouped-query attention (``mstfx/passes/attention.py``).
        region_chunks: per-region M by region name (``"model.layers.3.mlp"``), as a plan gives it.
        min_lm_head_chunk_tokens: the default LM-head rule never makes chunks shorter than this.
        compiler: ``"inductor"`` (default) or ``"aot_eager"`` / ``"eager"`` to debug the rewrite.
        offload_checkpoints: the inputs of checkpointed layers (HF gradient checkpointing) are kept in
            host memory between forward and backward (``mstfx.offload``); needs ``compiler="inductor"``.
    """

    mini_sequences: int | None = None
    lm_head_chunks: int | None = None
    chunk_mlp: bool = True
    chunk_lm_head: bool = True
    rewrite_attention: bool = True
    region_chunks: dict[str, int] = field(default_factory=dict)
    min_lm_head_chunk_tokens: int = 256
    compiler: str = "inductor"
    offload_checkpoints: bool = False

    def __post_init__(self) -> None:
        for name in ("chunk_mlp", "chunk_lm_head", "rewrite_attention", "offload_checkpoints"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.region_chunks, dict) or not all(isinstance(k, str) for k in self.region_chunks):
            raise ValueError(
                f"region_chunks must map region names (e.g. 'model.layers.3.mlp') to M, got {self.region_chunks!r}"
            )
        for name in ("mini_sequences", "lm_head_chunks"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name), cap=MAX_USER_CHUNKS)
        positive_int("min_lm_head_chunk_tokens", self.min_lm_head_chunk_tokens)
        for key, val in self.region_chunks.items():
            positive_int(f"region_chunks[{key!r}]", val, cap=MAX_USER_CHUNKS)
        if self.compiler not in ("inductor", "aot_eager", "eager"):
            raise ValueError(f"compiler must be 'inductor', 'aot_eager' or 'eager', got {self.compiler!r}")
        if self.offload_checkpoints and self.compiler != "inductor":
            raise ValueError(
                "offload_checkpoints=True needs compiler='inductor' (the offload is inserted by the joint-graph pass "
                "Inductor runs); in eager use mstfx.offload.enable_checkpoint_offload(model)"
            )

    def mlp_chunks_for(self, region: Any) -> int | None:
        return self.region_chunks.get(getattr(region, "name", ""), self.mini_sequences)

    def lm_head_chunks_for(self, region: Any) -> int | None:
        named = self.region_chunks.get(getattr(region, "name", ""))
        if named is not None:
            return named
        return self.lm_head_chunks if self.lm_head_chunks is not None else self.mini_sequences


def positive_int(name: str, value: Any, *, cap: int | None = None) -> int:
    """``value`` as an int, or a ValueError that names ``name`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cap is not None and value > cap:
        raise ValueError(
            f"{name}={value} is more than {cap} mini-sequences: each one is an unrolled copy of the "
            "region, so compile time grows with M; use a plan (mstfx.plan / mstfx.transform) or a smaller M"
        )
    return int(value)
