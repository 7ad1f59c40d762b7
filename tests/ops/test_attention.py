"""bidirectional_attention: the Triton kernels and the SDPA fallback against the float64
written-out reference, for the output, the lse and every gradient (dq, dk, dv)."""

import math

import pytest
import torch

import dlm_kernels
from dlm_kernels import dispatch, reference
from tests.utils import assert_close, device, ids, impl, skip_unless_available

DEV = device()
# "reference" is the SDPA fallback the CPU path runs; "triton" runs in the interpreter on CPU.
PATHS = ["reference", "triton"]


@pytest.fixture(autouse=True)
def _one_config(monkeypatch):
    # On CUDA, autotuning would compile every candidate of every flag set these tests touch
    # (minutes); the candidates are proven one by one in test_every_autotune_candidate instead.
    # The interpreter never autotunes. Tests that need the autotuner undo this.
    monkeypatch.setenv("DLM_KERNELS_AUTOTUNE", "0")


def _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, varlen_total=None):
    if varlen_total is not None:  # packed layout: (total, H, D)
        tq, tk = varlen_total
        shapes = [(tq, Hq, D), (tk, Hkv, D), (tk, Hkv, D)]
    else:
        shapes = [(B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, D)]
    return [torch.randn(s, device=DEV).to(dtype) for s in shapes]


def _run(path, q, k, v, g, glse, deterministic=True, **kw):
    """out, lse and the gradients of sum(out * g) + sum(finite lse * glse) of one path
    (deterministic: the op's argument, for the kernels' backward)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if path == "float64":
        out, lse = reference.bidirectional_attention(
            *(t.double() for t in leaves), return_lse=True, **kw
        )
    elif path == "lowp":  # the reference with its matmuls in the input dtype
        out, lse = reference.bidirectional_attention(*leaves, return_lse=True, upcast=False, **kw)
    else:
        with impl(path):
            out, lse = dlm_kernels.bidirectional_attention(
                *leaves, return_lse=True, deterministic=deterministic, **kw
            )
    # -inf (rows that see nothing) must not turn the loss into NaN: those entries are dropped.
    lse_term = lse.masked_fill(torch.isinf(lse), 0.0) * glse.to(lse.dtype)
    ((out * g.to(out.dtype)).sum() + lse_term.sum()).backward()
    return out.detach(), lse.detach(), *(t.grad for t in leaves)


def _check(path, q, k, v, deterministic=True, **kw):
    """Compare one path with the float64 reference under the 2x-low-precision rule."""
    if path == "triton":
        skip_unless_available("triton")
    out_shape = q.shape
    g = torch.randn(out_shape, device=DEV, dtype=torch.float64)
    varlen = kw.get("cu_seqlens_q") is not None
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    glse = torch.randn(lse_shape, device=DEV, dtype=torch.float64)
    ref = _run("float64", q, k, v, g, glse, **kw)
    low = _run("lowp", q, k, v, g, glse, **kw)
    got = _run(path, q, k, v, g, glse, deterministic, **kw)
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    assert got[1].dtype == torch.float32 and got[1].shape == lse_shape
    for name, r, lo, o in zip(("out", "lse", "dq", "dk", "dv"), ref, low, got):
        assert o.dtype == (torch.float32 if name == "lse" else q.dtype)
        assert_close(f"{path} {name}", r, o, lo)
    return got


def _padding_mask(B, S):
    """Row 0 left-padded, row 1 right-padded with an interior hole, last row entirely padding."""
    idx = torch.arange(S, device=DEV)
    mask = torch.ones(B, S, dtype=torch.bool, device=DEV)
    mask[0] = idx >= S // 3
    if B > 1:
        mask[1] = (idx < S - 7) & (idx != 5)
    if B > 2:
        mask[-1] = False
    return mask


# ------------------------------------------------------------------ reference vs naive formula
def test_reference_matches_naive_formula():
    # softmax(QK^T / sqrt(D)) V one query at a time, with a mask, a block size and Sq < Sk.
    B, Sq, Sk, H, D, bs = 2, 5, 9, 2, 7, 4
    q, k, v = (t.double() for t in _inputs(B, Sq, Sk, H, H, D, torch.float64))
    mask = torch.rand(B, Sk, device=DEV) < 0.7
    mask[:, -Sq:] = True
    mask[1, -2] = False  # one padding query
    out, lse = reference.bidirectional_attention(
        q, k, v, attention_mask=mask, block_size=bs, return_lse=True
    )
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                p = Sk - Sq + i
                keys = [j for j in range(Sk) if mask[b, j] and j // bs <= p // bs]
                if not mask[b, p] or not keys:
                    assert out[b, i, h].abs().max() == 0 and lse[b, h, i] == -math.inf
                    continue
                s = [float(q[b, i, h] @ k[b, j, h]) / math.sqrt(D) for j in keys]
                z = sum(math.exp(x) for x in s)
                o = sum(math.exp(x) / z * v[b, j, h] for x, j in zip(s, keys))
                torch.testing.assert_close(out[b, i, h], o, rtol=1e-12, atol=1e-12)
                assert abs(lse[b, h, i].item() - math.log(z)) < 1e-12


def test_reference_matches_sdpa_unmasked():
    q, k, v = _inputs(2, 37, 37, 6, 2, 40, torch.float64)
    out = reference.bidirectional_attention(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, sdpa)


# ------------------------------------------------------------------ every feature, each path
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "B,S,Hq,Hkv,D,dtype",
    [
        pytest.param(*c, id=ids(B=c[0], S=c[1], H=c[2], Hkv=c[3], D=c[4], d=c[5]))
        for c in [
            (2, 37, 2, 2, 40, torch.float32),
            (1, 37, 2, 2, 128, torch.bfloat16),
            (2, 37, 3, 3, 64, torch.float16),
            (1, 131, 1, 1, 64, torch.float32),
        ]
    ],
)
def test_plain(path, B, S, Hq, Hkv, D, dtype):
    _check(path, *_inputs(B, S, S, Hq, Hkv, D, dtype))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: ids(d=d))
def test_padding_mask(path, dtype):
    B, S = 3, 37
    q, k, v = _inputs(B, S, S, 2, 2, 40, dtype)
    mask = _padding_mask(B, S)
    out, lse, dq, dk, dv = _check(path, q, k, v, attention_mask=mask)
    # Padding query rows: exactly zero output and gradient, lse -inf; padding keys: zero dk, dv.
    assert torch.all(out[~mask] == 0) and torch.all(dq[~mask] == 0)
    assert torch.all(torch.isinf(lse.transpose(1, 2)[~mask]))
    assert torch.all(dk[~mask] == 0) and torch.all(dv[~mask] == 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block_size", [1, 12, 40], ids=lambda b: f"bs{b}")
def test_block_causal(path, block_size):
    # 12 is aligned with neither the query nor the key tiles; 1 is plain causal attention;
    # 40 > S is one block (bidirectional).
    _check(path, *_inputs(2, 37, 37, 3, 1, 40, torch.float32), block_size=block_size)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: ids(d=d))
def test_cache_mode_with_mask_and_blocks(path, dtype):
    # The current block of 13 queries against 37 keys (24 cached), left padding, GQA ratio 3.
    B, Sq, Sk = 3, 13, 37
    q, k, v = _inputs(B, Sq, Sk, 6, 2, 40, dtype)
    mask = _padding_mask(B, Sk)
    _check(path, q, k, v, attention_mask=mask, block_size=10)
    _check(path, q, k, v, attention_mask=mask)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [0.31, -0.2, 0.0], ids=["pos", "neg", "zero"])
def test_softmax_scale(path, scale):
    # A positive scale takes the forward's folded form (the row max on raw scores, scaled once),
    # a scale <= 0 the general one; padding and blocks put -inf scores beside the scale.
    q, k, v = _inputs(2, 37, 37, 3, 1, 40, torch.float32)
    _check(path, q, k, v, attention_mask=_padding_mask(2, 37), block_size=12, softmax_scale=scale)


@pytest.mark.parametrize("path", PATHS)
def test_gqa_ratio_3_with_mask(path):
    q, k, v = _inputs(2, 37, 37, 6, 2, 40, torch.float32)
    _check(path, q, k, v, attention_mask=_padding_mask(2, 37), block_size=16)


@pytest.mark.parametrize("path", PATHS)
def test_long_odd_sequence_all_features(path):
    # S = 131: several tiles, block edges (24) crossing tile edges, padding on both ends.
    q, k, v = _inputs(2, 131, 131, 3, 1, 40, torch.bfloat16)
    mask = _padding_mask(2, 131)
    _check(path, q, k, v, attention_mask=mask, block_size=24)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cache", [False, True], ids=["self", "cached"])
def test_varlen(path, cache):
    lens_q = [10, 1, 0, 26]
    lens_k = [17, 3, 4, 30] if cache else lens_q
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _inputs(0, 0, 0, 6, 2, 40, torch.float32, (sum(lens_q), sum(lens_k)))
    kw = dict(cu_seqlens_q=cu_q.to(DEV), cu_seqlens_k=cu_k.to(DEV))
    # max_seqlen larger than needed only launches idle programs.
    kw.update(max_seqlen_q=max(lens_q) + 5, max_seqlen_k=max(lens_k))
    _check(path, q, k, v, block_size=8 if cache else None, **kw)


@pytest.mark.parametrize("path", PATHS)
def test_varlen_equals_padded_batch(path):
    # A packed batch gives what each sequence gives alone.
    if path == "triton":
        skip_unless_available("triton")
    q, k, v = _inputs(0, 0, 0, 2, 2, 40, torch.float32, (30, 30))
    cu = torch.tensor([0, 7, 30], dtype=torch.int32, device=DEV)
    with impl(path):
        packed = dlm_kernels.bidirectional_attention(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=23, max_seqlen_k=23
        )
        for a, b in ((0, 7), (7, 30)):
            alone = dlm_kernels.bidirectional_attention(q[None, a:b], k[None, a:b], v[None, a:b])
            torch.testing.assert_close(packed[a:b], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    ["cache-mask-blocks-gqa3", "bf16-long-mask-blocks", "varlen-cached", "fp16-plain",
     "fp32-very-negative-lse", "fp16-negative-lse-padding"],
)  # fmt: skip
def test_atomic_dq_backward(case):
    # deterministic=False: dQ from the dK/dV kernel by float32 atomics, no dQ kernel. Every
    # feature that changes which (key tile, query tile) pairs meet, each against float64.
    skip_unless_available("triton")
    if case == "cache-mask-blocks-gqa3":  # Sq 37 < Sk 53: cached queries, rows 0 and 1 padded
        q, k, v = _inputs(2, 37, 53, 6, 2, 40, torch.float32)
        kw = dict(attention_mask=_padding_mask(2, 53), block_size=10)
    elif case == "bf16-long-mask-blocks":  # several tiles, blocks of 24 crossing tile edges
        q, k, v = _inputs(2, 131, 131, 3, 1, 40, torch.bfloat16)
        kw = dict(attention_mask=_padding_mask(2, 131), block_size=24)
    elif case == "varlen-cached":  # an empty sequence and len_q < len_k
        lens_q, lens_k = [10, 1, 0, 26], [17, 3, 4, 30]
        cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32,
                                   device=DEV) for n in (lens_q, lens_k))  # fmt: skip
        q, k, v = _inputs(0, 0, 0, 6, 2, 40, torch.float32, (sum(lens_q), sum(lens_k)))
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=26, max_seqlen_k=30,
                  block_size=8)  # fmt: skip
    elif case == "fp32-very-negative-lse":
        # Every score near -130 (lse below -88) and out-of-range key columns in the last
        # tile (S 37): their p = exp(-lse) overflowed to inf and its dS K put NaN in dQ (found
        # by a fuzzer; the deterministic path was right).
        q, k, v = _inputs(2, 37, 37, 2, 1, 40, torch.float32)
        q, k = q.abs() + 1.0, k.abs() + 1.0
        kw = dict(softmax_scale=-1.0)
    elif case == "fp16-negative-lse-padding":
        # One real key per row, scored near -12 for row 3: exp(12) is past fp16's range once p
        # is cast for the matmuls; padding keys alone (S 32, no out-of-range columns).
        q, k, v = _inputs(1, 32, 32, 1, 1, 64, torch.float16)
        k[0, 3] = -2.0 * q[0, 3]
        kw = dict(attention_mask=torch.zeros(1, 32, dtype=torch.bool, device=DEV))
        kw["attention_mask"][0, 3] = True
    else:
        q, k, v = _inputs(1, 45, 45, 2, 2, 64, torch.float16)
        kw = {}
    _check("triton", q, k, v, deterministic=False, **kw)


@pytest.mark.parametrize("path", PATHS)
def test_strided_inputs(path):
    # q, k, v as (B, H, S, D).transpose(1, 2) views and a mask sliced out of a wider one.
    B, S, H, D = 2, 23, 2, 40
    q, k, v = (torch.randn(B, H, S, D, device=DEV).transpose(1, 2) for _ in range(3))
    wide = torch.rand(B, S + 9, device=DEV) < 0.8
    mask = wide[:, 4 : 4 + S]
    assert not q.is_contiguous() and not mask.is_contiguous()
    _check(path, q, k, v, attention_mask=mask, block_size=7)


@pytest.mark.parametrize("path", [*PATHS, "float64"])
def test_garbage_in_padding_is_never_read(path):
    # NaN stored at padding positions of q, k, v (a KV cache allocated with torch.empty) must
    # not reach the output or the gradients, on every path: "reference" is the CPU fallback
    # (SDPA), "float64" the written-out reference.
    if path == "triton":
        skip_unless_available("triton")
    B, S = 2, 37
    q, k, v = _inputs(B, S, S, 2, 2, 40, torch.float32)
    mask = _padding_mask(B, S)
    dirty = [t.masked_fill(~mask[:, :, None, None], float("nan")) for t in (q, k, v)]
    clean = [t.masked_fill(~mask[:, :, None, None], 0.0) for t in (q, k, v)]
    _same_with_garbage(path, dirty, clean, mask)
    # Cached queries (Sq 20 < Sk 37): the queries' own padding is at key positions 17..36.
    _same_with_garbage(path, [dirty[0][:, 17:], *dirty[1:]], [clean[0][:, 17:], *clean[1:]], mask)


def _same_with_garbage(path, dirty, clean, mask):
    g = torch.randn_like(dirty[0])
    results = []
    for qkv in (dirty, clean):
        leaves = [t.clone().requires_grad_(True) for t in qkv]
        if path == "float64":
            out = reference.bidirectional_attention(*leaves, attention_mask=mask, block_size=8)
        else:
            with impl(path):
                out = dlm_kernels.bidirectional_attention(
                    *leaves, attention_mask=mask, block_size=8
                )
        (out * g).sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_all_padding_batch_and_no_grad_path():
    # Every row padding: zeros everywhere, no NaN; and the forward alone under no_grad.
    q, k, v = _inputs(2, 37, 37, 2, 2, 40, torch.float32)
    mask = torch.zeros(2, 37, dtype=torch.bool, device=DEV)
    for path in PATHS:
        if path == "triton":
            skip_unless_available("triton")
        with impl(path), torch.no_grad():
            out, lse = dlm_kernels.bidirectional_attention(
                q, k, v, attention_mask=mask, return_lse=True
            )
        assert torch.all(out == 0) and torch.all(lse == -math.inf)


def test_fake_and_autograd_registration():
    # opcheck runs the custom op under FakeTensor, autograd and schema checks.
    skip_unless_available("triton")
    from dlm_kernels.ops import attention

    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 19, 19, 2, 1, 16, torch.float32))
    mask = _padding_mask(1, 19)
    for deterministic in (True, False):
        args = (q, k, v, mask, None, None, 19, 19, 8, 0.25, deterministic)
        torch.library.opcheck(
            attention._attn_fwd,
            args,
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


# ------------------------------------------------------------------ bad input
def _bad(match, *args, exc=ValueError, **kw):
    with pytest.raises(exc, match=match):
        dlm_kernels.bidirectional_attention(*args, **kw)


def test_bad_inputs(monkeypatch):
    q, k, v = _inputs(2, 8, 8, 4, 2, 16, torch.float32)
    _bad("q must be float16", q.long(), k, v, exc=TypeError)
    _bad("share one dtype", q, k.half(), v, exc=TypeError)
    _bad(r"q must have shape \(B, S, H, D\)", q[0], k, v)
    _bad("k and v must have the same shape", q, k, v[:, :4])
    _bad("same head dim", q, k[..., :8], v[..., :8])
    _bad("head dim must be in", *_inputs(1, 2, 2, 1, 1, 257, torch.float32))
    k3 = torch.randn(2, 8, 3, 16, device=DEV)
    _bad("multiple of the number of key/value heads", q, k3, k3)
    _bad("multiple of the number of key/value heads", q[:, :, :3], k, v)
    _bad("same batch size", q, k[:1], v[:1])
    _bad("must be <= Sk", q, k[:, :4], v[:, :4])
    mask = torch.ones(2, 8, dtype=torch.bool, device=DEV)
    _bad("attention_mask must be a bool", q, k, v, attention_mask=mask.int(), exc=TypeError)
    _bad(r"attention_mask must have shape \(B, Sk\)", q, k, v, attention_mask=mask[:, :7])
    _bad("block_size must be >= 1", q, k, v, block_size=0)
    _bad("deterministic must be a bool", q, k, v, deterministic=1, exc=TypeError)
    _bad("block_size must be an int", q, k, v, block_size=2.0, exc=TypeError)
    _bad("softmax_scale must be finite", q, k, v, softmax_scale=float("nan"))
    _bad("softmax_scale must be a float", q, k, v, softmax_scale="0.1", exc=TypeError)
    _bad("softmax_scale must be a float", q, k, v, softmax_scale=True, exc=TypeError)
    import numpy as np  # a numpy scale is a number like any other (as numpy ints for block_size)

    with impl("reference"):
        a = dlm_kernels.bidirectional_attention(q, k, v, softmax_scale=np.float32(0.25))
        b = dlm_kernels.bidirectional_attention(q, k, v, softmax_scale=0.25)
    assert torch.equal(a, b)
    _bad("max_seqlen_q / max_seqlen_k apply only", q, k, v, max_seqlen_q=8)
    # varlen
    qp, kp, vp = q.reshape(16, 4, 16), k.reshape(16, 2, 16), v.reshape(16, 2, 16)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device=DEV)
    ok = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=11, max_seqlen_k=11)
    dlm_kernels.bidirectional_attention(qp, kp, vp, **ok)  # the valid call
    _bad(r"\(total, H, D\)", q, k, v, **ok)
    _bad("given together", qp, kp, vp, **{**ok, "cu_seqlens_k": None})
    _bad("int32", qp, kp, vp, **{**ok, "cu_seqlens_q": cu.long()}, exc=TypeError)
    _bad("are required with cu_seqlens", qp, kp, vp, **{**ok, "max_seqlen_q": None})
    # The values of cu_seqlens are read on the host: always on CPU, on CUDA only when asked
    # (a read would sync the stream).
    monkeypatch.setenv("DLM_KERNELS_CHECK", "1")
    _bad(
        "end at 16",
        qp,
        kp,
        vp,
        **{**ok, "cu_seqlens_q": torch.tensor([0, 5, 15], device=DEV).int()},
    )
    _bad(
        "never decrease",
        qp,
        kp,
        vp,
        **{
            **ok,
            "cu_seqlens_k": torch.tensor([0, 9, 5, 16], device=DEV).int(),
            "cu_seqlens_q": torch.tensor([0, 5, 9, 16], device=DEV).int(),
        },
    )
    _bad(
        "same length", qp, kp, vp, **{**ok, "cu_seqlens_k": torch.tensor([0, 16], device=DEV).int()}
    )
    _bad("a sequence has 11", qp, kp, vp, **{**ok, "max_seqlen_q": 10})
    _bad("cannot be combined", qp, kp, vp, attention_mask=mask, **ok)
    short = torch.tensor([0, 8, 16], dtype=torch.int32, device=DEV)
    _bad("len_q <= len_k", qp, kp[:8 + 3], vp[:8 + 3], block_size=4, cu_seqlens_q=short,
         cu_seqlens_k=torch.tensor([0, 3, 11], dtype=torch.int32, device=DEV), max_seqlen_q=8,
         max_seqlen_k=8)  # fmt: skip


# ------------------------------------------------------------------ tile configs and autotuning
def _all_candidates(kind):
    """Every triton.Config of every (dtype, head dim) list of one kernel."""
    from dlm_kernels.ops import attention

    configs = []
    for k, is_fp32, row_bytes in attention._CANDIDATES:
        if k == kind:
            dtype = torch.float32 if is_fp32 else torch.bfloat16
            configs += attention._autotune_configs(kind, row_bytes // dtype.itemsize, dtype)
    return configs


def _tile(cfg):
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]


class _Spy:
    """Stands in for a @triton.jit kernel and records the (BLOCK_M, BLOCK_N) it launched with."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.log.append((kw["BLOCK_M"], kw["BLOCK_N"]))
            return launch(*args, **kw)

        return run


def _spy_kernels(monkeypatch):
    from dlm_kernels.ops import attention

    logs = {"fwd": [], "dkdv": [], "dq": []}
    names = {
        "fwd": "_attn_fwd_kernel",
        "dkdv": "_attn_bwd_dkdv_kernel",
        "dq": "_attn_bwd_dq_kernel",
    }
    for kind, name in names.items():
        monkeypatch.setattr(attention, name, _Spy(getattr(attention, name), logs[kind]))
    return logs


def test_autotune_config_lists():
    # Each list starts with the untuned default, holds no duplicate, stays short (a compile per
    # candidate) and only has tiles tl.dot accepts (powers of two >= 16).
    skip_unless_available("triton")
    from dlm_kernels.ops import attention

    for kind, is_fp32, row_bytes in attention._CANDIDATES:
        dtype = torch.float32 if is_fp32 else torch.bfloat16
        for D in (row_bytes // dtype.itemsize, row_bytes // dtype.itemsize // 2 + 1):
            configs = attention._autotune_configs(kind, D, dtype)
            tiles = [(*_tile(c), c.num_warps, c.num_stages) for c in configs]
            assert tiles[0] == attention._gpu_tiles(D, dtype, kind), (kind, D, dtype)
            assert len(set(tiles)) == len(tiles) <= 8, (kind, D, dtype)
            for bm, bn, _, _ in tiles:
                assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0


def test_one_config_without_autotuning(monkeypatch):
    # Interpreter or DLM_KERNELS_AUTOTUNE=0: every kernel runs _tiles' config and nothing else.
    skip_unless_available("triton")
    from dlm_kernels.ops import attention

    q, k, v = _inputs(1, 19, 23, 2, 1, 40, torch.float32)
    logs = _spy_kernels(monkeypatch)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    with impl("triton"):
        dlm_kernels.bidirectional_attention(*leaves, block_size=4).sum().backward()
    for kind, log in logs.items():
        assert log == [attention._tiles(40, torch.float32, kind)[:2]], kind
    assert not attention._autotune_on()


def test_every_autotune_candidate(monkeypatch):
    # Each candidate config is forced in turn (fwd, dK/dV and dQ configs advance together) on a
    # case with every edge: cached queries (Sq 37 < Sk 171: several key tiles even at 128, a
    # whole one among them), left/right padding and a hole, block-causal blocks (10) unaligned
    # with every tile, GQA 3, D 40 (padded to 64). Under the
    # interpreter, which ignores num_warps and num_stages, float32 (the tightest tolerance) and
    # every tile shape of every list; on a GPU, bf16 and every config of its list. dK/dV's
    # configs run a second time with atomic dQ.
    skip_unless_available("triton")
    from dlm_kernels.ops import attention

    interp = dispatch.triton_interpret()
    dtype, D = (torch.float32 if interp else torch.bfloat16), 40
    runs = {}
    for kind in ("fwd", "dkdv", "dq"):
        configs = _all_candidates(kind) if interp else attention._autotune_configs(kind, D, dtype)
        runs[kind] = list({(_tile(c) if interp else c): c for c in configs}.values())
    B, Sq, Sk = 2, 37, 171
    q, k, v = _inputs(B, Sq, Sk, 3, 1, D, dtype)
    mask = _padding_mask(B, Sk)
    logs = _spy_kernels(monkeypatch)
    n = max(len(c) for c in runs.values())
    # Then every dK/dV config once more with atomic dQ (deterministic=False; no dQ kernel).
    plan = [(i, True) for i in range(n)] + [(i, False) for i in range(len(runs["dkdv"]))]
    for i, deterministic in plan:
        forced = {kind: configs[i % len(configs)] for kind, configs in runs.items()}
        with attention.forced_configs(**forced):
            _check("triton", q, k, v, attention_mask=mask, block_size=10,
                   deterministic=deterministic)  # fmt: skip
        for kind, log in logs.items():  # the forced tiles ran, nothing else
            ran = deterministic or kind != "dq"
            assert log == ([_tile(forced[kind])] if ran else []), (kind, forced[kind])
            log.clear()
    assert not attention._FORCED  # the context manager cleaned up


@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "atomic-dq"])
def test_autotuner_path(monkeypatch, deterministic):
    # The real triton.autotune path: on a GPU with its CUDA-event timer; under the interpreter
    # (where autotuning is off by design) switched on with a stand-in timer that runs each
    # candidate once and ranks the later ones faster, so that the last candidate must win.
    # float32 D 40 has three candidates per kernel. Checked: every candidate runs on the real
    # outputs (re-running is harmless: the result stays correct), the winner launches with a
    # grid from its own tiles, and a new length in the same power-of-two bucket (Sq 40, Sk 60
    # after 37, 53) reuses the winner without timing again. With atomic dQ, every timed run
    # adds into the dQ buffer: the result is right only if the tuner zeroes it between runs.
    skip_unless_available("triton")
    from dlm_kernels.ops import attention

    monkeypatch.setattr(attention, "_TUNERS", {})
    monkeypatch.setattr(attention, "_BEST", {})
    monkeypatch.setenv("DLM_KERNELS_AUTOTUNE", "1")
    timed = []
    if dispatch.triton_interpret():

        def fake_do_bench(kernel_call, quantiles):
            kernel_call()
            timed.append(1)
            return [1.0 / len(timed)] * len(quantiles)

        monkeypatch.setattr(attention, "_autotune_on", lambda: True)
        monkeypatch.setattr(attention, "_DO_BENCH", fake_do_bench)
    dtype, D = torch.float32, 40
    _check("triton", *_inputs(2, 37, 53, 4, 2, D, dtype), attention_mask=_padding_mask(2, 53),
           block_size=10, deterministic=deterministic)  # fmt: skip
    tuned = {key[0]: cfg for key, cfg in attention._BEST.items()}
    kinds = ["dkdv", "dq", "fwd"] if deterministic else ["dkdv", "fwd"]
    assert len(attention._BEST) == len(kinds) and sorted(tuned) == kinds
    for kind, cfg in tuned.items():
        configs = attention._autotune_configs(kind, D, dtype)
        assert cfg in configs
        if dispatch.triton_interpret():
            assert cfg == configs[-1], kind
    if dispatch.triton_interpret():
        assert len(timed) == sum(len(attention._autotune_configs(k, D, dtype)) for k in tuned)
    best = dict(attention._BEST)
    logs = _spy_kernels(monkeypatch)
    n_timed = len(timed)
    _check("triton", *_inputs(2, 40, 60, 4, 2, D, dtype), attention_mask=_padding_mask(2, 60),
           block_size=10, deterministic=deterministic)  # fmt: skip
    assert attention._BEST == best and len(timed) == n_timed  # no retuning
    for kind, log in logs.items():  # one launch each, straight with the tuned tiles
        assert log == ([_tile(tuned[kind])] if kind in tuned else []), kind
