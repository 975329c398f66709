"""Models written outside transformers, found by structure: nanoGPT-, torchtitan- and litgpt-style code.

Each spells the LM head, the loss and grouped-query attention its own way (``flatten(0, 1)``,
``.float()``, ``reduction="sum") / n_tokens``, K/V heads repeated by ``unsqueeze``/``expand``/``reshape``,
``split`` groups or ``repeat_interleave``).  Every case compares the compiled loss and every gradient with
eager on the same weights and reads the report: every MLP and the LM head chunked, attention handed the
unexpanded K/V.  Negative cases (tokens transposed before the loss, a per-token divide, heads repeated
in tile order) must be left unchanged, reported, and still equal eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mstfx
from conftest import assert_same
from mstfx.tools.measure import fresh_code

V, D, N_HEAD, N_KV, S, B = 320, 48, 4, 2, 64, 2
HEAD_DIM = D // N_HEAD
REP = N_HEAD // N_KV


# --------------------------------------------------------------------------------------------------
# nanoGPT: fused qkv, GELU MLP with bias, tied embeddings, learned positions
# --------------------------------------------------------------------------------------------------
class NanoBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.c_attn, self.attn_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.c_fc, self.c_proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, loss_style="view", layers=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(S, D)
        self.h = nn.ModuleList(NanoBlock() for _ in range(layers))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.wte.weight = self.lm_head.weight
        self.loss_style = loss_style

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if self.loss_style == "view":
            z, t = logits.view(-1, logits.size(-1)), targets.view(-1)
        elif self.loss_style == "flatten":
            z, t = logits.flatten(0, 1), targets.flatten(0, 1)
        elif self.loss_style == "reshape_float":
            z, t = logits.reshape(-1, V).float(), targets.reshape(-1)
        elif self.loss_style == "float_flatten_view":  # leading dims flattened through a 1-D detour
            z, t = torch.flatten(logits.float()).view(-1, V), targets.reshape(-1)
        elif self.loss_style == "transposed":  # tokens in (S, B) order: not a flatten of (B, S)
            z, t = logits.transpose(0, 1).reshape(-1, V), targets.transpose(0, 1).reshape(-1)
        else:
            raise ValueError(self.loss_style)
        return F.cross_entropy(z, t, ignore_index=-1)


# --------------------------------------------------------------------------------------------------
# torchtitan: RMSNorm, GQA, SwiGLU w1/w2/w3, untied output, sum over tokens then / n_tokens
# --------------------------------------------------------------------------------------------------
def repeat_heads(x, style):
    """K or V of shape (B, H_kv, S, hd) (``titan``: (B, S, H_kv, hd)) repeated to every query head."""
    if style == "titan":  # torchtitan's repeat_kv, before the transpose to (B, H, S, hd)
        bs, slen, n_kv, hd = x.shape
        return torch.unsqueeze(x, dim=3).expand(bs, slen, n_kv, REP, hd).reshape(bs, slen, n_kv * REP, hd)
    b, n_kv, s, hd = x.shape
    if style == "index":
        return x[:, :, None, :, :].expand(b, n_kv, REP, s, hd).reshape(b, n_kv * REP, s, hd)
    if style == "flatten":
        return x.unsqueeze(2).expand(b, n_kv, REP, s, hd).flatten(1, 2)
    if style == "interleave":
        return x.repeat_interleave(REP, dim=1)
    if style == "tiled":  # K/V head j mod H_kv for query head j: not what enable_gqa computes
        return x[:, None].expand(b, REP, n_kv, s, hd).reshape(b, REP * n_kv, s, hd)
    raise ValueError(style)


class TitanAttention(nn.Module):
    def __init__(self, repeat):
        super().__init__()
        self.wq = nn.Linear(D, N_HEAD * HEAD_DIM, bias=False)
        self.wk = nn.Linear(D, N_KV * HEAD_DIM, bias=False)
        self.wv = nn.Linear(D, N_KV * HEAD_DIM, bias=False)
        self.wo = nn.Linear(N_HEAD * HEAD_DIM, D, bias=False)
        self.repeat = repeat

    def forward(self, x):
        bs, seqlen, _ = x.shape
        xq = self.wq(x).view(bs, seqlen, -1, HEAD_DIM)
        xk = self.wk(x).view(bs, seqlen, -1, HEAD_DIM)
        xv = self.wv(x).view(bs, seqlen, -1, HEAD_DIM)
        if self.repeat == "titan":
            keys, values = repeat_heads(xk, "titan").transpose(1, 2), repeat_heads(xv, "titan").transpose(1, 2)
        else:
            keys, values = repeat_heads(xk.transpose(1, 2), self.repeat), repeat_heads(xv.transpose(1, 2), self.repeat)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), keys, values, is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(bs, seqlen, -1))


class TitanBlock(nn.Module):
    def __init__(self, repeat):
        super().__init__()
        self.attention, self.attention_norm, self.ffn_norm = TitanAttention(repeat), nn.RMSNorm(D), nn.RMSNorm(D)
        self.w1, self.w3 = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, 3 * D, bias=False)
        self.w2 = nn.Linear(3 * D, D, bias=False)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        f = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(f)) * self.w3(f))


class TitanLlama(nn.Module):
    def __init__(self, repeat="titan", layers=2, dtype=torch.float32):
        super().__init__()
        self.tok_embeddings = nn.Embedding(V, D)
        self.layers = nn.ModuleList(TitanBlock(repeat) for _ in range(layers))
        self.norm, self.output = nn.RMSNorm(D), nn.Linear(D, V, bias=False)
        self.to(dtype)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def titan_loss(model, tokens, labels, n_tokens, style="sum"):
    pred = model(tokens)
    if style == "sum":
        return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum") / n_tokens
    if style == "sum_to":
        loss = F.cross_entropy(pred.reshape(-1, V).to(torch.float32), labels.reshape(-1), reduction="sum")
        return loss / (labels != -100).sum()
    if style == "none_per_token":  # a per-token divide: the loss must stay per token, not chunked
        per_token = F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="none")
        return (per_token / n_tokens).sum()
    if style == "sum_by_vector":  # a summed loss divided by a vector: exact after the chunked sum too
        loss = F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum")
        return (loss / n_tokens).mean()
    raise ValueError(style)


# --------------------------------------------------------------------------------------------------
# litgpt: one qkv projection per query group, K/V groups of size 1 expanded, LLaMAMLP fc_1/fc_2/proj
# --------------------------------------------------------------------------------------------------
class LitBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_1, self.norm_2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.attn = nn.Linear(D, (N_HEAD + 2 * N_KV) * HEAD_DIM, bias=False)
        self.proj = nn.Linear(N_HEAD * HEAD_DIM, D, bias=False)
        self.fc_1, self.fc_2 = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.mlp_proj = nn.Linear(2 * D, D, bias=False)

    def forward(self, x):
        b, t, _ = x.size()
        qkv = self.attn(self.norm_1(x)).view(b, t, N_KV, REP + 2, HEAD_DIM).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.split((REP, 1, 1), dim=2)  # (B, groups, REP | 1 | 1, T, hd)
        k, v = k.expand(b, N_KV, REP, t, HEAD_DIM), v.expand(b, N_KV, REP, t, HEAD_DIM)
        q, k, v = (z.reshape(b, -1, t, HEAD_DIM) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        h = self.norm_2(x)
        return x + self.mlp_proj(F.silu(self.fc_1(h)) * self.fc_2(h))


class LitGPT(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.h = nn.ModuleList(LitBlock() for _ in range(layers))
        self.ln_f, self.lm_head = nn.RMSNorm(D), nn.Linear(D, V, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _batch(ignore=-100):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[1, -5:] = ignore
    return ids, labels


def _step(model, fn, args, backend=None):
    model.zero_grad(set_to_none=True)
    if backend is not None:
        fn = torch.compile(fresh_code(fn), backend=backend)
    loss = fn(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, fn, args, compiler="aot_eager", **options):
    ref = _step(model, fn, args)
    backend = mstfx.backend(compiler=compiler, mini_sequences={"lm_head": 4}, **options)
    got = _step(model, fn, args, backend)
    return ref, got, [d for r in backend.reports for d in r.decisions]


def _of(decisions, kind, action=None):
    return [d for d in decisions if d.kind == kind and (action is None or d.action == action)]


def _assert_all_chunked(decisions, mlps, attention_gqa=True):
    lm = _of(decisions, "lm_head")
    assert [d.action for d in lm] == ["chunked"] and lm[0].chunks == 4, decisions
    assert len(_of(decisions, "mlp", "chunked")) == mlps, decisions
    attn = _of(decisions, "attention")
    assert len(attn) == mlps  # one attention per layer, one MLP per layer
    if attention_gqa:
        assert all(d.action == "rewritten" and "K/V unexpanded" in d.detail for d in attn), attn


# --------------------------------------------------------------------------------------------------
# nanoGPT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_style", ["view", "flatten", "reshape_float", "float_flatten_view"])
def test_nanogpt(loss_style):
    torch.manual_seed(0)
    model = NanoGPT(loss_style)
    ids, labels = _batch(ignore=-1)
    ref, got, decisions = _run(model, lambda i, t: model(i, t), (ids, labels))
    assert_same(ref, got)
    _assert_all_chunked(decisions, mlps=2, attention_gqa=False)
    assert "tied weight" in _of(decisions, "lm_head")[0].detail


def test_nanogpt_transposed_tokens_left_unchanged():
    """``transpose(0, 1)`` before the reshape puts tokens in (S, B) order: not a flatten of the
    hidden states' (B, S), so the LM head is not chunked (and the result still equals eager)."""
    torch.manual_seed(0)
    model = NanoGPT("transposed")
    ids, labels = _batch(ignore=-1)
    ref, got, decisions = _run(model, lambda i, t: model(i, t), (ids, labels))
    assert_same(ref, got)
    (lm,) = _of(decisions, "lm_head")
    assert lm.action == "skipped" and "transpose" in lm.reason and "reorders the logits" in lm.reason, lm
    assert len(_of(decisions, "mlp", "chunked")) == 2


@pytest.mark.parametrize(
    "reshape, why",
    [
        (lambda z: z.view(-1, V // 2), "not [tokens, vocab"),  # rows are half-vocab pieces, not tokens
        (lambda z: z.permute(1, 0, 2).flatten(0, 1), "reorders the logits"),
        (lambda z: torch.flatten(z).view(-1, V).flip(0), "reorders the logits"),
    ],
    ids=["vocab_split", "permuted", "flipped"],
)
def test_lm_head_reshape_not_a_token_flatten(reshape, why):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(B, 8, D, generator=g, requires_grad=True), torch.randn(V, D, generator=g, requires_grad=True)
    rows = reshape(torch.empty(B, 8, V)).shape[0]
    t = torch.randint(0, V // 2, (rows,), generator=g)
    fn = lambda h, w, t: F.cross_entropy(reshape(F.linear(h, w)), t)  # noqa: E731
    backend = mstfx.backend(compiler="aot_eager", mini_sequences={"lm_head": 2})
    got = torch.compile(fresh_code(fn), backend=backend)(h, w, t)
    torch.testing.assert_close(got, fn(h, w, t))
    (lm,) = _of([d for r in backend.reports for d in r.decisions], "lm_head")
    assert lm.action == "skipped" and why in lm.reason, lm


# --------------------------------------------------------------------------------------------------
# torchtitan
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("repeat", ["titan", "index", "flatten", "interleave"])
def test_titan_llama_gqa_spellings(repeat):
    torch.manual_seed(0)
    model = TitanLlama(repeat)
    ids, labels = _batch()
    n = int((labels != -100).sum())
    ref, got, decisions = _run(model, lambda i, l: titan_loss(model, i, l, n), (ids, labels))
    assert_same(ref, got)
    _assert_all_chunked(decisions, mlps=2)
    assert all(f"{REP} query heads per K/V head" in d.detail for d in _of(decisions, "attention"))
    assert "then ÷" in _of(decisions, "lm_head")[0].detail


@pytest.mark.parametrize("n_tokens", ["tensor", "count_in_graph"])
def test_titan_llama_sum_over_tensor_count(n_tokens):
    torch.manual_seed(0)
    model = TitanLlama()
    ids, labels = _batch()
    if n_tokens == "tensor":
        n = (labels != -100).sum()
        fn = lambda i, l, c: titan_loss(model, i, l, c)  # noqa: E731
        args = (ids, labels, n)
    else:
        fn = lambda i, l: titan_loss(model, i, l, None, style="sum_to")  # noqa: E731
        args = (ids, labels)
    ref, got, decisions = _run(model, fn, args)
    assert_same(ref, got)
    _assert_all_chunked(decisions, mlps=2)


def test_titan_llama_dynamic_shapes():
    """Under ``dynamic=True`` the repeat is read through symbolic sizes; a second length reuses the graph."""
    torch.manual_seed(0)
    model = TitanLlama("flatten", layers=1)
    ids, labels = _batch()
    fn = lambda i, l: titan_loss(model, i, l, (l != -100).sum())  # noqa: E731
    ref = _step(model, fn, (ids, labels))
    backend = mstfx.backend(compiler="aot_eager", mini_sequences={"lm_head": 4})
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(fresh_code(fn), backend=backend, dynamic=True)
    loss = compiled(ids, labels)
    loss.backward()
    assert_same(ref, (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(compiled(ids[:, :40], labels[:, :40]), fn(ids[:, :40], labels[:, :40]))
    _assert_all_chunked(backend.reports[-1].decisions, mlps=1)  # the graph with symbolic sizes


def test_repeat_along_sequence_not_gqa():
    """``repeat_interleave`` along the sequence (not the heads) is no head repeat: left as written."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N_KV, 16, HEAD_DIM, generator=g) for _ in range(3))
    fn = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    )
    backend = mstfx.backend(compiler="aot_eager")
    got = torch.compile(fresh_code(fn), backend=backend)(q, k, v)
    torch.testing.assert_close(got, fn(q, k, v))
    (attn,) = _of([d for r in backend.reports for d in r.decisions], "attention")
    assert attn.action == "skipped" and "nothing to do" in attn.reason, attn


def test_titan_llama_inductor():
    torch.manual_seed(0)
    model = TitanLlama("titan", layers=1)
    ids, labels = _batch()
    n = int((labels != -100).sum())
    ref, got, decisions = _run(model, lambda i, l: titan_loss(model, i, l, n), (ids, labels), compiler="inductor")
    assert_same(ref, got, rtol=1e-4, atol=2e-5)
    _assert_all_chunked(decisions, mlps=1)


def test_per_token_divide_left_unchanged():
    """``reduction="none"`` divided by a per-token tensor: the loss is not a scalar sum, so the LM head
    is left whole and reported; the compiled step still equals eager."""
    torch.manual_seed(0)
    model = TitanLlama(layers=1)
    ids, labels = _batch()
    w = torch.rand(B * S) + 0.5
    ref, got, decisions = _run(model, lambda i, l, c: titan_loss(model, i, l, c, "none_per_token"), (ids, labels, w))
    assert_same(ref, got)
    (lm,) = _of(decisions, "lm_head")
    assert lm.action == "skipped" and "reduction='none'" in lm.reason, lm


def test_sum_divided_by_vector_kept_as_written():
    """A summed loss divided by a non-scalar: the divide is left as written after the chunked sum
    (exact), and the report names it."""
    torch.manual_seed(0)
    model = TitanLlama(layers=1)
    ids, labels = _batch()
    w = torch.rand(3) + 0.5
    ref, got, decisions = _run(model, lambda i, l, c: titan_loss(model, i, l, c, "sum_by_vector"), (ids, labels, w))
    assert_same(ref, got)
    (lm,) = _of(decisions, "lm_head")
    assert lm.action == "chunked" and "non-scalar" in lm.detail and "left as written" in lm.detail, lm


def test_tiled_head_repeat_left_expanded():
    """K/V repeated in tile order (query head j reads K/V head j mod H_kv) is not what ``enable_gqa``
    computes: K/V stay expanded, the report says why, and the result equals eager."""
    torch.manual_seed(0)
    model = TitanLlama("tiled", layers=1)
    ids, labels = _batch()
    n = int((labels != -100).sum())
    ref, got, decisions = _run(model, lambda i, l: titan_loss(model, i, l, n), (ids, labels))
    assert_same(ref, got)
    (attn,) = _of(decisions, "attention")
    assert attn.action == "skipped" and "tile order" in attn.reason, attn


# --------------------------------------------------------------------------------------------------
# litgpt
# --------------------------------------------------------------------------------------------------
def test_litgpt():
    torch.manual_seed(0)
    model = LitGPT()
    ids, labels = _batch()
    ref, got, decisions = _run(model, lambda i, t: model(i, t), (ids, labels))
    assert_same(ref, got)
    # the fused qkv projection is wider than its input but is no MLP: skipped, never chunked
    assert len(_of(decisions, "mlp", "chunked")) == 2
    _assert_all_chunked(decisions, mlps=2)
