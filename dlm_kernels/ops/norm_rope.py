"""Inference-time RMSNorm and RoPE in one Triton launch each, for the model's forward on CUDA.

Why: generation at 1B scale on an H100 was launch-bound (gpu-h100-2026-11-27-s9-run1: 16.4 ms
per step for ~6.5 ms of GEMM work, ~46 kernel-launching aten ops per layer). The torch forms of
these two make most of them: RMSNorm in float32 is three casts, pow, mean, add, rsqrt and two
muls (F.rms_norm decomposes into those outside a compiler), RoPE two casts, neg, cat, two muls
and an add, twice per layer each. Here each is one kernel: ~28 launches fewer per layer.

Meaning: exactly the torch forms ``rms_norm_ref`` and ``rope_ref`` below (which dlm/model.py
runs whenever these kernels do not), in float32, rounded once to the input's dtype; they differ
only in float32 summation order and fused multiply-adds (a last-bit difference before that
rounding).

Forward only, by design: dlm/model.py calls these when no gradient is needed (generation and
evaluation under no_grad / inference_mode) and the dispatch picks Triton (CUDA tensors, or the
interpreter forced by tests); training, float64 and torch.compile keep the torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm_kernels import dispatch

try:
    import triton
    import triton.language as tl
except Exception:  # no triton, or a broken one: the Triton path is never selected
    triton = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight in float32, in x's dtype (LLaMA / Qwen)."""
    return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, S, H, D) by RoPE's (B, S, 1, D) float32 cos / sin, half-split layout."""
    xf = x.float()  # once: for bf16 inputs each .float() is a cast kernel
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, D, eps, BLOCK_D: tl.constexpr):
        """One row per program: the whole row in registers (D <= 16384)."""
        r = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + r * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + r * D + offs, (x * inv * w).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_kernel(
        x_ptr, cos_ptr, sin_ptr, y_ptr,
        S, H, HALF,  # positions per row, heads, head_dim / 2
        stride_xb, stride_xs, stride_xh,  # x (B, S, H, D), last dim contiguous
        stride_cb, stride_cs,  # cos and sin (B, S, 1, D), last dim contiguous
        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        """One (b, s) position per program, every head: y = x * cos + [-x2, x1] * sin."""
        pid = tl.program_id(0)
        b = (pid // S).to(tl.int64)
        s = (pid % S).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_HALF)
        d_ok = offs_d < HALF
        ok = (offs_h < H)[:, None] & d_ok[None, :]
        src = x_ptr + b * stride_xb + s * stride_xs + offs_h[:, None] * stride_xh + offs_d[None, :]
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        c = cos_ptr + b * stride_cb + s * stride_cs + offs_d
        n = sin_ptr + b * stride_cb + s * stride_cs + offs_d
        c1 = tl.load(c, mask=d_ok, other=0.0)[None, :]
        c2 = tl.load(c + HALF, mask=d_ok, other=0.0)[None, :]
        s1 = tl.load(n, mask=d_ok, other=0.0)[None, :]
        s2 = tl.load(n + HALF, mask=d_ok, other=0.0)[None, :]
        dst = y_ptr + ((b * S + s) * H + offs_h[:, None]) * (2 * HALF) + offs_d[None, :]
        ty = y_ptr.dtype.element_ty
        tl.store(dst, (x1 * c1 - x2 * s1).to(ty), mask=ok)
        tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(ty), mask=ok)


def use_fused(x: Tensor, *params: Tensor) -> bool:
    """Whether the model's forward may take these kernels for ``x``: Triton picked for its
    device, a 16/32-bit float, in plain eager mode (not under torch.compile or a tracer), and no
    gradient wanted."""
    if triton is None or x.dtype not in _DTYPES or not dispatch.plain_eager():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)):
        return False
    return dispatch.select(x.device, has_cpp=False) == "triton"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`rms_norm_ref` in one launch (no autograd: see :func:`use_fused`)."""
    D = x.shape[-1]
    if D > 16384:  # one row per program in registers
        return rms_norm_ref(x, weight, eps)
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return y
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    block = triton.next_power_of_2(D)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, w, y, x2.stride(0), D, float(eps), BLOCK_D=block,
        num_warps=4 if block <= 2048 else 8,
    )  # fmt: skip
    return y


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`rope_ref` in one launch for (B, S, H, D) x and (B, S, 1, D) float32 cos / sin
    (broadcast over heads); other shapes take the torch form."""
    B, S, H, D = x.shape
    if (
        D % 2 or cos.dtype != torch.float32 or sin.dtype != torch.float32
        or cos.shape != (B, S, 1, D) or sin.shape != cos.shape or sin.stride() != cos.stride()
    ):  # fmt: skip
        return rope_ref(x, cos, sin)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(B, S, H, D, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    half = D // 2
    _rope_kernel[(B * S,)](
        x, cos, sin, y, S, H, half, x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0), cos.stride(1),
        BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )  # fmt: skip
    return y
