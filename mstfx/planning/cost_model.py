"""Cost: bytes of one training step as sympy expressions of sequence length S, batch B and M.

Why sympy: the planner needs the *longest* S that fits a budget and the *fewest* chunks that fit a
sequence; with the peak written as a maximum of a few expressions that are linear (or, with eager
attention, quadratic) in S, both are answered by ``sympy.solve`` instead of by trial compiles.
The model is pure arithmetic on an :class:`Arch` (plain numbers, no torch, no FX), so it is testable
with ``subs`` and usable for a 70B model on a laptop.

What is counted (t = B·S tokens, ``a`` bytes per activation element, fp32 = 4):

* **static**: parameters, gradients, optimizer state (AdamW: 2 fp32 states; SGD: 1 momentum buffer;
  mixed precision: + an fp32 master copy of the weights).
* **activations**, by liveness over the step.  Each region kind (attention block, MLP, LM head + loss)
  has bytes *saved* for backward and *transient* bytes alive only while it runs.  The step's peak is
  the largest of a few phases:

  - ``forward end``: every layer's saved bytes + the LM head's forward transient,
  - ``head backward``: saved bytes + the LM head's backward transient + its weight gradient,
  - ``top layer backward``: saved bytes + one layer's backward transient (and, with checkpointing,
    that layer's recomputed activations) + the gradients made so far,
  - ``bottom layer backward``: the same for the first layer: one layer's saved bytes, but nearly
    every gradient made (the larger of top and bottom bounds every layer in between),
  - ``end``: all gradients + the embedding's backward.

Mixture-of-experts layers (``Arch.routed_layers`` of them) have no dense MLP of the model's
``intermediate`` width: their routed experts are a region kind's own terms, and beside them a shared
expert (a dense MLP of ``Arch.shared_intermediate``) or, with none, only the block's input
(``moe_block``); the other layers keep their dense MLP.  Each region counts its own layers; a phase
that holds one layer's bytes takes the average layer (every layer's saved bytes) or, for a
checkpointed layer's recompute, the larger of a dense and a MoE layer.

Two programs (``PROGRAMS``).  ``compiled``, the step the mst backend runs: per-token coefficients
(``COEF``) count tensors of the Inductor step in units of the hidden size ``h``, the MLP width ``I``,
the vocab ``V``; they were read off the profiler's live sets at the peak (which tensors, how many) of
the reference Llama config (fp32 and bf16), a 2-layer GPT-2 (GELU) and an 8-layer GQA Llama on CPU,
and checked on a tied GQA Qwen2 never used to set them; measured errors (9.8% worst, tied models
included) are in docs/planning.md.
Two terms are not per token: the compiled HF SDPA path (transformers 5, Llama and GPT-2 alike) keeps
a B×S×S additive causal mask (``Arch.causal_mask``), and a tied, unchunked LM head (GPT-2) keeps its
logits buffer and defers its weight gradient to the end of backward.
``eager``, the same step run op by op with FlashAttention (what ``mstfx simulate`` runs): no fitted
number, each op's saved tensors by autograd's rules (:func:`eager_attention`, the kinds' ``eager`` terms).  Modes:

    standard            nothing chunked, nothing checkpointed
    checkpointing       every decoder layer checkpointed (HF ``gradient_checkpointing_enable``)
    mst                 MLPs and LM head + loss chunked into M_mlp / M_head mini-sequences
    mst+checkpointing   both: every layer checkpointed, and the MLPs *inside* the checkpointed layers
                        chunked as well (the pass rewrites the checkpoint bodies); the recompute of
                        one layer in backward then saves only its MLP input, chunk by chunk
    mst+checkpointing+offload
                        the same, with the checkpoints in host memory: the GPU holds only the ones
                        in use (``mstfx/planning/offload_cost.py``, which also counts host bytes and PCIe time)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import sympy as sp

from ..vocabulary import ChunkForm, Mode, Program
from . import offload_cost as offload

from ..regions.mlp import cost as mlp_cost
from ..regions.registry import Kind
from .terms import B, COEF, FP32, RegionCost, S, norm_saved  # noqa: F401  (part of this module's vocabulary)

#: I-wide tensors an unchunked compiled MLP saves per token (the MLP kind's cost side)
mlp_saved_i = mlp_cost.saved_i
M_MLP, M_HEAD = sp.symbols("M_mlp M_head", positive=True)


#: the modes (:class:`mstfx.vocabulary.Mode`, members equal to the planner's spellings)
MODES = tuple(Mode)
#: which program's memory is predicted: the Inductor-compiled step (what the mst backend runs, fitted
#: on CPU, ``COEF``) or the eager autograd step with FlashAttention (what ``mstfx simulate`` runs,
#: derived from the ops' saved tensors, see :func:`eager_attention` and the kinds' cost sides)
PROGRAMS = (Program.COMPILED, Program.EAGER)
NORMS = ("rms", "rms_fp32", "layer")
OPTIMIZERS = ("adamw", "sgd", "none")


@dataclass(frozen=True)
class Arch:
    """What the cost model needs of a decoder-only LM (plain numbers)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool = True
    tied: bool = False
    params: int | None = None  # exact count when known (an nn.Module); else estimated
    eager_attention: bool = False  # materialises heads × S × S scores (quadratic in S)
    causal_mask: bool = True  # the compiled HF SDPA path materialises a B × S × S additive mask (transformers 5)
    #: attention is plain causal (no sliding window, no chunked attention): in the mst modes the
    #: backend's attention pass then hands SDPA ``is_causal=True`` and the unexpanded K/V, so the
    #: compiled step keeps neither the mask nor repeated K/V (``mstfx/passes/attention.py``)
    plain_causal: bool = True
    #: how a norm keeps its input for backward (eager program): "rms" (HF Llama: fp32 copy of the input,
    #: weight applied in the activation dtype), "rms_fp32" (HF Gemma: weight applied in fp32 too),
    #: "layer" (``native_layer_norm``: the input itself plus mean and rstd)
    norm: str = "rms"
    sandwich_norms: bool = False  # a norm on each branch output too (Gemma 2/3: four norms per layer)
    logit_softcap: bool = False  # tanh soft-capping of the logits (Gemma 2)
    #: the model ends in an LM head (+ loss); False for a bare backbone (HF ``LlamaModel``, ``BertModel``),
    #: whose step then has no vocab-wide region and no head weight
    lm_head: bool = True
    #: routed mixture-of-experts layers: experts per layer (0: a dense model), experts each token is
    #: routed to, and one expert's MLP width (its cost terms: the routed-experts region kind)
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    name: str = ""
    #: layers whose MLP is the routed experts (``None``: every layer when ``experts``, else none); the
    #: other layers have a dense MLP of width ``intermediate``, these have none besides the shared expert
    moe_layers: int | None = None
    #: width of the dense shared-expert MLP beside the routed experts in a MoE layer (0: none, as in
    #: Mixtral and Qwen3-MoE; Qwen2-MoE: ``shared_expert_intermediate_size``; DeepSeek: shared experts ×
    #: expert width), and whether a sigmoid gate (an h → 1 projection) scales its output (Qwen2-MoE)
    shared_intermediate: int = 0
    shared_gate: bool = False
    #: the longest sequence the config's positions cover (0: not given) and the field that says so
    #: (``max_position_embeddings``, GPT-2's ``n_positions``); the planner warns past it
    max_positions: int = 0
    positions_field: str = "max_position_embeddings"

    @property
    def ups(self) -> int:
        """Up-projections per MLP: 2 for gated (SwiGLU/GeGLU), 1 for plain (GELU)."""
        return 2 if self.gated else 1

    @property
    def routed_layers(self) -> int:
        """Layers whose MLP is the routed experts (:attr:`moe_layers`, resolved; none without experts)."""
        if not self.experts:
            return 0
        if self.moe_layers is not None:
            return max(0, min(int(self.moe_layers), self.layers))
        return self.layers

    @property
    def dense_layers(self) -> int:
        """Layers with a dense MLP of width :attr:`intermediate` (every layer of a dense model)."""
        return self.layers - self.routed_layers

    @property
    def n_params(self) -> int:
        if self.params is not None:
            return int(self.params)
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * (q + 2 * kv) + q * h + 2 * h
        mlp = (self.ups + 1) * h * i
        head = 0 if self.tied or not self.lm_head else self.vocab * h
        if not self.routed_layers:
            return self.vocab * h + self.layers * (layer + mlp) + h + head
        # a MoE layer: the experts' stacked weights, the router (h × experts), the shared expert and its gate
        moe = (self.experts * (self.ups + 1) * h * self.expert_intermediate + h * self.experts
               + (self.ups + 1) * h * self.shared_intermediate + (h if self.shared_gate else 0))
        return (self.vocab * h + self.layers * layer + self.dense_layers * mlp + self.routed_layers * moe
                + h + head)

    @property
    def layer_params(self) -> int:
        return (self.n_params - self.vocab * self.hidden * (1 if self.tied else 2)) // max(1, self.layers)


@dataclass(frozen=True)
class Precision:
    """Bytes per element: parameters/gradients, activations; fp32 master weights in mixed precision."""

    param_bytes: int = 4
    act_bytes: int = 4
    master_weights: bool = False

    @classmethod
    def of(cls, mixed_precision: str | bool | None) -> "Precision":
        """``None``/``False``/"fp32": all fp32. "bf16"/"fp16": 2-byte weights and activations.
        "amp"/``True``: 2-byte weights and activations plus an fp32 master copy (and fp32 states)."""
        if mixed_precision in (None, False, "fp32", "no"):
            return cls()
        if mixed_precision in ("bf16", "fp16", "pure-bf16"):
            return cls(2, 2, False)
        if mixed_precision in (True, "amp", "bf16-amp", "fp16-amp"):
            return cls(2, 2, True)
        raise ValueError(f"mixed_precision must be None, 'fp32', 'bf16', 'fp16' or 'amp', got {mixed_precision!r}")


@dataclass
class StepCost:
    """The whole step: static bytes, activation phases (peak = params + grads + optimizer + max(phases))."""

    params: sp.Expr
    grads: sp.Expr
    optimizer: sp.Expr
    phases: dict[str, sp.Expr]
    regions: list[RegionCost] = field(default_factory=list)

    @property
    def activations(self) -> sp.Expr:
        """Peak over phases of activation bytes (phases already include the grads alive then)."""
        return sp.Max(*self.phases.values()) - self.grads

    @property
    def peak(self) -> sp.Expr:
        return self.params + self.optimizer + sp.Max(*self.phases.values())


def optimizer_bytes(n_params: int, optimizer: str, prec: Precision) -> int:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    states = {"adamw": 2, "sgd": 1, "none": 0}[optimizer]
    state_bytes = FP32 if (prec.master_weights or prec.param_bytes == FP32) else prec.param_bytes
    master = FP32 * n_params if prec.master_weights and optimizer != "none" else 0
    return states * state_bytes * n_params + master


def cost_program(program: Program | str) -> Program:
    """``program`` as a :class:`Program` the cost model predicts (:data:`PROGRAMS`); ValueError otherwise."""
    p = Program.parse(program)
    if p not in PROGRAMS:
        raise ValueError(f"program must be one of {', '.join(PROGRAMS)} for the cost model, got {str(p)!r}")
    return p


def kind_costs(arch: "Arch", prec: "Precision", chunked: bool, m_mlp, m_head, program: Program) -> dict[str, "RegionCost"]:
    """Each region kind's cost per decoder layer (``RegionKind.cost`` of every kind in
    ``mstfx.regions.registry.REGION_KINDS``, in that order), by kind name; a kind whose model has no
    such region (``None``) is left out.  A kind's M is the planner's ``M_mlp`` or ``M_head`` (its
    ``cost_symbol``); an M that is the number 1 means not chunked."""
    from mstfx.regions import registry  # the list as it is now (a test may add a kind)

    out = {}
    for kind in registry.REGION_KINDS:
        m = m_head if kind.cost_symbol == "M_head" else m_mlp
        one = isinstance(m, (int, sp.Integer)) and int(m) == 1
        cost = kind.cost(arch, prec, chunked and not one, m, program)
        if cost is not None:
            out[kind.name] = cost
    return out


def regions(
    arch: Arch, prec: Precision, mode: Mode | str, m_mlp=M_MLP, m_head=M_HEAD, program: Program | str = Program.COMPILED,
    sequence_parallel: int = 1,
) -> list[RegionCost]:
    """Bytes of the attention, MLP and LM-head regions in ``mode`` (M symbolic unless given).

    ``sequence_parallel`` N > 1: the attention block is a rank's under Ulysses (:func:`ulysses_attention`)
    and S counts a rank's tokens (:func:`step_cost` substitutes the whole sequence).

    In the mst modes a region whose M is the number 1 is not chunked (the pass leaves it alone).
    ``program``: "compiled" (the Inductor step, :data:`COEF`) or "eager" (:func:`eager_attention` and the
    kinds' ``eager`` terms).
    """
    mode, program = Mode.parse(mode), cost_program(program)
    chunked, ckpt = mode.chunked, mode.checkpointed
    if arch.norm not in NORMS:
        raise ValueError(f"Arch.norm must be one of {NORMS}, got {arch.norm!r}")
    # MLPs inside checkpointed layers are chunked too: the pass rewrites the bodies of Dynamo's
    # ``tag_activation_checkpoint`` (HF ``gradient_checkpointing_enable``), so a checkpointed layer's
    # recompute makes only the MLP input, and its backward runs chunk by chunk (see "checkpointed layer")
    chunk_mlp = chunked and not (isinstance(m_mlp, (int, sp.Integer)) and int(m_mlp) == 1)
    if program is Program.COMPILED:
        attn = compiled_attention(arch, prec, mask_kept(arch, mode))
    else:
        attn = eager_attention(arch, prec)
    if sequence_parallel > 1:
        norm = norm_saved(arch, prec.act_bytes)
        attn = ulysses_attention(attn, arch, prec, sequence_parallel, program, norm,
                                 norm if arch.sandwich_norms else 0)
    # every region kind's terms; the dense MLP and the LM head have phases of their own in step_cost
    # (the MLP's recompute in a checkpointed layer and its pooled chunk buffers, the head's weight
    # gradient), the other kinds (routed experts) are each a layer term with its count of layers
    kinds = kind_costs(arch, prec, chunked, m_mlp, m_head, program)
    mlp, head = kinds.pop(Kind.MLP), kinds.pop(Kind.LM_HEAD)
    # a MoE layer's dense part (shared expert, or the block's input alone)
    block = moe_block(arch, prec, chunk_mlp, m_mlp, program)
    extra = ([block[0]] if block else []) + list(kinds.values())
    if ckpt:  # a checkpointed layer keeps its input; its activations come back one layer at a time
        # with the MLP chunked, its backward runs one chunk at a time (``mlp.bwd_transient``), each
        # chunk recomputed just before its gradient (``ckpt_mlp_whole`` = 0; eager: each chunk's own
        # checkpoint)
        whole = COEF["ckpt_mlp_whole"] if program is Program.COMPILED else 0.0
        h, t, a = arch.hidden, B * S, prec.act_bytes
        def recomputed(region: RegionCost, full_saved) -> sp.Expr:
            return whole * full_saved + (1 - whole) * region.saved if chunk_mlp else region.saved

        # the dense MLP's unchunked saved bytes: its terms with M = 1
        mlp_full_saved = mlp_cost.dense(arch, prec, False, 1, arch.intermediate, arch.dense_layers, program)[1]
        dense_saved = recomputed(mlp, mlp_full_saved)
        kinds_saved = sum((e.saved for e in extra[1 if block else 0:]), sp.Integer(0))
        if not arch.routed_layers:
            layer_saved = attn.saved + dense_saved + kinds_saved
        else:  # the larger of a dense layer and a MoE layer is recomputed (at the top or the bottom)
            moe_saved = recomputed(*block) + kinds_saved
            layer_saved = attn.saved + (_larger(dense_saved, moe_saved) if arch.dense_layers else moe_saved)
        if chunk_mlp and whole:  # a chunk's up-projections are already in the whole recompute: only its gradients are new
            mlp = mlp_cost.whole_recompute(mlp, arch, prec, m_mlp, whole)
        present = [r for r in (mlp, *extra) if r.count]
        ckpt_region = RegionCost(
            "checkpointed layer", arch.layers, f"{h}", t * a * COEF["ckpt_saved_h"] * h, layer_saved,
            sp.Max(attn.bwd_transient, *(r.bwd_transient for r in present)),
            recompute_flops=2 * t * arch.layer_params,
        )
        return [ckpt_region, attn, mlp, head, *extra]
    return [attn, mlp, head, *extra]


def shared_expert_backlog(present: list[RegionCost], head: RegionCost, arch: Arch, prec: Precision) -> sp.Expr:
    """Bytes beside a chunked shared expert's own in its backward, compiled in the loop form (its loop
    operator is one extern call in the Inductor backward of the MoE block, after the routed experts'):

    * the routed experts' backward buffers (their region's ``bwd_transient``: one run's slots, the
      weights' partial sums, every token's input gradient): Inductor frees or reuses them only after
      the extern call, so all are still alive while the loop runs;
    * the block's output gradient, which the routed experts and the shared expert both read (t·h), and
      the loop operator's input gradient, one t×h buffer it fills chunk by chunk (the MLP kind's terms
      count a chunk's buffers only);
    * the chunked LM head's saved tensors (its hidden gradient and fp32 weight gradient, ``head.saved``),
      still held by the step's backward.

    Read off the profiler's live set at the peak of the tiny Qwen2-MoE (S = 4096, M = 8, fp32: the
    top layer's shared-expert loop backward; routed experts' buffers 4.44 MiB against their term's
    4.60)."""
    routed = sum((r.bwd_transient for r in present if r.kind == Kind.ROUTED_EXPERTS and r.chunks != 1), sp.Integer(0))
    return routed + 2 * B * S * prec.act_bytes * arch.hidden + (head.saved if head.chunks != 1 else 0)


def _larger(x: sp.Expr, y: sp.Expr) -> sp.Expr:
    """The larger of two byte counts of the same form (each a multiple of the tokens B·S, M alike), told
    apart at one point so that the phases stay free of ``Max`` (sympy solves them for S)."""
    at = {S: 1, B: 1, M_MLP: 1, M_HEAD: 1}
    return x if float(sp.sympify(x).subs(at)) >= float(sp.sympify(y).subs(at)) else y


def moe_block(arch: Arch, prec: Precision, chunk_mlp: bool, m_mlp, program: Program) -> tuple[RegionCost, sp.Expr] | None:
    """The dense part of the ``arch.routed_layers`` MoE layers, beside their routed experts (the region
    kind's own terms), and its unchunked saved bytes; ``None`` for a dense model.  A MoE layer has no
    dense MLP of ``arch.intermediate``: it has a shared expert, a dense MLP of
    ``arch.shared_intermediate`` on the same normed input (Qwen2-MoE, DeepSeek), or none (Mixtral,
    Qwen3-MoE), when only the block's input (the residual and the norm's output, which the router and
    the experts read) is counted here."""
    n = arch.routed_layers
    if not n:
        return None
    if arch.shared_intermediate:
        region, full = mlp_cost.dense(arch, prec, chunk_mlp, m_mlp, arch.shared_intermediate, n, program, "shared expert")
        if arch.shared_gate and chunk_mlp and program is Program.COMPILED:
            # the sigmoid gate multiplies the shared expert's output, and the product's backward reads it:
            # the loop operator's t×h output is saved (read off the tiny Qwen2-MoE's live set, S = 4096, M = 8)
            gated_out = B * S * prec.act_bytes * arch.hidden
            region = replace(region, saved=region.saved + gated_out)
        return region, full
    region, full = mlp_cost.dense(arch, prec, False, 1, 0, n, program, "moe input")
    return replace(region, shape=f"{arch.hidden}", bwd_transient=0 * S), full


def mask_kept(arch: Arch, mode: Mode | str) -> bool:
    """Whether the compiled step in ``mode`` still holds HF's S×S mask (and K/V repeated per query head):
    plain Inductor does; the mst backend removes both where attention is plain causal."""
    return arch.causal_mask and not (Mode.parse(mode).chunked and arch.plain_causal)


def compiled_attention(arch: Arch, prec: Precision, mask: bool | None = None) -> RegionCost:
    """The attention block of the Inductor-compiled step (:data:`COEF`); the MLP and the LM head are
    their kinds' terms (``mstfx/regions/<kind>/cost.py``).

    ``mask``: the step holds HF's mask and repeated K/V (default ``arch.causal_mask``; see :func:`mask_kept`)."""
    c, a = COEF, prec.act_bytes
    h, nh = arch.hidden, arch.heads
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    if arch.causal_mask if mask is None else mask:  # with a mask HF's SDPA path repeats K and V to every query head (repeat_kv)
        kv = q
    t = B * S

    attn_saved = t * a * (c["attn_saved_h"] * h + c["attn_saved_qkv"] * (q + 2 * kv)) + t * nh * FP32
    attn_bwd = t * a * c["bwd_transient_h"] * h
    if arch.eager_attention:  # softmax probabilities saved, their gradient transient
        attn_saved += B * nh * S * S * a
        attn_bwd += B * nh * S * S * a
    return RegionCost("attention", arch.layers, f"{nh}×{arch.head_dim} heads", attn_saved, 0 * S, attn_bwd)


def eager_attention(arch: Arch, prec: Precision) -> RegionCost:
    """The attention block of the *eager* step with FlashAttention-2; the MLP and the LM head are their
    kinds' terms (``mstfx/regions/<kind>/cost.py``, ``eager``).

    Derived, not fitted: each op's saved tensors (autograd's rules), per token (``a`` = activation
    bytes, fp32 = 4), as ``mstfx simulate`` runs the step: the input norm and its output (kept by the
    q/k/v projections), q and k after rotary and v (kept by flash attention, K/V at their own head
    count), its output (kept by the output projection) and its fp32 log-sum-exp; backward: the
    output's gradient, dq/dk/dv, FA2's fp32 dq accumulator and, with GQA, dk/dv expanded to all heads.
    """
    a = prec.act_bytes
    h, nh = arch.hidden, arch.heads
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    t = B * S
    norm = norm_saved(arch, a)
    branch_norm = norm if arch.sandwich_norms else 0  # on the branch output, which goes to the residual add

    attn_saved = t * (norm + a * h + a * (q + 2 * kv) + a * q + FP32 * nh + branch_norm)
    gqa = 2 * a * q if kv != q else 0
    attn_bwd = t * (a * h + a * q + a * (q + 2 * kv) + FP32 * q + FP32 * nh + gqa)
    if arch.eager_attention:  # softmax probabilities saved, their gradient transient
        attn_saved += B * nh * S * S * a
        attn_bwd += B * nh * S * S * a
    return RegionCost("attention", arch.layers, f"{nh}×{arch.head_dim} heads", attn_saved, 0 * S, attn_bwd)


def step_cost(
    arch: Arch,
    mode: Mode | str,
    optimizer: str = "none",
    prec: Precision | None = None,
    m_mlp=M_MLP,
    m_head=M_HEAD,
    program: Program | str = Program.COMPILED,
    chunk_form: ChunkForm | str = ChunkForm.LOOP,
    sequence_parallel: int = 1,
    gpus: int = 1,
    per_block: bool = False,
    optimizer_in_backward: bool = False,
) -> StepCost:
    """The step's bytes: static parts and the activation phases, as expressions of S, B (and M).

    ``sequence_parallel``: the Ulysses degree N (:func:`ulysses_attention`): every token-wise term
    counts S/N tokens, attention runs on the full S with H/N heads; S stays the *whole* sequence in
    every expression.  ``gpus``: FSDP (ZeRO-3) over that many GPUs (:func:`fsdp_unsharded`):
    parameters, gradients and optimizer state divided by it, plus the unsharded modules in flight.

    ``program``: "compiled" (the step the mst backend / Inductor runs) or "eager" (op by op, with
    FlashAttention, as ``mstfx simulate`` runs it); see :data:`PROGRAMS`.
    ``chunk_form``: the compiled step's form of a chunked region (``MstConfig.chunk_form``; see
    :class:`~mstfx.vocabulary.ChunkForm`).
    ``per_block``: the compiled program of ``mstfx.compile(model, per_block=True)``: each decoder layer
    its own graph, the decoder body eager (no S×S mask handed to the layers, the embedding's backward
    not fused into the first layer's), the chunked head's weight-gradient accumulator alive only in the
    head's backward.  ``optimizer_in_backward`` (with ``per_block``): an optimizer step in
    ``register_post_accumulate_grad_hook`` frees each gradient once accumulated, so a phase holds the
    gradients of the module in backward only, not all made so far (a whole-model program returns every
    gradient from one backward graph, so there it changes nothing).
    """
    mode, program, chunk_form = Mode.parse(mode), cost_program(program), ChunkForm.parse(chunk_form)
    prec = prec or Precision()
    compiled = program is Program.COMPILED
    # the loop operator runs its chunks op by op inside one extern call: its chunk buffers never enter
    # Inductor's reuse pool, and the LM head's fp32 weight gradient is the operator's own output
    looped = compiled and chunk_form is ChunkForm.LOOP
    sp_n = check_sequence_parallel(arch, sequence_parallel, gpus)
    regs = regions(arch, prec, mode, m_mlp, m_head, program, sp_n)
    by = {r.kind: r for r in regs}
    n = arch.n_params
    # FSDP: every state divided by the GPUs; the unsharded module gradient (before its reduce-scatter)
    # is in every backward phase, and two all-gathered modules (current + prefetched) beside the shards
    gathered, unsharded = fsdp_unsharded(arch, prec, gpus)
    params = sp.Rational(n * prec.param_bytes, gpus) + 2 * gathered
    grads = sp.Rational(n * prec.param_bytes, gpus) + unsharded
    opt = sp.Rational(optimizer_bytes(n, optimizer, prec), gpus)
    head_grad = sp.Rational(arch.vocab * arch.hidden * prec.param_bytes * (1 if arch.lm_head else 0), gpus)
    layer_grad = sp.Rational(arch.layer_params * prec.param_bytes, gpus) + unsharded
    attn, mlp, head = by["attention"], by[Kind.MLP], by[Kind.LM_HEAD]
    freed = per_block and optimizer_in_backward
    emb_grad = sp.Rational(arch.vocab * arch.hidden * prec.param_bytes, gpus)
    looped_head = looped and head.chunks != 1  # the LM head + loss is the loop operator
    extra = [r for r in regs if r.kind not in ("attention", Kind.MLP, Kind.LM_HEAD, "checkpointed layer")]
    # a layer's regions that not every layer has (MoE: a dense MLP, or a shared expert and routed
    # experts) count by their share of the layers; every region of a dense model has share 1
    share = lambda r: 1 if r.count == arch.layers else sp.Rational(r.count, max(1, arch.layers))  # noqa: E731
    present = [r for r in extra if r.count and r.bwd_transient != 0]  # each a backward phase of its own
    # a tied weight gets two gradients (LM head, embedding) that are summed: one extra V×h for a while
    tied_extra = head_grad if arch.tied else sp.Integer(0)
    # the chunked head's fp32 dL/dW accumulator is an input of the compiled backward: alive through it
    acc_alive = sp.Integer(arch.vocab * arch.hidden * FP32) * COEF["acc_alive"] \
        if head.chunks != 1 and "checkpointed layer" not in by and not per_block else 0
    if "checkpointed layer" in by:
        ck = by["checkpointed layer"]
        layer_saved = ck.saved
        tops = {"(attention)": ck.fwd_transient + attn.bwd_transient,
                **({"(mlp)": ck.fwd_transient + mlp.bwd_transient} if mlp.count else {}),
                **{f"({e.kind})": ck.fwd_transient + e.bwd_transient for e in present}}
    else:
        # the average layer (a dense model's every layer): its bottom-layer phase is one layer's
        layer_saved = attn.saved + share(mlp) * mlp.saved + sum((share(e) * e.saved for e in extra), sp.Integer(0))
        # compiled: Inductor's buffer reuse keeps a chunked MLP's freed chunk buffers in its pool until the
        # next layer's MLP backward allocates the same sizes, so they are alive in the attention backward
        # between (measured, reference Llama, M = 3 and 4; COEF["mlp_chunk_pool"]); MoE: the larger
        # of the dense MLP's and the shared expert's, and beside it a chunked region kind's own pooled
        # buffers (routed experts: one run's, measured on the tiny Qwen2-MoE alongside the shared expert's)
        mlps = [r for r in (mlp, *present) if r.kind in (Kind.MLP, "shared expert") and r.count and r.chunks != 1]
        pooled = mlps[0].bwd_transient if len(mlps) == 1 else _larger(*(r.bwd_transient for r in mlps)) if mlps else 0
        # the loop form runs a chunked MLP as one extern operator whose chunk buffers never enter the pool,
        # but a region kind that is not a loop operator (routed experts: unrolled, Inductor's own kernels)
        # still leaves its run's buffers there (measured, tiny Mixtral in the loop form, S = 4096, M = 8:
        # one run's slots alive in the top layer's attention backward)
        kinds_pooled = sum((r.pooled for r in present if r.pooled is not None and r.chunks != 1), sp.Integer(0))
        pool = (pooled + kinds_pooled) * COEF["mlp_chunk_pool"] if compiled and not looped \
            else kinds_pooled * COEF["mlp_chunk_pool"] if compiled else 0
        tops = {"(attention)": attn.bwd_transient + pool,
                **({"(mlp)": mlp.bwd_transient} if mlp.count else {}),
                **{f"({e.kind})": e.bwd_transient for e in present}}
        if looped and "(shared expert)" in tops and by["shared expert"].chunks != 1:
            tops["(shared expert)"] += shared_expert_backlog(present, head, arch, prec)
    # with offload only the checkpoints in use are on the GPU (``offload.checkpoints_on_gpu``)
    kept = offload.checkpoints_on_gpu(arch.layers, mode, program)
    layers_saved = kept * layer_saved
    # the causal mask of the attention layers, made once and alive until the first layer's backward
    # (compiled only: eager FlashAttention takes no mask)
    # (none with sequence parallelism: the Ulysses kernel runs causal on the whole S without a mask, and
    # HF's mask of a rank's own tokens has no reader; the simulation's program drops it alike)
    mask = B * S * S * prec.act_bytes * COEF["mask_s2"] if mask_kept(arch, mode) and compiled and sp_n == 1 \
        and not per_block else sp.Integer(0)
    layers_saved = layers_saved + mask
    # tied weight, head not chunked (measured on GPT-2): the LM head's weight gradient waits to be summed
    # with the embedding's at the end of backward, and the fp32 logits/dlogits buffer lives until then
    tied_late = arch.tied and head.chunks == 1 and compiled
    # compiled: Inductor fuses the embedding backward (its V×h zeros, the scatter, a tied weight's sum)
    # into one kernel with the first layer's input-norm backward, so that layer's last two h-wide
    # gradients are still alive when the V×h buffers are made (read off GPT-2's generated backward,
    # S = 4096; its q/k/v output gradient was too, read by the bias gradient's row sum fused into the
    # same kernel, until ``mstfx/post_grad/bias_grad_order.py`` ran that sum right after the gradient)
    first_layer_residue = B * S * prec.act_bytes * 2 * arch.hidden if not per_block else sp.Integer(0)
    # a tied weight's two gradients at the end: the loop operator's fp32 weight gradient (an input of
    # the backward) takes the sum in place (measured in fp32); out of place otherwise
    tied_sum_extra = 1 if (tied_late or (looped_head and prec.param_bytes == FP32)) else 2
    # 16-bit weights, whole-model compiled: Inductor runs PyTorch's decomposition of the embedding
    # backward, which computes in fp32 (``embedding_dense_backward``: an fp32 copy of the incoming
    # tokens×h gradient, scattered into fp32 V×h zeros, then cast to the weights' dtype), so the end of
    # backward holds the fp32 V×h accumulator beside every gradient (not sharded: the whole embedding's
    # gradient is made before any reduce-scatter).  Measured: reference Llama in bf16, S = 4096, mst +
    # checkpointing at M = 4 / 32, 159.5 MiB = the end phase with both terms (109.8 without them).  The
    # per-block program (whose body, the embedding included, runs eagerly) is not measured with it.
    emb_fp32_backward = B * S * FP32 * arch.hidden + arch.vocab * arch.hidden * FP32 \
        if compiled and not per_block and prec.param_bytes < FP32 else sp.Integer(0)
    phases = {
        "forward end": layers_saved + head.saved + head.fwd_transient,
        # chunked head: the forward finishes the fp32 accumulator into a V×h weight-gradient buffer
        **({"forward end (head weight gradient)": layers_saved + head.saved + arch.vocab * arch.hidden * FP32}
           if head.chunks != 1 and compiled and not looped else {}),
        # a tied weight's two gradients are summed at the end of backward (the "end" phase), not here;
        # the loop operator's saved fp32 weight gradient becomes the fp32 weight's gradient in place
        "head backward": layers_saved + head.saved + head.bwd_transient
        + (0 if tied_late or (looped_head and prec.param_bytes == FP32) else head_grad) + unsharded,
        # backward of layer k holds the saved activations of layers 1..k and the gradients of layers
        # k..L: linear in k, so the larger of the top layer and the bottom layer is the peak of all
        **{f"top layer backward {k}": layers_saved + v + layer_grad + acc_alive + (head.saved if tied_late else head_grad)
           for k, v in tops.items()},
        **{f"bottom layer backward {k}": layers_saved - (kept - 1) * layer_saved + v + acc_alive
           + grads - (0 if arch.tied and not tied_late else head_grad) + (head.saved if tied_late else 0)
           for k, v in tops.items()},
        # a tied weight at the end: its gradient, the embedding's, and their sum (out of place), except
        # for the compiled unchunked head, whose logits buffer is reused (measured on GPT-2)
        "end": grads + tied_extra * tied_sum_extra + B * S * prec.act_bytes * arch.hidden
        + (head.saved if tied_late else 0) + (first_layer_residue if compiled else 0) + emb_fp32_backward,
    }
    if freed:
        # gradients consumed per module: a layer's backward holds its own (and a tied head's, which is
        # accumulated only with the embedding's, at the end); the end holds the embedding's
        held_head = head_grad if arch.tied else sp.Integer(0)
        phases.update({
            **{f"top layer backward {k}": layers_saved + v + layer_grad + held_head for k, v in tops.items()},
            **{f"bottom layer backward {k}": layers_saved - (kept - 1) * layer_saved + v + layer_grad + held_head
               for k, v in tops.items()},
            "end": emb_grad + tied_extra * tied_sum_extra + B * S * prec.act_bytes * arch.hidden
            + (head.saved if tied_late else 0),
        })
        grads = _larger(_larger(layer_grad, head_grad), emb_grad)  # the most alive at once
    if sp_n > 1:  # the expressions above count a rank's tokens as S: S/N of the whole sequence
        phases = {k: v.subs(S, S / sp_n) for k, v in phases.items()}
        regs = [_per_rank(r, sp_n) for r in regs]
    return StepCost(params, grads, opt, {k: sp.simplify(v) for k, v in phases.items()}, regs)


def _per_rank(r: RegionCost, sp_n: int) -> RegionCost:
    """``r`` with its rank-token expressions written in the whole sequence S (S → S/N)."""
    sub = lambda e: sp.sympify(e).subs(S, S / sp_n)  # noqa: E731
    return replace(r, saved=sub(r.saved), fwd_transient=sub(r.fwd_transient), bwd_transient=sub(r.bwd_transient),
                   recompute_flops=sub(r.recompute_flops), chunks=sub(r.chunks),
                   pooled=None if r.pooled is None else sub(r.pooled))


#: GPUs that share one host (its memory holds their offloaded checkpoints and optimizer state)
GPUS_PER_NODE = 8


def check_mesh(sequence_parallel: int, gpus: int = 1) -> int:
    """The Ulysses degree N checked against the GPUs alone (no model needed): positive integers, N
    dividing ``gpus``.  ValueError otherwise."""
    for name, v in (("sequence_parallel", sequence_parallel), ("gpus", gpus)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if gpus % sequence_parallel:
        raise ValueError(f"sequence_parallel={sequence_parallel} must divide gpus={gpus} (a mesh of gpus/N "
                         f"data-parallel × N sequence-parallel ranks)")
    return sequence_parallel


def check_sequence_parallel(arch: Arch, sequence_parallel: int, gpus: int = 1) -> int:
    """The Ulysses degree N, checked as the runtime checks it: a positive integer dividing ``gpus`` and
    the query heads (each rank runs attention on H/N heads, :func:`check_mesh` for the GPUs); any KV head
    count dividing the query heads (repeated as :func:`kv_heads_split` says when N does not divide it).
    ValueError otherwise."""
    n = check_mesh(sequence_parallel, gpus)
    if arch.heads % n:
        raise ValueError(f"sequence_parallel={n} must divide the {arch.heads} query heads: Ulysses gives each rank "
                         f"H/N whole heads")
    if arch.kv_heads < 1 or arch.heads % arch.kv_heads:
        raise ValueError(f"{arch.heads} query heads are not a multiple of {arch.kv_heads} KV heads")
    return n


def kv_heads_split(heads: int, kv_heads: int, world: int) -> int:
    """How many K/V heads go into the all-to-all, so that each of ``world`` ranks gets whole K/V heads
    for its H/N query heads: Hkv when N divides them; else N when Hkv divides N (each rank's query heads
    share one K/V head, repeated N/Hkv times in all, as DeepSpeed's Ulysses replicates them); else H
    (every query head its own copy).  The runtime (``mstfx.sequence_parallel.ulysses_attention``) repeats K/V by this rule and the planner
    counts a rank's K/V bytes by it (:func:`kv_heads_per_rank`)."""
    if kv_heads % world == 0:
        return kv_heads
    return world if world % kv_heads == 0 else heads


def kv_heads_per_rank(arch: Arch, sequence_parallel: int) -> int:
    """KV heads a rank holds in head-sharded attention (:func:`kv_heads_split` / N)."""
    return kv_heads_split(arch.heads, arch.kv_heads, sequence_parallel) // sequence_parallel


def kv_replication(arch: Arch, sequence_parallel: int) -> int:
    """How many ranks hold each KV head (1: split, no copy; N/Hkv when there are fewer KV heads than ranks)."""
    return kv_heads_per_rank(arch, sequence_parallel) * sequence_parallel // arch.kv_heads


def fsdp_unsharded(arch: Arch, prec: Precision, gpus: int) -> tuple[int, int]:
    """(one all-gathered module's parameter bytes, one unsharded module gradient's bytes) under FSDP over
    ``gpus`` (0, 0 on one GPU): the largest module, a decoder layer or the V×h embedding / LM head (as
    ``mstfx simulate`` counts FSDP)."""
    if gpus <= 1:
        return 0, 0
    largest = max(arch.layer_params, arch.vocab * arch.hidden) * prec.param_bytes
    return largest, largest


def ulysses_attention(attn: RegionCost, arch: Arch, prec: Precision, sequence_parallel: int, program: Program,
                      norm: int = 0, branch_norm: int = 0) -> RegionCost:
    """The attention block of a rank under Ulysses sequence parallelism of degree N, in bytes of that
    rank's S/N tokens (``S`` in the expression; :func:`step_cost` substitutes the whole sequence).

    Around the attention kernel an all-to-all turns the rank's S/N tokens × H heads into the whole S ×
    H/N heads (K/V: :func:`kv_heads_per_rank` heads) and one turns the output back.  Per
    rank token, with ``a`` the activation bytes and widths q = H·hd, kv_r = N·(K/V heads per rank)·hd
    (= Hkv·hd unless KV heads are repeated):

    * saved: what the single-GPU block keeps, with K/V at kv_r (the kernel keeps q, k, v, its output
      and log-sum-exp for the whole S on H/N heads: the same bytes as S/N tokens on H heads), plus the
      output after the all-to-all back (the output projection's input: a second q-wide tensor);
    * backward transient: the larger of two moments.  The kernel's backward: the single-GPU block's
      transient (K/V at kv_r, the workspace for H/N heads over the whole S) plus the output gradient
      on both sides of its all-to-all.  An all-to-all in flight (dq back to the rank's tokens): the
      output gradient, dq/dk/dv for the whole S, and the send and receive buffers, ``2·q``.  Eager:
      exactly so (the simulation's order, where the kernel's moment is the larger); compiled: the
      fitted single-GPU terms, since compiled code frees each side of an exchange once it is read (the
      simulated program's peak at S/N tokens is the same with and without the all-to-alls).
      FlashAttention-style: nothing S×S, except eager scores (``Arch.eager_attention``) for the whole
      S on H/N heads.

    Not modelled: the forward's all-to-all buffers (the peak is in backward), overlap of the
    collectives with compute, NCCL's own workspace, and padding of a sequence N does not divide.
    """
    n, a = sequence_parallel, prec.act_bytes
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    kv_r = n * kv_heads_per_rank(arch, n) * arch.head_dim
    t, nh = B * S, arch.heads
    a2a = 2 * t * a * (q + 2 * kv_r)  # the forward's exchange of q, k, v: send and receive buffers
    if program is Program.COMPILED:
        c = COEF
        saved = t * a * (c["attn_saved_h"] * arch.hidden + c["attn_saved_qkv"] * (q + 2 * kv_r) + q) + t * nh * FP32
        bwd = t * a * c["bwd_transient_h"] * arch.hidden
    else:
        saved = t * (norm + a * arch.hidden + a * (q + 2 * kv_r) + 2 * a * q + FP32 * nh + branch_norm)
        gqa = 2 * a * q if kv_heads_per_rank(arch, n) * n != nh else 0
        kernel = t * (a * arch.hidden + 2 * a * q + a * (q + 2 * kv_r) + FP32 * q + FP32 * nh + gqa)
        exchange = t * (a * arch.hidden + a * q + a * (q + 2 * kv_r) + 2 * a * q)
        bwd = _larger(kernel, exchange)
    if arch.eager_attention:  # scores for the whole S on H/N heads (N·S: the whole sequence in rank tokens)
        scores = B * sp.Rational(nh, n) * (n * S) ** 2 * a
        saved, bwd = saved + scores, bwd + scores
    shape = f"{nh // n}×{arch.head_dim} heads per rank (of {nh}), whole S; S/N tokens elsewhere"
    return replace(attn, shape=shape, saved=saved, fwd_transient=a2a, bwd_transient=bwd)


def _roots_le(expr: sp.Expr, budget: float) -> float:
    """Largest S > 0 with ``expr(S) <= budget`` for a non-decreasing expr (∞ if it never exceeds)."""
    if not expr.has(S):
        return math.inf if float(expr) <= budget else 0.0
    sols = [complex(r) for r in sp.solve(sp.Eq(expr, budget), S)]
    real = [r.real for r in sols if abs(r.imag) < 1e-9 and r.real > 0]
    if not real:
        return 0.0 if float(expr.subs(S, 1)) > budget else math.inf
    return max(real)


def with_margin(static: float, peak: float, margin: float) -> float:
    """The peak a plan must fit: ``static`` (parameters + optimizer state) exact, the rest of ``peak``
    (gradients + activations, what the model estimates) grown by ``margin``."""
    return static + (peak - static) * (1 + margin)


def margin_room(static: float, budget: float, margin: float) -> float:
    """Bytes left for gradients + activations under ``budget`` with ``margin`` kept (inverse of
    :func:`with_margin`)."""
    return (budget - static) / (1 + margin)


def longest_s(cost: StepCost, budget_bytes: float, batch: int = 1, margin: float = 0.0) -> int:
    """Longest S (an integer, 0 if none) whose peak fits ``budget_bytes``, by solving each phase.

    The peak is ``static + max(phases)``, every phase non-decreasing in S, so the longest S is the
    smallest of the per-phase roots of ``static + phase(S) = budget``.  Symbols M must be substituted
    first (a number, or a rule such as M = ⌈B·S/h⌉ relaxed to B·S/h).  ``margin``: the phases (gradients
    + activations) must fit with that fraction to spare: ``static + phase·(1 + margin) <= budget``.
    """
    static = cost.params + cost.optimizer
    budget_bytes = float(static) + margin_room(float(static), budget_bytes, margin)
    best = math.inf
    for expr in cost.phases.values():
        e = sp.simplify((static + expr).subs(B, batch))
        if e.free_symbols - {S}:
            raise ValueError(f"substitute {sorted(map(str, e.free_symbols - {S}))} before solving for S")
        best = min(best, _roots_le(e, budget_bytes))
    if math.isinf(best):
        return 2**62
    return max(0, int(math.floor(best + 1e-9)))


def evaluate(expr: sp.Expr, seq_len: int, batch: int = 1, m_mlp: int = 1, m_head: int = 1) -> float:
    return float(sp.sympify(expr).subs({S: seq_len, B: batch, M_MLP: m_mlp, M_HEAD: m_head}))
