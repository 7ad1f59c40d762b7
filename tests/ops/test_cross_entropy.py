"""masked_cross_entropy: each implementation vs the float64 reference, forward and backward."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import dlm_kernels
from dlm_kernels import dispatch, reference
from tests.utils import assert_close, device, ids, impl, skip_unless_available

DEV = device()
# The kernel paths; the reference is checked against a naive formula and F.cross_entropy.
IMPLS = ["cpp", "triton"]


def _inputs(shape, V, dtype, p_mask=0.5, scale=3.0):
    logits = (torch.randn(*shape, V, device=DEV) * scale).to(dtype)
    target = torch.randint(0, V, shape, device=DEV)
    mask = torch.rand(shape, device=DEV) < p_mask
    weight = torch.rand(shape, device=DEV) + 0.5
    return logits, target, mask, weight


def _run(name, logits, target, mask, weight, grad_out=None, **kw):
    """Loss and d(loss * grad_out)/d(logits) of one implementation (logits cloned as a leaf)."""
    x = logits.detach().clone().requires_grad_(True)
    with impl(name):
        loss = dlm_kernels.masked_cross_entropy(x, target, mask, weight, **kw)
    if grad_out is None:
        grad_out = torch.tensor(1.7, dtype=torch.float64, device=loss.device)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def _check_against_reference(name, logits, target, mask, weight, **kw):
    # The same random upstream gradient for all three runs (per row for reduction="none").
    g = torch.randn(target.shape, dtype=torch.float64, device=target.device)
    if kw.get("reduction", "mean") != "none":
        g = g.reshape(-1)[0]
    ref_loss, ref_grad = _run("reference", logits.double(), target, mask, weight, g, **kw)
    low_loss, low_grad = _run("reference", logits, target, mask, weight, g, **kw)
    out_loss, out_grad = _run(name, logits, target, mask, weight, g, **kw)
    assert out_loss.dtype == torch.float32
    assert out_grad.dtype == logits.dtype
    assert_close(f"{name} loss", ref_loss, out_loss, low_loss)
    assert_close(f"{name} grad", ref_grad, out_grad, low_grad)


# ------------------------------------------------------------------ reference vs naive formula
def test_reference_matches_naive_formula():
    N, V, eps, z = 37, 1003, 0.1, 1e-3
    logits, target, mask, weight = _inputs((N,), V, torch.float64)
    out = reference.masked_cross_entropy(
        logits, target, mask, weight, reduction="none", label_smoothing=eps, z_loss=z
    )
    expected = torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        if not mask[i]:
            continue
        row = logits[i].tolist()
        lse = math.log(sum(math.exp(v) for v in row))
        nll = lse - row[target[i]]
        smooth = lse - sum(row) / V
        expected[i] = weight[i].item() * ((1 - eps) * nll + eps * smooth + z * lse * lse)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_reference_matches_torch_cross_entropy():
    logits, target, mask, _ = _inputs((4, 37), 1003, torch.float64)
    ours = reference.masked_cross_entropy(logits, target, mask, label_smoothing=0.2)
    theirs = F.cross_entropy(logits[mask], target[mask], label_smoothing=0.2)
    torch.testing.assert_close(ours, theirs)


# ------------------------------------------------------------------ kernels vs reference
@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: ids(d=d)
)
def test_against_reference_dtypes(name, dtype):
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((37,), 1003, dtype)
    _check_against_reference(name, logits, target, mask, weight)


OPTIONS = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smoothing": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-3},
    "normalizer": {"normalizer": 2 * 37},
    "all": {"label_smoothing": 0.05, "z_loss": 1e-4, "normalizer": 50.0},
}


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_options(name, opt):
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((2, 37), 1003, torch.float32)
    _check_against_reference(name, logits, target, mask, weight, **OPTIONS[opt])


@pytest.mark.parametrize("name", IMPLS)
def test_opcheck(name):
    """torch.library.opcheck: schema, fake tensor and autograd registration are consistent."""
    skip_unless_available(name)
    from dlm_kernels.ops import cross_entropy as ce

    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)
    x = logits.clone().requires_grad_(True)
    t, valid, w = ce.prepare_rows("t", target, mask, weight, -100, 1003, logits.device)
    torch.library.opcheck(ce._masked_ce_fwd, (x, t, valid, w, 0.1, 1e-3, name))
    lse = ce._masked_ce_fwd(logits, t, valid, w, 0.1, 1e-3, name)[1]
    g = torch.rand(37, device=DEV)
    torch.library.opcheck(ce._masked_ce_bwd, (g, logits, t, valid, w, lse, 0.1, 1e-3, name))


def test_torch_compile_fullgraph_first_call_in_a_fresh_process(tmp_path):
    """The dispatch is traceable even when the very first call of the process is compiled."""
    import subprocess
    import sys

    code = (
        "import torch, dlm_kernels\n"
        "x = torch.randn(37, 1003, requires_grad=True)\n"
        "t = torch.randint(0, 1003, (37,)); m = torch.rand(37) < 0.5\n"
        "f = torch.compile(lambda x: dlm_kernels.masked_cross_entropy(x, t, m), "
        "backend='aot_eager', fullgraph=True)\n"
        "f(x).backward(); print('ok', x.grad.abs().sum().item())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("name", IMPLS)
def test_no_mask_uses_ignore_index(name):
    skip_unless_available(name)
    logits, target, _, weight = _inputs((37,), 1003, torch.float32)
    target[::3] = -1
    _check_against_reference(name, logits, target, None, weight, ignore_index=-1)
    _check_against_reference(name, logits, target, None, None, ignore_index=-1)


@pytest.mark.parametrize("name", IMPLS)
def test_mask_and_ignore_index_combine(name):
    """A masked position whose target is ignore_index carries no loss and no gradient."""
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32, p_mask=1.0)
    target[:5] = -100
    loss, grad = _run(name, logits, target, mask, weight, reduction="none")
    assert (loss[:5] == 0).all() and (grad[:5] == 0).all()
    _check_against_reference(name, logits, target, mask, weight)


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("p_mask", [0.0, 1.0], ids=["none-masked", "all-masked"])
def test_none_and_all_masked(name, p_mask):
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((3, 37), 1003, torch.float32, p_mask=p_mask)
    loss, grad = _run(name, logits, target, mask, weight)
    if p_mask == 0.0:
        assert loss.item() == 0.0, "mean over no masked position is defined as 0"
        assert (grad == 0).all()
    else:
        _check_against_reference(name, logits, target, mask, weight)


@pytest.mark.parametrize("name", IMPLS)
def test_unmasked_rows_are_never_read(name):
    """NaN and -inf in rows that carry no loss change nothing."""
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)
    mask[0], mask[1], mask[2] = False, True, False
    logits[0] = float("nan")
    logits[2] = float("-inf")
    loss, grad = _run(name, logits, target, mask, weight, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("name", IMPLS)
def test_neg_inf_logits(name):
    """-inf logits (banned tokens) are legal; a -inf target logit gives +inf loss."""
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32, p_mask=1.0)
    logits[:, 500:] = float("-inf")  # half the vocabulary banned everywhere
    target = target % 500
    logits[3, :-1] = float("-inf")  # all but one token banned
    logits[3, -1] = 0.0
    target[3] = 1002
    _check_against_reference(name, logits, target, mask, weight)
    target[4] = 700  # the target itself banned
    loss, _ = _run(name, logits, target, mask, weight, reduction="none")
    assert loss[4].item() == float("inf")
    assert torch.isfinite(loss[torch.arange(37) != 4]).all()


@pytest.mark.parametrize("name", IMPLS)
def test_nan_logits_give_nan_loss(name):
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32, p_mask=1.0)
    logits[7, 11] = float("nan")
    with impl(name):
        loss = dlm_kernels.masked_cross_entropy(logits, target, mask, reduction="none")
    assert torch.isnan(loss[7])
    assert torch.isfinite(loss[torch.arange(37) != 7]).all()


@pytest.mark.parametrize("opts", [{}, {"z_loss": 1e-3}, {"label_smoothing": 0.1}],
                         ids=["plain", "z_loss", "smoothing"])  # fmt: skip
@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["bwd", "grad_in_fwd"])
@pytest.mark.parametrize("name", IMPLS)
def test_pos_inf_and_nan_rows_match_the_reference(name, grad_in_forward, opts):
    """A +inf logit (the target elsewhere or on it) and a NaN logit poison their own rows exactly
    as the reference does: loss and gradient, NaN where the reference has NaN and nowhere else
    (without z-loss, 2 z lse was NaN at lse = +inf and made every gradient of the row NaN)."""
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((9,), 1003, torch.float32, p_mask=1.0)
    target[1:4] = torch.tensor([5, 6, 7], device=DEV)
    logits[1, 40] = float("inf")  # target elsewhere
    logits[2, 6] = float("inf")  # on the target
    logits[3, 7] = float("nan")
    logits[4, :] = float("-inf")
    g = torch.randn(9, dtype=torch.float64, device=DEV)
    kw = dict(reduction="none", **opts)
    want_loss, want_grad = _run("reference", logits.double(), target, mask, weight, g, **kw)
    leaf = logits.detach().clone().requires_grad_(True)
    x = leaf * 1  # grad_in_forward writes over the logits: they must come from an op
    with impl(name):
        got_loss = dlm_kernels.masked_cross_entropy(
            x, target, mask, weight, grad_in_forward=grad_in_forward, **kw
        )
    (got_loss * g.to(got_loss.dtype)).sum().backward()
    got_loss, got_grad = got_loss.detach(), leaf.grad
    assert torch.equal(got_loss.isnan(), want_loss.isnan()), (got_loss, want_loss)
    assert torch.equal(got_grad.isnan(), want_grad.isnan()), got_grad.isnan().sum(1)
    torch.testing.assert_close(got_loss.double(), want_loss, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", IMPLS)
def test_label_smoothing_on_logits_near_float_max(name):
    """Rows of finite logits in [1e38, 3e38]: label smoothing's row mean is finite (float64
    reference), though the row's float32 sum is not (it overflowed to inf in both kernels)."""
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((5,), 1003, torch.float32, p_mask=1.0)
    logits = torch.rand(5, 1003, device=DEV) * 2e38 + 1e38
    g = torch.randn(5, dtype=torch.float64, device=DEV)
    kw = dict(reduction="none", label_smoothing=0.1)
    want_loss, want_grad = _run("reference", logits.double(), target, mask, weight, g, **kw)
    got_loss, got_grad = _run(name, logits, target, mask, weight, g, **kw)
    assert got_loss.isfinite().all(), got_loss
    torch.testing.assert_close(got_loss.double(), want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("V", [33, 44, 64, 66])  # 64: one whole tile (the unmasked loop)
@pytest.mark.parametrize("name", IMPLS)
def test_label_smoothing_on_rows_of_float_max(name, V):
    """Rows of +-FLT_MAX: the row mean is +-FLT_MAX, and the smoothing term lse - mean is
    finite (0 in float64). A float32 sum of x * fl(1 / V) overflowed to inf at these V (fl(1 / V)
    rounds up), which gave the loss -inf or +inf (a fuzzing helper's find)."""
    skip_unless_available(name)
    big = 3.4028234663852886e38
    logits = torch.tensor([[big], [-big]], device=DEV).expand(2, V).contiguous()
    target = torch.zeros(2, dtype=torch.int64, device=DEV)
    mask = torch.ones(2, dtype=torch.bool, device=DEV)
    weight = torch.ones(2, device=DEV)
    kw = dict(reduction="none", label_smoothing=0.1)
    want, _ = _run("reference", logits.double(), target, mask, weight, **kw)
    got, _ = _run(name, logits, target, mask, weight, **kw)
    assert got.isfinite().all(), got
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def _tile_rows(V, dtype, huge=True):
    """Rows that drive the forward's per-chunk anchors through every case, tile after tile.
    huge: also rows of logits near the float limits (not with smoothing or z-loss, whose float32
    row mean and lse^2 overflow there)."""
    j = torch.arange(V, dtype=torch.float32)
    big = 3.0e38
    rows = [
        torch.randn(V) * 3,
        j * 0.3,  # rising slowly: the anchors stay put, terms grow up to e^8
        j * 1.0,  # rising fast: each tile moves the anchors (sums rescaled)
        -j * 0.5,  # falling
        torch.where(j < V // 2, float("-inf"), torch.randn(V)),  # -inf first, then values
        torch.where(j < V // 2, torch.randn(V), float("-inf")),  # values, then a -inf tail
        torch.where(j == V - 40, float("nan"), torch.randn(V)),  # NaN in a late tile
        torch.where((j >= 96) & (j < 100), float("nan"), float("-inf")),  # NaN beside -inf only
        torch.where(j == V - 30, float("inf"), torch.randn(V)),  # +inf in a late tile
        torch.where(j == V - 1, 0.0, float("-inf")),  # one finite logit, last
        torch.full((V,), float("-inf")),  # nothing finite
        torch.randn(V) * 30,  # wide spread
    ]
    if huge:
        rows += [
            torch.full((V,), -big),  # finite, far below every other row
            torch.where(j % 17 == 0, big / 4, -big / 4),  # weight * (lse - x_t) stays finite
        ]
    return torch.stack(rows).to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}],
                         ids=["plain", "smoothing", "z_loss"])  # fmt: skip
@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["bwd", "grad_in_fwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: ids(d=d))
@pytest.mark.parametrize("tile, V", [(16, 203), (64, 192)])
def test_rows_swept_over_many_tiles_match_the_reference(tile, V, dtype, grad_in_forward, opts,
                                                        monkeypatch):  # fmt: skip
    """Tile-to-tile paths of the sweeps (the anchors' moves, -inf / NaN / +inf arriving in a
    later tile, a ragged last tile or none): the interpreter's tile is lowered to 16 or 64
    columns so that a row takes 3 to 13 of them; on a GPU, V grows to 3 GPU tiles and 203
    columns, or to exactly 3 GPU tiles."""
    skip_unless_available("triton")
    from dlm_kernels.ops import cross_entropy as ce

    monkeypatch.setattr(ce, "_INTERP_BLOCK_V", tile)
    if DEV.type == "cuda":
        # The tile above is the interpreter's: here 3 GPU tiles and a ragged 203 columns, or
        # exactly 3 GPU tiles (no ragged one).
        V = 3 * ce._GPU_BLOCK_V + (203 if V == 203 else 0)
    logits = _tile_rows(V, dtype, huge=not opts)
    N = logits.shape[0]
    target = torch.randint(0, V, (N,), device=DEV)
    target[9] = V - 1  # the one finite logit
    mask = torch.ones(N, dtype=torch.bool, device=DEV)
    weight = torch.rand(N, device=DEV) + 0.5
    g = torch.randn(N, dtype=torch.float64, device=DEV)
    kw = dict(reduction="none", **opts)
    want_loss, want_grad = _run("reference", logits.double(), target, mask, weight, g, **kw)
    low_loss, low_grad = _run("reference", logits, target, mask, weight, g, **kw)
    leaf = logits.detach().clone().requires_grad_(True)
    x = leaf * 1  # grad_in_forward writes over the logits: they must come from an op
    with impl("triton"):
        got_loss = dlm_kernels.masked_cross_entropy(
            x, target, mask, weight, grad_in_forward=grad_in_forward, **kw
        )
    (got_loss * g.to(got_loss.dtype)).sum().backward()
    assert_close("loss", want_loss, got_loss.detach(), low_loss)
    assert_close("grad", want_grad, leaf.grad, low_grad)


@pytest.mark.parametrize("name", IMPLS)
def test_noncontiguous_logits_and_broadcast_weight(name):
    skip_unless_available(name)
    base = torch.randn(3, 37, 2 * 1003, device=DEV)
    logits = base[..., ::2]  # last-dim stride 2
    target = torch.randint(0, 1003, (3, 37), device=DEV)
    mask = torch.rand(3, 37, device=DEV) < 0.5
    weight = torch.rand(3, 1, device=DEV) + 0.5  # one 1/t per sequence
    _check_against_reference(name, logits, target, mask, weight, normalizer=3 * 37)


@pytest.mark.slow
@pytest.mark.parametrize("name", IMPLS)
def test_vocab_151936(name):
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((5,), 151936, torch.bfloat16)
    mask[0] = True
    _check_against_reference(name, logits, target, mask, weight, label_smoothing=0.1)


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_repeat_runs_are_bitwise_identical(name):
    """Deterministic: two runs give identical results (no atomics, fixed reduction order)."""
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)
    a = _run(name, logits, target, mask, weight)
    b = _run(name, logits, target, mask, weight)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gradcheck_float64_reference_path():
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (5,))
    mask = torch.tensor([True, False, True, True, False])
    weight = torch.rand(5, dtype=torch.float64) + 0.5

    def f(x):
        return dlm_kernels.masked_cross_entropy(
            x, target, mask, weight, label_smoothing=0.1, z_loss=0.01
        )

    assert torch.autograd.gradcheck(f, (logits,))


def test_torch_compile_with_custom_op():
    """The C++ path is a registered custom op: torch.compile traces it without graph breaks."""
    skip_unless_available("cpp")
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)

    def f(x):
        return dlm_kernels.masked_cross_entropy(x, target, mask, weight)

    with impl("cpp"):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        x1 = logits.clone().requires_grad_(True)
        compiled(x1).backward()
        x2 = logits.clone().requires_grad_(True)
        f(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"target": "float"}, TypeError, "target must be an integer"),
        ({"target": "shape"}, ValueError, "target's shape"),
        ({"target": "range"}, ValueError, "target must lie in [0, 1003)"),
        ({"mask": "int"}, TypeError, "mask must be a bool"),
        ({"mask": "shape"}, ValueError, "mask must have the shape"),
        ({"weight": "shape"}, ValueError, "weight must have the shape"),
        ({"weight": "int"}, TypeError, "weight must be a floating-point"),
        ({"logits": "int"}, TypeError, "logits must be a float32"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must lie in [0, 1]"),
        ({"z_loss": float("nan")}, ValueError, "z_loss must be >= 0"),
        ({"normalizer": torch.tensor(0.0)}, ValueError, "normalizer must be > 0"),
        ({"normalizer": torch.ones(2)}, ValueError, "normalizer must be a number or a one-"),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else "",
)
@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_bad_input_errors_name_the_argument(name, kwargs, exc, words, monkeypatch):
    skip_unless_available(name)
    monkeypatch.setenv("DLM_KERNELS_CHECK", "1")  # the range check syncs, so CUDA asks for it
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)
    args = {"logits": logits, "target": target, "mask": mask, "weight": weight}
    opts = {}
    for k, v in kwargs.items():
        if k == "target":
            args["target"] = {
                "float": target.float(),
                "shape": target[:-1],
                "range": torch.where(mask, torch.full_like(target, 1003), target),
            }[v]
        elif k == "mask":
            args["mask"] = {"int": mask.long(), "shape": mask[:5]}[v]
        elif k == "weight":
            args["weight"] = {"shape": weight[:5], "int": weight.long()}[v]
        elif k == "logits":
            args["logits"] = logits.long()
        else:
            opts[k] = v
    with impl(name), pytest.raises(exc, match=re.escape(words)):
        dlm_kernels.masked_cross_entropy(
            args["logits"], args["target"], args["mask"], args["weight"], **opts
        )


@pytest.mark.parametrize("name", ["reference", *IMPLS])
def test_one_element_normalizer_gives_a_scalar(name):
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)
    with impl(name):
        a = dlm_kernels.masked_cross_entropy(logits, target, mask, weight, normalizer=7.0)
        b = dlm_kernels.masked_cross_entropy(logits, target, mask, weight,
                                             normalizer=torch.tensor([7.0]))  # fmt: skip
    assert a.shape == b.shape == () and torch.equal(a, b)


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    import importlib
    import warnings

    real_import = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "dlm_kernels._C":
            raise ImportError("simulated: extension not built")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    try:
        logits = torch.randn(37, 1003)  # CPU tensors: the C++ ops serve the CPU only
        target, mask = torch.randint(0, 1003, (37,)), torch.rand(37) < 0.5
        weight = torch.rand(37) + 0.5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dispatch.refresh()  # the load is retried, fails, warns once
            with impl("auto"):
                a = dlm_kernels.masked_cross_entropy(logits, target, mask, weight)
                dlm_kernels.masked_cross_entropy(logits, target, mask, weight)
        msgs = [w for w in caught if "dlm_kernels._C could not be loaded" in str(w.message)]
        assert len(msgs) == 1, [str(w.message) for w in caught]
        assert dispatch.select(torch.device("cpu")) == "reference"
        b = reference.masked_cross_entropy(logits, target, mask, weight)
        torch.testing.assert_close(a, b)
    finally:
        monkeypatch.undo()
        dispatch.refresh()


def test_dispatch_env_override_is_validated(monkeypatch):
    monkeypatch.setenv("DLM_KERNELS_IMPL", "fastest")
    with pytest.raises(ValueError, match="DLM_KERNELS_IMPL must be one of"):
        dispatch.refresh()
    monkeypatch.undo()
    dispatch.refresh()
    assert dispatch.requested_impl() == "auto"


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: ids(d=d))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_in_forward_matches_reference(name, dtype, reduction):
    """Liger's trade: the gradient is written over the logits in the forward pass."""
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((2, 37), 1003, dtype)
    kw = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3}
    g = torch.randn(target.shape, dtype=torch.float64, device=DEV)
    if reduction != "none":
        g = g.reshape(-1)[0]
    ref_loss, ref_grad = _run("reference", logits.double(), target, mask, weight, g, **kw)
    low_loss, low_grad = _run("reference", logits, target, mask, weight, g, **kw)
    leaf = logits.detach().clone().requires_grad_(True)
    x = leaf * 1  # a non-leaf, as the output of an LM head would be
    with impl(name):
        loss = dlm_kernels.masked_cross_entropy(x, target, mask, weight, grad_in_forward=True, **kw)
    assert not torch.equal(x.detach(), logits), "the logits' storage holds the gradient now"
    (loss * g.to(loss.dtype)).sum().backward()
    assert_close(f"{name} loss", ref_loss, loss.detach(), low_loss)
    assert_close(f"{name} grad", ref_grad, leaf.grad, low_grad)


def test_grad_in_forward_refuses_a_leaf():
    skip_unless_available("cpp")
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)
    with impl("cpp"), pytest.raises(ValueError, match="not a leaf tensor"):
        dlm_kernels.masked_cross_entropy(
            logits.requires_grad_(True), target, mask, weight, grad_in_forward=True
        )


@pytest.mark.parametrize("name", IMPLS)
def test_grad_in_forward_second_backward_says_why(name):
    # retain_graph=True then a second backward: a message naming the op and the way out, not
    # autograd's generic in-place error. The first backward's gradient stays right.
    skip_unless_available(name)
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)
    leaf = logits.clone().requires_grad_(True)
    with impl(name):
        loss = dlm_kernels.masked_cross_entropy(leaf * 1, target, mask, weight,
                                                grad_in_forward=True)  # fmt: skip
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    with pytest.raises(RuntimeError, match="grad_in_forward=True.*retain_graph"):
        loss.backward()
    assert torch.equal(leaf.grad, first)


def test_grad_in_forward_compiles_fullgraph():
    skip_unless_available("cpp")
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)

    def f(leaf):
        return dlm_kernels.masked_cross_entropy(
            leaf * 2, target, mask, weight, grad_in_forward=True
        )

    with impl("cpp"):
        a = logits.clone().requires_grad_(True)
        torch.compile(f, backend="aot_eager", fullgraph=True)(a).backward()
        b = logits.clone().requires_grad_(True)
        f(b).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_weight_gets_no_gradient():
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)
    weight.requires_grad_(True)
    for name in ["reference", "cpp" if DEV.type == "cpu" else "triton"]:
        skip_unless_available(name)
        with impl(name):
            loss = dlm_kernels.masked_cross_entropy(
                logits.requires_grad_(True), target, mask, weight
            )
        loss.backward()
        assert weight.grad is None, name


def test_grad_in_forward_guards_other_users_of_the_logits():
    """An op that saved the logits for its backward fails loudly, not silently."""
    skip_unless_available("cpp")
    logits, target, mask, weight = _inputs((37,), 1003, torch.float32)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1
    y = (x * x).sum()  # saves x for its backward
    with impl("cpp"):
        loss = dlm_kernels.masked_cross_entropy(x, target, mask, weight, grad_in_forward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + y).backward()


@pytest.mark.parametrize("name", ["reference", *IMPLS])
def test_narrow_integer_targets_are_not_wrapped_onto_ignore_index(name):
    """A uint8 target of 156 is a real token: -100 (the default ignore_index) must not be
    compared in uint8, where it wraps to 156; likewise an int32 target against an
    ignore_index beyond int32."""
    skip_unless_available(name)
    logits, target, _, _ = _inputs((37,), 300, torch.float32)
    target = target % 256  # every target fits uint8
    target[:4] = 156
    wide, _ = _run(name, logits, target, None, None, reduction="none")
    narrow, _ = _run(name, logits, target.to(torch.uint8), None, None, reduction="none")
    assert (wide[:4] > 0).all()
    assert torch.equal(narrow, wide)
    far, _ = _run(name, logits, target.to(torch.int32), None, None, reduction="none",
                  ignore_index=2**32 + 156)  # fmt: skip
    assert torch.equal(far, wide)


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_second_order_gradients_are_refused_by_name_on_kernel_paths(name):
    # A backward through gradients taken with create_graph=True: the kernel paths have no
    # second-order formulas and must say so by op name (torch's own error names an internal
    # op), while the cross-entropies' reference paths compute them.
    skip_unless_available(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g).to(device())
    t = torch.randint(0, 7, (4,), generator=g).to(device())
    h, W = (torch.randn(n, 5, generator=g).to(device()) for n in (4, 7))
    q = torch.randn(1, 5, 2, 8, generator=g).to(device())
    calls = {
        "masked_cross_entropy": (lambda a: dlm_kernels.masked_cross_entropy(a, t), x),
        "masked_linear_cross_entropy": (
            lambda a: dlm_kernels.masked_linear_cross_entropy(
                a, W.to(a.dtype), t, reduction="none"
            ).sum(),
            h,
        ),
        "bidirectional_attention": (
            lambda a: dlm_kernels.bidirectional_attention(a, a, a).sum(),
            q,
        ),
    }
    for op, (f, a) in calls.items():
        if name == "cpp" and op == "bidirectional_attention":
            continue  # its CPU path is the reference (SDPA)
        a = a.clone().requires_grad_(True)
        with dispatch.use(name):
            (gr,) = torch.autograd.grad(f(a), a, create_graph=True)
            with pytest.raises(RuntimeError, match=f"{op}: no second-order gradients"):
                gr.pow(2).sum().backward()
        if op != "bidirectional_attention":
            b = a.detach().double().requires_grad_(True)
            with dispatch.use("reference"):
                (gr,) = torch.autograd.grad(f(b), b, create_graph=True)
                gr.pow(2).sum().backward()
            assert b.grad is not None and torch.isfinite(b.grad).all()
