"""``mstfx simulate``: the longest sequence that trains on a GPU of a given size, found without a GPU.

The real Hugging Face model is built and run (one forward + backward) under ``FakeTensorMode``: no
weights, no data, no device; every tensor has only a shape, a dtype and a storage size.
``MemTracker`` (``torch.distributed._tools``) follows every allocation and free, so the peak it
reports is the peak the eager step would reach on a GPU.  Four modes:

``standard``   the model as it is
``ckpt``       Hugging Face ``gradient_checkpointing_enable()`` (each decoder layer recomputed)
``mst``        the mst backend's rewrite: chunked MLPs and fused chunked LM head + loss
``mst+ckpt``   both
``mst+ckpt+offload``  both, and the checkpoints (each layer's input) kept in host memory

The MsT rewrite is the mst backend's own: for each sequence length the MLP module (one decoder
layer's) and the LM-head + loss function are captured by Dynamo and handed to
``mstfx.backend(compiler="eager")``, which runs the pass pipeline and returns the eager form of the
rewritten graph (each MLP chunk under ``torch.utils.checkpoint``, the LM head through
``chunked_ops.linear_cross_entropy``, M from ``mstfx/regions/rules.py``).  Every decoder layer then runs
that graph with its own weights.  (Dynamo refuses to run while a dispatch mode such as FakeTensorMode
or MemTracker is active, so the whole model cannot be captured inside the simulation; the regions
are captured outside it, with the same fake parameters, and replayed inside.)

Attention runs as FlashAttention-2 does on a GPU (no S×S tensor, K/V kept at their own head count,
the backward's fp32 dq accumulator and GQA-expanded dk/dv workspace), and HF's packed-sequence probe,
which cannot read fake position ids, is answered "not packed" as a real single-sequence run does
(see docs/simulate.md).

Optimizer state is added by formula (see :data:`OPTIMIZERS`); "grads freed as made" setups (the MsT
paper's optimizer-in-backward) use the peak of (memory − gradients) over the step plus the largest
single gradient.  ``gpus > 1`` models FSDP (ZeRO-3): parameters, gradients and optimizer state are
divided by the GPUs, plus two all-gathered modules and one unsharded gradient module; activations are
not sharded by FSDP.  ``sequence_parallel = N`` (dividing ``gpus``) adds Ulysses sequence parallelism:
one rank's step is run, on its S/N tokens, with the attention kernel run as a rank runs it (an
all-to-all from S/N tokens × H heads to the whole S × H/N heads and back, the send and receive
buffers allocated; see :func:`_flash_sim_attention` and docs/distributed.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .. import model_configs
from ..hf_checkpointing import disable_checkpointing, enable_checkpointing
from ..vocabulary import Action, Mode, Program

GiB = 1 << 30
#: GPUs that share one host (the host memory per node sums theirs; ``planning.cost_model.GPUS_PER_NODE``)
GPUS_PER_NODE = 8

#: the modes as this tool spells them (its ``--modes``, tables and JSON: ``Mode.short``); every function
#: here also takes a :class:`~mstfx.vocabulary.Mode` or the planner's spelling
MODES = tuple(m.short for m in Mode)
MODE_LABELS = {
    Mode.STANDARD: "standard",
    Mode.CHECKPOINTING: "activation checkpointing",
    Mode.MST: "MsT",
    Mode.MST_CHECKPOINTING: "MsT + checkpointing",
    Mode.MST_CHECKPOINTING_OFFLOAD: "MsT + checkpointing + offload",
}

#: name -> (bytes per parameter of optimizer state (+ fp32 master weights) on the GPU,
#:          gradients kept until the step (False: freed as made, optimizer in backward), description)
OPTIMIZERS: dict[str, tuple[float, bool, str]] = {
    "adamw": (8.0, True, "AdamW, fp32 states (2×4 B/param), bf16 weights and grads, no fp32 master"),
    "adamw-master": (12.0, True, "AdamW, fp32 states + fp32 master weights (12 B/param)"),
    "adamw-bf16": (4.0, True, "AdamW, bf16 states (2×2 B/param)"),
    "offload": (0.0, True, "AdamW, states and master weights offloaded to CPU"),
    "zero-offload": (0.0, False, "DeepSpeed ZeRO-Offload (ALST's setup): states, master weights and gradients "
                     "offloaded to CPU, each gradient copied out as it is made"),
    "paper": (4.0, False, "MsT paper: bf16 weights, one Adam per param stepped in a post-accumulate-grad hook, bf16 states, grads freed as made"),
}

MODEL_ALIASES = model_configs.ALIASES
EMBEDDED_MODELS = model_configs.NAMES

_ATTN_NAME = "mstfx_sim_attention"  # a name with "flash" in it makes HF look for a hub kernel


class SimulateError(ValueError):
    """Bad input to the simulator (unknown model, unreadable config, impossible GPU size...)."""


# --------------------------------------------------------------------------------------------- configs


def load_config(model: str | None = None, config_path: str | None = None):
    """A transformers ``PretrainedConfig`` from a built-in name or a config path (``--model`` and
    ``--config`` accept the same things, read and checked as ``mstfx plan`` does:
    ``mstfx/model_configs/source.py``)."""
    from transformers import AutoConfig

    from ..model_configs import source

    if (model is None) == (config_path is None):
        raise SimulateError("give exactly one of --model or --config (a built-in name or a config.json path)")
    given = model if model is not None else config_path
    try:
        data, label = source.read(given)
        source.check(data, label, require_model_type=True)  # the checks mstfx plan makes, and model_type
    except source.ConfigError as err:
        raise SimulateError(str(err)) from None
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **data)
    except Exception as err:
        text = str(err) if len(str(err)) <= 500 else str(err)[:500] + " ..."
        raise SimulateError(f"config {label}: transformers cannot build a {model_type!r} config: {text}") from None
    cfg._mstfx_name = MODEL_ALIASES.get(given.lower(), Path(given).stem) if isinstance(given, str) else Path(given).stem
    return cfg


# --------------------------------------------------------------------------------------------- attention


@contextlib.contextmanager
def _flash_sim_attention(sequence_parallel: int = 1):
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

    from ..planning.cost_model import kv_heads_split
    from .compiled_program import fa2_backward_workspace

    if _ATTN_NAME in AttentionInterface._global_mapping:  # an enclosing block registered it
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

    AttentionInterface.register(_ATTN_NAME, flash_sim_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN_NAME, flash_attention_mask)
    try:
        yield
    finally:
        AttentionInterface._global_mapping.pop(_ATTN_NAME, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(_ATTN_NAME, None)


@contextlib.contextmanager
def _no_packed_sequences():
    """HF's packed-sequence probe cannot read fake position ids; answer as a real single-sequence run."""
    import transformers.masking_utils as mu

    orig = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = orig


# --------------------------------------------------------------------------------------------- tracker


def _peak_tracker_class():
    from ..compat.memory import mem_tracker_api

    MemTracker, _MemRefType = mem_tracker_api()

    total_key = "Total"

    class PeakTracker(MemTracker):
        """MemTracker keeping only global peaks (per-module peaks cost O(modules) per op), for several
        weightings of parameters and gradients at once: peak of ``total − (1−wp)·params − (1−wg)·grads``."""

        def __init__(self, weights):
            super().__init__()
            self.weights = list(weights)
            self.best = [-math.inf] * len(self.weights)
            self.snaps: list[dict] = [{} for _ in self.weights]

        def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002
            for snap in self._curr_mem_snap.values():
                tot, p, g = snap[total_key], snap[_MemRefType.PARAM], snap[_MemRefType.GRAD]
                for i, (wp, wg) in enumerate(self.weights):
                    v = tot - (1 - wp) * p - (1 - wg) * g
                    if v > self.best[i]:
                        self.best[i] = v
                        self.snaps[i] = dict(snap)

        def split(self, i: int) -> tuple[float, float, float]:
            """(params, grads, activations) bytes at peak ``i``, weighted."""
            snap, (wp, wg) = self.snaps[i], self.weights[i]
            if not snap:
                return 0.0, 0.0, 0.0
            p, g = snap[_MemRefType.PARAM] * wp, snap[_MemRefType.GRAD] * wg
            acts = snap[total_key] - snap[_MemRefType.PARAM] - snap[_MemRefType.GRAD]
            return p, g, acts

    return PeakTracker


# --------------------------------------------------------------------------------------------- model


@dataclass
class SimulatedBreakdown:
    """Peak memory of one training step (bytes, per GPU), split by what holds it."""

    seq_len: int
    mode: Mode
    optimizer: str
    batch: int
    gpus: int
    params: float
    grads: float
    optimizer_state: float
    activations: float
    chunks: dict = field(default_factory=dict)  # what the mst backend chunked, M per region kind
    #: host memory (per GPU's process): offloaded checkpoints at their most + optimizer state kept there
    host: float = 0.0
    #: Ulysses degree: a rank holds ``seq_len / sequence_parallel`` tokens
    sequence_parallel: int = 1
    #: host memory of one node: ``host`` of each of its GPUs (``GPUS_PER_NODE`` or fewer)
    host_node: float = 0.0

    def __post_init__(self) -> None:
        self.mode = Mode.parse(self.mode)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer_state + self.activations

    def gib(self) -> dict:
        return {k: round(getattr(self, k) / GiB, 3)
                for k in ("params", "grads", "optimizer_state", "activations", "total", "host", "host_node")}


def chunks_by_kind(reports) -> dict[str, int]:
    """M per region kind the backend chose in ``reports`` (1 for a kind found but not chunked), for
    every kind of the registry that the reports mention."""
    from ..regions.registry import REGION_KINDS

    out = {}
    for kind in REGION_KINDS:
        decided = [d for r in reports for d in r.decisions if d.kind == kind.name]
        if decided:
            out[kind.name] = max((d.chunks or 1 for d in decided if d.action is Action.CHUNKED), default=1)
    return out


class _FakeModel:
    """One fake-weight model, reused for every run of every mode (building it takes seconds)."""

    def __init__(self, config) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from ..compat.functorch import fake_tensor_mode

        config = _sim_config(config)
        self.config = config
        self.fake_mode = fake_tensor_mode()(allow_non_fake_inputs=True)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # never .to(dtype) under fake mode
        try:
            with _flash_sim_attention(), self.fake_mode:
                self.model = AutoModelForCausalLM.from_config(config)
        except Exception as err:
            raise SimulateError(f"transformers cannot build this model: {type(err).__name__}: {err}") from None
        finally:
            torch.set_default_dtype(old)
        self.model.train()
        params = list(self.model.parameters())
        self.n_params = sum(p.numel() for p in params)
        self.param_bytes = sum(p.numel() * p.element_size() for p in params)
        self.largest_param_bytes = max(p.numel() * p.element_size() for p in params)
        mods = [self.model.get_input_embeddings(), self.model.get_output_embeddings(), *self._layers()]
        self.largest_module_bytes = max(
            sum(p.numel() * p.element_size() for p in m.parameters()) for m in mods if m is not None
        )
        self.param_names = {id(p): n for n, p in self.model.named_parameters()}

    def _layers(self):
        base = getattr(self.model, self.model.base_model_prefix, self.model)
        return list(getattr(base, "layers", []))

    # ---- the mst backend's rewrite, captured per sequence length

    def _capture(self, fn: Callable, inputs: tuple, backend) -> tuple[Callable, list]:
        """Dynamo-capture ``fn(*inputs)`` with ``backend``; return the compiled callable and its argument
        recipe (input index, parameter name or constant) for replays with other inputs/weights."""
        import torch

        got: dict[str, Any] = {}

        def capture(gm, example_inputs):
            compiled = backend(gm, example_inputs)

            def run(*args):
                got.setdefault("args", args)
                got["fn"] = compiled
                with self.fake_mode:
                    return compiled(*args)

            return run

        from .measure import fresh_code

        from ..compat import tracing_settings

        with tracing_settings():  # checkpointed layers traced whole, as mstfx.compile does
            torch.compile(fresh_code(fn), backend=capture, dynamic=False, fullgraph=True)(*inputs)
        if "fn" not in got:
            raise RuntimeError("Dynamo produced no graph")
        recipe = []
        for a in got["args"]:
            idx = next((i for i, x in enumerate(inputs) if a is x), None)
            if idx is not None:
                recipe.append(("input", idx))
            elif id(a) in self.param_names and isinstance(a, torch.nn.Parameter):
                recipe.append(("param", self.param_names[id(a)]))
            else:
                recipe.append(("const", a))
        return got["fn"], recipe

    def _mst_patches(self, seq_len: int, batch: int, undo: list, lm_head_m: int | None = None) -> dict[str, int]:
        """Install the mst backend's eager rewrite of every MLP and of the LM head + loss; the way to
        remove each patch goes into ``undo`` as soon as it is installed (so a failure half-way is
        undone too); returns M per region kind.  ``lm_head_m``: the LM head's M (default: the
        backend's rule)."""
        import torch

        import mstfx

        be = mstfx.backend(compiler="eager",
                           mini_sequences=None if lm_head_m is None else {"lm_head": lm_head_m})
        model, cfg = self.model, self.config
        layers = self._layers()
        hidden = cfg.hidden_size
        with self.fake_mode:
            h = torch.empty(batch, seq_len, hidden, requires_grad=True)
            labels = torch.zeros(batch, seq_len, dtype=torch.long)
        named = dict(model.named_parameters())

        def replay(compiled, recipe, owner_prefix, inputs):
            args = []
            for kind, what in recipe:
                if kind == "input":
                    args.append(inputs[what])
                elif kind == "param":
                    args.append(named[owner_prefix(what)])
                else:
                    args.append(what)
            out = compiled(*args)
            return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

        if layers and hasattr(layers[0], "mlp"):
            mlp0 = layers[0].mlp
            compiled, recipe = self._capture(lambda x: mlp0(x), (h,), be)
            prefix0 = self._prefix(mlp0)
            for layer in layers:
                mlp = layer.mlp
                pre = self._prefix(mlp)

                def fwd(x, _pre=pre):
                    return replay(compiled, recipe, lambda n: _pre + n[len(prefix0):], (x,))

                mlp.forward = fwd
                undo.append(lambda m=mlp: m.__dict__.pop("forward", None))

        def head_loss(hs, lab):
            logits = model.lm_head(hs)
            cap = getattr(cfg, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return model.loss_function(logits, lab, vocab_size=cfg.vocab_size)

        hcompiled, hrecipe = self._capture(head_loss, (h, labels), be)
        self._head = lambda hs, lab: replay(hcompiled, hrecipe, lambda n: n, (hs, lab))
        self._reports = list(be.reports)
        return chunks_by_kind(self._reports)

    def _prefix(self, module) -> str:
        for name, mod in self.model.named_modules():
            if mod is module:
                return name + "."
        raise RuntimeError("module not in model")

    # ---- one step

    def step_peak(self, seq_len: int, batch: int, mode: Mode, weights: list[tuple[float, float]],
                  sequence_parallel: int = 1):
        """Run one fwd+bwd in ``mode``; the tracker holds the peaks for each (params, grads) weighting.
        ``sequence_parallel`` N > 1: ``seq_len`` is one rank's tokens (S/N), its attention Ulysses'."""
        import torch

        from .offload_sim import FakeHostHooks, HostCounter, lm_head_chunks

        PeakTracker = _peak_tracker_class()
        model = self.model
        offload, ckpt, mst = mode.offloaded, mode.checkpointed, mode.chunked
        self.host = HostCounter()
        with warnings.catch_warnings():  # transformers 5 renames these; the old names still work
            warnings.simplefilter("ignore", FutureWarning)
            if offload:  # the offload mode's own eager code, with host copies that only count bytes
                from mstfx.offload import enable_checkpoint_offload

                enable_checkpoint_offload(model, hooks=lambda: FakeHostHooks(self.host))
            elif ckpt:
                enable_checkpointing(model)
            else:
                disable_checkpointing(model)
        undo: list = []
        model.zero_grad(set_to_none=True)
        try:
            head_m = lm_head_chunks(self.config.hidden_size, self.config.vocab_size, seq_len * batch) if offload else None
            chunks = self._mst_patches(seq_len, batch, undo, head_m) if mst else {}
            with _flash_sim_attention(sequence_parallel), _no_packed_sequences(), self.fake_mode:
                ids = torch.zeros(batch, seq_len, dtype=torch.long)
                tracker = PeakTracker(weights)
                tracker.track_external(model)
                with tracker:
                    if mst:
                        base = getattr(model, model.base_model_prefix)
                        hs = base(input_ids=ids, use_cache=False).last_hidden_state
                        loss = self._head(hs, ids)
                        del hs
                    else:
                        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    loss.backward()
                    del loss
                    model.zero_grad(set_to_none=True)
        finally:
            for u in undo:
                u()
            self._head = None
            model.zero_grad(set_to_none=True)
        return tracker, chunks


def _sim_config(config):
    import copy

    import torch

    cfg = copy.deepcopy(config)
    cfg.use_cache = False
    cfg._attn_implementation = _ATTN_NAME
    # bf16 weights whatever the checkpoint was saved in: transformers builds in ``config.dtype`` when it
    # is set (Gemma 2's config says float32), which would silently double every weight and activation
    cfg.dtype = torch.bfloat16
    # memory does not depend on the attention pattern inside FlashAttention (sliding window, soft-cap)
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        cfg.attn_logit_softcapping = None
    return cfg


# --------------------------------------------------------------------------------------------- peaks


def _check_args(seq_len: int, mode: Mode | str, batch: int, optimizer: str, gpus: int, sequence_parallel: int = 1) -> Mode:
    """The arguments checked (SimulateError naming the bad one); ``mode`` as a :class:`Mode`."""
    try:
        mode = Mode.parse(mode)
    except ValueError:
        raise SimulateError(f"unknown mode {mode!r}; one of {', '.join(MODES)} (or the planner's spelling "
                            "with 'checkpointing')") from None
    if optimizer not in OPTIMIZERS:
        raise SimulateError(f"unknown optimizer setup {optimizer!r}; one of {', '.join(OPTIMIZERS)}")
    from ..config import is_positive_int

    for name, v in (("seq_len", seq_len), ("batch", batch), ("gpus", gpus), ("sequence_parallel", sequence_parallel)):
        if not is_positive_int(v):
            raise SimulateError(f"{name} must be a positive integer, got {v!r}")
    if gpus % sequence_parallel:
        raise SimulateError(f"sequence_parallel={sequence_parallel} must divide gpus={gpus} "
                            f"(a mesh of gpus/N data-parallel × N sequence-parallel ranks)")
    if seq_len % sequence_parallel:
        raise SimulateError(f"seq_len={seq_len} must be a multiple of sequence_parallel={sequence_parallel} "
                            f"(each rank holds S/N tokens)")
    return mode


def _check_program(program: Program | str) -> Program:
    try:
        return Program.parse(program)
    except ValueError:
        raise SimulateError(f"unknown program {program!r}; one of {', '.join(PROGRAMS)}") from None


def check_heads(config, sequence_parallel: int) -> None:
    """Ulysses needs whole heads per rank: N divides the query heads (SimulateError otherwise); K/V heads
    are repeated as the runtime repeats them (``cost_model.kv_heads_split``)."""
    if sequence_parallel == 1:
        return
    from ..planning import cost_model as cm

    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    arch = cm.Arch(hidden=1, intermediate=1, layers=1, heads=heads, kv_heads=kv, head_dim=1, vocab=1)
    try:
        cm.check_sequence_parallel(arch, sequence_parallel, sequence_parallel)
    except ValueError as err:
        raise SimulateError(str(err)) from None


_MODEL_CACHE: dict[int, _FakeModel] = {}


def _fake_model(config) -> _FakeModel:
    fm = _MODEL_CACHE.get(id(config))
    if fm is None:
        _MODEL_CACHE.clear()
        fm = _MODEL_CACHE[id(config)] = _FakeModel(config)
        fm._config_ref = config  # keep id() valid
    return fm


def _weights(gpus: int) -> list[tuple[float, float]]:
    """Peaks tracked per run: [grads kept, grads freed as made] with params/grads divided by ``gpus``."""
    s = 1.0 / gpus
    return [(s, s), (s, 0.0)]


def _breakdowns(fm: _FakeModel, tracker, seq_len, mode, batch, gpus, chunks, host: float = 0.0,
                sequence_parallel: int = 1) -> dict[str, SimulatedBreakdown]:
    from .offload_sim import HOST_STATE_BYTES_PER_PARAM

    per_node = min(gpus, GPUS_PER_NODE)
    out = {}
    sharded_extra_p = 2 * fm.largest_module_bytes if gpus > 1 else 0.0  # all-gathered current + prefetched
    sharded_extra_g = fm.largest_module_bytes if gpus > 1 else 0.0  # unsharded grads before reduce-scatter
    for opt, (state_bpp, grads_kept, _) in OPTIMIZERS.items():
        i = 0 if grads_kept else 1
        p, g, acts = tracker.split(i)
        if not grads_kept:
            g = fm.largest_param_bytes / gpus  # the one gradient alive while its Adam steps
        out[opt] = SimulatedBreakdown(
            seq_len=seq_len,
            mode=mode,
            optimizer=opt,
            batch=batch,
            gpus=gpus,
            params=p + sharded_extra_p,
            grads=g + (sharded_extra_g if grads_kept else 0.0),
            optimizer_state=state_bpp * fm.n_params / gpus,
            activations=acts,
            chunks=dict(chunks),
            host=(h := host + HOST_STATE_BYTES_PER_PARAM.get(opt, 0.0) * fm.n_params / gpus),
            sequence_parallel=sequence_parallel,
            host_node=h * per_node,
        )
    return out


#: which program is simulated: the eager step (op by op under MemTracker) or the compiled one (the
#: graphs the mst backend / Inductor builds, see :mod:`mstfx.tools.compiled_program`)
#: (``compiled-per-block``: ``mstfx.compile(model, per_block=True)``, each decoder layer its own graph)
PROGRAMS = Program.spellings()


def _compiled_breakdowns(config, fm: _FakeModel, seq_len: int, mode: Mode, batch: int, gpus: int,
                         sequence_parallel: int = 1, per_block: bool = False) -> dict[str, SimulatedBreakdown]:
    """Breakdowns of the compiled step: activations and gradients at its peak from the program itself.

    Its backward is one graph whose outputs are all the gradients, so they are alive together until it
    returns, whatever the optimizer setup: "grads freed as made" does not apply to it.  ``gpus > 1``:
    FSDP's shares as in the eager program (parameters, the gradients at the peak and the optimizer
    state divided by the GPUs, plus two all-gathered modules and one unsharded module gradient); the
    whole-model graph is kept (FSDP2 under compile breaks it per layer, which is not simulated).
    ``sequence_parallel``: ``seq_len`` is the whole sequence; the program captured is one rank's, on
    its S/N tokens, with Ulysses' all-to-alls around attention (``compiled_program.simulated_sdpa``).

    ``per_block``: the program of per-block compilation, composed from the whole one and the eager
    decoder body by :func:`~mstfx.tools.compiled_program.per_block_peak`: the same saved tensors and
    recomputes, the eager final norm's saved tensors at the forward's end, and each block's backward
    its own graph, so its gradients are handed to autograd (and, in the "grads freed as made" setups,
    consumed by the optimizer step in backward) when that block's backward ends."""
    from .compiled_program import compiled_peak, eager_body_extra_of, per_block_peak
    from .offload_sim import HOST_STATE_BYTES_PER_PARAM

    if per_block and gpus > 1:
        raise SimulateError("--program compiled-per-block models one GPU; use --program compiled with --gpus")
    peak = compiled_peak(config, seq_len // sequence_parallel, mode, batch, sequence_parallel=sequence_parallel)
    extra_p = 2 * fm.largest_module_bytes if gpus > 1 else 0.0
    extra_g = fm.largest_module_bytes if gpus > 1 else 0.0
    per_node = min(gpus, GPUS_PER_NODE)

    body_extra = eager_body_extra_of(config, seq_len // sequence_parallel, batch) if per_block else 0

    def grads_and_activations(grads_kept: bool) -> tuple[float, float]:
        if not per_block:
            return peak.grads / gpus + extra_g, peak.activations
        step = per_block_peak(peak, fm.largest_module_bytes, not grads_kept, body_extra)
        return step.grads, step.activations

    out = {}
    for opt, (state_bpp, grads_kept, _) in OPTIMIZERS.items():
        host = peak.host + HOST_STATE_BYTES_PER_PARAM.get(opt, 0.0) * fm.n_params / gpus
        grads, acts = grads_and_activations(grads_kept)
        out[opt] = SimulatedBreakdown(
            seq_len=seq_len, mode=mode, optimizer=opt, batch=batch, gpus=gpus, params=fm.param_bytes / gpus + extra_p,
            grads=grads, optimizer_state=state_bpp * fm.n_params / gpus,
            activations=acts, host=host, sequence_parallel=sequence_parallel, host_node=host * per_node,
        )
    return out


def simulate_all(config, seq_len: int, mode: Mode | str, batch: int = 1, gpus: int = 1,
                 program: Program | str = Program.EAGER, sequence_parallel: int = 1) -> dict[str, SimulatedBreakdown]:
    """One simulated step; the peak breakdown for every optimizer setup of :data:`OPTIMIZERS`."""
    mode = _check_args(seq_len, mode, batch, "adamw", gpus, sequence_parallel)
    check_heads(config, sequence_parallel)
    program = _check_program(program)
    fm = _fake_model(config)
    if program.compiled:
        return _compiled_breakdowns(config, fm, seq_len, mode, batch, gpus, sequence_parallel,
                                    per_block=program.per_block)
    tracker, chunks = fm.step_peak(seq_len // sequence_parallel, batch, mode, _weights(gpus), sequence_parallel)
    return _breakdowns(fm, tracker, seq_len, mode, batch, gpus, chunks, fm.host.peak, sequence_parallel)


def simulate_peak(
    config, seq_len: int, mode: Mode | str, batch: int = 1, optimizer: str = "adamw", gpus: int = 1,
    program: Program | str = Program.EAGER, sequence_parallel: int = 1,
) -> SimulatedBreakdown:
    """Simulated per-GPU peak of one training step (fwd + bwd, optimizer state resident).

    ``config``: a transformers config (see :func:`load_config`); ``mode``: a :class:`Mode` or one of :data:`MODES`;
    ``optimizer``: one of :data:`OPTIMIZERS`; ``gpus > 1``: FSDP, params/grads/optimizer sharded;
    ``program``: a :class:`Program`: eager (op by op), compiled (what ``backend="mst"`` / Inductor
    builds) or compiled-per-block;
    ``sequence_parallel`` N (dividing ``gpus`` and ``seq_len``): Ulysses, one rank's S/N tokens.
    """
    mode = _check_args(seq_len, mode, batch, optimizer, gpus, sequence_parallel)
    return simulate_all(config, seq_len, mode, batch, gpus, program, sequence_parallel)[optimizer]


# --------------------------------------------------------------------------------------------- search


@dataclass
class ModeResult:
    mode: Mode
    max_seq_len: int  # 0: nothing fits
    at_max: SimulatedBreakdown | None
    runs: list[tuple[int, float]]  # (S, total bytes) of every run, for the plot
    confirmed: bool
    note: str = ""


def _round(s: float, q: int) -> int:
    return max(q, int(s // q) * q)


def search_longest(
    peak_fn: Callable[[int], float],
    budget: float,
    *,
    start: int = 4096,
    quantum: int = 128,
    rel_tol: float = 0.005,
    max_runs: int = 9,
    max_len: int = 1 << 24,
    on_run: Callable[[int, float], None] | None = None,
) -> tuple[int, list[tuple[int, float]]]:
    """Largest S (multiple of ``quantum``) with ``peak_fn(S) <= budget``; 0 if not even ``quantum`` fits.

    The peak is convex and piecewise linear in S: a chord between a fitting and a non-fitting S lands on
    the fitting side, a line through the two largest fitting runs overshoots; the two are alternated.
    The returned S is always one that was run and fitted.
    """
    runs: dict[int, float] = {}

    def run(s: int) -> float:
        s = min(max(quantum, s), max_len)
        if s not in runs:
            runs[s] = peak_fn(s)
            if on_run:
                on_run(s, runs[s])
        return runs[s]

    def fits():
        return sorted(s for s, v in runs.items() if v <= budget)

    def over():
        return sorted(s for s, v in runs.items() if v > budget)

    if run(start) > budget:
        if run(quantum) > budget:
            return 0, sorted(runs.items())
        lo, hi = quantum, start
        # line through the two runs, then alternate as below
    else:
        run(min(max_len, start * 4))
    last_over = bool(over())
    for _ in range(max_runs):
        f, o = fits(), over()
        if not f:
            break
        lo = f[-1]
        hi = o[0] if o else None
        if hi is not None and hi - lo <= max(quantum, rel_tol * lo):
            break
        line = None
        if len(f) >= 2:  # line through the two largest fitting runs: overshoots (convex peak)
            a, b = f[-2], f[-1]
            slope = (runs[b] - runs[a]) / (b - a)
            # a flat stretch (the compiled step at short S peaks at the end of its backward, where
            # nothing grows with S) says nothing of where the peak crosses: grow by 4× until it rises
            line = b + (budget - runs[b]) / slope if slope > 0 else None
        if hi is None:
            guess = line if line is not None else lo * 4
        else:
            chord = lo + (budget - runs[lo]) * (hi - lo) / (runs[hi] - runs[lo])  # lands on the fitting side
            guess = chord if (last_over or line is None or line >= hi) else line
        s = _round(guess, quantum)
        if hi is not None:
            s = min(s, hi - quantum)
        if s <= lo:
            s = lo + quantum
        if s in runs or s > max_len:
            break
        last_over = run(s) > budget
    f = fits()
    return (f[-1] if f else 0), sorted(runs.items())


def find_max_seq_len(
    config, gpu_gb: float, mode: Mode | str, optimizer: str = "adamw", batch: int = 1, gpus: int = 1, progress=None,
    program: Program | str = Program.EAGER, sequence_parallel: int = 1, **search
) -> tuple[ModeResult, dict[int, dict[str, SimulatedBreakdown]]]:
    """Longest S that fits ``gpu_gb`` GiB per GPU in ``mode``; also every run's breakdowns.
    ``sequence_parallel`` N: S is the whole sequence, a multiple of N (the search's quantum and start
    are multiplied by N)."""
    mode = _check_args(sequence_parallel, mode, batch, optimizer, gpus, sequence_parallel)
    program = _check_program(program)
    check_heads(config, sequence_parallel)
    n = sequence_parallel
    search = {**search, "quantum": search.get("quantum", 128) * n, "start": search.get("start", 4096) * n,
              "max_len": search.get("max_len", 1 << 24) * n}
    budget = gpu_gb * GiB
    all_runs: dict[int, dict[str, SimulatedBreakdown]] = {}
    fm = _fake_model(config)
    fixed = OPTIMIZERS[optimizer][0] * fm.n_params / gpus + fm.param_bytes / gpus
    if fixed > budget:
        note = (
            f"nothing fits: weights + optimizer state alone need {fixed / GiB:.1f} GiB per GPU "
            f"(> {gpu_gb:g}) before any gradient or activation"
        )
        return ModeResult(mode, 0, None, [], True, note), all_runs

    def peak(s: int) -> float:
        bd = simulate_all(config, s, mode, batch, gpus, program, sequence_parallel)
        all_runs[s] = bd
        if progress is not None:
            progress(mode, s, bd[optimizer].total)
        return bd[optimizer].total

    best, runs = search_longest(peak, budget, **search)
    note = "" if best else f"nothing fits: even {search.get('quantum', 128)} tokens exceed {gpu_gb:g} GiB"
    return ModeResult(mode, best, all_runs.get(best, {}).get(optimizer), runs, best > 0, note), all_runs


def _interpolated_max(all_runs: dict[int, dict[str, SimulatedBreakdown]], optimizer: str, budget: float) -> int:
    """Longest S for another optimizer setup from the runs already made (piecewise-linear interpolation);
    0 where no run fits it (see :func:`_longest_for_setup` for what is known then)."""
    pts = sorted((s, bd[optimizer].total) for s, bd in all_runs.items())
    fit = [s for s, v in pts if v <= budget]
    if not fit:
        return 0
    best = max(fit)
    above = [(s, v) for s, v in pts if s > best]
    if above:
        (s1, v1), (s2, v2) = (best, dict(pts)[best]), above[0]
        return int(s1 + (budget - v1) * (s2 - s1) / (v2 - v1))
    below = [(s, v) for s, v in pts if s < best]
    if below and dict(pts)[best] > below[-1][1]:
        (s1, v1), (s2, v2) = below[-1], (best, dict(pts)[best])
        return int(s2 + (budget - v2) * (s2 - s1) / (v2 - v1))  # extrapolated
    return best


def _fixed_bytes(fm, optimizer: str, gpus: int, program: Program | str = Program.EAGER) -> float:
    """Bytes of a step of ``optimizer``'s setup that do not grow with S: parameters, every gradient (or
    the one alive, grads freed as made) and optimizer state, as :func:`_breakdowns` and
    :func:`_compiled_breakdowns` count them: the peak as S → 0.  The whole-model compiled program keeps
    every gradient whatever the setup (its one backward graph returns them together), so there a setup
    that frees gradients as made still holds all of them; counting one would put the chord of
    :func:`_longest_for_setup` under the true peak and its "lower bound" above the longest S."""
    state_bpp, grads_kept, _ = OPTIMIZERS[optimizer]
    program = Program.parse(program)
    grads_kept = grads_kept or (program.compiled and not program.per_block)
    extra = fm.largest_module_bytes if gpus > 1 else 0.0
    params = fm.param_bytes / gpus + 2 * extra
    grads = fm.param_bytes / gpus + extra if grads_kept else fm.largest_param_bytes / gpus
    return params + grads + state_bpp * fm.n_params / gpus


def _longest_for_setup(all_runs: dict[int, dict[str, SimulatedBreakdown]], optimizer: str, budget: float, fixed: float,
                       quantum: int) -> tuple[int | None, str]:
    """``(longest S, how it is known)`` of a setup that was not searched, from the runs made for another.

    * a run fits it: interpolated between runs (or extrapolated past the longest), as before;
    * else, its fixed bytes (``fixed``: the peak as S → 0) exceed the budget: 0, nothing fits;
    * no run fits it, but runs exist: the peak is convex in S, so on [0, shortest run] it lies under the
      chord from (0, ``fixed``) to the shortest run; where the chord meets the budget is a length that
      fits (a lower bound, rounded down to ``quantum``);
    * no run at all (the searched setup could not hold its own weights): not known, None.
    """
    pts = sorted((s, bd[optimizer].total) for s, bd in all_runs.items())
    if any(v <= budget for _, v in pts):
        best = _interpolated_max(all_runs, optimizer, budget)
        return best, "extrapolated" if best > pts[-1][0] else "interpolated"
    if fixed > budget:
        return 0, "nothing fits: weights + gradients + optimizer state exceed the budget"
    if not pts:
        return None, "not run: the searched setup fits no length; rerun with --optimizer " + optimizer
    s1, v1 = pts[0]
    bound = int(s1 * (budget - fixed) / (v1 - fixed)) // quantum * quantum if v1 > fixed else 0
    return bound, (f"at least: a lower bound below the shortest run (S = {s1}); rerun with --optimizer {optimizer} "
                   "or a smaller --start for the longest S")


# --------------------------------------------------------------------------------------------- cost model

def compare_with_cost_model(config, seq_lens, modes=MODES, batch: int = 1) -> list[dict]:
    """Simulated vs predicted peak (bf16 weights, grads kept, no optimizer state) at each length and mode.

    ``rel`` = (predicted − simulated) / simulated; the target is |rel| ≤ 0.10.
    """
    from mstfx.planning.planner import arch_of, predict_peak

    # the simulation runs FlashAttention whatever the config asks for (no S × S scores)
    arch = replace(arch_of(config), eager_attention=False)
    rows = []
    for mode in map(Mode.parse, modes):
        for s in seq_lens:
            simd = simulate_peak(config, int(s), mode, batch, optimizer="offload")
            # the offload mode's LM head follows its own rule (``offload_sim.lm_head_chunks``): predict with the M run
            ms = simd.chunks if mode.offloaded else {}
            pred = predict_peak(
                arch, int(s), batch, mode, optimizer="none", mixed_precision="bf16", program=Program.EAGER,
                mini_sequences=dict(ms) or None,
            )
            rows.append(
                dict(
                    mode=mode.short,
                    seq_len=int(s),
                    simulated_gib=round(simd.total / GiB, 3),
                    predicted_gib=round(pred.peak / GiB, 3),
                    sim_activations_gib=round(simd.activations / GiB, 3),
                    pred_activations_gib=round(pred.activations / GiB, 3),
                    rel=round((pred.peak - simd.total) / simd.total, 4),
                )
            )
    return rows


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from ..model_configs import source

    p = argparse.ArgumentParser(
        prog="mstfx simulate",
        description="Longest sequence that trains on a GPU of a given size: the real HF model run under "
        "FakeTensor + MemTracker (no weights, no GPU), in four modes. Memory is in GiB (2**30 bytes).",
        epilog="exit status: 0 done, 1 nothing fits in any requested mode, 2 bad input (unknown model, bad config or "
        "option, an output path that cannot be written: checked before the run)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    names = ", ".join(source.names())
    src.add_argument("--model", metavar="NAME_OR_PATH", help=f"model: a built-in name ({names}) or a config.json path")
    src.add_argument("--config", metavar="NAME_OR_PATH", help="the same as --model (as in mstfx plan)")
    p.add_argument("--gpu-gb", type=float, required=True, help="memory of one GPU in GiB (2**30 bytes)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--optimizer", default="adamw", help=f"one of {', '.join(OPTIMIZERS)} (default adamw)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (with --strategy fsdp)")
    p.add_argument("--strategy", default="fsdp", choices=["fsdp"], help="how state is split over --gpus")
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="Ulysses sequence parallelism of degree N (dividing --gpus and the query heads): each GPU "
                   "holds S/N tokens, attention runs on the whole S with H/N heads (default 1); S is the whole sequence")
    p.add_argument("--start", type=int, default=4096, help="first sequence length tried")
    p.add_argument("--quantum", type=int, default=128, help="answer granularity in tokens")
    p.add_argument("--plot", "--out", dest="plot", default=None,
                   help="PNG path (default: simulate-<model>-<GPU GiB>gib-<optimizer>[-<program>].png in the current "
                   "directory; 'none' to skip; not written when no mode fits)")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write JSON to a file or '-' for stdout")
    p.add_argument(
        "--program", default="eager", choices=PROGRAMS,
        help="eager: the step run op by op (FlashAttention); compiled: the graphs torch.compile(backend='mst') "
        "builds (plain Inductor for standard/ckpt), their saved tensors and recomputes; compiled-per-block: "
        "mstfx.compile(model, per_block=True), each block's gradients freed at its backward's end under the "
        "grads-freed-as-made setups (paper, zero-offload) (default eager)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--compare-cost-model",
        metavar="S1,S2,...",
        default=None,
        help="instead of the search: simulated vs cost-model peak at these lengths (bf16, no optimizer state)",
    )
    return p


def _validate_cli(args) -> list[Mode]:
    if not (args.gpu_gb > 0) or math.isinf(args.gpu_gb):
        raise SimulateError(f"--gpu-gb must be a positive number of GiB, got {args.gpu_gb:g}")
    if args.batch < 1 or args.gpus < 1 or args.quantum < 1 or args.start < 1 or args.sequence_parallel < 1:
        raise SimulateError("--batch, --gpus, --sequence-parallel, --start and --quantum must be positive integers")
    if args.gpus % args.sequence_parallel:
        raise SimulateError(f"--sequence-parallel {args.sequence_parallel} must divide --gpus {args.gpus} "
                            f"(a mesh of gpus/N data-parallel × N sequence-parallel ranks)")
    if args.optimizer not in OPTIMIZERS:
        raise SimulateError(f"unknown --optimizer {args.optimizer!r}; one of {', '.join(OPTIMIZERS)}")
    given = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in given if m not in Mode.spellings()]
    if bad or not given:
        raise SimulateError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    return list(dict.fromkeys(map(Mode.parse, given)))


def run_cli(args) -> dict:
    modes = _validate_cli(args)
    program = Program.parse(args.program)  # argparse's choices are its spellings
    config = load_config(args.model, args.config)
    check_heads(config, args.sequence_parallel)
    name = config._mstfx_name
    t0 = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(modes) * 6, desc=f"simulate {name}", unit="run", file=sys.stderr, leave=False)

    def progress(mode, s, total):
        if bar is not None:
            if bar.n >= bar.total:
                bar.total += 2
            bar.update(1)
            bar.set_postfix_str(f"{mode.short} S={s} peak={total / GiB:.1f} GiB")

    results: dict[Mode, ModeResult] = {}
    all_runs: dict[Mode, dict[int, dict[str, SimulatedBreakdown]]] = {}
    fm = None
    try:
        fm = _fake_model(config)
        for mode in modes:
            results[mode], all_runs[mode] = find_max_seq_len(
                config, args.gpu_gb, mode, args.optimizer, args.batch, args.gpus, progress,
                program=program, sequence_parallel=args.sequence_parallel, start=args.start, quantum=args.quantum,
            )
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    budget = args.gpu_gb * GiB
    out = {
        "model": name,
        "params_billion": round(fm.n_params / 1e9, 3),
        "gpu_gib": args.gpu_gb,
        "gpus": args.gpus,
        "strategy": args.strategy if args.gpus > 1 else None,
        "sequence_parallel": args.sequence_parallel,
        "gpus_per_node": min(args.gpus, GPUS_PER_NODE),
        "batch": args.batch,
        "optimizer": args.optimizer,
        "program": str(program),
        "seconds": round(elapsed, 1),
        "modes": {},
        "by_optimizer": {},
        "by_optimizer_how": {},
    }
    for mode, r in results.items():  # keyed by this tool's spelling (``Mode.short``) in the JSON
        out["modes"][mode.short] = {
            "max_seq_len": r.max_seq_len,
            "note": r.note,
            "peak_gib": r.at_max.gib() if r.at_max else None,
            "chunks": r.at_max.chunks if r.at_max else {},
            "runs": [[s, round(v / GiB, 3)] for s, v in r.runs],
            # host memory of each run (offloaded checkpoints + optimizer state kept there)
            "host_runs": [[s, round(all_runs[mode][s][args.optimizer].host / GiB, 3)] for s, _ in r.runs if s in all_runs[mode]],
            # the same runs' host memory of one node (its GPUs' offloaded checkpoints and optimizer state)
            "host_node_runs": [[s, round(all_runs[mode][s][args.optimizer].host_node / GiB, 3)]
                               for s, _ in r.runs if s in all_runs[mode]],
        }
        # the longest S of every other setup from the same runs, and how it is known (``_longest_for_setup``)
        found = {opt: (r.max_seq_len, "searched") if opt == args.optimizer else
                 _longest_for_setup(all_runs[mode], opt, budget, _fixed_bytes(fm, opt, args.gpus, program),
                                    args.quantum)
                 for opt in OPTIMIZERS}
        out["by_optimizer"][mode.short] = {opt: v for opt, (v, _) in found.items()}
        out["by_optimizer_how"][mode.short] = {opt: how for opt, (_, how) in found.items()}
    std = out["modes"].get("standard", {}).get("max_seq_len")
    for mode in out["modes"]:
        m = out["modes"][mode]["max_seq_len"]
        out["modes"][mode]["vs_standard"] = round(m / std, 2) if std else None
    return out


def _print_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{out['model']} ({out['params_billion']}B params) on "
        + (f"{out['gpus']} × " if out["gpus"] > 1 else "")
        + f"{out['gpu_gib']:g} GiB, batch {out['batch']}, optimizer {out['optimizer']}, {out.get('program', 'eager')} program"
        + (f", {out['strategy']} (per-GPU)" if out["strategy"] else "")
        + (f", sequence parallel {out['sequence_parallel']} (S/{out['sequence_parallel']} tokens per GPU)"
           if out.get("sequence_parallel", 1) > 1 else "")
    )
    node = out["gpus"] > 1
    t = Table(title=title)
    cols = ["mode", "max S", "× standard", "params", "grads", "optimizer", "activations", "peak GiB", "host GiB"]
    cols += [f"host/node GiB ({out.get('gpus_per_node', 1)} GPUs)"] if node else []
    for col in cols + ["M (mlp/head)"]:
        t.add_column(col, justify="right" if col != "mode" else "left")
    for mode, r in out["modes"].items():
        pk = r["peak_gib"]
        if not pk:
            t.add_row(MODE_LABELS[Mode.parse(mode)], "0", *["-"] * (len(cols) - 2), r["note"][:60])
            continue
        ch = r["chunks"]
        t.add_row(
            MODE_LABELS[Mode.parse(mode)],
            f"{r['max_seq_len']:,}",
            f"{r['vs_standard']:.2f}" if r["vs_standard"] else "-",
            f"{pk['params']:.2f}",
            f"{pk['grads']:.2f}",
            f"{pk['optimizer_state']:.2f}",
            f"{pk['activations']:.2f}",
            f"{pk['total']:.2f}",
            f"{pk.get('host', 0.0):.2f}",
            *([f"{pk.get('host_node', 0.0):.2f}"] if node else []),
            f"{ch.get('mlp', '-')}/{ch.get('lm_head', '-')}" if ch else "-",
        )
    console = Console(width=max(120, Console().width))
    console.print(t)
    notes = {r["note"] for r in out["modes"].values() if r["note"]}
    for n in notes:
        console.print(f"[bold red]{n}[/]")
    console.print(f"simulated in {out['seconds']} s")


def default_plot_name(out: dict) -> str:
    """``simulate-<model>-[<gpus>x]<GiB>gib-<optimizer>[-compiled].png``: runs of one model with another GPU,
    optimizer or program do not overwrite each other's plot."""
    gpus = f"{out['gpus']}x" if out["gpus"] > 1 else ""
    gpus += f"sp{out['sequence_parallel']}-" if out.get("sequence_parallel", 1) > 1 else ""
    program = f"-{out['program']}" if out.get("program", "eager") != "eager" else ""
    return f"simulate-{out['model']}-{gpus}{out['gpu_gib']:g}gib-{out['optimizer']}{program}.png"


def _plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, r in out["modes"].items():
        if r["runs"]:
            s, v = zip(*r["runs"])
            line, = ax.plot(s, v, marker="o", label=f"{MODE_LABELS[Mode.parse(mode)]} (max {r['max_seq_len']:,})")
            host = [(hs, hv) for hs, hv in r.get("host_runs", []) if hv > 0]
            if host:  # host memory of the same runs, dashed, in the mode's colour
                hs, hv = zip(*host)
                ax.plot(hs, hv, marker="x", linestyle=":", color=line.get_color(), label=f"{MODE_LABELS[Mode.parse(mode)]}: host memory")
    ax.axhline(out["gpu_gib"], color="k", linestyle="--", label=f"GPU {out['gpu_gib']:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length S (tokens)")
    ax.set_ylabel("peak GPU memory per GPU (GiB); dotted: host memory")
    gp = f"{out['gpus']}×" if out["gpus"] > 1 else ""
    ax.set_title(f"{out['model']}, {gp}{out['gpu_gib']:g} GiB, optimizer {out['optimizer']}, batch {out['batch']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _compare_cli(args) -> int:
    modes = _validate_cli(args)
    try:
        lens = [int(x) for x in args.compare_cost_model.split(",") if x.strip()]
    except ValueError:
        raise SimulateError(f"--compare-cost-model wants comma-separated integers, got {args.compare_cost_model!r}") from None
    if not lens or min(lens) < 1:
        raise SimulateError("--compare-cost-model wants positive sequence lengths")
    config = load_config(args.model, args.config)
    t0 = time.perf_counter()
    rows = compare_with_cost_model(config, lens, modes, args.batch)
    if args.json is not None:
        text = json.dumps({"model": config._mstfx_name, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, indent=2)
        if args.json == "-":
            print(text)
        else:
            try:
                Path(args.json).write_text(text + "\n")
            except OSError as err:
                return _write_error("--json", args.json, err)
    if args.json != "-":
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{config._mstfx_name}: simulated vs cost model (bf16, batch {args.batch}, no optimizer state)")
        for col in ("mode", "S", "simulated GiB", "cost model GiB", "difference"):
            t.add_column(col, justify="left" if col == "mode" else "right")
        for r in rows:
            t.add_row(MODE_LABELS[Mode.parse(r["mode"])], f"{r['seq_len']:,}", f"{r['simulated_gib']:.2f}", f"{r['predicted_gib']:.2f}", f"{r['rel']:+.1%}")
        Console().print(t)
    return 0


def _check_outputs(args) -> None:
    """Every file the run will write (``--json``, ``--plot`` or the default plot in the current
    directory) is writable: a SimulateError (exit 2) now rather than a failure after the run."""
    import os

    from .output_paths import check_writable

    paths = {"--json": args.json}
    if not args.compare_cost_model:
        if args.plot is None:
            if not os.access(os.getcwd(), os.W_OK):
                raise SimulateError(f"cannot write the default plot into the current directory {os.getcwd()}: "
                                    "no permission; give --plot PATH, or --plot none")
        elif args.plot.lower() != "none":
            paths["--plot"] = args.plot
    problem = check_writable(paths)
    if problem is not None:
        raise SimulateError(problem)


def _write_error(option: str, path: str, err: OSError) -> int:
    print(f"mstfx simulate: error: cannot write {option} {path}: {err.strerror or err}", file=sys.stderr)
    return 2


def cli_main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the message; exit code 2 on errors
        return int(e.code or 0)
    try:
        _check_outputs(args)
        if args.compare_cost_model:
            return _compare_cli(args)
        out = run_cli(args)
    except SimulateError as err:
        print(f"mstfx simulate: error: {err}", file=sys.stderr)
        return 2
    if args.json is not None:
        text = json.dumps(out, indent=2)
        if args.json == "-":
            print(text)
        else:
            try:
                Path(args.json).write_text(text + "\n")
            except OSError as err:  # checked before the run; something changed since
                return _write_error("--json", args.json, err)
    if args.json != "-":
        _print_table(out)
    plot = args.plot if args.plot is not None else default_plot_name(out)
    if plot.lower() == "none":
        pass
    elif not any(r["max_seq_len"] for r in out["modes"].values()):
        print(f"no plot: no mode fits {out['gpu_gib']:g} GiB at any length, nothing to draw", file=sys.stderr)
    else:
        try:
            _plot(out, plot)
        except OSError as err:
            return _write_error("--plot", plot, err)
        if args.json != "-":
            print(f"plot: {plot}")
    return 0 if any(r["max_seq_len"] for r in out["modes"].values()) else 1  # 1: does not fit


__all__ = [
    "SimulatedBreakdown",
    "MODES",
    "OPTIMIZERS",
    "SimulateError",
    "find_max_seq_len",
    "load_config",
    "search_longest",
    "simulate_all",
    "simulate_peak",
    "cli_main",
    "compare_with_cost_model",
]
