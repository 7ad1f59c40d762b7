"""The optional flash-attn route of bidirectional_attention (dlm_kernels/ops/attention_flash.py).

flash-attn cannot be installed here (no GPU), so a stand-in module with flash-attn's two entry
points (same signatures, layouts and semantics, computed with plain softmax attention) is put
in ``sys.modules``. What is under test is our side: which calls are routed, how a padding mask
is packed into varlen and scattered back, cache mode, GQA, gradients, and what is not routed.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import dlm_kernels
from dlm_kernels import dispatch, reference
from dlm_kernels.ops import attention_flash
from tests.utils import assert_close, impl

CALLS: list[str] = []


def _dense(q, k, v, softmax_scale, causal):
    # q (B, Sq, H, D), k/v (B, Sk, Hkv, D): non-causal softmax attention, GQA by repetition.
    assert not causal
    g = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(g, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * softmax_scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)


def _fake_flash_attn() -> types.ModuleType:
    mod = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
        CALLS.append("dense")
        assert dropout_p == 0.0
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        return _dense(q, k, v, scale, causal)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               **kw):  # fmt: skip
        CALLS.append("varlen")
        assert cu_seqlens_q.dtype == torch.int32 and isinstance(max_seqlen_q, int)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        outs = []
        for b in range(cu_seqlens_q.numel() - 1):
            q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
            assert q1 - q0 <= max_seqlen_q and k1 - k0 <= max_seqlen_k
            if q1 == q0:
                continue
            outs.append(_dense(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale, causal)[0])
        return torch.cat(outs) if outs else q[:0].clone()

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    monkeypatch.setattr(attention_flash, "DEVICES", ("cuda", "cpu"))
    CALLS.clear()
    yield CALLS


def _qkv(B, Sq, Sk, Hq, Hkv, D, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(B * 1000 + Sq * 10 + Sk)
    mk = lambda S, H: torch.randn(B, S, H, D, generator=g).to(dtype)  # noqa: E731
    return mk(Sq, Hq), mk(Sk, Hkv), mk(Sk, Hkv)


def _compare(q, k, v, **kw):
    """Routed output and gradients against the float64 reference (the 2x rule of utils)."""
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with impl("flash_attn"):
        out = dlm_kernels.bidirectional_attention(*leaves, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    (out.float() * g.float()).sum().backward()
    refs = []
    for dt in (torch.float64, q.dtype):
        rl = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        ro = reference.bidirectional_attention(*rl, upcast=False, **kw)
        (ro.double() * g.double()).sum().backward()
        refs.append((ro, [t.grad for t in rl]))
    (r64, g64), (rlo, glo) = refs
    assert_close("out", r64, out, rlo)
    for name, a, b, c in zip(("dq", "dk", "dv"), g64, glo, leaves):
        assert_close(name, a, c.grad, b)
    return out


def test_dense_and_gqa(fake):
    q, k, v = _qkv(2, 37, 37, 6, 2, 40)
    _compare(q, k, v, softmax_scale=0.3)
    assert fake == ["dense"]


def test_cache_mode(fake):
    q, k, v = _qkv(2, 11, 37, 4, 4, 64)
    _compare(q, k, v)
    assert fake == ["dense"]


def test_padding_is_packed_and_scattered_back(fake):
    # Left and right padding, a hole-free row, and one row that is all padding.
    q, k, v = _qkv(4, 37, 37, 4, 2, 64)
    mask = torch.ones(4, 37, dtype=torch.bool)
    mask[0, :9] = False
    mask[1, 30:] = False
    mask[3] = False
    out = _compare(q, k, v, attention_mask=mask)
    assert fake == ["varlen"]
    assert torch.all(out[~mask] == 0)


def test_padding_with_cache(fake):
    q, k, v = _qkv(2, 8, 29, 4, 1, 64)
    mask = torch.ones(2, 29, dtype=torch.bool)
    mask[0, :5] = False  # a left-padded prompt; the queries (last 8) are all real
    mask[1, 25:] = False  # a right-padded row: 4 of its queries are padding
    out = _compare(q, k, v, attention_mask=mask)
    assert fake == ["varlen"] and torch.all(out[1, 4:] == 0)


def test_varlen_passes_through(fake):
    q, k, v = (t.reshape(-1, t.shape[2], t.shape[3]) for t in _qkv(1, 30, 30, 2, 2, 32))
    cu = torch.tensor([0, 7, 30], dtype=torch.int32)
    _compare(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=23, max_seqlen_k=23)
    assert fake == ["varlen"]


@pytest.mark.parametrize(
    "case", ["block_size", "return_lse", "float32", "head_dim_40"]
)  # fmt: skip
def test_unsupported_cases_run_our_kernels(fake, case):
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    q, k, v = _qkv(1, 19, 19, 2, 2, 44 if case == "head_dim_40" else 32, dtype)
    kw = {"block_size": 4} if case == "block_size" else {}
    kw["return_lse"] = case == "return_lse"
    with impl("flash_attn"):
        dlm_kernels.bidirectional_attention(q, k, v, **kw)
    assert fake == []


def test_missing_flash_attn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ImportError
    monkeypatch.setattr(attention_flash, "DEVICES", ("cuda", "cpu"))
    q, k, v = _qkv(1, 8, 8, 2, 2, 32)
    with impl("flash_attn"), pytest.raises(RuntimeError, match="flash_attn"):
        dlm_kernels.bidirectional_attention(q, k, v)


def test_other_ops_run_as_auto():
    logits = torch.randn(5, 33)
    target = torch.randint(0, 33, (5,))
    with impl("flash_attn"):
        assert dispatch.select(logits.device) == dispatch.select(logits.device, has_cpp=True)
        loss = dlm_kernels.masked_cross_entropy(logits, target)
    assert math.isfinite(float(loss))
