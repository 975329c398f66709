"""The fake model: the real Hugging Face model built under ``FakeTensorMode`` and run one forward +
backward under ``MemTracker`` (the peak tracker), with the mst backend's rewrite replayed per region."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from ...hf_checkpointing import disable_checkpointing, enable_checkpointing
from ...vocabulary import Action, Mode
from .options import GiB, SimulateError, ATTN_NAME
from .attention import flash_sim_attention, no_packed_sequences


def _peak_tracker_class():
    from ...compat.memory import mem_tracker_api

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
    from ...regions.registry import REGION_KINDS

    out = {}
    for kind in REGION_KINDS:
        decided = [d for r in reports for d in r.decisions if d.kind == kind.name]
        if decided:
            out[kind.name] = max((d.chunks or 1 for d in decided if d.action is Action.CHUNKED), default=1)
    return out


class FakeModel:
    """One fake-weight model, reused for every run of every mode (building it takes seconds)."""

    def __init__(self, config) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from ...compat.functorch import fake_tensor_mode

        config = _sim_config(config)
        self.config = config
        self.fake_mode = fake_tensor_mode()(allow_non_fake_inputs=True)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # never .to(dtype) under fake mode
        try:
            with flash_sim_attention(), self.fake_mode:
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

        from ..measure import fresh_code

        from ...compat import tracing_settings

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

        from ..offload_sim import FakeHostHooks, HostCounter, lm_head_chunks

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
            with flash_sim_attention(sequence_parallel), no_packed_sequences(), self.fake_mode:
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
    cfg._attn_implementation = ATTN_NAME
    # bf16 weights whatever the checkpoint was saved in: transformers builds in ``config.dtype`` when it
    # is set (Gemma 2's config says float32), which would silently double every weight and activation
    cfg.dtype = torch.bfloat16
    # memory does not depend on the attention pattern inside FlashAttention (sliding window, soft-cap)
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        cfg.attn_logit_softcapping = None
    return cfg
