"""Test helpers shared by every test: the error rule of STYLE.md and small input makers.

The rule (flash-attention's): a kernel's error against the float64 reference may be at most
``factor`` (2) times the error of the reference itself run in the kernel's precision, plus a
small ``atol``. For float64 inputs both errors are tiny and the atol decides.
"""

from __future__ import annotations

import contextlib
import os

import torch

from dlm_kernels import dispatch

# atol added to the rule, by the dtype the kernel ran in, relative to the largest magnitude of
# the reference tensor (a fixed atol of 1e-2 let a bf16 gradient of magnitude 0.02 be 30% off).
ATOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}

# The paths a CPU test can exercise on this machine. "triton" runs in the interpreter.
IMPLS = ["reference", "cpp", "triton"]


def _stats(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    diff = (out.double() - ref.double()).abs()
    finite = torch.isfinite(ref.double())
    diff = torch.where(finite, diff, torch.zeros_like(diff))
    if diff.numel() == 0:
        return 0.0, 0.0
    return diff.max().item(), diff.mean().item()


def assert_close(
    name: str,
    ref: torch.Tensor,
    out: torch.Tensor,
    ref_lowp: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
    atol: float | None = None,
    rtol: float = 0.0,
) -> None:
    """Assert ``out`` (a kernel's result) is close to ``ref`` (the float64 reference).

    ref_lowp: the reference run in the kernel's own precision; the allowed error is
    ``factor * max|ref_lowp - ref| + atol + rtol * |ref|``. Without it, ``atol + rtol * |ref|``.
    ``atol`` is relative to ``max|ref|`` (default: ATOL of the low-precision dtype).
    Non-finite values must match exactly (same positions, same signs of inf, NaN where NaN).
    Prints labelled max and mean errors, so a failing run shows how far off each tensor was.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out_d, ref_d = out.detach().double().cpu(), ref.detach().double().cpu()
    nan_ref, nan_out = torch.isnan(ref_d), torch.isnan(out_d)
    assert torch.equal(nan_ref, nan_out), (
        f"{name}: NaN at {int(nan_out.sum())} positions in output vs {int(nan_ref.sum())} "
        f"in reference"
    )
    inf_ref, inf_out = torch.isinf(ref_d), torch.isinf(out_d)
    assert torch.equal(inf_ref, inf_out), f"{name}: inf positions differ"
    assert torch.equal(ref_d[inf_ref], out_d[inf_out]), f"{name}: signs of inf differ"
    if atol is None:
        atol = ATOL.get(out.dtype, 1e-5) if ref_lowp is None else ATOL.get(ref_lowp.dtype, 1e-5)
    err_max, err_mean = _stats(ref_d, out_d)
    finite = torch.isfinite(ref_d)
    scale = ref_d[finite].abs().max().item() if finite.any() else 0.0
    atol = atol * max(scale, 1e-30)
    base = 0.0
    if ref_lowp is not None:
        lowp_d = ref_lowp.detach().double().cpu()
        # A non-finite low-precision reference where the float64 one is finite would make the
        # bound infinite and let anything pass.
        assert torch.isfinite(lowp_d[finite]).all(), (
            f"{name}: the low-precision reference is not finite where the float64 one is"
        )
        base, _ = _stats(ref_d, lowp_d)
    bound = (factor * base + atol + rtol * ref_d.abs()).expand_as(ref_d)
    excess = ((out_d - ref_d).abs() - bound)[finite]
    ok = excess.numel() == 0 or excess.max().item() <= 0
    print(
        f"{name}: max err {err_max:.3e}, mean err {err_mean:.3e}, "
        f"reference-in-low-precision max err {base:.3e}, atol {atol:.1e} (max|ref| {scale:.2e})"
    )
    assert ok, (
        f"{name}: max err {err_max:.3e} exceeds {factor} x {base:.3e} + {atol:.1e} (+ rtol {rtol})"
    )


@contextlib.contextmanager
def impl(name: str):
    """Run the block with one implementation forced (see dlm_kernels.dispatch.use)."""
    with dispatch.use(name):
        yield


def skip_unless_available(name: str) -> None:
    """pytest.skip when an implementation cannot run here (no _C built, no triton)."""
    import pytest

    if name == "cpp" and device().type != "cpu":
        pytest.skip("the C++ ops serve CPU tensors; this run's tests use CUDA tensors")
    if name == "cpp" and dispatch.cpp_ops() is None:
        if os.environ.get("CI"):
            pytest.fail("the C++ extension dlm_kernels._C is not built in CI")
        pytest.skip("dlm_kernels._C not built")
    if name == "triton":
        if not dispatch.triton_available():
            pytest.skip("triton not installed")
        if not (torch.cuda.is_available() or dispatch.triton_interpret()):
            pytest.skip("no CUDA device and TRITON_INTERPRET is not set")


def to_device(obj, dev):
    """``obj`` with every tensor in it (tuples, lists, dict values too) moved to ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, dev) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    return obj


def run_on(name: str, fn, *args, **kw):
    """``fn(*args, **kw)`` with implementation ``name`` forced, on the device it runs on here.

    Tests build their inputs on the CPU. The Triton path runs them on CUDA when there is a GPU
    (under the interpreter otherwise), so its inputs go there and its outputs come back to the
    CPU; the other paths run where the inputs are.
    """
    dev = device() if name == "triton" else torch.device("cpu")
    with impl(name):
        out = fn(*to_device(args, dev), **to_device(kw, dev))
    return to_device(out, torch.device("cpu"))


def device() -> torch.device:
    """Where the tests run: CUDA when present (the GPU check), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ids(**kw) -> str:
    """Readable parametrize ids: ids(B=2, S=37, dtype=torch.bfloat16) -> 'B2-S37-bf16'."""
    short = {
        torch.float32: "fp32",
        torch.float64: "fp64",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
    }
    parts = []
    for k, v in kw.items():
        parts.append(short[v] if isinstance(v, torch.dtype) else f"{k}{v}")
    return "-".join(parts)
