"""The one options object of mstfx, validated when it is made and whenever a field is set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .regions.rules import MIN_LM_HEAD_CHUNK_TOKENS
from .vocabulary import ChunkForm
from .validate import is_positive_int, positive_int  # noqa: F401  (re-exported: mstfx.config.positive_int)

#: Largest M a user may ask for.  With the default loop form compile work does not depend on M; past
#: this a chunk is a few tokens long at any length this machine or a GPU trains, and the per-chunk
#: overhead of the loop (one small matmul per weight per chunk) only costs time.  The unrolled form
#: (``chunk_form="unrolled"``) compiles one copy of the region per mini-sequence.
MAX_USER_CHUNKS = 256

#: The forms a chunked region can take in the compiled graph (``MstConfig.chunk_form``): the spellings
#: of :class:`mstfx.vocabulary.ChunkForm`.
CHUNK_FORMS = ChunkForm.spellings()


@dataclass
class MstConfig:
    """Options of the ``mst`` backend, checked when made and whenever a field is set (a bad value raises
    ValueError and leaves the config as it was; a dict changed in place is not seen: assign a new one).

    Attributes:
        mini_sequences: the chunk knob, M.  An int: M for every chunked region; a dict: M per region
            kind (``{"mlp": 8, "lm_head": 16}``; kinds left out use their rule); ``None``: each kind's
            default rule (MLP: ⌈tokens/hidden⌉, LM head: ⌈vocab/hidden⌉), see ``mstfx.regions.rules``.
        chunk_mlp / chunk_lm_head: turn a region kind off.
        skip_kinds: names of region kinds to leave unchanged (``mstfx.regions.registry.Kind``), for
            kinds without a switch of their own.
        rewrite_attention: hand SDPA ``is_causal=True`` instead of an in-graph causal mask and the
            unexpanded K/V of grouped-query attention (``mstfx/passes/attention.py``).
        region_chunks: per-region M by region name (``"model.layers.3.mlp"``), as a plan gives it.
        min_lm_head_chunk_tokens: the default LM-head rule never makes chunks shorter than this.
        compiler: ``"inductor"`` (default) or ``"aot_eager"`` / ``"eager"`` to debug the rewrite.
        offload_checkpoints: the inputs of checkpointed layers (HF gradient checkpointing) are kept in
            host memory between forward and backward (``mstfx.offload``); needs ``compiler="inductor"``.
        chunk_form: how a chunked region appears in the compiled graph (:data:`CHUNK_FORMS`):
            ``"loop"`` one opaque loop operator per region, run op by op inside (compile work does
            not grow with M; ``mstfx/chunk_loop.py``); ``"unrolled"`` M copies of the region that
            Inductor fuses (compile work grows with M).  The ``eager`` compiler always runs each
            chunk under ``torch.utils.checkpoint``.
        sequence_parallel: a ``torch.distributed`` ProcessGroup whose ranks each hold S/N tokens of the
            sequence: every attention call is split across it (Ulysses all-to-all,
            ``mstfx.sequence_parallel``), everything else runs per rank; ``None`` (default): off.
    """

    mini_sequences: int | dict[str, int] | None = None
    chunk_mlp: bool = True
    chunk_lm_head: bool = True
    rewrite_attention: bool = True
    region_chunks: dict[str, int] = field(default_factory=dict)
    min_lm_head_chunk_tokens: int = MIN_LM_HEAD_CHUNK_TOKENS
    skip_kinds: tuple[str, ...] = ()
    compiler: str = "inductor"
    offload_checkpoints: bool = False
    chunk_form: str = "loop"
    sequence_parallel: Any = None

    def __post_init__(self) -> None:
        self._check()
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """A field set after construction is checked as at construction (and normalised the same way);
        a bad value raises and leaves the config as it was."""
        if not self.__dict__.get("_checked") or name not in self.__dataclass_fields__:
            object.__setattr__(self, name, value)
            return
        before = dict(self.__dict__)
        object.__setattr__(self, name, value)
        try:
            self._check()
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _check(self) -> None:
        """Check every field (and the pairs that must agree); normalise ``mini_sequences`` and
        ``skip_kinds``.  ValueError naming the field otherwise."""
        for name in ("chunk_mlp", "chunk_lm_head", "rewrite_attention", "offload_checkpoints"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.region_chunks, dict) or not all(isinstance(k, str) for k in self.region_chunks):
            raise ValueError(
                f"region_chunks must map region names (e.g. 'model.layers.3.mlp') to M, got {self.region_chunks!r}"
            )
        object.__setattr__(self, "mini_sequences", check_mini_sequences(self.mini_sequences))
        positive_int("min_lm_head_chunk_tokens", self.min_lm_head_chunk_tokens)
        for key, val in self.region_chunks.items():
            positive_int(f"region_chunks[{key!r}]", val, cap=MAX_USER_CHUNKS)
        from .regions.registry import REGION_KINDS

        names = [k.name for k in REGION_KINDS]
        if isinstance(self.skip_kinds, str) or not all(k in names for k in self.skip_kinds):
            raise ValueError(f"skip_kinds must be a tuple of region kind names {names}, got {self.skip_kinds!r}")
        object.__setattr__(self, "skip_kinds", tuple(str(k) for k in self.skip_kinds))
        if self.chunk_form not in CHUNK_FORMS:
            raise ValueError(f"chunk_form must be one of {CHUNK_FORMS}, got {self.chunk_form!r}")
        if self.sequence_parallel is not None:
            import torch.distributed as dist

            group_type = getattr(dist, "ProcessGroup", None)
            if group_type is None or not isinstance(self.sequence_parallel, group_type):
                raise ValueError(f"sequence_parallel must be a torch.distributed ProcessGroup or None, got "
                                 f"{self.sequence_parallel!r}")
        if self.compiler not in ("inductor", "aot_eager", "eager"):
            raise ValueError(f"compiler must be 'inductor', 'aot_eager' or 'eager', got {self.compiler!r}")
        if self.offload_checkpoints and self.compiler != "inductor":
            raise ValueError(
                "offload_checkpoints=True needs compiler='inductor' (the offload is inserted by the joint-graph pass "
                "Inductor runs); in eager use mstfx.offload.enable_checkpoint_offload(model)"
            )

    def mini_sequences_for(self, kind: str, region: Any) -> int | None:
        """M asked for ``region`` of ``kind``: by its name (``region_chunks``), else ``mini_sequences``
        (for the kind, if a dict); ``None`` leaves it to the kind's rule."""
        named = self.region_chunks.get(getattr(region, "name", ""))
        if named is not None:
            return named
        if isinstance(self.mini_sequences, dict):
            return self.mini_sequences.get(str(kind))
        return self.mini_sequences


def check_mini_sequences(value: Any, *, cap: int | None = MAX_USER_CHUNKS) -> int | dict[str, int] | None:
    """The chunk knob M validated, as ``MstConfig(mini_sequences=...)`` and the planner take it: ``None``
    (each kind's rule), a positive int (M for every chunked region) or a dict of region-kind names
    (``mstfx.regions.registry.REGION_KINDS``) to positive ints; ValueError naming an unknown kind or a
    bad M otherwise."""
    if value is None:
        return None
    if isinstance(value, dict):
        from .regions.registry import REGION_KINDS

        names = [k.name for k in REGION_KINDS]
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(f"mini_sequences names unknown region kinds {unknown}; the kinds are {names}")
        return {str(k): positive_int(f"mini_sequences[{k!r}]", v, cap=cap) for k, v in value.items()}
    return positive_int("mini_sequences", value, cap=cap)
