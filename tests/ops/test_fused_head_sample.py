"""fused_head_unmask_step against unmask_step on materialised logits, on every path.

The claim under test: ``fused_head_unmask_step(x, h, W, ...)`` gives exactly the tokens and the
commits of ``unmask_step(x, reference.linear_logits(h, W, bias, softcap), ...)`` for the same
seed. The hidden states, the head and the bias are on a dyadic grid (k / 8), so every product
and sum of the matmul is exact in float32; in bf16 the grid is narrow enough (|k| <= 2, the
bias |k| <= 8: every logit is j / 64 with |j| <= 224 < 2^8) that the logits are exact in bf16
too, whether a GEMM adds the bias before or after rounding its float32 accumulator. So the
logits are the same bits whatever GEMM computes them (row count, blocking, Triton or BLAS), and
equality is a fair test, not a lucky one. The expected result always comes from the reference
unmask_step (float64, sorts), which test_unmask_sample.py ties to the C++ and Triton samplers.
"""

from __future__ import annotations

import pytest
import torch

from dlm_kernels import fused_head_unmask_step, reference, unmask_step
from dlm_kernels.ops import fused_head_sample as fh
from dlm_kernels.ops import unmask_sample as us
from tests.utils import device, ids, impl, run_on, skip_unless_available, to_device

CONFS = ["prob", "raw_prob", "margin", "neg_entropy", "random"]
RULES = {
    "k4": dict(num_transfer=4),
    "k-per-row": dict(num_transfer=torch.tensor([1, 60, 3])),
    "threshold": dict(threshold=0.2),
    "factor": dict(factor=1.0),
    "alg_temp": dict(num_transfer=5, alg_temp=0.3),
    "ancestral": dict(ancestral=True, theta=0.4),
}
SAMPLED = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Same reason as test_unmask_sample.py: tiny ops on a loaded 2-core machine run faster on
    # one thread.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _grid(*shape, dtype=torch.float32, k=16):
    return (torch.randint(-k, k + 1, shape).to(torch.float32) / 8).to(dtype)


def _batch(b=3, l=37, h=40, v=1003, p=0.6, dtype=torch.float32):
    """x with ~p masked (row 2 has nothing masked when b > 2), hidden, head, bias."""
    mask_id = v  # outside the vocabulary, as in LLaDA
    x = torch.randint(0, v, (b, l))
    mask = torch.rand(b, l) < p
    if b > 2:
        mask[2] = False
    x[mask] = mask_id
    k, kb = (16, 16) if dtype == torch.float32 else (2, 8)  # bf16: exact logits (module doc)
    assert dtype == torch.float32 or h * k * k + 8 * kb < 2**8, "bf16 logits would round"
    return (
        x,
        mask,
        mask_id,
        _grid(b, l, h, dtype=dtype, k=k),
        _grid(v, h, dtype=dtype, k=k),
        _grid(v, dtype=dtype, k=kb),
    )


def _expected(x, hidden, W, bias=None, softcap=None, logits_shift=False, **kw):
    # The head in float32 (exact on the grid, so the same bits as in hidden's dtype): CPU torch
    # 2.11's bf16 GEMM spreads a NaN of one hidden row into a neighbouring row's logits.
    dt = hidden.dtype
    f32 = [None if t is None else t.float() for t in (hidden, W, bias)]
    logits = reference.linear_logits(*f32, softcap)
    if softcap is None:
        logits = logits.to(dt)
    if logits_shift:  # Dream: position l predicted by the output at l - 1, position 0 by its own
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    with impl("reference"):
        return unmask_step(x, logits, **kw)


def _check(name, x, hidden, W, **kw):
    want = _expected(x, hidden, W, **{k: v for k, v in kw.items() if k != "chunk_rows"})
    got = run_on(name, fused_head_unmask_step, x, hidden, W, **kw)
    assert torch.equal(got[1], want[1]), f"{name}: committed differs"
    assert torch.equal(got[0], want[0]), f"{name}: tokens differ"
    return got


# ---------------------------------------------------------------------------------------------
# equality with unmask_step on the materialised logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("conf", CONFS)
def test_cpp_every_confidence_and_rule(conf, rule):
    skip_unless_available("cpp")
    x, mask, mask_id, h, W, b = _batch()
    for draw in (dict(seed=5), dict(SAMPLED, seed=2**40 + 3, offset=5)):  # T = 0, then T > 0
        kw = dict(mask_id=mask_id, bias=b, confidence=conf, **RULES[rule], **draw)
        new, done = _check("cpp", x, h, W, chunk_rows=16, **kw)
        assert torch.equal(new[2], x[2]) and not bool(done[2].any())  # nothing masked: unchanged
        assert not bool((done & ~mask).any()) and bool((new[done] != mask_id).all())


@pytest.mark.parametrize("rule", ["k4", "threshold", "ancestral"])
def test_reference_path(rule):
    x, _, mask_id, h, W, b = _batch(l=23, v=301)
    for draw in (dict(confidence="margin", seed=1), dict(SAMPLED, seed=11, confidence="prob")):
        _check("reference", x, h, W, mask_id=mask_id, bias=b, chunk_rows=9, **RULES[rule], **draw)


def test_triton_odd_shape_greedy():
    # H 40, V 1003, L 37, bias and softcap; chunks of 16 slots over a fixed loop of
    # ceil(B * L / 16) = 7 chunks, the last ones past the device-side count (no host sync).
    skip_unless_available("triton")
    x, _, mask_id, h, W, b = _batch()
    _check("triton", x, h, W, mask_id=mask_id, bias=b, softcap=3.0, chunk_rows=16,
           num_transfer=3, confidence="neg_entropy", seed=0)  # fmt: skip


@pytest.mark.parametrize("name", ["cpp", "triton", "reference"])
def test_strided_head_bias_and_hidden(name):
    # Views a user passes: the bias a column of a (V, 2) tensor (stride 2), the head stored
    # transposed, the hidden states a slice of wider ones. The bias is ~100x the hidden's
    # contribution, so a bias read with the wrong stride changes the tokens.
    # The views are made on the device the path runs on (moving a strided view to CUDA would
    # make it contiguous and test nothing there).
    if name != "reference":
        skip_unless_available(name)
    x, _, mask_id, h, W, b = _batch(b=2, l=13, v=203)
    kw = dict(mask_id=mask_id, chunk_rows=8, num_transfer=3, seed=0)
    want = _expected(x, h, W, bias=b * 64, **{k: v for k, v in kw.items() if k != "chunk_rows"})
    dev = device() if name == "triton" else torch.device("cpu")
    x, h, W, b = (t.to(dev) for t in (x, h, W, b))
    bias = torch.stack([b * 64, -b * 64], 1)[:, 0]
    head = W.t().contiguous().t()
    hidden = torch.cat([h, _grid(2, 13, 7).to(dev)], dim=-1)[..., :40]
    assert bias.stride(0) == 2 and head.stride(0) == 1 and not hidden.is_contiguous()
    with impl(name):
        got = fused_head_unmask_step(x, hidden, head, bias=bias, **kw)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: ids(d=d))
def test_triton_seeded(dtype):
    skip_unless_available("triton")
    x, _, mask_id, h, W, b = _batch(b=3, l=11, v=203, dtype=dtype)
    _check("triton", x, h, W, mask_id=mask_id, bias=b, chunk_rows=8, threshold=0.3,
           confidence="margin", seed=7, offset=2, **SAMPLED)  # fmt: skip


@pytest.mark.parametrize("name", ["cpp", "triton", "reference"])
def test_per_row_keys(name):
    # Per-row seed / offset / left_pad (one call for a padded batch): the chunked path gathers
    # each slot's key; it must agree with unmask_step on the full logits.
    skip_unless_available(name)
    x, _, mask_id, h, W, b = _batch(b=3, l=11 if name == "triton" else 29, v=203)
    pads = torch.tensor([0, 3, 6])
    cand = torch.arange(x.shape[1])[None, :] >= pads[:, None]  # padding is never a candidate
    kw = dict(mask_id=mask_id, bias=b, chunk_rows=7, num_transfer=torch.tensor([2, 4, 1]),
              alg_temp=0.5, confidence="random", seed=torch.tensor([5, 2**33, 5]),
              offset=torch.tensor([1, 0, 2**32 - 1]), left_pad=pads, candidates=cand,
              **SAMPLED)  # fmt: skip
    got = _check(name, x, h, W, **kw)
    assert bool(got[1].any())


@pytest.mark.parametrize("name", ["cpp", "reference"])
def test_bf16_softcap_shift(name):
    skip_unless_available(name)
    x, _, mask_id, h, W, b = _batch(l=29, v=257, dtype=torch.bfloat16)
    for shift in (False, True):
        _check(name, x, h, W, mask_id=mask_id, bias=b, softcap=2.5, logits_shift=shift,
               chunk_rows=13, num_transfer=6, seed=1, **SAMPLED)  # fmt: skip


def test_logits_shift_triton():
    skip_unless_available("triton")
    x, _, mask_id, h, W, _ = _batch(b=2, l=9, v=67)
    x[:, 0] = mask_id  # position 0 keeps its own output
    _check("triton", x, h, W, mask_id=mask_id, logits_shift=True, chunk_rows=5, num_transfer=2,
           confidence="raw_prob", seed=0)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# chunking, edge rows, memory
# ---------------------------------------------------------------------------------------------
def test_chunk_boundaries():
    skip_unless_available("cpp")
    x, mask, mask_id, h, W, b = _batch(l=31, v=211)
    n = int(mask.sum())
    kw = dict(mask_id=mask_id, bias=b, num_transfer=5, seed=4, confidence="margin", **SAMPLED)
    want = _expected(x, h, W, **kw)
    for chunk in (1, 2, 7, n - 1, n, n + 1, 10_000):
        with impl("cpp"):
            got = fused_head_unmask_step(x, h, W, chunk_rows=chunk, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), chunk


@pytest.mark.parametrize("name", ["cpp", "triton", "triton-cublas"])
def test_logits_are_chunked_and_only_for_candidates(name, monkeypatch):
    # The sampler sees every chunk's logits: none may exceed chunk_rows rows, and (CPU path,
    # eager CUDA's cuBLAS chunks) the rows add up to the candidate count, not B * L: the head
    # never ran for other positions. "triton" is the no-sync loop (CUDA graphs, compile).
    blas = name == "triton-cublas"
    name = "triton" if blas else name
    skip_unless_available(name)
    monkeypatch.setenv("DLM_KERNELS_HEAD", "cublas" if blas else "fused")
    rows_op = fh._head_logits_rows_op
    kernel_rows = []
    monkeypatch.setattr(fh, "_head_logits_rows_op",
                        lambda *a: kernel_rows.append(a[-1]) or rows_op(*a))  # fmt: skip
    x, mask, mask_id, h, W, _ = _batch(b=2, l=13, v=67)
    block = torch.zeros_like(mask)
    block[:, 3:10] = True
    seen = []
    real = us._sample

    def spy(logits, rows, valid, *a):
        seen.append((logits.shape[0], int(valid.sum())))
        return real(logits, rows, valid, *a)

    kw = dict(mask_id=mask_id, candidates=block, num_transfer=100)
    want = _expected(x, h, W, **kw)
    monkeypatch.setattr(us, "_sample", spy)
    got = run_on(name, fused_head_unmask_step, x, h, W, chunk_rows=4, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(rows <= 4 for rows, _ in seen), seen
    assert sum(v for _, v in seen) == int((mask & block).sum())
    if name == "cpp" or blas:
        assert sum(rows for rows, _ in seen) == int((mask & block).sum())
        assert not kernel_rows  # cuBLAS (F.linear) computed them
    else:  # the fixed no-sync loop: ceil(B * L / chunk_rows) chunks of the gather-GEMM kernel
        assert len(seen) == -(-2 * 13 // 4) and kernel_rows == [4] * 6 + [2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: ids(d=d))
def test_triton_cublas_chunks(dtype, monkeypatch):
    # Eager CUDA's path (forced here on any device): host-read count, F.linear per chunk over
    # the gathered rows, the Triton row sampler; bias, softcap, Dream's shift, a NaN row.
    skip_unless_available("triton")
    monkeypatch.setenv("DLM_KERNELS_HEAD", "cublas")
    x, _, mask_id, h, W, b = _batch(b=2, l=11, v=203, dtype=dtype)
    h[0, 4, 7] = float("nan")
    x[0, 4] = mask_id
    for shift in (False, True):
        new, _ = _check("triton", x, h, W, mask_id=mask_id, bias=b, softcap=2.5,
                        logits_shift=shift, chunk_rows=5, num_transfer=4, seed=1,
                        **SAMPLED)  # fmt: skip
        assert bool(((new >= 0) & (new <= mask_id)).all())
    monkeypatch.setenv("DLM_KERNELS_HEAD", "fast")
    with impl("triton"), pytest.raises(ValueError, match="DLM_KERNELS_HEAD"):
        fused_head_unmask_step(*to_device((x, h, W), device()), mask_id=mask_id, num_transfer=1)


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_nothing_masked_and_all_masked(name):
    skip_unless_available(name)
    x, _, mask_id, h, W, b = _batch(b=2, l=7, v=67)
    x[:] = 5
    new, done = run_on(name, fused_head_unmask_step, x, h, W, mask_id=mask_id, bias=b,
                       num_transfer=3)  # fmt: skip
    assert torch.equal(new, x) and not bool(done.any())
    x[:] = mask_id
    new, done = _check(name, x, h, W, mask_id=mask_id, bias=b, num_transfer=100, chunk_rows=3,
                       seed=2, **SAMPLED)  # fmt: skip
    assert bool(done.all()) and bool(((new >= 0) & (new < 67)).all())


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_nan_hidden_row(name):
    # a NaN hidden state makes a whole row of NaN logits: token 0, confidence -inf (the row
    # sampler's rule), the same on every path, never a crash or an out-of-range token
    skip_unless_available(name)
    x, mask, mask_id, h, W, b = _batch(b=2, l=9, v=67, p=1.0)
    h[0, 4, 7] = float("nan")
    new, done = _check(name, x, h, W, mask_id=mask_id, bias=b, num_transfer=9, chunk_rows=4,
                       seed=3, **SAMPLED)  # fmt: skip
    assert int(new[0, 4]) == 0 and bool(((new >= 0) & (new < 67)).all())


def test_large_vocab_cpp():
    skip_unless_available("cpp")
    x, _, mask_id, h, W, b = _batch(b=1, l=5, v=151936, p=1.0)
    _check("cpp", x, h, W, mask_id=mask_id, bias=b, chunk_rows=2, num_transfer=2, seed=9,
           temperature=0.7, top_p=0.95)  # fmt: skip


def test_torch_compile_fullgraph():
    # no host sync and no graph break: under torch.compile the CPU path runs the fixed loop over
    # ceil(B * L / chunk_rows) chunks (as on CUDA) and must still give the eager answer
    skip_unless_available("cpp")
    x, _, mask_id, h, W, _ = _batch(b=2, l=9, v=67)

    def step(x, h, W):
        return fused_head_unmask_step(x, h, W, mask_id=mask_id, num_transfer=2, chunk_rows=4,
                                      seed=3, temperature=0.8, top_p=0.9)  # fmt: skip

    with impl("cpp"):
        got = torch.compile(step, fullgraph=True)(x, h, W)
    want = _expected(x, h, W, mask_id=mask_id, num_transfer=2, seed=3, temperature=0.8,
                     top_p=0.9)  # fmt: skip
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_custom_op_opcheck():
    skip_unless_available("triton")
    with impl("triton"):
        dev = device()
        h, W, b = (t.to(dev) for t in (_grid(10, 40), _grid(37, 40), _grid(37)))
        hrows = torch.tensor([3, 0, 7, 9, 1, 2, 4, 5, 6, 8], device=dev)
        count = torch.tensor([4], dtype=torch.int32, device=dev)
        out = fh._head_logits_rows_op(h, W, b, hrows, count, 1, 4)
        assert torch.equal(out[:3], torch.nn.functional.linear(h[hrows[1:4]], W, b))
        torch.library.opcheck(fh._head_logits_rows_op, (h, W, b, hrows, count, 0, 4),
                              test_utils=("test_schema", "test_faketensor"))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    x, mask, mask_id, h, W, b = _batch(b=2, l=5, v=20)
    base = dict(mask_id=mask_id, num_transfer=1)
    bad = [
        ((x.float(), h, W), {}, TypeError, "x must be"),
        ((x, h[:, :4], W), {}, ValueError, "hidden must be"),
        ((x, h.int(), W), {}, TypeError, "hidden must be"),
        ((x, h, W[:, :7]), {}, ValueError, "lm_head_weight must have shape"),
        ((x, h, W.double()), {}, TypeError, "lm_head_weight must have hidden's dtype"),
        ((x, h, W), dict(bias=b[:3]), ValueError, "bias"),
        ((x, h, W), dict(softcap=-1.0), ValueError, "softcap"),
        ((x, h, W), dict(chunk_rows=0), ValueError, "chunk_rows"),
        ((x, h, W), dict(logits_shift=1), TypeError, "logits_shift"),
        ((x, h, W), dict(mask_id=2.0), TypeError, "mask_id"),
        ((x, h, W), dict(threshold=0.5), ValueError, "exactly one"),
        ((x, h, W), dict(alg_temp=-1.0), ValueError, "alg_temp"),
        ((x, h, W), dict(candidates=mask[:, :3]), ValueError, "candidates"),
        ((x, h, W), dict(confidence="entropy"), ValueError, "confidence"),
        ((x, h, W), dict(top_p=1.5), ValueError, "top_p"),
        ((x, h, W), dict(num_transfer=torch.tensor([1, 2, 3])), ValueError, "num_transfer"),
    ]
    for args, kw, err, word in bad:
        with pytest.raises(err, match=word):
            fused_head_unmask_step(*args, **{**base, **kw})
    with pytest.raises(ValueError, match="exactly one"):
        fused_head_unmask_step(x, h, W, mask_id=mask_id)


def test_default_dispatch():
    # no forced implementation: whatever dispatch picks for CPU tensors gives the same answer
    x, _, mask_id, h, W, b = _batch(b=2, l=9, v=67)
    got = fused_head_unmask_step(x, h, W, mask_id=mask_id, bias=b, num_transfer=2, seed=3)
    want = _expected(x, h, W, mask_id=mask_id, bias=b, num_transfer=2, seed=3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
