"""The compiled program: what the forward saves, when the backward recomputes, and its simulated peak.

The program is captured on the meta device (no weights, no maths): Dynamo, the mst passes, AOT
autograd's partition.  Checked here: checkpointed layers recompute their MLP one chunk at a time (the
last layer too), the estimate follows the profiler's CPU peaks of the real Inductor step, and
``simulate_peak(program="compiled")`` answers for a whole config.
"""

from __future__ import annotations

import pytest
import torch

import mstfx
from mstfx.compat import with_tracing_settings
from mstfx.tools.compiled_program import capture_program, program_peak


def _llama_config(layers=2, hidden=128, inter=512, vocab=1000):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, use_cache=False, attn_implementation="sdpa",
    )


def _meta_llama(cfg, checkpointing=True):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _profiled_llama(seq: int, checkpointing: bool):
    """The profiler checks' real model (HF Llama, hidden 256, intermediate 1024, 4 layers, vocab 2000,
    fp32; ``mlp_heavy_config``), its config and input ids, with Dynamo's caches reset."""
    from transformers import LlamaForCausalLM

    from mstfx.tools.bench import mlp_heavy_config

    cfg = mlp_heavy_config(seq)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    torch._dynamo.reset()
    return model, cfg, ids


def _captured_peak(meta, seq: int, mst: bool = True):
    """The simulated peak of ``meta``'s whole-model compiled program (default MstConfig; ``mst=False``:
    plain Inductor)."""
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    return program_peak(capture_program(meta, ids, mstfx.MstConfig() if mst else None), device="cpu")


def _recomputed_up_projection_runs(program, chunk_tokens, inter):
    """Lengths of the runs of consecutive recomputed up-projections (chunk×I matmuls of a checkpointed
    layer) in the backward, with no gradient matmul between them."""
    runs, current = [], 0
    for node in program.backward.graph.nodes:
        if node.op != "call_function" or "mm" not in str(node.target):
            continue
        shape = tuple(node.meta["val"].shape)
        if "ac_graph_id" in node.meta and shape == (chunk_tokens, inter):
            current += 1
        else:
            if current:
                runs.append(current)
            current = 0
    return runs + ([current] if current else [])


@pytest.mark.parametrize("layers", [1, 3])
def test_checkpointed_layers_recompute_one_chunk_at_a_time(layers):
    """Unrolled form: every checkpointed layer, the last one included (its output feeds the final norm), rebuilds its
    MLP chunk by chunk: at most the gate and up projections of one chunk before that chunk's gradients."""
    cfg = _llama_config(layers=layers)
    seq, m = 1024, 8
    program = capture_program(_meta_llama(cfg), torch.zeros(1, seq, dtype=torch.long, device="meta"),
                              mstfx.MstConfig(mini_sequences=m, chunk_form="unrolled"))  # the loop form: tests/model/test_chunk_loop.py
    runs = _recomputed_up_projection_runs(program, seq // m, cfg.intermediate_size)
    assert len(runs) >= layers * m, runs  # every chunk of every layer is recomputed in the backward
    assert max(runs) <= 2, f"chunks recomputed together before their gradients: {runs}"


def test_attention_leaves_no_square_tensor_in_the_program():
    cfg = _llama_config(layers=2)
    seq = 640  # nothing else in this model is 640×640
    program = capture_program(_meta_llama(cfg), torch.zeros(1, seq, dtype=torch.long, device="meta"), mstfx.MstConfig())
    for gm in (program.forward, program.backward):
        squares = [n.name for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
                   and n.meta["val"].dim() >= 2 and tuple(n.meta["val"].shape[-2:]) == (seq, seq)]
        assert squares == []
    plain = capture_program(_meta_llama(cfg), torch.zeros(1, seq, dtype=torch.long, device="meta"), None)
    assert any(isinstance(n.meta.get("val"), torch.Tensor) and tuple(n.meta["val"].shape[-2:]) == (seq, seq)
               for n in plain.forward.graph.nodes), "plain Inductor's program should still hold HF's S×S mask"


def test_extrapolated_layers_match_a_direct_capture():
    """Identical layers make the peak linear in their count: 2 and 3 layers predict 5."""
    from mstfx.tools.compiled_program import compiled_peak, step_peak

    cfg = _llama_config(layers=5)
    direct = step_peak(cfg, 1024, "mst+ckpt")
    extrapolated = compiled_peak(cfg, 1024, "mst+ckpt")
    assert abs(extrapolated.total / direct.total - 1) < 0.02, (extrapolated, direct)


def test_simulate_peak_compiled_program():
    from mstfx.tools.simulate import simulate_peak

    cfg = _llama_config(layers=3)
    mst = simulate_peak(cfg, 1024, "mst+ckpt", optimizer="adamw", program="compiled")
    plain = simulate_peak(cfg, 1024, "standard", optimizer="adamw", program="compiled")
    assert 0 < mst.activations < plain.activations
    assert mst.params == plain.params > 0 and mst.optimizer_state == 8 * mst.params / 2  # bf16 params, 8 B/param states
    with pytest.raises(ValueError, match="program"):
        simulate_peak(cfg, 1024, "mst", program="jit")


def test_per_block_program_frees_each_blocks_gradients_under_optimizer_in_backward():
    """``--program compiled-per-block``: with the optimizer stepped in backward ("paper") one module's
    gradients are alive, not all; with gradients kept until the step it is the whole program's peak."""
    from mstfx.tools.simulate import simulate_all
    from mstfx.tools.simulate.measure import cached_fake_model

    from mstfx.tools.compiled_program import compiled_peak, eager_body_extra_of

    cfg = _llama_config(layers=3)
    whole = simulate_all(cfg, 1024, "mst+ckpt", program="compiled")
    per_block = simulate_all(cfg, 1024, "mst+ckpt", program="compiled-per-block")
    extra = eager_body_extra_of(cfg, 1024)
    kept, kept_whole = per_block["adamw"], whole["adamw"]
    # gradients kept: the whole program's peak, or its forward's end plus the eager final norm's saves
    assert kept_whole.total <= kept.total <= kept_whole.total + extra
    peak = compiled_peak(cfg, 1024, "mst+ckpt")
    assert kept.grads + kept.activations == max(peak.total, peak.forward + extra)
    fm = cached_fake_model(cfg)
    paper, paper_whole = per_block["paper"], whole["paper"]
    assert paper.grads == fm.largest_module_bytes < paper_whole.grads
    assert paper.activations >= paper_whole.activations  # the most non-gradient bytes, wherever they are
    assert paper.total < paper_whole.total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_body_extra_counts_the_eager_final_norms_saves(dtype):
    """Per block, Hugging Face's eager RMSNorm saves (beyond its input, which the compiled norm keeps) a
    normalised fp32 value of the hidden states' size and the fp32 rsqrt per token: in bf16 the fp32 copy
    of the input (4 bytes) and the bf16 normalised value (2) replace the 2-byte input; in fp32 the copy is
    the input and the normalised value is added.  Both: 4 bytes per element and 4 per token."""
    from mstfx.tools.compiled_program import eager_body_extra

    cfg = _llama_config(layers=2)
    model = _meta_llama(cfg, checkpointing=False).to(dtype)
    batch, seq = 2, 64
    assert eager_body_extra(model, batch, seq) == batch * seq * (4 * cfg.hidden_size + 4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["standard", "mst", "mst+ckpt"])
@pytest.mark.parametrize("seq", [2048, 8192])
def test_estimate_follows_the_profiler(mode, seq):
    """The simulated peak of the compiled program (plain Inductor for ``standard``) within 10% (or 10 MiB,
    for peaks of a few tens of MiB where Inductor's buffer reuse dominates) of the profiler's peak of the
    real CPU step (HF Llama, hidden 256, intermediate 1024, 4 layers, vocab 2000, fp32); ``-s`` prints
    both (the table of docs/compiled_program.md)."""
    from mstfx.tools.measure import peak_bytes, training_step

    checkpointing, mst = mode.endswith("ckpt"), mode.startswith("mst")
    model, cfg, ids = _profiled_llama(seq, checkpointing)
    # traced as mstfx.compile traces (HF's checkpointed layers whole on transformers >= 5.25)
    backend = mstfx.backend() if mst else "inductor"
    compiled = with_tracing_settings(torch.compile(lambda i: model(input_ids=i, labels=i).loss, backend=backend))
    step = training_step(model, lambda: compiled(ids))
    step()
    measured, _ = peak_bytes(step)
    estimate = _captured_peak(_meta_llama(cfg, checkpointing), seq, mst=mst)
    print(f"{mode} S={seq}: profiler {measured / 2**20:.1f} MiB, simulated {estimate.total / 2**20:.1f} MiB")
    assert abs(estimate.total - measured) <= max(0.10 * measured, 10 * 2**20), (estimate, measured)


@pytest.mark.slow
@pytest.mark.parametrize("freed", [False, True], ids=["grads-kept", "optimizer-in-backward"])
@pytest.mark.parametrize("mode,seq", [("mst", 2048), ("mst+ckpt", 8192)])
def test_per_block_estimate_follows_the_profiler(mode, seq, freed):
    """``--program compiled-per-block``'s peak (:func:`per_block_peak` of the captured program) within 10%
    (or 10 MiB, as above) of the profiler's peak of a real per-block step (``mstfx.compile(model,
    per_block=True)``, Inductor, CPU), with gradients kept until the step and with an SGD step in
    ``register_post_accumulate_grad_hook`` that frees each gradient once accumulated.  The model reads
    only the loss (``mstfx.drop_logits``), as the simulated step does: called directly, a per-block
    model's LM-head graph would return the tokens×vocab logits as well (15.6 MiB alive through the
    forward's end at S = 2048, 62.5 MiB at 8192), which the whole-model check above leaves dead by
    reading ``.loss`` inside the compiled function."""
    from mstfx.tools.compiled_program import eager_body_extra, per_block_peak
    from mstfx.tools.measure import peak_bytes, training_step

    checkpointing = mode.endswith("ckpt")
    model, cfg, ids = _profiled_llama(seq, checkpointing)
    if freed:
        def sgd_in_backward(p):
            with torch.no_grad():
                p.add_(p.grad, alpha=-1e-3)
            p.grad = None

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(sgd_in_backward)
    mstfx.compile(model, per_block=True)
    mstfx.drop_logits(model)
    step = training_step(model, lambda: model(input_ids=ids, labels=ids).loss)
    step()
    measured, _ = peak_bytes(step)
    meta = _meta_llama(cfg, checkpointing)
    whole = _captured_peak(meta, seq)
    modules = [*model.model.layers, model.model.embed_tokens, model.lm_head]
    largest = max(sum(p.numel() * p.element_size() for p in m.parameters()) for m in modules)
    estimate = per_block_peak(whole, largest, freed, eager_body_extra(meta, 1, seq)).total
    print(f"per-block {mode} S={seq} freed={freed}: estimate {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(estimate - measured) <= max(0.10 * measured, 10 * 2**20), (estimate, measured, whole)


@pytest.mark.parametrize("mst", [False, True])
def test_backward_differentiates_the_loss(mst):
    """The captured backward starts from the loss's gradient: it reads the tangent and computes the
    gradient of the whole tokens×vocab logits (plain) or of the LM head weight, never a backward traced
    from zeros (on the meta device ``F.cross_entropy``'s ``aten::nll_loss`` loses its derivative under
    AOT tracing unless the capture routes it through ``nll_loss_forward``)."""
    seq, cfg = 256, _llama_config(layers=1)
    program = capture_program(_meta_llama(cfg, checkpointing=False), torch.zeros(1, seq, dtype=torch.long, device="meta"),
                              mstfx.MstConfig() if mst else None)
    tangents = [n for n in program.backward.graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    assert tangents and all(t.users for t in tangents)
    head_shapes = ((cfg.vocab_size, cfg.hidden_size), (cfg.hidden_size, cfg.vocab_size))
    grad_head = [n for n in program.backward.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
                 and tuple(n.meta["val"].shape) in head_shapes and n.meta["val"].dim() == 2 and n.target is not torch.ops.aten.permute.default]
    assert grad_head, "no LM-head weight gradient computed in the backward"


def _largest_tensor(program) -> tuple[int, str]:
    """Elements of the largest tensor any node of the compiled forward or backward makes (before
    Inductor fuses pointwise ops: an upper bound on its buffers), and that node's name."""
    best = (0, "")
    for gm in (program.forward, program.backward):
        for node in gm.graph.nodes:
            vals = node.meta.get("val")
            for val in vals if isinstance(vals, (tuple, list)) else (vals,):
                if isinstance(val, torch.Tensor) and node.op != "placeholder":
                    best = max(best, (val.numel(), node.name))
    return best


def test_mst_program_never_makes_tokens_by_vocab_or_a_whole_mlp_activation():
    """No tensor of the compiled mst step, forward or backward, is as large as one MLP's
    tokens×intermediate activation (nor, larger still, the tokens×vocab logits); plain Inductor's
    step makes the logits, so the check can fail."""
    cfg = _llama_config(layers=2, hidden=128, inter=512, vocab=1000)
    seq = 1024
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    plain, _ = _largest_tensor(capture_program(_meta_llama(cfg, checkpointing=False), ids))
    assert plain >= seq * cfg.vocab_size
    largest, name = _largest_tensor(
        capture_program(_meta_llama(cfg, checkpointing=False), ids, mstfx.MstConfig(mini_sequences=8))
    )
    assert largest < seq * cfg.intermediate_size, f"{name}: {largest} elements"


def _traced(fn, *shapes):
    """``fn`` traced to aten ops on meta tensors (each node carries its ``meta["val"]``)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*[torch.empty(s, device="meta") for s in shapes])


def test_weight_gradient_summed_over_chunks_is_one_matmul_per_chunk():
    """Inductor's post-grad ``addmm`` pattern: a running sum of chunk products (how a weight used by
    every mini-sequence gets its gradient, often as a transpose of a transpose) is one matmul per chunk
    writing the sum, so no chunk's product has a buffer of its own.  On a GPU Inductor keeps the add
    apart when only pointwise ops read it."""
    from mstfx.tools.compiled_program import graph_peak, with_addmm_fused

    def chunked_weight_grad(c, a0, b0, a1, b1):
        acc = c + (a0 @ b0).permute(1, 0).permute(1, 0)
        return acc + a1 @ b1

    gm = _traced(chunked_weight_grad, (64, 48), *[(64, 32), (32, 48)] * 2)
    fused = with_addmm_fused(gm, "cpu")
    targets = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.aten.addmm.default] * 2
    product = 64 * 48 * 4
    # at each addmm only the running sum and the new sum are alive (unfused: all three products and the sum)
    assert graph_peak(gm, inputs_owned=False, device="cpu").peak == 2 * product

    def sum_then_pointwise(a, b, c):
        return torch.relu(c + a @ b)

    gm = _traced(sum_then_pointwise, (64, 32), (32, 48), (64, 48))
    on_gpu = [n.target for n in with_addmm_fused(gm, "cuda").graph.nodes]
    on_cpu = [n.target for n in with_addmm_fused(gm, "cpu").graph.nodes]
    assert torch.ops.aten.addmm.default not in on_gpu and torch.ops.aten.addmm.default in on_cpu


def test_inline_rule_follows_inductors_thresholds():
    """A pointwise value read by several kernels is stored when its expression is expensive on the CPU
    (``exp``) or reads many buffers; read by one kernel, only past the accumulated-reads threshold,
    which is higher on the CPU than on a GPU."""
    from mstfx.tools.compiled_program import InlineRule

    cpu, gpu = InlineRule.for_device("cpu"), InlineRule.for_device("cuda")
    gm = _traced(lambda x: torch.exp(x) * 2, (4, 4))
    expression = frozenset(n for n in gm.graph.nodes if n.op == "call_function")
    one = frozenset(["x"])
    assert cpu.realised(2, one, expression) and not gpu.realised(2, one, expression)
    assert not cpu.realised(1, one, expression)
    reads = frozenset(f"buf{i}" for i in range(gpu.max_reads + 1))
    assert gpu.realised(1, reads, frozenset()) and not cpu.realised(1, reads, frozenset())
    assert cpu.max_reads > gpu.max_reads and gpu.reads_on_reuse < gpu.max_reads


def test_scatter_computes_its_values_in_its_own_loop():
    """Inductor's scatter lowering loads the values it scatters through their loader (``ir.Scatter``'s
    ``inner_fn``): a pointwise value read only by a scatter has no buffer, and the buffers it reads live
    until the scatter (the embedding's backward reads the first layer's input-norm gradient so)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from mstfx.tools.compiled_program import graph_peak

    def embedding_backward(a, b, idx):
        return torch.full((100, 32), 0.0, device=a.device).index_put((idx,), a * b + 1, accumulate=True)

    args = (torch.empty(64, 32, device="meta"), torch.empty(64, 32, device="meta"), torch.empty(64, dtype=torch.long, device="meta"))
    gm = make_fx(embedding_backward, tracing_mode="fake")(*args)
    assert graph_peak(gm, inputs_owned=False, device="cpu").peak == 100 * 32 * 4  # the scatter's output only


def test_checkpointed_attention_reads_copies_in_the_traced_layout():
    """A checkpointed layer's attention runs inside AOT autograd's rng-state wrappers, which Inductor
    calls with row-major buffers; its flash backward needs q, k and the output in the stride order they
    were traced with (``sdpa_constraint``), so it reads copies.  The copies of q and k are fused into the
    rotary's kernel (made with it, at the start of the layer's backward); without checkpointing the
    attention fixes the layout itself and there are none."""
    from mstfx.tools.compiled_program import with_layout_copies

    cfg = _llama_config()
    ids = torch.zeros(1, 64, dtype=torch.long, device="meta")
    for checkpointing in (True, False):
        program = capture_program(_meta_llama(cfg, checkpointing), ids, mstfx.MstConfig())
        gm = with_layout_copies(program.backward)
        nodes = list(gm.graph.nodes)
        flash = [n for n in nodes if "flash_attention_backward" in str(n.target)]
        copied = [[a.target is torch.ops.aten.clone.default for a in n.args[1:5]] for n in flash]
        if not checkpointing:
            assert not any(any(c) for c in copied)
            continue
        assert flash and all(c == [True, True, False, True] for c in copied)  # q, k, out; v is an mm's view already
        for n in flash:
            q, k = n.args[1], n.args[2]
            assert q.prev is q.args[0] or q.prev.prev is q.args[0]  # made right after the rotary (k's copy follows q's)
            assert nodes.index(k) < nodes.index(n) - 10


def test_meta_capture_of_a_rotary_under_disabled_autocast():
    """transformers 4.57's rotary embedding enters ``torch.autocast("meta", enabled=False)`` on meta
    tensors, which autocast rejects; the capture traces it as the cpu context, only while it traces:
    the program is captured with every region rewritten (the MLPs beside the context in the loop form)
    and Dynamo's autocast handling is the original again afterwards."""
    from torch._dynamo.variables.ctx_manager import AutocastModeVariable

    create = AutocastModeVariable.__dict__["create"]
    torch._dynamo.reset()
    program = capture_program(_meta_llama(_llama_config(layers=1, hidden=64, inter=256, vocab=500), checkpointing=False),
                              torch.zeros(1, 256, dtype=torch.long, device="meta"), mstfx.MstConfig(mini_sequences=4))
    assert AutocastModeVariable.__dict__["create"] is create
    mlp = [d for d in program.report.decisions if d.kind == "mlp"]
    assert len(mlp) == 1 and mlp[0].action == "chunked" and "one loop operator" in mlp[0].detail, mlp
