"""sample_tokens / unmask_step: every path against the float64 reference.

Deterministic where it can be (T = 0, and T > 0 with a fixed seed: the Philox draws are the same
on every path, so tokens must be equal), statistical where it cannot (chi-square of many draws
against the exact filtered distribution, computed here independently of the package).
The Triton interpreter is slow, so its shapes are small (V 203, a few rows).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dlm_kernels import dispatch, reference, sample_tokens, unmask_step
from dlm_kernels.ops import unmask_sample as us
from tests.utils import assert_close, device, ids, impl, run_on, skip_unless_available

KERNELS = ["cpp", "triton"]
CONFS = ["prob", "raw_prob", "margin", "neg_entropy", "random"]
FILTERS = {
    "none": {},
    "topk": {"top_k": 17},
    "topp": {"top_p": 0.8},
    "minp": {"min_p": 0.05},
    "all": {"top_k": 40, "top_p": 0.9, "min_p": 0.02},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The reference's Philox is ~60 small int64 ops per call; on a loaded 2-core machine each
    # parallel region waits ~16 ms for the second thread, so run these tests single-threaded
    # (test_cpp_thread_count_invariant checks the C++ path with more threads).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _logits(n, v, scale=2.0, dtype=torch.float32):
    return (torch.randn(n, v, dtype=torch.float64) * scale).to(dtype)


def _run(name, fn, *args, **kw):
    return run_on(name, fn, *args, **kw)


def _check_same(out, ref, name):
    tok, conf = out
    rtok, rconf = ref
    assert torch.equal(tok, rtok), f"{name}: tokens differ at {(tok != rtok).nonzero().flatten()}"
    assert_close(f"{name} confidence", rconf, conf, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------
def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32_10.
    cases = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 2**64 - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            0x299F31D0A4093822,
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for (c0, c1, c2, c3), key, want in cases:
        got = reference.philox4x32(torch.tensor([c0]), c1, c2, c3, key)
        assert [int(w) for w in got] == list(want)


def test_philox_cpp_matches_reference():
    skip_unless_available("cpp")
    c0 = torch.randint(0, 2**32, (4099,), dtype=torch.int64)
    seed = 0x1234_5678_9ABC_DEF0
    want = torch.stack(reference.philox4x32(c0, 77, 5, 3, seed), dim=1)
    got = dispatch.cpp_ops().philox4x32(c0, 77, 5, 3, seed)
    assert torch.equal(got, want)
    u = reference.philox_uniform(c0, 77, 0, seed, 5)
    assert bool(((u > 0) & (u < 1)).all())


# ---------------------------------------------------------------------------------------------
# T = 0: exact tokens, confidence to float32 precision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("filt", list(FILTERS))
@pytest.mark.parametrize("conf", CONFS)
def test_greedy_cpp(conf, filt):
    skip_unless_available("cpp")
    x = _logits(33, 1003)
    kw = dict(confidence=conf, seed=5, **FILTERS[filt])
    ref = _run("reference", sample_tokens, x, **kw)
    _check_same(_run("cpp", sample_tokens, x, **kw), ref, f"cpp-{conf}-{filt}")
    assert torch.equal(ref[0], x.argmax(-1))


TRITON_GREEDY = (
    [(c, "all") for c in CONFS]
    + [("prob", f) for f in ("none", "topk", "topp", "minp")]
    + [("margin", "none"), ("raw_prob", "none")]
)


@pytest.mark.parametrize("conf,filt", TRITON_GREEDY)
def test_greedy_triton(conf, filt):
    skip_unless_available("triton")
    x = _logits(3, 203)
    kw = dict(confidence=conf, seed=5, **FILTERS[filt])
    ref = _run("reference", sample_tokens, x, **kw)
    _check_same(_run("triton", sample_tokens, x, **kw), ref, f"triton-{conf}-{filt}")


def test_greedy_ties_lowest_index():
    x = torch.zeros(3, 50)
    x[0, [7, 3, 40]] = 2.0
    x[1] = 1.0
    x[2, [49, 48]] = 5.0
    for name in ["reference", "cpp", "triton"]:
        skip_unless_available(name)
        tok, conf = _run(name, sample_tokens, x, confidence="margin")
        assert tok.tolist() == [3, 0, 48], name
        assert conf.tolist() == [0.0, 0.0, 0.0], name  # a tie at the top: margin 0


def test_cpp_general_path_argmax_and_kept_set_edges():
    # The C++ general path (any filter, or T > 0) finds the max's first index and compacts the
    # kept tokens 8 at a time, and top_p's threshold bin 16 at a time (AVX2): maxima at 0, at a
    # vector's last lane, tied across vectors and in the ragged tail; V 1003 = 62 x 16 + 11.
    skip_unless_available("cpp")
    v = 1003
    x = _logits(6, v)
    x[0, 0] = 9.0
    x[1, [7, 8]] = 9.0  # a tie across two 8-wide vectors: the lower index
    x[2, [15, 1000]] = 9.0
    x[3, v - 1] = 9.0  # in the ragged tail
    x[4, [999, 1002]] = 9.0
    x[5, 500:] = float("-inf")  # the kept set ends mid-row
    for kw in (dict(top_k=40), dict(temperature=0.6, top_p=0.9), dict(temperature=0.6),
               dict(top_p=0.5, min_p=0.01)):  # fmt: skip
        for conf in ("prob", "margin"):
            kw2 = dict(confidence=conf, seed=4, **kw)
            ref = _run("reference", sample_tokens, x, **kw2)
            got = _run("cpp", sample_tokens, x, **kw2)
            _check_same(got, ref, f"cpp-{conf}-{kw}")
            if "temperature" not in kw:
                assert got[0][:5].tolist() == [0, 7, 15, v - 1, 999]


def test_cpp_top_k_threshold_with_ties():
    # top_k's threshold is the k-th largest value counting duplicates, as the reference's sort:
    # small integer logits tie at every threshold. Small k over a long row takes the C++ heap
    # (k <= 1024 and 16 k <= V), large k nth_element; -inf entries and k = 1 included.
    skip_unless_available("cpp")
    g = torch.Generator().manual_seed(21)
    x = torch.randint(-6, 7, (5, 4099), generator=g).to(torch.float32)
    x[1, ::3] = float("-inf")
    x[2, 100:110] = 7.0  # ten tied maxima
    x[3, 4098] = 9.0  # the largest values in the ragged tail
    x[4, [4097, 4098]] = torch.tensor([8.0, 8.5])
    for k in (1, 2, 3, 10, 11, 64, 256, 300, 1024, 2000):
        for kw in (dict(), dict(temperature=0.8)):
            kw2 = dict(top_k=k, seed=6, **kw)
            ref = _run("reference", sample_tokens, x, **kw2)
            _check_same(_run("cpp", sample_tokens, x, **kw2), ref, f"cpp-top_k{k}-{kw}")


@pytest.mark.parametrize("conf", CONFS)
def test_triton_small_tiles(conf, monkeypatch):
    # The interpreter's default tile holds a whole small row: force 64-wide tiles so that the
    # cross-tile paths run (the online max of the one-pass greedy rows, with its rescaled sums;
    # ties and maxima in later tiles; per-row filters that switch the one-pass path off for some
    # rows only), greedy and sampled, against the reference.
    skip_unless_available("triton")
    import dlm_kernels.ops.unmask_sample as us

    monkeypatch.setattr(us, "_block_v", lambda V: 64)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(11, 301, generator=g, dtype=torch.float64) * 2
    x[0] += torch.linspace(0, 20, 301, dtype=torch.float64)  # a new max in every tile
    x[1, [70, 200]] = 12.0  # a tie across tiles: the lower index
    x[2, :100] = float("-inf")  # -inf tiles before the first finite value
    x[3, 5] = float("nan")
    x[4, 64] = 10.0  # the first element of a tile
    x[6, [10, 300]] = torch.tensor([9.0, 9.5], dtype=torch.float64)  # margin: the second value
    # in an earlier tile than the max, the max in the ragged last tile
    # The same slot of two tiles (one lane of the one-pass greedy rows): a tie at the top (the
    # lower index, margin 0), and the top two values in either order.
    x[7, [5, 69]] = 12.0
    x[8, [20, 84]] = torch.tensor([11.0, 10.5], dtype=torch.float64)
    x[9, [30, 94]] = torch.tensor([10.5, 11.0], dtype=torch.float64)
    xs = x.to(torch.float32)
    # A lane's most negative float before +inf (FLT_MAX): their difference overflows float32.
    xs[10] = xs[6]
    xs[10, [15, 79]] = torch.tensor([torch.finfo(torch.float32).min, float("inf")])
    # The one-pass greedy loop maps only +inf (and for margin NaN) itself: NaN in the max's lane
    # before and after it, beside the second value, a whole tile of NaN; two +inf in one lane
    # (their difference is NaN); -0 tied with +0 at the top (the lower index wins).
    xs = torch.cat([xs, xs[:3].clone()])
    xs[11, ::5] = float("nan")
    xs[11, [96, 128, 160]] = torch.tensor([8.0, float("nan"), 7.5])
    xs[11, 192:256] = float("nan")
    xs[12, [3, 67, 200]] = float("inf")
    xs[13] = float("-inf")
    xs[13, [3, 7]] = torch.tensor([-0.0, 0.0])
    xs[13, 100] = -1.0
    # some rows filtered, some not
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0, 0.7, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    top_k = torch.tensor([0, 5, 0, 301, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    for kw in (dict(), dict(top_p=top_p), dict(top_k=top_k)):
        for T in (0.0, 0.8):
            kw2 = dict(confidence=conf, temperature=T, seed=3, **kw)
            ref = _run("reference", sample_tokens, xs, **kw2)
            got = _run("triton", sample_tokens, xs, **kw2)
            _check_same(got, ref, f"triton-{conf}-{T}-{kw}")
            if T == 0.0 and not kw:
                assert got[0][12] == 3 and got[0][13] == 3, got[0][11:]


def test_all_greedy_reads_only_what_the_host_holds():
    assert us.all_greedy(0) and us.all_greedy(0.0) and us.all_greedy(np.float64(0.0))
    assert not us.all_greedy(0.7) and not us.all_greedy(False) and not us.all_greedy(1e-30)
    assert us.all_greedy(torch.zeros(3)) and not us.all_greedy(torch.tensor([0.0, 0.5]))


def test_triton_greedy_kernel_matches_the_general_one(monkeypatch):
    # A temperature the host knows to be 0 everywhere, with no filter, launches the kernel
    # compiled with the one-pass greedy path alone (GREEDY: fewer registers); a per-row
    # temperature with a sampled row, or a filter, launches the general kernel, whose greedy
    # rows take the same one-pass code. Both against the reference: +inf (two, and beside
    # FLT_MAX), NaN, a row of -inf, -0 tied with +0, ties across tiles and chunks.
    skip_unless_available("triton")
    seen = []
    real = us._sample_rows_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["GREEDY"])
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(us, "_sample_rows_kernel", Spy())
    monkeypatch.setattr(us, "_block_v", lambda V: 64)
    monkeypatch.setenv("DLM_KERNELS_AUTOTUNE", "0")  # on a GPU: the direct launch, spied
    # A temperature tensor is read on the host only where it lives there (a CUDA read syncs).
    host_tensor = device().type == "cpu"
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 301, generator=g) * 2
    x[0, [40, 41, 250]] = 11.0  # ties inside one chunk and across tiles
    x[1, [7, 130]] = float("inf")
    x[1, 9] = torch.finfo(torch.float32).max
    x[2, ::4] = float("nan")
    x[3] = float("-inf")
    x[4] = float("-inf")
    x[4, [12, 5]] = torch.tensor([0.0, -0.0])
    x[5] += torch.linspace(0, 40, 301)  # a new anchor in almost every chunk
    x[6, 300] = 30.0  # the max alone in the ragged last chunk
    x[7, [3, 20]] = torch.tensor([torch.finfo(torch.float32).max, float("inf")])  # FLT_MAX first
    x[7, [5, 21]] = float("inf")  # (+inf counts as FLT_MAX: index 3 wins, in chunk and across)
    mixed = torch.zeros(9, dtype=torch.float64)
    mixed[8] = 0.6
    for conf in ("prob", "raw_prob", "margin", "neg_entropy", "random"):
        for T, kw, greedy in ((0.0, {}, True), (torch.zeros(9), {}, host_tensor),
                              (mixed, {}, False), (0.0, {"top_k": 5}, False)):  # fmt: skip
            # random has no one-pass path (the general kernel stores the 0 it replaces)
            greedy = greedy and conf != "random"
            args = dict(confidence=conf, temperature=T, seed=4, **kw)
            ref = _run("reference", sample_tokens, x, **args)
            seen.clear()
            got = _run("triton", sample_tokens, x, **args)
            assert seen == [greedy], (conf, T, kw, seen)
            _check_same(got, ref, f"triton-{conf}-{greedy}-{sorted(kw)}")


@pytest.mark.parametrize("conf", ["prob", "margin", "neg_entropy"])
def test_triton_greedy_rising_rows_keep_precision(conf, monkeypatch):
    # Rows whose max rises slowly give every lane of the one-pass greedy path a new max at
    # almost every tile. Rescaling its sum at each one by a float32 factor compounded to ~1e-5
    # relative error; the confidence must stay at float32 rounding (relative, not the 1e-6
    # absolute tolerance, which small probabilities pass anyway).
    skip_unless_available("triton")
    import dlm_kernels.ops.unmask_sample as us

    monkeypatch.setattr(us, "_block_v", lambda V: 4)
    g = torch.Generator().manual_seed(5)
    ramp = torch.linspace(0, 1, 1024, dtype=torch.float64)
    x = torch.stack([ramp, ramp * 4, ramp * 0.25 + torch.rand(1024, generator=g) * 1e-3])
    x = x.to(torch.float32)
    rows = [x]
    if conf == "neg_entropy":
        # A chunk whose anchor stays up to 8 below a later chunk's max (the anchor moves only
        # beyond 8): sums of e (x - a) measured from it, e^8 x 8 per term in float32, lost up
        # to 2.5e-6 relative in the final E / Z - log Z (a fuzzing helper's finding).
        head = torch.rand(64, 4, generator=g) * -3
        head[:, 0] = 0.0
        rows.append(torch.cat([head, 5.5 + torch.rand(64, 2, generator=g) * 2.49], 1))
    for y in rows:
        ref = _run("reference", sample_tokens, y, confidence=conf)
        tok, c = _run("triton", sample_tokens, y, confidence=conf)
        assert torch.equal(tok, ref[0])
        rel = ((c.double() - ref[1].double()).abs() / ref[1].double().abs()).max().item()
        assert rel < 5e-7, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: ids(d=d))  # fmt: skip
def test_triton_thresholds_on_narrowed_keys(dtype, monkeypatch):
    # The top_k / top_p searches run over int32 keys of the widened logits shifted right by the
    # bits a bf16 (16) or fp16 (13) value leaves at zero: the thresholds must still fall on the
    # reference's data values. Heavy ties (logits rounded to 1/4), values on both sides of zero
    # and -0.0, top_k boundaries inside a run of ties, top_p targets that a run of ties straddles,
    # +inf (FLT_MAX to every path) beside the dtype's largest finite value (one bf16 key apart
    # only because FLT_MAX gets bf16 +inf's key), -inf and NaN; 64-wide tiles so that each pass
    # spans several tiles. Tokens and confidences against the reference, at T 0 and T > 0.
    skip_unless_available("triton")
    import dlm_kernels.ops.unmask_sample as us

    monkeypatch.setattr(us, "_block_v", lambda V: 64)
    g = torch.Generator().manual_seed(21)
    v = 301
    x = torch.round(torch.randn(8, v, generator=g, dtype=torch.float64) * 8) / 4
    big = torch.finfo(dtype).max
    x[0, 7], x[0, 200] = float("inf"), big  # top_k 1 and 2 around the +inf stand-in
    x[1, 150:] = -0.0
    x[1, :150] = torch.round(x[1, :150])  # few distinct values: long runs of ties at 0 and -0
    x[2, ::3] = float("-inf")
    x[2, 1::7] = float("nan")
    x[3] = x[3].abs() * -1.0 - 2.0  # all negative
    x[4, 100:110] = 5.0  # a run of ties at the top
    x[5] = x[5] * 40.0  # a wide spread: many keys between the max and the threshold
    # Values two fp16 ulps apart, and float32 ones a few ulps apart (rounded away in 16 bits):
    # keys that a wider shift would merge.
    x[6] = 200.0 + x[6] / 4 + torch.randint(0, 8, (v,), generator=g) * 2.0**-16
    x[7, 3] = big
    xs = x.to(dtype)
    top_k = torch.tensor([1, 2, 160, 9, 5, 300, 7, 1])
    top_p = torch.tensor([0.5, 0.999, 0.6, 0.3, 0.95, 0.01, 0.6, 0.9])
    for kw in (dict(top_k=top_k), dict(top_p=top_p), dict(top_k=top_k, top_p=top_p)):
        for T, conf in ((0.0, "margin"), (0.7, "prob"), (3.0, "neg_entropy")):
            kw2 = dict(confidence=conf, temperature=T, seed=5, **kw)
            ref = _run("reference", sample_tokens, xs, **kw2)
            got = _run("triton", sample_tokens, xs, **kw2)
            _check_same(got, ref, f"triton-{dtype}-{conf}-T{T}-{sorted(kw)}")


@pytest.mark.parametrize("npiv", [16, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: ids(d=d))
def test_triton_top_p_search_bound(dtype, npiv, monkeypatch):
    # The top_p search starts at a data bound (the values whose weights are under
    # (1 - p) Z / (2 V)) instead of -inf's key. Rows where the threshold falls deep in a long
    # tail (one spike, then thousands of small weights that top_p needs), a dense row, tails
    # just above and below the bound, LLM-like spikes; p from 0.3 to 0.9999 (over 0.9999 the
    # bound is off) and T down to 1e-7 (|x_lo| / T >= 1e6: off). Tokens and confidences against
    # the reference. Every pivot count the GPU autotuner may pick (npiv).
    skip_unless_available("triton")
    import dlm_kernels.ops.unmask_sample as us

    monkeypatch.setattr(us, "_block_v", lambda V: 256)
    monkeypatch.setattr(us, "_NPIV", npiv)
    g = torch.Generator().manual_seed(5)
    V = 1003
    x = torch.randn(8, V, generator=g, dtype=torch.float64)
    x[0] = x[0] * 0.05  # a dense row: the threshold far below the max
    x[1] = x[1] * 0.05 - 6.0  # a spike of weight ~1 at T 1 and a tail that holds ~2.5
    x[1, 17] = 0.0
    x[2] = x[2] * 3.0 + 25.0  # LLM-like: a wide spread well above zero
    x[3] = x[3] * 0.02 - math.log(V)  # a flat tail whose total weight ~1 beside the spike
    x[3, 500] = 0.0
    x[4] = x[4] * 0.5 - 12.0  # tail weights near (1 - p) Z / (2 V) at T 1
    x[4, 9] = 0.0
    x[5, :900] = -1.0e4  # a few live values, the rest far below
    x[6] = torch.round(x[6] * 16) / 64  # ties
    xs = x.to(dtype)
    top_p = torch.tensor([0.95, 0.9, 0.99, 0.6, 0.999, 0.3, 0.9999, 0.99995])
    top_k = torch.tensor([0, 40, 1003, 7, 0, 600, 1, 999])
    for T, conf, k in ((1.0, "prob", None), (0.7, "margin", top_k), (0.2, "neg_entropy", None),
                       (1e-7, "prob", top_k)):  # fmt: skip
        kw = dict(confidence=conf, temperature=T, seed=11, top_p=top_p, top_k=k)
        ref = _run("reference", sample_tokens, xs, **kw)
        got = _run("triton", sample_tokens, xs, **kw)
        _check_same(got, ref, f"triton-{dtype}-{conf}-T{T}")


@pytest.mark.parametrize("conf", ["prob", "raw_prob", "margin", "neg_entropy"])
def test_greedy_cpp_across_blocks(conf):
    # The C++ greedy path reads a row in blocks of 2048 with a running max (AVX2 where built
    # with it): maxima that grow from block to block (the running sums are rescaled), ties in
    # different blocks (the lowest index wins), the first element of a block, a ragged last
    # block (5003 = 2 x 2048 + 907, not a multiple of the 32-wide unroll), a first block of
    # -inf only, scattered -inf, large logits (the exps are taken of x - max, never of x), NaN,
    # and every input dtype. For margin, the per-lane second values: a second value in the max's
    # own SIMD lane (positions 32 apart), in an earlier block, and a tie in one lane (margin 0).
    # The max's index is found by a vector search of its block: ties inside one vector too.
    skip_unless_available("cpp")
    g = torch.Generator().manual_seed(11)
    v = 5003
    x = torch.randn(16, v, generator=g, dtype=torch.float64)
    x[11, [1041, 1050, 3000]] = 9.0  # tied in one 16-wide vector (and one 8-wide apart), and later
    x[12] = torch.round(x[12] * 32) / 32 + 3e5  # large logits (float32 spacing at 3e5: 1/32)
    x[13] = torch.round(x[13] * 4) / 4 - 2e6
    # NaN counts as -inf on the one-pass path too (no NaN check in its loop): NaN after the
    # max and before the second value in their lanes, at a block's first and last logit, and
    # the max itself surrounded by NaN; a block of NaN only.
    x[14, ::5] = float("nan")
    x[14, [96, 128, 160]] = torch.tensor([8.0, float("nan"), 7.5], dtype=torch.float64)
    x[14, [2047, 2048]] = float("nan")
    x[15, 2048:4096] = float("nan")
    x[15, [4100, 4099, 4101]] = torch.tensor([9.0, float("nan"), float("nan")], dtype=torch.float64)
    x[8, [100, 132]] = torch.tensor([9.0, 8.5], dtype=torch.float64)
    x[9, [10, 3000]] = torch.tensor([8.0, 9.0], dtype=torch.float64)
    x[10, [64, 96]] = 9.0
    x[0, [2500, 4999]] = 9.0
    x[1] += torch.linspace(0, 30, v, dtype=torch.float64)  # a new max in every block
    x[2, [5, 4100]] = 7.0
    x[3, 2048] = 6.0  # the first element of a block
    x[4, :2048] = float("-inf")  # nothing but -inf in the first block
    x[5, ::7] = float("-inf")
    x[6] = x[6] * 3 + 80.0  # large logits, the max near float32 exp's own overflow point
    x[7, v - 1] = 8.0  # the max in the ragged tail
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        ref = _run("reference", sample_tokens, xd, confidence=conf)
        got = _run("cpp", sample_tokens, xd, confidence=conf)
        _check_same(got, ref, f"cpp-{conf}-{dtype}")
        if dtype == torch.float32:
            assert got[0][0] == 2500 and got[0][2] == 5 and got[0][3] == 2048 and got[0][7] == v - 1


# ---------------------------------------------------------------------------------------------
# T > 0: the same seed gives the same tokens on every path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: ids(d=d))
@pytest.mark.parametrize("filt", list(FILTERS))
@pytest.mark.parametrize("name", KERNELS)
def test_seeded_same_tokens(name, filt, dtype):
    skip_unless_available(name)
    n, v = (4, 203) if name == "triton" else (64, 1003)
    x = _logits(n, v, scale=1.0, dtype=dtype)
    temp = torch.rand(n, dtype=torch.float64) + 0.3
    temp[1] = 0.0  # an argmax row among sampled ones
    conf = "prob" if filt != "all" else "margin"
    kw = dict(temperature=temp, confidence=conf, seed=2**40 + 17, offset=3, **FILTERS[filt])
    ref = _run("reference", sample_tokens, x, **kw)
    _check_same(_run(name, sample_tokens, x, **kw), ref, f"{name}-{filt}")
    # the draw is random: another offset moves some tokens, the same one reproduces them
    kw2 = dict(kw, offset=4)
    assert not torch.equal(_run(name, sample_tokens, x, **kw2)[0], ref[0])
    assert torch.equal(_run(name, sample_tokens, x, **kw)[0], ref[0])


@pytest.mark.parametrize("conf", CONFS)
@pytest.mark.parametrize("name", KERNELS)
def test_sampled_confidences(name, conf):
    # T > 0: every confidence against the reference, unfiltered and with every filter (raw_prob's
    # unfiltered, untempered sum runs its own pass; V 2048 + 37 crosses the C++ 2048-blocks).
    skip_unless_available(name)
    n, v = (3, 203) if name == "triton" else (16, 2048 + 37)
    x = _logits(n, v)
    x[0, ::3] = float("-inf")
    filts = ["none", "all"] if name == "triton" else list(FILTERS)
    for filt in filts:
        kw = dict(temperature=0.8, confidence=conf, seed=29, **FILTERS[filt])
        ref = _run("reference", sample_tokens, x, **kw)
        _check_same(_run(name, sample_tokens, x, **kw), ref, f"{name}-{conf}-{filt}")


def test_cpp_thread_count_invariant():
    skip_unless_available("cpp")
    x = _logits(16, 1003, scale=1.0)
    kw = dict(temperature=0.9, top_p=0.9, top_k=100, seed=8)
    one = _run("cpp", sample_tokens, x, **kw)
    torch.set_num_threads(2)
    try:
        two = _run("cpp", sample_tokens, x, **kw)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_per_row_options_match_scalar_calls():
    skip_unless_available("cpp")
    x = _logits(5, 301, scale=1.0)
    temp = torch.tensor([0.5, 1.0, 0.0, 2.0, 0.8], dtype=torch.float64)
    top_k = torch.tensor([0, 5, 30, 301, 2])
    top_p = torch.tensor([0.3, 1.0, 0.9, 0.5, 0.99], dtype=torch.float64)
    with impl("cpp"):
        tok, conf = sample_tokens(x, temperature=temp, top_k=top_k, top_p=top_p, seed=9)
        for i in range(5):
            # the counter row of a single-row call is 0: compare with the reference of row i
            t1, c1 = reference.sample_tokens_rows(
                x[i : i + 1], torch.tensor([i]), temp[i : i + 1], top_k[i : i + 1],
                top_p[i : i + 1], None, "prob", 9, 0,
            )  # fmt: skip
            assert int(t1) == int(tok[i])
            assert_close(f"row {i}", c1, conf[i : i + 1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# chi-square of many draws against the exact filtered distribution
# ---------------------------------------------------------------------------------------------
def _exact_probs(logits, T, top_k=None, top_p=None, min_p=None):
    """The filtered distribution, from the definitions (numpy float64, a plain sort)."""
    z = np.asarray(logits, dtype=np.float64) / T
    keep = np.ones(z.shape, dtype=bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p is not None:
        q = np.where(keep, np.exp(z - z.max()), 0.0)
        q /= q.sum()
        above = np.array([q[z > zj].sum() for zj in z])
        keep &= above < top_p
    if min_p is not None:
        keep &= np.exp(z - z.max()) >= min_p
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


CHI_CASES = {
    "plain": dict(temperature=0.7),
    "topk": dict(temperature=1.0, top_k=4),
    "topp": dict(temperature=0.8, top_p=0.7),
    "minp": dict(temperature=1.2, min_p=0.15),
    "all": dict(temperature=0.9, top_k=8, top_p=0.85, min_p=0.04),
    "all7": dict(temperature=0.9, top_k=5, top_p=0.9, min_p=0.04),  # for V = 7
}


def _chi_square(name, case, n, v):
    opts = CHI_CASES[case]
    base = torch.tensor(np.random.default_rng(v).normal(size=v) * 1.5, dtype=torch.float32)
    x = base.expand(n, v).contiguous()  # one distribution, n independent counter rows
    tok, _ = _run(name, sample_tokens, x, seed=1234, **opts)
    counts = np.bincount(tok.numpy(), minlength=v)
    p = _exact_probs(base.numpy(), opts["temperature"], opts.get("top_k"), opts.get("top_p"),
                     opts.get("min_p"))  # fmt: skip
    assert counts[p == 0].sum() == 0, f"drew filtered tokens: {counts} vs {p}"
    kept = p > 0
    assert kept.sum() >= 2, "test distribution degenerate"
    res = stats.chisquare(counts[kept], p[kept] * n)
    print(f"{name}-{case}: chi2 {res.statistic:.2f}, p-value {res.pvalue:.4f}, kept {kept.sum()}")
    assert res.pvalue > 1e-4, f"{case}: counts {counts} vs expected {np.round(p * n, 1)}"


@pytest.mark.parametrize("case", [c for c in CHI_CASES if c != "all7"])
def test_chi_square_cpp(case):
    skip_unless_available("cpp")
    _chi_square("cpp", case, 40000, 11)


def test_chi_square_triton():
    skip_unless_available("triton")
    _chi_square("triton", "all7", 160, 7)


# ---------------------------------------------------------------------------------------------
# edge rows
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["reference"] + KERNELS)
def test_edge_rows(name):
    skip_unless_available(name)
    v = 97
    x = _logits(5, v)
    x[0] = float("-inf")
    x[0, 41] = -3.0  # all -inf but one
    x[1] = float("nan")  # no finite logit: token 0, confidence -inf
    x[2, ::2] = float("nan")  # NaN counts as -inf: never drawn
    x[3] = float("-inf")
    x[4, 10] = float("inf")  # +inf: the point mass
    for kw in [dict(), dict(temperature=1.5, top_p=0.9, top_k=5, min_p=0.1)]:
        for conf in CONFS:
            tok, c = _run(name, sample_tokens, x, confidence=conf, seed=3, **kw)
            assert bool(((tok >= 0) & (tok < v)).all())
            assert tok[0] == 41 and tok[1] == 0 and tok[3] == 0 and tok[4] == 10
            assert tok[2] % 2 == 1
            assert c[1] == float("-inf") and c[3] == float("-inf")
            assert not bool(c.isnan().any())
            if conf in ("prob", "raw_prob"):
                assert c[0] == 1.0


@pytest.mark.parametrize("name", KERNELS)
def test_large_vocab(name):
    skip_unless_available(name)
    x = _logits(2, 151936, scale=3.0)
    kw = dict(temperature=0.7, top_p=0.95, seed=11, confidence="prob")
    if name == "cpp":
        kw["top_k"] = 1000
    ref = _run("reference", sample_tokens, x, **kw)
    _check_same(_run(name, sample_tokens, x, **kw), ref, f"{name}-V151936")


# ---------------------------------------------------------------------------------------------
# unmask_step
# ---------------------------------------------------------------------------------------------
RULES = {
    "k4": dict(num_transfer=4),
    "k-per-row": dict(num_transfer=torch.tensor([1, 60, 3])),
    "threshold": dict(threshold=0.2),
    "factor": dict(factor=1.0),
    "alg_temp": dict(num_transfer=5, alg_temp=0.3),
    "ancestral": dict(ancestral=True, theta=0.4),
}
MASK_ID = 999


def _masked_batch(b=3, l=37, v=203):
    x = torch.randint(0, v, (b, l))
    mask = torch.rand(b, l) < 0.6
    if b > 2:
        mask[2] = False  # a row with nothing masked
    x[mask] = MASK_ID
    return x, mask, _logits(b * l, v).reshape(b, l, v)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("name", KERNELS)
def test_unmask_step_paths(name, rule):
    skip_unless_available(name)
    x, mask, logits = _masked_batch(l=11 if name == "triton" else 37)
    kws = [dict(confidence="prob"), dict(temperature=0.8, top_p=0.9, confidence="margin")]
    if name == "triton":  # the interpreter is slow: one sampled configuration
        kws = kws[1:]
    for kw in kws:
        kw = dict(kw, seed=7, offset=2, mask_id=MASK_ID, **RULES[rule])
        ref = _run("reference", unmask_step, x, logits, **kw)
        for layout in (logits, logits[mask]):  # full (B, L, V) and masked-only (M, V)
            out = _run(name, unmask_step, x, layout, **kw)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), rule
        assert torch.equal(ref[0][2], x[2]) and not bool(ref[1][2].any())
        assert not bool((ref[1] & ~mask).any())
        assert bool((ref[0][ref[1]] != MASK_ID).all())


def _left_padded(pads, l, v, pad_id=5):
    """x (B, l) with pads[b] leading pad tokens, a few real tokens, then masks; logits."""
    x = torch.full((len(pads), l), MASK_ID)
    for b, p in enumerate(pads):
        x[b, :p] = pad_id
        x[b, p : p + 2] = 7
    return x, _logits(len(pads) * l, v).reshape(len(pads), l, v)


@pytest.mark.parametrize("name", ["reference"] + KERNELS)
def test_per_row_keys_draw_what_each_row_draws_alone(name):
    # One call over a left-padded batch with per-row seed, offset and left_pad must commit, in
    # every row, what that row commits alone, unpadded, with its own seed and offset: the
    # sampler batches T > 0 steps with this (each row's output independent of its batch).
    skip_unless_available(name)
    pads = torch.tensor([0, 4, 7])
    x, logits = _left_padded(pads.tolist(), 13 if name == "triton" else 29, 203)
    seeds = torch.tensor([11, 2**40 + 3, 11])
    offs = torch.tensor([0, 5, 2**32 - 1])
    rules = [(dict(num_transfer=torch.tensor([2, 3, 1])), "prob")]
    if name != "triton":  # the interpreter is slow; the selection draws are torch code
        rules += [
            (dict(num_transfer=2, alg_temp=0.5), "random"),
            (dict(ancestral=True, theta=0.4), "margin"),
            (dict(threshold=0.2), "prob"),
        ]
    for rule, conf in rules:
        kw = dict(mask_id=MASK_ID, temperature=0.8, top_p=0.9, confidence=conf, **rule)
        xb, cb = _run(name, unmask_step, x, logits, seed=seeds, offset=offs, left_pad=pads, **kw)
        masked = x == MASK_ID  # the masked-only layout gives the same
        x2, c2 = _run(name, unmask_step, x, logits[masked], seed=seeds, offset=offs,
                      left_pad=pads, **kw)  # fmt: skip
        assert torch.equal(x2, xb) and torch.equal(c2, cb)
        assert bool(cb.any())
        for b, p in enumerate(pads.tolist()):
            kwb = {k: v[b : b + 1] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            x1, c1 = _run(name, unmask_step, x[b : b + 1, p:], logits[b : b + 1, p:],
                          seed=int(seeds[b]), offset=int(offs[b]), **kwb)  # fmt: skip
            assert torch.equal(x1[0], xb[b, p:]) and torch.equal(c1[0], cb[b, p:]), (rule, b)
            assert not bool(cb[b, :p].any())
    if name != "reference":  # and the same tokens as the reference path
        kw = dict(mask_id=MASK_ID, temperature=0.8, top_p=0.9, seed=seeds, offset=offs,
                  left_pad=pads, **rules[0][0])  # fmt: skip
        ref = _run("reference", unmask_step, x, logits, **kw)
        out = _run(name, unmask_step, x, logits, **kw)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("name", ["reference"] + KERNELS)
def test_negative_left_pad_keys_a_window_like_the_whole_row(name):
    # The sampler gives the op only the window it draws from, x[:, w:], with left_pad = pad - w
    # (negative once the window starts after the padding): every draw must be the whole row's
    # at the same position, for the token draws and the selection's own draws alike.
    skip_unless_available(name)
    pads = torch.tensor([0, 4, 7])
    x, logits = _left_padded(pads.tolist(), 15 if name == "triton" else 29, 203)
    w = 9  # after every row's padding and real tokens
    cand = (x == MASK_ID) & (torch.arange(x.shape[1]) >= w)
    seeds, offs = torch.tensor([11, 2**40 + 3, 11]), torch.tensor([0, 5, 2**32 - 1])
    rules = [(dict(num_transfer=torch.tensor([2, 3, 1])), "prob")]
    if name != "triton":  # the interpreter is slow; the selection draws are torch code
        rules += [
            (dict(num_transfer=2, alg_temp=0.5), "random"),
            (dict(ancestral=True, theta=0.4), "margin"),
        ]
    for rule, conf in rules:
        kw = dict(mask_id=MASK_ID, temperature=0.8, top_p=0.9, confidence=conf, seed=seeds,
                  offset=offs, **rule)  # fmt: skip
        xf, cf = _run(name, unmask_step, x, logits, left_pad=pads, candidates=cand, **kw)
        xw, cw = _run(name, unmask_step, x[:, w:], logits[:, w:], left_pad=pads - w,
                      candidates=cand[:, w:], **kw)  # fmt: skip
        assert bool(cf.any()) and torch.equal(xf[:, :w], x[:, :w])
        assert torch.equal(xw, xf[:, w:]) and torch.equal(cw, cf[:, w:]), rule


@pytest.mark.parametrize("name", ["reference"] + KERNELS)
def test_sample_tokens_per_row_seeds(name):
    skip_unless_available(name)
    x = _logits(4, 203)
    seeds, offs = torch.tensor([3, 3, 2**62, 0]), torch.tensor([0, 1, 7, 2**32 - 1])
    tok, conf = _run(name, sample_tokens, x, temperature=1.0, top_k=50, confidence="random",
                     seed=seeds, offset=offs)  # fmt: skip
    for i in range(4):  # row i is keyed (seeds[i], offs[i], counter row i)
        t1, c1 = reference.sample_tokens_rows(
            x[i : i + 1], torch.tensor([i]), torch.ones(1, dtype=torch.float64),
            torch.tensor([50]), None, None, "random", int(seeds[i]), int(offs[i]),
        )  # fmt: skip
        assert int(t1) == int(tok[i]) and float(c1) == float(conf[i])
    one = _run(name, sample_tokens, x, temperature=1.0, seed=3, offset=1)
    both = _run(name, sample_tokens, x, temperature=1.0, seed=torch.full((4,), 3), offset=1)
    assert torch.equal(one[0], both[0])


def test_per_row_key_bad_inputs():
    x, logits = _left_padded([0, 2], 9, 31)
    kw = dict(mask_id=MASK_ID, num_transfer=1, temperature=1.0)
    bad = [
        (TypeError, "seed", dict(seed=torch.tensor([1.0, 2.0]))),
        (ValueError, "seed", dict(seed=torch.tensor([1, 2, 3]))),
        (ValueError, "seed", dict(seed=torch.tensor([1, -2]))),
        (ValueError, "offset", dict(seed=1, offset=torch.tensor([0, 2**32]))),
        (TypeError, "left_pad", dict(seed=1, left_pad=2)),
        (ValueError, "left_pad", dict(seed=1, left_pad=torch.tensor([0, 10]))),
        (
            ValueError,
            r"left_pad must lie in \[-2147483648, 10\)",
            dict(seed=1, left_pad=torch.tensor([0, -(2**31) - 1])),
        ),
        (TypeError, "left_pad", dict(seed=1, left_pad=torch.tensor([True, False]))),
    ]
    for err, arg, extra in bad:
        with pytest.raises(err, match=arg):
            unmask_step(x, logits, **kw, **extra)
    with pytest.raises(ValueError, match="seed"):
        sample_tokens(logits[0], seed=torch.tensor([1, 2]))
    # a masked position inside the padding would share the first real position's draw
    xp = x.clone()
    xp[1, 0] = MASK_ID
    with pytest.raises(ValueError, match="left_pad"):
        unmask_step(xp, logits, **kw, seed=1, left_pad=torch.tensor([0, 2]))
    cand = torch.ones_like(xp, dtype=torch.bool)
    cand[1, :2] = False  # excluded by candidates: fine
    unmask_step(xp, logits, **kw, seed=1, left_pad=torch.tensor([0, 2]), candidates=cand)


def test_unmask_step_rules():
    x, mask, logits = _masked_batch(b=4, l=41, v=50)
    n = mask.sum(1)
    conf_kw = dict(mask_id=MASK_ID, seed=1)
    # num_transfer larger than the masked count: everything commits
    _, done = unmask_step(x, logits, num_transfer=1000, **conf_kw)
    assert torch.equal(done, mask)
    _, done = unmask_step(x, logits, num_transfer=3, **conf_kw)
    assert done.sum(1).tolist() == torch.minimum(n, torch.tensor(3)).tolist()
    # the committed ones are the most confident
    tok, conf = sample_tokens(logits.reshape(-1, 50), seed=1)
    conf = conf.reshape(4, 41)
    for b in (0, 1, 3):  # row 2 has nothing masked
        c = conf[b][mask[b]]
        assert conf[b][done[b]].min() >= c.sort(descending=True).values[2]
    # threshold: all >= tau and at least one
    _, done = unmask_step(x, logits, threshold=0.99, **conf_kw)
    assert done.sum(1).tolist() == [1, 1, 0, 1]
    _, done = unmask_step(x, logits, threshold=0.3, **conf_kw)
    assert torch.equal(done, mask & ((conf >= 0.3) | done))
    # factor: the longest prefix of sorted confidences with c_i >= 1 - f / (i + 1), at least one
    _, done = unmask_step(x, logits, factor=2.0, **conf_kw)
    for b in range(4):
        c = sorted(conf[b][mask[b]].tolist(), reverse=True)
        k = 0
        while k < len(c) and (k == 0 or c[k] >= 1 - 2.0 / (k + 2)):
            k += 1
        assert int(done[b].sum()) == k
    # ancestral: theta 0 commits nothing, theta 1 commits all
    assert not bool(unmask_step(x, logits, ancestral=True, theta=0.0, **conf_kw)[1].any())
    assert torch.equal(unmask_step(x, logits, ancestral=True, theta=1.0, **conf_kw)[1], mask)
    # candidates restrict the commits to the block
    block = torch.zeros_like(mask)
    block[:, 10:20] = True
    _, done = unmask_step(x, logits, num_transfer=100, candidates=block, **conf_kw)
    assert torch.equal(done, mask & block)


@pytest.mark.parametrize("keys", ["scalar", "per_row", "left_pad"])
def test_cpp_commit_matches_reference_select(keys):
    # The C++ commit pass (eager CPU steps) against reference.select_commits + torch.where on
    # every rule, with ties (confidences on a coarse grid), -inf confidences, candidates that
    # exclude masked positions, per-row counts from 0 to past the candidate count, and the
    # draws of alg_temp and the ancestral rule keyed per row and from each row's left padding.
    skip_unless_available("cpp")
    g = torch.Generator().manual_seed(3)
    B, L = 6, 45
    x = torch.randint(0, 50, (B, L), generator=g)
    tok = torch.randint(0, 50, (B, L), generator=g)
    conf = torch.randint(0, 6, (B, L), generator=g).float() / 5  # many ties
    conf[torch.rand(B, L, generator=g) < 0.1] = float("-inf")
    cand = torch.rand(B, L, generator=g) < 0.7
    cand[1] = False  # a row with no candidate
    cand[2] = True
    left_pad = None
    if keys == "scalar":
        seed, offset = 2**40 + 9, 3
    else:
        seed = torch.tensor([1, 2**62, 7, 7, 0, 5])
        offset = torch.tensor([0, 2**32 - 1, 4, 4, 9, 1])
        if keys == "left_pad":
            left_pad = torch.tensor([0, 3, 0, 7, L, 1])
            cand &= torch.arange(L)[None, :] >= left_pad[:, None]
    nt = torch.tensor([0, 3, 100, 5, 2, 1])
    rules = [
        dict(nt=nt), dict(nt=nt, alg_temp=0.3), dict(nt=torch.full((B,), L)),
        dict(th=torch.tensor([0.5, 0.1, 0.9, 1.1, 0.0, 0.6], dtype=torch.float64)),
        dict(factor=1.0), dict(factor=0.2),
        dict(tt=torch.tensor([0.0, 0.5, 1.0, 0.3, 0.7, 0.5], dtype=torch.float64)),
    ]  # fmt: skip
    # Row 5 sits on the factor rule's thresholds 1 - f / (r + 2) rounded to float32 (computed
    # in float64, one float32 ulp decides), row 0 holds NaN confidences (never emitted by the
    # samplers; they rank first, as in torch's descending sort).
    r = torch.arange(L, dtype=torch.float64)
    conf5 = conf.clone()
    conf5[5] = (1 - 0.2 / (r + 2)).float()
    conf5[5, 1::3] = torch.nextafter(conf5[5, 1::3], torch.tensor(0.0))
    conf5[0, [4, 9]] = float("nan")
    # The packed form (unmask_step with (M, V) logits): the draws at flat positions pos, a
    # superset of the candidates (masked positions outside the block), scattered back inside.
    pos = (cand | (torch.rand(B, L, generator=g) < 0.2)).reshape(-1).nonzero().view(-1)
    for rule in rules:
        args = [rule.get(k) for k in ("nt", "th", "factor", "alg_temp", "tt")]
        for c in (conf, conf5):
            with dispatch.use("reference"):
                ref = us.select_and_commit(x, tok, c, cand, *args, seed, offset, left_pad)
            with dispatch.use("cpp"):
                out = us.select_and_commit(x, tok, c, cand, *args, seed, offset, left_pad)
            assert torch.equal(out[1], ref[1]), (keys, rule)
            assert torch.equal(out[0], ref[0]), (keys, rule)
            assert not bool((out[1] & ~cand).any())
            packed = (tok.reshape(-1)[pos], c.reshape(-1)[pos])
            for name in ("reference", "cpp"):
                with dispatch.use(name):
                    got = us.select_and_commit(x, *packed, cand, *args, seed, offset, left_pad,
                                               pos)  # fmt: skip
                assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0]), (name, rule)
    with pytest.raises(RuntimeError, match="num_transfer"):
        dispatch.cpp_ops().commit_rows(x, tok, conf, cand, 0, None, None, 0.0, 0.0, None, 0, 0,
                                       None, None, None)  # fmt: skip
    bad = pos.clone()
    bad[-1] = B * L
    with pytest.raises(RuntimeError, match="outside"):
        dispatch.cpp_ops().commit_rows(x, *packed, cand, 0, nt, None, 0.0, 0.0, None, 0, 0,
                                       None, None, None, bad)  # fmt: skip
    with pytest.raises(RuntimeError, match="with pos, tok"):
        dispatch.cpp_ops().commit_rows(x, tok, conf, cand, 0, nt, None, 0.0, 0.0, None, 0, 0,
                                       None, None, None, pos)  # fmt: skip


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_unmask_step_empty_batch(name):
    skip_unless_available(name)
    x, logits = torch.zeros(0, 8, dtype=torch.int64), torch.randn(0, 8, 11)
    for rule in RULES.values():
        rule = {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in rule.items()}
        new, done = _run(name, unmask_step, x, logits, mask_id=0, seed=1, **rule)
        assert new.shape == (0, 8) and done.shape == (0, 8)


@pytest.mark.parametrize("name", ["reference", "cpp", "triton"])
def test_greedy_tied_maxima_exact(name):
    # k tied maxima among -inf: probability exactly 1 / k on the reference and C++ paths (every
    # tied term exp(0) = 1), so a threshold of 1 / k commits every tied position, as the
    # reference does; a flat row of V 151936 sums exact ones. (A review found a 1-ulp error
    # here in a faster C++ exp form, since dropped.) Triton: to float32 precision.
    skip_unless_available(name)
    lg = torch.full((3, 2048 + 37), float("-inf"))
    lg[0, [3, 40]] = 1.7
    lg[1, [5, 1000, 2060]] = -2.25
    lg[2, 7] = 80.0
    flat = torch.full((1, 151936), 0.25)
    tok, conf = _run(name, sample_tokens, lg)
    _, conf_flat = _run(name, sample_tokens, flat)
    assert tok.tolist() == [3, 5, 7]
    want = torch.tensor([1 / 2, 1 / 3, 1.0, 1 / 151936], dtype=torch.float64).float()
    got = torch.cat([conf, conf_flat])
    if name == "triton":
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        return
    assert torch.equal(got, want), got
    two = torch.full((2, 64), float("-inf"))
    two[:, [3, 40]] = 1.7
    _, done = _run(name, unmask_step, torch.full((1, 2), 99), two, mask_id=99, threshold=0.5,
                   seed=0)  # fmt: skip
    assert done.tolist() == [[True, True]]


def test_cpp_greedy_one_hot_rows_exact():
    # One finite logit among -inf: probability (and margin) exactly 1 and entropy exactly 0 on
    # the greedy fast path too (its -inf lanes and ragged-tail padding must weigh exactly 0 there).
    skip_unless_available("cpp")
    for v in (2, 64, 2048 + 37):
        x = torch.full((3, v), float("-inf"))
        x[0, 0], x[1, v // 2], x[2, v - 1] = 1.5, -3.0, 80.0
        for conf in ("prob", "raw_prob", "margin", "neg_entropy"):
            tok, c = _run("cpp", sample_tokens, x, confidence=conf)
            assert tok.tolist() == [0, v // 2, v - 1]
            one = [0.0] * 3 if conf == "neg_entropy" else [1.0] * 3
            assert c.tolist() == one, (v, conf, c)


def test_cpp_simd_path_built():
    # The default build (-march=native) on an AVX2 machine compiles the explicit AVX2 paths:
    # without this check a build that lost them would pass every test on the scalar ones.
    skip_unless_available("cpp")
    if not dispatch.cpp_ops().built_for_native():
        pytest.skip("not built with -march=native (DLM_KERNELS_CPU_ARCH, or the compiler)")
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "avx2" not in flags or "fma" not in flags:
        pytest.skip("this CPU has no AVX2/FMA")
    assert dispatch.cpp_ops().simd_path() == "avx2"


def test_traced_step_matches_eager():
    # make_fx records the registered custom ops, never the direct C++ calls of eager steps
    # (a trace of those would replay the commits of the example inputs).
    from torch.fx.experimental.proxy_tensor import make_fx

    x, mask, logits = _masked_batch(b=2, l=16, v=23)

    def step(x, logits):
        return unmask_step(x, logits, mask_id=MASK_ID, num_transfer=3, seed=4)

    gm = make_fx(step, tracing_mode="real")(x, logits)
    x2, _, logits2 = _masked_batch(b=2, l=16, v=23)
    for got, want in zip(gm(x2, logits2), step(x2, logits2)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_compiled_step_with_changing_arguments(name, dynamic):
    """A sampling loop compiled with fullgraph=True passes offset=step, and may change the seed,
    num_transfer or temperature between calls: each call matches eager and no value recompiles
    past dynamo's first (an argument check on a traced int, or an f-string / math.isinf on a
    traced float, had broken the graph from the second call, or recompiled on every value)."""
    skip_unless_available(name)
    import torch._dynamo.utils as dutils

    x, _, logits = _masked_batch(b=2, l=9, v=23)
    args = ("offset", "seed", "num_transfer", "temperature")

    def step(x, logits, offset, seed, num_transfer, temperature):
        return unmask_step(x, logits, mask_id=MASK_ID, num_transfer=num_transfer, seed=seed,
                           offset=offset, temperature=temperature, top_p=0.9)  # fmt: skip

    with impl(name):
        for arg in args:
            torch._dynamo.reset()
            dutils.counters.clear()
            compiled = torch.compile(step, fullgraph=True, backend="eager", dynamic=dynamic)
            for v in range(4):
                kw = dict(offset=1, seed=3, num_transfer=2, temperature=0.7)
                kw[arg] = {"temperature": 0.5 + 0.1 * v, "num_transfer": 1 + v}.get(arg, 7 * v)
                for got, want in zip(compiled(x, logits, **kw), step(x, logits, **kw)):
                    assert torch.equal(got, want), (arg, v)
            assert dutils.counters["stats"]["unique_graphs"] <= 2, arg
    torch._dynamo.reset()


@pytest.mark.parametrize("rule", ["ancestral", "threshold"])
def test_inductor_step_matches_eager(rule):
    # torch.compile(backend="inductor") on the CPU committed other tokens than eager: with
    # (M, V) logits it ran the read of the draws scattered back to (B, L) before the scatter
    # (x's mask_id committed), and with per-row seeds whose low word is >= 2**31 the selection's
    # Philox draws differed (its int64 products overflowed: undefined behaviour in the C++).
    skip_unless_available("cpp")
    b, l, v = 8, 3, 50
    x = torch.full((b, l), MASK_ID)
    x[0] = 1  # a row with nothing masked
    logits = _logits(int((x == MASK_ID).sum()), v)
    seeds = torch.tensor([3, 2**40 - 5, 12345678901, 2**35 + 7, 0, 2**32 - 1, 2**31, 9])
    kw = dict(mask_id=MASK_ID, temperature=0.7, offset=torch.arange(b))
    if rule == "ancestral":
        kw.update(ancestral=True, theta=0.5)
    else:
        kw.update(threshold=torch.linspace(0.0, 0.9, b, dtype=torch.float64))

    def step(x, logits, seeds):
        return unmask_step(x, logits, seed=seeds, **kw)

    want = step(x, logits, seeds)
    torch._dynamo.reset()
    got = torch.compile(step, backend="inductor", fullgraph=True)(x, logits, seeds)
    assert bool(want[1].any()) and bool((want[0][want[1]] != MASK_ID).all())
    assert torch.equal(got[1], want[1]), (got[1] != want[1]).nonzero().tolist()
    assert torch.equal(got[0], want[0]), (got[0] != want[0]).nonzero().tolist()


def test_compiled_philox_is_one_opaque_op():
    # Under torch.compile the reference's Philox draws (the selection's for ancestral / alg_temp,
    # and the reference sampler's) are one custom op: inductor inlining its ten rounds took more
    # than 5 minutes to compile an ancestral step of 3 x 16 positions. Same values as eager.
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    x, _, logits = _masked_batch(b=3, l=16, v=23)

    def step(x, logits):
        return unmask_step(x, logits, mask_id=MASK_ID, ancestral=True, theta=0.5,
                           temperature=0.7, seed=torch.tensor([3, 2**40 - 5, 2**31]))  # fmt: skip

    with impl("reference"):
        torch._dynamo.reset()
        got = torch.compile(step, backend=backend, fullgraph=True)(x, logits)
        want = step(x, logits)
    torch._dynamo.reset()
    assert any("dlm_kernels.philox_uniform" in g for g in graphs), graphs
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    rows, cols = torch.arange(3)[:, None], torch.arange(5)[None]
    eager = reference.philox_uniform(cols, rows, 2, 2**40 - 5, 7)
    op = torch.ops.dlm_kernels.philox_uniform(cols, rows, 2, torch.tensor(2**40 - 5),
                                              torch.tensor(7))  # fmt: skip
    assert torch.equal(op, eager)


@pytest.mark.parametrize("name", ["reference"] + KERNELS)
def test_unmask_step_ties_lowest_position(name):
    skip_unless_available(name)
    b, l, v = 2, 19, 31
    x = torch.full((b, l), MASK_ID)
    x[0, :4] = 1
    logits = _logits(1, v).expand(b * l, v).reshape(b, l, v).contiguous()  # equal confidences
    new, done = _run(name, unmask_step, x, logits, mask_id=MASK_ID, num_transfer=3)
    assert done[0].nonzero().flatten().tolist() == [4, 5, 6]
    assert done[1].nonzero().flatten().tolist() == [0, 1, 2]


def test_unmask_step_alg_temp_draws_without_replacement():
    # position 0 has confidence ~1, the others ~0: with alg_temp small it is always drawn first
    b, l, v = 64, 9, 13
    x = torch.full((b, l), MASK_ID)
    logits = torch.zeros(b, l, v)
    logits[:, 0, 3] = 30.0
    counts = torch.zeros(l)
    for off in range(4):
        _, done = unmask_step(x, logits, mask_id=MASK_ID, num_transfer=2, alg_temp=0.05,
                              seed=5, offset=off)  # fmt: skip
        assert done.sum(1).eq(2).all() and done[:, 0].all()
        counts += done.sum(0)
    # the second pick is uniform over the 8 equal positions
    res = stats.chisquare(counts[1:].numpy(), np.full(8, 4 * 64 / 8))
    assert res.pvalue > 1e-4


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(3, 20)
    bad = [
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=torch.tensor([0.5, -1.0, 1.0])), ValueError, "temperature"),
        (dict(temperature=torch.ones(4)), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=-2), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(min_p=2.0), ValueError, "min_p"),
        (dict(confidence="entropy"), ValueError, "confidence"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(offset=2**40), ValueError, "offset"),
        (dict(generator=3), TypeError, "generator"),
        # NaN in a per-row tensor (a scalar NaN always was an error)
        (dict(temperature=torch.tensor([0.5, float("nan"), 1.0])), ValueError, "temperature"),
        (dict(top_p=torch.tensor([0.5, float("nan"), 1.0])), ValueError, "top_p"),
        (dict(min_p=torch.tensor([float("nan")] * 3)), ValueError, "min_p"),
        (dict(top_k=2**70), ValueError, "top_k must fit in int64"),
        # inf / inf, and logits / T overflowing float64: NaN confidences on the kernel paths
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=5e-324), ValueError, "temperature"),
        (dict(temperature=torch.tensor([0.5, 0.0, float("inf")])), ValueError, "temperature"),
        (
            dict(temperature=torch.tensor([0.5, 0.0, 1e-250], dtype=torch.float64)),
            ValueError,
            "temperature",
        ),
    ]
    for kw, err, word in bad:
        with pytest.raises(err, match=word):
            sample_tokens(x, **kw)
    with pytest.raises(TypeError, match="logits"):
        sample_tokens(torch.ones(3, 20, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        sample_tokens(torch.randn(2, 3, 20))
    xs, mask, logits = _masked_batch(b=2, l=5, v=20)
    with pytest.raises(ValueError, match="exactly one"):
        unmask_step(xs, logits, mask_id=MASK_ID)
    with pytest.raises(ValueError, match="exactly one"):
        unmask_step(xs, logits, mask_id=MASK_ID, num_transfer=1, threshold=0.5)
    with pytest.raises(ValueError, match="theta"):
        unmask_step(xs, logits, mask_id=MASK_ID, ancestral=True)
    with pytest.raises(ValueError, match=r"threshold must be a number \(not NaN\)"):
        unmask_step(xs, logits, mask_id=MASK_ID, threshold=float("nan"))
    with pytest.raises(ValueError, match="every threshold must be a number"):
        unmask_step(xs, logits, mask_id=MASK_ID, threshold=torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="theta"):
        unmask_step(xs, logits, mask_id=MASK_ID, ancestral=True, theta=torch.tensor([0.5, -1]))
    with pytest.raises(ValueError, match="alg_temp"):
        unmask_step(xs, logits, mask_id=MASK_ID, threshold=0.5, alg_temp=0.5)
    with pytest.raises(TypeError, match="x must be"):
        unmask_step(xs.float(), logits, mask_id=MASK_ID, num_transfer=1)
    with pytest.raises(ValueError, match="candidates"):
        unmask_step(xs, logits, mask_id=MASK_ID, num_transfer=1, candidates=mask[:, :3])
    with pytest.raises(ValueError, match="masked positions"):
        unmask_step(xs, logits.reshape(10, 20)[:1], mask_id=MASK_ID, num_transfer=1)
    with pytest.raises(ValueError, match="num_transfer"):
        unmask_step(xs, logits, mask_id=MASK_ID, num_transfer=torch.tensor([1, 2, 3]))


def test_numpy_scalars_pass_as_numbers():
    # Arguments read from numpy or a config: numpy ints / floats act as Python ones (same
    # tokens); numpy and Python bools are still refused as ints.
    np = pytest.importorskip("numpy")
    xs, _, logits = _masked_batch(b=2, l=9, v=40)
    kw = dict(mask_id=MASK_ID, num_transfer=2, seed=3, offset=1, temperature=0.5, top_k=5)
    want = unmask_step(xs, logits, **kw)
    np_kw = dict(mask_id=np.int64(MASK_ID), num_transfer=np.int32(2), seed=np.int64(3),
                 offset=np.uint32(1), temperature=np.float32(0.5), top_k=np.int64(5))  # fmt: skip
    got = unmask_step(xs, logits, **np_kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for bad in (True, np.bool_(True)):
        with pytest.raises(TypeError, match="mask_id must be an int"):
            unmask_step(xs, logits, **{**kw, "mask_id": bad})
        with pytest.raises(TypeError, match="top_k"):
            unmask_step(xs, logits, **{**kw, "top_k": bad})


def test_seed_from_generator():
    x = _logits(8, 50, scale=0.5)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = sample_tokens(x, temperature=1.0, generator=g1)[0]
    b = sample_tokens(x, temperature=1.0, generator=g2)[0]
    c = sample_tokens(x, temperature=1.0, generator=g2)[0]  # the generator moved on
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("per_row", [False, True], ids=["one_key", "per_row_keys"])
def test_custom_op_opcheck(per_row):
    skip_unless_available("cpp")
    n, v = 4, 33
    keys = (torch.tensor([3, 1, 2**40, 0]), torch.tensor([0, 9, 2**32 - 1, 4])) if per_row else (
        None, None)  # fmt: skip
    args = (
        _logits(n, v), torch.arange(n), torch.ones(n, dtype=torch.bool),
        torch.full((n,), 0.7, dtype=torch.float64), torch.full((n,), 5),
        torch.full((n,), 0.9, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
        0, 1, 2, *keys, True, True, False, "cpp",
    )  # fmt: skip
    torch.library.opcheck(us._sample_rows_op, args, test_utils=("test_schema", "test_faketensor"))
    assert math.isfinite(float(us._sample_rows_op(*args)[1].sum()))


@pytest.mark.parametrize("name", KERNELS)
def test_top_k_survives_top_p_near_one_and_extreme_temperatures(name):
    # Found in review: (1) the Triton top-p search once tested its lower end, whose float32 mass
    # could fall under a top_p target within rounding of 1 and undo top_k (every token kept);
    # (2) 1 / T in float32 overflowed (T < 2.9e-39) or vanished (T > 1.4e45), giving NaN weights.
    skip_unless_available(name)
    x = torch.full((1, 50), 4.5)
    x[0, 10] = 5.0
    x[0, 20] = torch.nextafter(torch.tensor(5.0), torch.tensor(0.0))  # 1 ulp below the max
    for seed in range(4):
        kw = dict(temperature=0.55, top_k=2, top_p=1 - 1e-9, seed=seed)
        _check_same(_run(name, sample_tokens, x, **kw), _run("reference", sample_tokens, x, **kw),
                    f"{name}-topk-{seed}")  # fmt: skip
    y = _logits(3, 97)
    y[:, 5] = float("-inf")
    for kw in (dict(temperature=1e-39), dict(temperature=1e-200, top_p=0.9),
               dict(temperature=1e300, top_p=0.9)):  # fmt: skip
        _check_same(_run(name, sample_tokens, y, seed=1, **kw),
                    _run("reference", sample_tokens, y, seed=1, **kw), f"{name}-{kw}")  # fmt: skip


def test_autotune_candidates_and_pruning():
    # The pivot-count candidates compile only for rows with a top_k / top_p search; every
    # candidate keeps one element per thread in the searches' per-lane accumulators.
    configs = us._sample_configs(151936)
    assert {c.kwargs["NPIV"] for c in configs} == {16, 8, 4}
    assert all(c.kwargs["BLOCK_S"] == min(c.kwargs["BLOCK_V"], 32 * c.num_warps) for c in configs)
    plain = us._prune_configs(configs, {}, HAS_TOPK=False, HAS_TOPP=False, HAS_MINP=True)
    assert plain and {c.kwargs["NPIV"] for c in plain} == {us._NPIV}

    def view(cs):
        return [(c.kwargs, c.num_warps) for c in cs]

    assert view(us._prune_configs(configs, {}, HAS_TOPK=False, HAS_TOPP=True)) == view(configs)
    # cp.async stages: 3 but for 4096-wide tiles and margin rows (2: sm_90 spills with 3).
    assert {c.kwargs["BLOCK_V"]: c.kwargs["STAGES"] for c in configs} == {
        2048: 3,
        1024: 3,
        4096: 2,
        512: 3,
    }
    margin = us._prune_configs(configs, {}, MODE=2, HAS_TOPK=True, HAS_TOPP=False)
    assert view(margin) == [(dict(c.kwargs, STAGES=2), c.num_warps) for c in configs]
