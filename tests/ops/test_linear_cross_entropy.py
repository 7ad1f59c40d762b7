"""masked_linear_cross_entropy: each implementation vs the float64 reference, loss and the three
gradients (hidden, lm_head_weight, bias), every option, edge cases, errors, the nn module."""

import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import dlm_kernels
from dlm_kernels import reference
from dlm_kernels.nn import MaskedLinearCrossEntropy
from dlm_kernels.ops import linear_cross_entropy as lce
from tests.utils import IMPLS, assert_close, device, ids, impl, skip_unless_available

DEV = device()
# "slab": the eager CUDA path (cuBLAS over vocabulary slabs, ops/linear_cross_entropy.py),
# forced here on every device and cut into 100-column slabs so that V 1003 crosses ten slab
# edges; "triton" is then the fused kernels (DLM_KERNELS_LCE=fused), also on a GPU.
KERNELS = ["cpp", "triton", "slab"]
IMPLS = [*IMPLS, "slab"]


SLAB_TEST_COLS = 100


@contextlib.contextmanager
def _impl(name):
    prev_env, prev_cols = os.environ.get("DLM_KERNELS_LCE"), lce._SLAB_COLS
    os.environ["DLM_KERNELS_LCE"] = "slab" if name == "slab" else "fused"
    lce._SLAB_COLS = SLAB_TEST_COLS if name == "slab" else prev_cols
    try:
        with impl("triton" if name == "slab" else name):
            yield
    finally:
        lce._SLAB_COLS = prev_cols
        if prev_env is None:
            os.environ.pop("DLM_KERNELS_LCE", None)
        else:
            os.environ["DLM_KERNELS_LCE"] = prev_env


def _skip(name):
    skip_unless_available("triton" if name == "slab" else name)


def _dev(name):
    # The C++ path takes CPU tensors even when the tests run on a GPU machine.
    return torch.device("cpu") if name == "cpp" else DEV


def _inputs(shape, H, V, dtype, p_mask=0.5, bias=True, dev=DEV):
    """hidden (*shape, H), W (V, H), bias (V,), target, mask, weight (B, 1) broadcast.

    W is scaled so that the logits have a standard deviation of ~3, as a trained head's do."""
    hidden = torch.randn(*shape, H, device=dev).to(dtype)
    W = (torch.randn(V, H, device=dev) * (3.0 / H**0.5)).to(dtype)
    b = (torch.randn(V, device=dev) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, V, shape, device=dev)
    mask = torch.rand(shape, device=dev) < p_mask
    weight = torch.rand(*shape[:-1], 1, device=dev) + 0.5
    return hidden, W, b, target, mask, weight


def _run(name, hidden, W, b, target, mask, weight, grad_out, **kw):
    """Loss and the gradients of sum(loss * grad_out) for (hidden, W, bias), on fresh leaves."""
    leaves = [
        x.detach().clone().requires_grad_(True) if x is not None else None for x in (hidden, W, b)
    ]
    with _impl(name):  # the backward too: the ops pick their path at run time
        loss = dlm_kernels.masked_linear_cross_entropy(
            leaves[0], leaves[1], target, mask, weight, bias=leaves[2], **kw
        )
        (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach(), [x.grad if x is not None else None for x in leaves]


def _check(name, hidden, W, b, target, mask, weight, factor=2.0, **kw):
    """The kernel against the float64 reference, with the reference run in the kernel's own
    precision as the yardstick (tests/utils.assert_close's rule)."""
    _skip(name)
    g = torch.randn(target.shape, dtype=torch.float64, device=target.device)
    if kw.get("reduction", "mean") != "none":
        g = g.reshape(-1)[0]
    dbl = [x.double() if x is not None else None for x in (hidden, W, b)]
    ref_loss, ref_grads = _run("reference", *dbl, target, mask, weight, g, **kw)
    low_loss, low_grads = _run("reference", hidden, W, b, target, mask, weight, g, **kw)
    out_loss, out_grads = _run(name, hidden, W, b, target, mask, weight, g, **kw)
    assert out_loss.dtype == torch.float32
    assert_close(f"{name} loss", ref_loss, out_loss, low_loss, factor=factor)
    for label, r, lo, o, x in zip(("d_hidden", "d_W", "d_bias"), ref_grads, low_grads, out_grads,
                                  (hidden, W, b)):  # fmt: skip
        if x is None:
            assert o is None
            continue
        assert o.dtype == x.dtype, f"{label}: dtype {o.dtype}, expected {x.dtype}"
        assert_close(f"{name} {label}", r, o, lo, factor=factor)
    return out_loss, out_grads


# ------------------------------------------------------------------ the reference itself
def test_reference_is_linear_then_masked_cross_entropy():
    hidden, W, b, target, mask, weight = _inputs((2, 37), 40, 1003, torch.float64)
    ours = reference.masked_linear_cross_entropy(
        hidden, W, target, mask, weight, bias=b, label_smoothing=0.1, z_loss=1e-3, softcap=5.0
    )
    logits = 5.0 * torch.tanh((hidden @ W.T + b) / 5.0)
    theirs = reference.masked_cross_entropy(
        logits, target, mask, weight, label_smoothing=0.1, z_loss=1e-3
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    plain = reference.masked_linear_cross_entropy(hidden, W, target, mask)
    torch.testing.assert_close(plain, F.cross_entropy((hidden @ W.T)[mask], target[mask]))


# ------------------------------------------------------------------ kernels vs reference
@pytest.mark.parametrize("name", IMPLS)
def test_matches_reference_fp32(name):
    # Odd shapes: 74 rows (~37 masked), H 40, V 1003, with bias and per-sequence weights.
    _check(name, *_inputs((2, 37), 40, 1003, torch.float32, dev=_dev(name)))


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: ids(d=d))
def test_matches_reference_low_precision(name, dtype):
    _check(name, *_inputs((1, 37), 40, 1003, dtype, dev=_dev(name)))


# Every option alone, then all at once. ignore_index: a custom value present in the targets.
OPTIONS = {
    "plain": {},
    "weight": {},
    "bias": {},
    "smoothing": dict(label_smoothing=0.1),
    "zloss": dict(z_loss=1e-3),
    "softcap": dict(softcap=2.5),
    "normalizer": dict(normalizer=61.0),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "ignore_index": dict(ignore_index=7),
    "all": dict(label_smoothing=0.2, z_loss=1e-2, softcap=2.5, normalizer=61.0, ignore_index=7),
    "all-none": dict(label_smoothing=0.2, z_loss=1e-2, softcap=2.5, reduction="none"),
}


# The Triton interpreter is slow: on that path the options that are one line of host code or
# one term of the kernel (weight, z_loss, normalizer, sum, ignore_index) run together in "all".
_TRITON_OPTIONS = ("plain", "bias", "smoothing", "softcap", "none", "all", "all-none")
OPTION_CASES = (
    [("cpp", o) for o in OPTIONS]
    + [("triton", o) for o in _TRITON_OPTIONS]
    + [("slab", o) for o in OPTIONS]
)


@pytest.mark.parametrize("name,option", OPTION_CASES, ids=[f"{n}-{o}" for n, o in OPTION_CASES])
def test_each_option(name, option):
    kw = dict(OPTIONS[option])
    hidden, W, b, target, mask, weight = _inputs((1, 37), 40, 1003, torch.float32, dev=_dev(name))
    if option not in ("bias", "all", "all-none"):
        b = None
    if option not in ("weight", "all", "all-none"):
        weight = None
    if "ignore_index" in kw:
        target[0, :9] = kw["ignore_index"]  # masked positions among them must carry no loss
        mask[0, :9] = True
    _check(name, hidden, W, b, target, mask, weight, **kw)


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("p_mask", [0.0, 1.0], ids=["none-masked", "all-masked"])
def test_no_and_all_masked(name, p_mask):
    hidden, W, b, target, mask, weight = _inputs(
        (1, 37), 40, 1003, torch.float32, p_mask, dev=_dev(name)
    )
    loss, grads = _check(name, hidden, W, b, target, mask, weight)
    if p_mask == 0.0:
        assert loss.item() == 0.0  # "mean" over nothing is 0, not NaN
        for gr in grads:
            assert torch.count_nonzero(gr) == 0


@pytest.mark.parametrize("name", ["reference", *KERNELS])
def test_rows_without_loss_are_never_read(name):
    # NaN / inf hidden states at positions that carry no loss (padding) must not leak, on the
    # reference path too (float64 inputs, the fallback without _C): 0 * NaN in its weight
    # gradient's matmul made all of dW NaN.
    if name != "reference":
        _skip(name)
    hidden, W, b, target, mask, weight = _inputs((1, 37), 40, 1003, torch.float32, dev=_dev(name))
    hidden[~mask] = float("nan")
    hidden[0, 0] = float("inf")
    mask[0, 0] = False
    g = torch.tensor(1.3, dtype=torch.float64)
    loss, (dh, dW, db) = _run(name, hidden, W, b, target, mask, weight, g)
    clean = torch.where(mask[..., None], hidden, torch.zeros_like(hidden))
    ref_loss, (rdh, rdW, rdb) = _run("reference", clean.double(), W.double(), b.double(), target,
                                     mask, weight, g)  # fmt: skip
    assert_close("loss", ref_loss, loss)
    assert_close("d_hidden", rdh, dh)
    assert_close("d_W", rdW, dW)
    assert_close("d_bias", rdb, db)


@pytest.mark.parametrize("name", KERNELS)
def test_minus_inf_bias_columns(name):
    # A -inf bias bans tokens (a tokenizer's unused ids): they get probability 0 and zero
    # gradients, the loss stays finite. Slab edges (100 columns) fall inside the banned runs.
    _skip(name)
    hidden, W, b, target, mask, weight = _inputs((2, 37), 40, 1003, torch.float32, dev=_dev(name))
    banned = torch.zeros(1003, dtype=torch.bool, device=b.device)
    banned[::7] = True
    banned[:205] = True  # the first two slabs whole (a row max of -inf) and an edge
    allowed = (~banned).nonzero().squeeze(1)
    target = allowed[target % allowed.numel()]
    b = b.masked_fill(banned, float("-inf"))
    loss, (dh, dW, db) = _check(name, hidden, W, b, target, mask, weight, reduction="none")
    assert torch.isfinite(loss).all()
    assert torch.count_nonzero(dW[banned]) == 0 and torch.count_nonzero(db[banned]) == 0
    assert torch.isfinite(dh).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", KERNELS)
def test_float16_dhidden_fits_where_the_gradient_does(name, reduction):
    # float16 logits rising by 20 per column with z-loss: d(loss)/d(logits) is ~665 at an
    # upstream gradient of 1 and dHidden ~1.1e5 before the 0.25 below brings it to ~27.6k. The
    # C++ path's float16 dHidden GEMM, run at an upstream gradient of 1 for "mean" / "sum",
    # overflowed to inf (a fuzzing helper's find).
    _skip(name)
    dev = _dev(name)
    V = 167
    hidden = torch.tensor([[[20.0, 1.0]]], device=dev).half()
    W = torch.stack([torch.arange(V, dtype=torch.float32, device=dev),
                     torch.zeros(V, device=dev)], 1).half()  # fmt: skip
    target = torch.tensor([[100]], device=dev)
    mask = torch.ones(1, 1, dtype=torch.bool, device=dev)
    g = torch.full((1, 1) if reduction == "none" else (), 0.25, dtype=torch.float64, device=dev)
    kw = dict(z_loss=0.1, reduction=reduction)
    _, want = _run("reference", hidden.double(), W.double(), None, target, mask, None, g, **kw)
    _, got = _run(name, hidden, W, None, target, mask, None, g, **kw)
    assert got[0].isfinite().all(), got[0]
    torch.testing.assert_close(got[0].double(), want[0], rtol=2e-3, atol=0)


@pytest.mark.parametrize("name", KERNELS)
def test_pos_inf_bias_column(name):
    # A +inf bias column: every row's lse is +inf, so the loss is +inf where the target is
    # another column and NaN (inf - inf) where it is that column, as in float64; the gradients
    # are NaN exactly where the reference's are. The fused kernel's online logsumexp shifted by
    # +inf and made every loss NaN (a fuzzing helper's find).
    _skip(name)
    dev = _dev(name)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 2, 4, generator=g).to(dev)
    W = torch.randn(8, 4, generator=g).to(dev)
    b = torch.zeros(8, device=dev)
    b[3] = float("inf")
    target = torch.tensor([[3, 1]], device=dev)
    mask = torch.ones(1, 2, dtype=torch.bool, device=dev)
    gout = torch.ones(1, 2, dtype=torch.float64, device=dev)
    want, want_grads = _run("reference", hidden.double(), W.double(), b.double(), target, mask,
                            None, gout, reduction="none")  # fmt: skip
    got, got_grads = _run(name, hidden, W, b, target, mask, None, gout, reduction="none")
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), got
    for w_, o in zip(want_grads, got_grads):
        assert torch.equal(o.isnan(), w_.isnan()), (o, w_)


@pytest.mark.parametrize("V", [33, 64, 66])
@pytest.mark.parametrize("name", KERNELS)
def test_label_smoothing_on_rows_of_float_max(name, V):
    # Logits of +-FLT_MAX (a bias of +-FLT_MAX, W = 0): the row mean is +-FLT_MAX and the
    # smoothing term lse - mean is finite (0 in float64). Float32 sums of x * fl(1 / V) (which
    # rounds up) overflowed to inf at these V in the fused and slab kernels: loss -inf / +inf.
    _skip(name)
    dev = _dev(name)
    hidden = torch.zeros(1, 2, 4, device=dev)
    W = torch.zeros(V, 4, device=dev)
    target = torch.zeros(1, 2, dtype=torch.int64, device=dev)
    mask = torch.ones(1, 2, dtype=torch.bool, device=dev)
    for big in (3.4028234663852886e38, -3.4028234663852886e38):
        b = torch.full((V,), big, device=dev)
        kw = dict(bias=b, label_smoothing=0.1, reduction="none")
        want = reference.masked_linear_cross_entropy(
            hidden.double(), W.double(), target, mask, **{**kw, "bias": b.double()}
        )
        with _impl(name):
            got = dlm_kernels.masked_linear_cross_entropy(hidden, W, target, mask, **kw)
        assert got.isfinite().all(), (big, got)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", KERNELS)
def test_triton_atomics_and_return_lse(name):
    # deterministic=False (the atomic backward on Triton; the CPU path ignores it) and the lse.
    _skip(name)
    hidden, W, b, target, mask, weight = _inputs((1, 37), 40, 1003, torch.float32, dev=_dev(name))
    _check(name, hidden, W, b, target, mask, weight, deterministic=False, label_smoothing=0.1)
    with _impl(name):
        loss, lse = dlm_kernels.masked_linear_cross_entropy(
            hidden, W, target, mask, bias=b, return_lse=True, softcap=3.0
        )
    valid = mask & (target != -100)
    logits = 3.0 * torch.tanh((hidden.double() @ W.double().T + b.double()) / 3.0)
    ref_lse = torch.where(valid, torch.logsumexp(logits, -1), torch.zeros((), dtype=torch.float64))
    assert lse.shape == target.shape and lse.dtype == torch.float32 and not lse.requires_grad
    assert_close("lse", ref_lse, lse)
    # With inputs that train, the lse is still detached on every path and reduction (the ops'
    # backward has no lse gradient: an attached lse would drop a gradient silently).
    leaves = [t.clone().requires_grad_(True) for t in (hidden, W, b)]
    for red in ("mean", "none"):
        with _impl(name):
            loss, lse = dlm_kernels.masked_linear_cross_entropy(
                leaves[0], leaves[1], target, mask, bias=leaves[2], return_lse=True,
                reduction=red,
            )  # fmt: skip
        assert loss.requires_grad and not lse.requires_grad, red


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("frozen", ["head", "hidden", "weight"])  # weight: only the bias trains
def test_frozen_inputs(name, frozen):
    # A frozen LM head (LoRA) or frozen hidden states: only the other gradients are computed,
    # and they still match the reference (both the reduced and the per-row paths).
    _skip(name)
    hidden, W, b, target, mask, weight = _inputs((1, 37), 40, 1003, torch.float32, dev=_dev(name))
    for red in ("mean", "none"):
        h = hidden.clone().requires_grad_(frozen != "hidden")
        w = W.clone().requires_grad_(frozen not in ("head", "weight"))
        bb = b.clone().requires_grad_(frozen != "head")
        with _impl(name):
            loss = dlm_kernels.masked_linear_cross_entropy(
                h, w, target, mask, weight, bias=bb, reduction=red
            )
            loss.sum().backward()
        rh, rw, rb = (x.detach().double().requires_grad_(x.requires_grad) for x in (h, w, bb))
        ref = reference.masked_linear_cross_entropy(
            rh, rw, target, mask, weight, bias=rb, reduction=red
        )
        ref.sum().backward()
        for label, x, r in (("d_hidden", h, rh), ("d_W", w, rw), ("d_bias", bb, rb)):
            if x.requires_grad:
                assert_close(f"{red} {label}", r.grad, x.grad)
            else:
                assert x.grad is None


@pytest.mark.slow
def test_large_vocabulary_cpu():
    # Qwen / Dream's vocabulary: V = 151936 with a few rows and a small H.
    skip_unless_available("cpp")
    _check("cpp", *_inputs((1, 5), 16, 151936, torch.float32, p_mask=0.8, dev=_dev("cpp")))


def test_cpu_chunks_cover_every_row(monkeypatch):
    # Force several chunks (and a ragged last one) at a small shape: 16-row chunks over ~45 rows.
    skip_unless_available("cpp")
    monkeypatch.setattr(lce, "_CPU_CHUNK_ELEMS", 16 * 1003)
    for red in ("mean", "none"):
        args = _inputs((2, 37), 40, 1003, torch.float32, p_mask=0.6, dev=_dev("cpp"))
        _check("cpp", *args, reduction=red, softcap=4.0)


def test_cpu_no_grad_and_retain_graph():
    skip_unless_available("cpp")
    hidden, W, b, target, mask, weight = _inputs((1, 37), 40, 1003, torch.float32, dev=_dev("cpp"))
    ref = reference.masked_linear_cross_entropy(hidden, W, target, mask, weight, bias=b)
    with impl("cpp"), torch.no_grad():
        out = dlm_kernels.masked_linear_cross_entropy(hidden, W, target, mask, weight, bias=b)
    assert_close("no_grad loss", ref.double(), out)
    # Gradients computed in the forward can be consumed once: a second backward must fail
    # loudly rather than return twice-scaled gradients.
    W = W.clone().requires_grad_(True)
    with impl("cpp"):
        loss = dlm_kernels.masked_linear_cross_entropy(hidden, W, target, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()
    # Nor do they carry a graph: a second-order gradient must fail, not silently drop the
    # loss's curvature (it returned grad + 0 where the reference gives the full term).
    h = hidden.clone().requires_grad_(True)
    with impl("cpp"):
        loss = dlm_kernels.masked_linear_cross_entropy(h, W, target, mask, reduction="sum")
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_gradcheck_float64():
    # The public function in float64 (which runs the reference) with every option.
    hidden, W, b, target, mask, weight = _inputs((1, 6), 5, 19, torch.float64, p_mask=0.7)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=2.0)

    def f(h, w, bb):
        return dlm_kernels.masked_linear_cross_entropy(h, w, target, mask, weight, bias=bb, **kw)

    args = [x.clone().requires_grad_(True) for x in (hidden, W, b)]
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("name", KERNELS)
def test_gradcheck_kernels(name):
    # The kernels accumulate in float32 by design, so float64 finite differences cannot resolve
    # them; instead their backward is checked against their own forward by central differences
    # in float32 (eps 1e-3: rounding noise ~1e-4 relative), per-row output, every option.
    _skip(name)
    hidden, W, b, target, mask, weight = _inputs(
        (1, 6), 5, 19, torch.float32, p_mask=0.7, dev=_dev(name)
    )
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=2.0, reduction="none")

    def f(h, w, bb):
        with _impl(name):
            return dlm_kernels.masked_linear_cross_entropy(
                h, w, target, mask, weight, bias=bb, **kw
            )

    args = [x.clone().requires_grad_(True) for x in (hidden, W, b)]
    with _impl(name), pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(f, args, eps=1e-3, atol=2e-3, rtol=2e-2)


def test_autocast_casts_like_linear():
    # A bf16-autocast model with float32 master weights: the op runs the head in bf16, as
    # F.linear would, and the gradients come back in float32.
    hidden, W, b, target, mask, weight = _inputs((1, 37), 40, 1003, torch.float32, dev=_dev("cpp"))
    h, w = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dlm_kernels.masked_linear_cross_entropy(h, w, target, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = reference.masked_linear_cross_entropy(
        hidden.bfloat16().double(), W.bfloat16().double(), target, mask
    )
    low = reference.masked_linear_cross_entropy(hidden.bfloat16(), W.bfloat16(), target, mask)
    assert_close("autocast loss", ref, loss, low)


# ------------------------------------------------------------------ nn module
def test_module_matches_function():
    hidden, W, b, target, mask, weight = _inputs((2, 37), 40, 1003, torch.float32)
    mod = MaskedLinearCrossEntropy(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    assert "label_smoothing=0.1" in repr(mod)
    out = mod(hidden, W, target, mask, weight, bias=b, normalizer=74)
    ref = dlm_kernels.masked_linear_cross_entropy(
        hidden, W, target, mask, weight, bias=b, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
        normalizer=74,
    )  # fmt: skip
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="reduction"):
        MaskedLinearCrossEntropy(reduction="avg")
    # Checked at construction, not at the first forward.
    with pytest.raises(ValueError, match="softcap must be None or > 0"):
        MaskedLinearCrossEntropy(softcap=-1.0)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        MaskedLinearCrossEntropy(deterministic="yes")


def test_module_trains_a_head():
    # A few SGD steps on a tied head must lower the loss (the module is usable in a model).
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 101, bias=True)
    hidden = torch.randn(4, 9, 16)
    target = torch.randint(0, 101, (4, 9))
    mask = torch.rand(4, 9) < 0.5
    loss_fn = MaskedLinearCrossEntropy()
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(hidden, head.weight, target, mask, bias=head.bias)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ bad input
def test_bad_inputs(monkeypatch):
    hidden, W, b, target, mask, weight = _inputs((2, 37), 40, 1003, torch.float32)
    f = dlm_kernels.masked_linear_cross_entropy
    with pytest.raises(TypeError, match="hidden"):
        f(hidden.long(), W, target)
    with pytest.raises(ValueError, match="lm_head_weight"):
        f(hidden, W[:, :39], target)
    with pytest.raises(ValueError, match="lm_head_weight"):
        f(hidden, W[0], target)
    with pytest.raises(TypeError, match="lm_head_weight"):
        f(hidden, W.double(), target)
    with pytest.raises(ValueError, match="bias"):
        f(hidden, W, target, bias=b[:-1])
    with pytest.raises(TypeError, match="bias"):
        f(hidden, W, target, bias=b.half())
    with pytest.raises(ValueError, match="hidden"):
        f(hidden[:, :-1], W, target)
    with pytest.raises(TypeError, match="target"):
        f(hidden, W, target.float())
    with pytest.raises(TypeError, match="target must be an integer tensor, got list"):
        f(hidden, W, target.tolist())
    with pytest.raises(TypeError, match="mask"):
        f(hidden, W, target, mask.int())
    with pytest.raises(ValueError, match="weight"):
        f(hidden, W, target, mask, torch.ones(3, 1))
    with pytest.raises(ValueError, match="softcap"):
        f(hidden, W, target, softcap=-1.0)
    with pytest.raises(TypeError, match="softcap"):
        f(hidden, W, target, softcap="5")
    with pytest.raises(ValueError, match="reduction"):
        f(hidden, W, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        f(hidden, W, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="normalizer"):
        f(hidden, W, target, reduction="sum", normalizer=3.0)
    with pytest.raises(TypeError, match="deterministic"):
        f(hidden, W, target, deterministic=None)
    bad = target.clone()
    bad[0, 0] = 1003
    m = torch.zeros_like(mask)
    m[0, 0] = True
    if hidden.device.type != "cpu":
        # No host sync on CUDA: the kernels give NaN; DLM_KERNELS_CHECK=1 turns the check on.
        assert torch.isnan(f(hidden, W, bad, m, reduction="none")[0, 0])
        monkeypatch.setenv("DLM_KERNELS_CHECK", "1")
    with pytest.raises(ValueError, match=r"target must lie in \[0, 1003\)"):
        f(hidden, W, bad, m)
    f(hidden, W, bad, ~m)  # an out-of-range target where no loss is carried is fine


@pytest.mark.parametrize("programs", [1, 10, 1000], ids=lambda p: f"programs{p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: ids(d=d))
def test_slab_kernels_small_tiles(dtype, programs, monkeypatch):
    # The slab kernels with tiles smaller than a slab: the forward's loop over a slab's column
    # tiles and the backward's second grid axis run (with the test's 100-column slabs and the
    # default tiles neither would), ragged row and column tiles, the 3-column last slab. The
    # forward's column split: none (each program loops over a slab's 4 column tiles), pieces
    # of 2 tiles (a short last piece), one tile per program; with smoothing, z-loss and
    # softcap (the options the kernel sees: the others are host code, covered elsewhere).
    monkeypatch.setattr(lce, "_slab_blocks", lambda: dict(BLOCK_M=4, BLOCK_C=32))
    monkeypatch.setattr(lce, "_slab_programs", lambda device: programs)
    inputs = list(_inputs((1, 37), 40, 1003, dtype))
    inputs[4] = torch.arange(37, device=DEV)[None] % 2 == 0  # 19 rows: 5 row tiles
    splits = {1: 1, 10: 2, 1000: 4}[programs]
    assert lce._slab_split(19, 100, dict(BLOCK_M=4, BLOCK_C=32), programs)[0] == splits
    _check("slab", *inputs, **OPTIONS["all-none"])


@pytest.mark.parametrize("programs", [1, 10], ids=lambda p: f"programs{p}")
def test_slab_rising_and_banned_logits_across_tiles(programs, monkeypatch):
    # Logits that rise (or fall) along the vocabulary by up to 6 per column, so that each
    # chunk state of the slab forward meets a larger max in every column tile and moves its
    # anchor (rescaling its sum), beside -inf bias runs that start and end inside tiles: the
    # small tiles make a 100-column slab 3-4 tiles of 32 per program (or 2 per piece).
    _skip("slab")
    monkeypatch.setattr(lce, "_slab_blocks", lambda: dict(BLOCK_M=4, BLOCK_C=32))
    monkeypatch.setattr(lce, "_slab_programs", lambda device: programs)
    V = 1003
    slopes = torch.tensor([0.25, 1.0, 6.0, -0.5, 0.0, 3.0, -6.0, 0.5, 2.0], device=DEV)
    N = slopes.numel()
    hidden = torch.stack([slopes, torch.ones(N, device=DEV)], 1)[None]  # logit = slope * j
    W = torch.stack([torch.arange(V, device=DEV, dtype=torch.float32),
                     torch.zeros(V, device=DEV)], 1)  # fmt: skip
    b = torch.zeros(V, device=DEV)
    b[130:175] = float("-inf")  # inside one slab, across a tile edge
    b[290:410] = float("-inf")  # a whole slab and parts of two
    allowed = (b == 0).nonzero().squeeze(1)
    target = allowed[torch.randint(0, allowed.numel(), (1, N), device=DEV)]
    mask = torch.ones(1, N, dtype=torch.bool, device=DEV)
    weight = torch.rand(1, 1, device=DEV) + 0.5
    _check("slab", hidden, W, b, target, mask, weight, label_smoothing=0.1, reduction="none")


@pytest.mark.slow
def test_large_vocabulary_slab(monkeypatch):
    # The eager CUDA path at Dream's vocabulary with its own slab width (V // 64 columns).
    monkeypatch.setattr(sys.modules[__name__], "SLAB_TEST_COLS", None)
    monkeypatch.setattr(lce, "_SLAB_MIN_ELEMS", 1)  # 4 rows: 2374-column slabs, not one
    assert lce._slab_cols(4, 151936) == 2432
    _check("slab", *_inputs((1, 5), 16, 151936, torch.float32, p_mask=0.8))


@pytest.mark.parametrize("name", ["triton", "slab"])
def test_out_of_range_target_is_nan_without_the_host_check(name, monkeypatch):
    # What CUDA does (the range check would sync): NaN at the row, never a plausible loss.
    _skip(name)
    from dlm_kernels.ops import cross_entropy as ce

    monkeypatch.setattr(ce, "_check_targets_on_host", lambda *a: False)
    hidden, W, b, target, mask, weight = _inputs((1, 37), 40, 1003, torch.float32, p_mask=1.0)
    target[0, 3] = 1003
    target[0, 5] = -2
    with _impl(name):
        loss = dlm_kernels.masked_linear_cross_entropy(hidden, W, target, mask, reduction="none")
    bad = torch.zeros_like(mask)
    bad[0, [3, 5]] = True
    assert bool(torch.isnan(loss[bad]).all()) and bool(torch.isfinite(loss[~bad]).all())


def test_bad_lce_choice_is_an_error(monkeypatch):
    skip_unless_available("triton")
    monkeypatch.setenv("DLM_KERNELS_LCE", "fast")
    hidden, W, b, target, mask, weight = _inputs((1, 7), 16, 33, torch.float32)
    with impl("triton"), pytest.raises(ValueError, match="DLM_KERNELS_LCE"):
        dlm_kernels.masked_linear_cross_entropy(hidden, W, target, mask)


@pytest.mark.parametrize("name", KERNELS)
def test_label_smoothing_on_logits_near_float_max(name):
    """Logits h . W in [1e38, 3.3e38] (H 1): label smoothing's row mean is finite (the float64
    reference's), though a float32 sum of the row is not; every path sums x / V."""
    _skip(name)
    dev = _dev(name)
    hidden = (torch.rand(5, 1, device=dev) * 0.8 + 1.0) * 1e19
    W = (torch.rand(1003, 1, device=dev) * 0.8 + 1.0) * 1e19
    target = torch.randint(0, 1003, (5,), device=dev)
    mask = torch.ones(5, dtype=torch.bool, device=dev)
    kw = dict(reduction="none", label_smoothing=0.1)
    want = reference.masked_linear_cross_entropy(hidden.double(), W.double(), target, mask, **kw)
    with _impl(name):
        got = dlm_kernels.masked_linear_cross_entropy(hidden, W, target, mask, **kw)
    assert got.isfinite().all(), got
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
