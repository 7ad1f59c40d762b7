"""The CPU goal cases under pytest-benchmark: each op beside its baselines, one group per case.

pytest-benchmark's own table (min / median / max / rounds per provider, grouped), its JSON, and
its comparison across commits are what this adds to ``benchmarks.run`` (whose budgets, GPU
ceilings, peak memory and plots it does not replace). Each test also checks that our output
matches the baseline's, so a ratio never compares different work. ``make bench`` runs it after
``benchmarks.run`` and writes ``benchmarks/results/cpu-<date>-pytest.json``.

    pytest benchmarks/pytest_suite.py --benchmark-group-by=group
    pytest benchmarks/pytest_suite.py --benchmark-autosave        # then, after a change:
    pytest benchmarks/pytest_suite.py --benchmark-compare --benchmark-compare-fail=median:10%

DLM_BENCH_TOY=1: toy shapes (tests/test_benchmarks.py runs it so, once per case, so that it
cannot rot).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_cross_entropy as ce  # noqa: E402
from benchmarks import bench_linear_cross_entropy as lce  # noqa: E402
from benchmarks import bench_unmask_sample as us  # noqa: E402

TOY = os.environ.get("DLM_BENCH_TOY") == "1"
# The CPU goal shapes of issues 3 and 2 (V 32000; benchmarks.run also times V 151936).
UNMASK_BLV = (2, 8, 1003) if TOY else (2, 128, 32000)
CE_NV = (64, 1003) if TOY else (4096, 32000)
LCE_NHV = (64, 40, 1003) if TOY else (2048, 512, 32000)


@pytest.fixture(scope="module")
def unmask_inputs():
    B, L, V = UNMASK_BLV
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B * L, V, generator=g) * 2
    x = torch.full((B, L), us.MASK_ID, dtype=torch.int64)
    return x, logits


UNMASK_CASES = {
    "greedy": dict(temperature=0.0),
    "T0.7-top_p0.95": dict(temperature=0.7, top_p=0.95),
}


def _ours_x(x, logits, **kw):
    return us.ours_step(x, logits, **kw)[0]  # (new x, committed)


UNMASK_PROVIDERS = {"dlm_kernels": _ours_x, "dream-chain": us.dream_step}


@pytest.mark.parametrize("provider", list(UNMASK_PROVIDERS))
@pytest.mark.parametrize("case", list(UNMASK_CASES))
def test_unmask_step(benchmark, unmask_inputs, case, provider):
    x, logits = unmask_inputs
    kw = UNMASK_CASES[case]
    B, L, V = UNMASK_BLV
    benchmark.group = f"unmask_step {case} {B * L}x{V} fp32"
    out = benchmark(UNMASK_PROVIDERS[provider], x, logits, **kw)
    assert out.shape == x.shape and int((out != us.MASK_ID).sum()) == B * us.K
    if kw["temperature"] == 0:  # deterministic: the same commits as Dream's chain
        assert torch.equal(out, us.dream_step(x, logits, **kw))


@pytest.fixture(scope="module")
def ce_inputs():
    N, V = CE_NV
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=g).requires_grad_(True)
    target = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) < 0.5
    weight = torch.rand(N, generator=g) + 0.5
    return logits, target, mask, weight


CE_PROVIDERS = {"dlm_kernels": ce._ours, "eager": ce._eager}


@pytest.mark.parametrize("provider", list(CE_PROVIDERS))
def test_masked_cross_entropy_fwd_bwd(benchmark, ce_inputs, provider):
    N, V = CE_NV
    benchmark.group = f"masked_cross_entropy fwd+bwd {N}x{V} fp32"
    _, fwd_bwd = ce._closures(CE_PROVIDERS[provider], ce_inputs)
    benchmark(fwd_bwd)
    logits = ce_inputs[0]
    grad = logits.grad.clone()
    logits.grad = None
    ce._eager(*ce_inputs).backward()
    torch.testing.assert_close(grad, logits.grad, rtol=1e-4, atol=1e-12)


@pytest.fixture(scope="module")
def lce_inputs():
    N, H, V = LCE_NHV
    return lce._inputs(N, H, V, torch.float32, "cpu")


LCE_PROVIDERS = {"dlm_kernels": lce._ours, "gather-eager": lce._gather_eager}
if hasattr(torch.nn.functional, "linear_cross_entropy"):
    LCE_PROVIDERS["torch-linear_cross_entropy"] = lce._torch_lce


@pytest.mark.parametrize("provider", list(LCE_PROVIDERS))
def test_masked_linear_cross_entropy_fwd_bwd(benchmark, lce_inputs, provider):
    N, H, V = LCE_NHV
    benchmark.group = f"masked_linear_cross_entropy fwd+bwd {N}x{H}x{V} fp32"
    hidden, W, target, mask = lce_inputs
    benchmark(lce._fwd_bwd(LCE_PROVIDERS[provider], *lce_inputs))
    got = (hidden.grad.clone(), W.grad.clone())
    lce._fwd_bwd(lce._gather_eager, *lce_inputs)()
    for a, b in zip(got, (hidden.grad, W.grad)):
        # float32 sums over rows in another order: entries that cancel to ~1e-3 of the largest
        # differ in their low bits, hence a bound on the scale of the whole gradient.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
