"""Masked fused linear cross-entropy: the LM head and the diffusion loss without (N, V) logits.

``masked_linear_cross_entropy(hidden, W, target, mask, weight)`` means
``masked_cross_entropy(hidden @ W.T + bias, target, mask, weight)`` (optionally with Gemma's
softcap on the logits), but only the rows that carry loss are ever multiplied by the LM head and
the logits of those rows are never all alive at once:

- CPU ("cpp"): the valid rows are gathered by index (a host sync is free on the CPU) and run in
  chunks of rows. Per chunk: logits = h @ W.T (+ bias, softcap), then the C++ masked-CE forward
  and backward ops (ops/cross_entropy.py), dHidden for the chunk and dW / dbias accumulated in
  float32 during the forward (Liger-Kernel's trick), so the backward only scales the stored
  gradients by grad_output. Peak extra memory: two (chunk_rows, V) float32 buffers + dW.
  Measured at N=2048, H=512, V=32000, half masked, float32, on the shared 2-core EPYC
  (benchmarks/bench_linear_cross_entropy.py): peak extra 100 MB, against 129 MB for torch's
  chunked F.linear_cross_entropy, 380 MB for gather + linear + F.cross_entropy and 502 MB for
  the full logits; single-thread CPU time 1.66 s against 1.91 s for the gather composition.
- GPU, slab (the default for CUDA tensors outside CUDA-graph capture, torch.compile'd code
  included: the op is opaque to the compiler and chooses when it runs): the valid rows are
  gathered (one host sync for their count) and the vocabulary is walked in slabs of ~V/64
  columns: the GEMMs through cuBLAS, the softmax work in one Triton pass per slab; see "CUDA,
  eager" below for why (the fused kernels' backward measured 5x slower than eager on an H100,
  9x slower than the slab path on an H200).
- GPU, fused ("triton": under CUDA-graph capture, torch.compile's mode="reduce-overhead"
  included, or DLM_KERNELS_LCE=fused): the valid rows are compacted on the device (a stable
  sort of the mask, no host sync: the grid is sized for N rows and tiles past the device-side
  count exit at once). The forward tiles (rows x vocab) with tl.dot, keeps the logits in
  registers, runs an online logsumexp and keeps one float32 lse per row. The backward
  recomputes the logit tiles: one kernel accumulates dHidden over vocabulary tiles, another
  dW / dbias over row tiles (both
  deterministic); ``deterministic=False`` uses one kernel with float32 atomics instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dlm_kernels import dispatch, reference
from dlm_kernels.ops.cross_entropy import check_options, prepare_rows, reduce_rows

try:
    import triton
    import triton.language as tl

    from dlm_kernels.ops.fast_math import _ANCHOR0, _chunk_lse_step, _chunk_lse_total, _exp_ftz
except Exception:  # no triton, or a broken one: the Triton path is never selected
    triton = None

_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
# Every kernel works on the compacted rows: ``order`` (N,) lists the rows that carry loss first
# and ``count`` (1,) int32 says how many there are, both on the device. The grids are sized for
# all N rows (no host sync); a row tile at or past ``count`` does nothing.
if triton is not None:

    @triton.jit
    def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b in float32. UPCAST (interpreter only): triton 3.6's interpreter multiplies
        the raw bits of bfloat16 operands (off by 1e10 on a 16x16 product), so there the
        operands go to float32 first; exact for bf16/fp16 values, as the GPU's fp32 accumulate."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _epilogue(x, b_ptr, cols, col_ok, softcap, HAS_BIAS: tl.constexpr,
                  HAS_CAP: tl.constexpr):  # fmt: skip
        """A float32 (rows, cols) tile of h @ W.T -> logits: + bias, then the softcap."""
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_CAP:
            # tanh(u) = 2 sigmoid(2u) - 1: saturates to +-1 without overflow.
            x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
        return x

    @triton.jit
    def _logits_tile(
        h_ptr,  # (N, H) hidden, rows contiguous
        stride_h,  # elements between rows of hidden
        w_ptr,  # (V, H) LM head
        stride_w,  # elements between rows of the LM head
        b_ptr,  # (V,) bias (unused without HAS_BIAS)
        rows,  # (BLOCK_M,) int64 row indices into hidden
        row_ok,  # (BLOCK_M,) bool: slot holds a row that carries loss
        offs_v,  # (BLOCK_V,) vocabulary indices
        col_ok,  # (BLOCK_V,) bool: offs_v < V
        H,  # hidden size
        softcap,  # c of c * tanh(x / c)
        HAS_BIAS: tl.constexpr,
        HAS_CAP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PREC: tl.constexpr,  # tl.dot input_precision: "ieee" for float32 (no TF32 rounding)
        UPCAST: tl.constexpr,  # interpreter: float32 operands for tl.dot (see _dot)
    ):
        """(BLOCK_M, BLOCK_V) float32 logits, softcapped; they never leave registers."""
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            # Padded slots (rows past the count, columns past V, k past H) load zeros so that
            # tl.dot's 16-wide minimum tiles work for any shape.
            a = tl.load(
                h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + offs_v[None, :].to(tl.int64) * stride_w + offs_k[:, None],
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            acc = _dot(a, b, acc, PREC, UPCAST)
        return _epilogue(acc, b_ptr, offs_v, col_ok, softcap, HAS_BIAS, HAS_CAP)

    @triton.jit
    def _online_lse(x, cols, col_ok, tgt, m_i, s_i, x_t, total, HAS_SMOOTHING: tl.constexpr):
        """Fold a (rows, cols) tile of logits (-inf outside col_ok) into each row's running
        max m_i, sum s_i of exp(x - m_i), target logit x_t and (smoothing) row sum total, in
        float64 from each element on (float32 sums of x, or of x * fl(1 / V), overflowed on
        rows of logits near +-FLT_MAX, whose mean is finite)."""
        m_new = tl.maximum(m_i, tl.max(x, 1))
        # A row that has seen only -inf keeps shift 0: exp(-inf - 0) = 0, not NaN. A +inf
        # shifts by FLT_MAX: exp(+inf - FLT_MAX) = inf, so s and the lse are +inf (a shift of
        # +inf gave exp(inf - inf) = NaN: a +inf bias made every row's loss NaN).
        shift = tl.where(m_new == float("-inf"), 0.0, tl.minimum(m_new, 3.4028234663852886e38))
        s_i = s_i * tl.exp(m_i - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
        x_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), 1)
        if HAS_SMOOTHING:
            total += tl.sum(tl.where(col_ok[None, :], x, 0.0).to(tl.float64), 1)
        return m_new, s_i, x_t, total

    @triton.jit
    def _dlogits_tile(
        x,  # (BLOCK_M, BLOCK_V) float32 logits (softcapped)
        offs_v,
        col_ok,
        row_ok,
        tgt,  # (BLOCK_M,) int64 targets
        lse,  # (BLOCK_M,) float32 from the forward
        coef,  # (BLOCK_M,) float32 grad_output * weight
        V,
        label_smoothing,
        z_loss,
        softcap,
        HAS_CAP: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr,
        HAS_Z: tl.constexpr,
        FAST_EXP: tl.constexpr,  # GPU: exps with subnormal results flushed (_exp_ftz)
    ):
        """d(loss) / d(pre-softcap logits) for one tile, float32, 0 in padded slots."""
        p = _exp_ftz(x - lse[:, None], FAST_EXP)
        scale = coef
        if HAS_Z:
            scale = coef * (1.0 + 2.0 * z_loss * lse)
        hit = coef * (1.0 - label_smoothing)
        # The target as int32 (-1 when out of range): a 64-bit compare per logit cost ~3 more
        # instructions in sm_90 SASS.
        t32 = tl.where((tgt >= 0) & (tgt < V), tgt, -1).to(tl.int32)
        g = scale[:, None] * p - tl.where(offs_v[None, :] == t32[:, None], hit[:, None], 0.0)
        if HAS_SMOOTHING:
            g -= (coef * (label_smoothing / V))[:, None]
        if HAS_CAP:
            # d(c tanh(u / c)) / du = 1 - (capped / c)^2
            t = x / softcap
            g = g * (1.0 - t * t)
        return tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)

    @triton.jit
    def _row_tile(order_ptr, count_ptr, pid, BLOCK_M: tl.constexpr):
        """The rows of row tile ``pid``: (rows int64 indices into hidden, row_ok bool)."""
        count = tl.load(count_ptr)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < count
        rows = tl.load(order_ptr + offs_m, mask=row_ok, other=0)
        return rows, row_ok

    @triton.jit
    def _row_terms(target_ptr, lse_ptr, grad_ptr, weight_ptr, rows, row_ok):
        """What the backward needs of each row: (target, lse, grad_output * weight)."""
        tgt = tl.load(target_ptr + rows, mask=row_ok, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        coef = tl.load(grad_ptr + rows, mask=row_ok, other=0.0) * tl.load(
            weight_ptr + rows, mask=row_ok, other=0.0
        )
        return tgt, lse, coef

    @triton.jit
    def _lce_fwd_kernel(
        h_ptr, stride_h, w_ptr, stride_w, b_ptr,  # hidden (N, H), head (V, H), bias (V,)
        order_ptr,  # (N,) int64: rows that carry loss first
        count_ptr,  # (1,) int32: how many rows carry loss
        target_ptr,  # (N,) int64
        weight_ptr,  # (N,) float32 per-row factor
        loss_ptr,  # (N,) float32 out (pre-zeroed: rows without loss stay 0)
        lse_ptr,  # (N,) float32 out (pre-zeroed)
        V, H,
        label_smoothing, z_loss, softcap,
        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr,  # eps != 0 (the row sum is skipped otherwise)
        HAS_Z: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        count = tl.load(count_ptr)
        if pid * BLOCK_M < count:
            rows, row_ok = _row_tile(order_ptr, count_ptr, pid, BLOCK_M)
            tgt = tl.load(target_ptr + rows, mask=row_ok, other=0)
            # Online logsumexp over vocabulary tiles, one running (max, sum) pair per row.
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            s_i = tl.zeros((BLOCK_M,), tl.float32)
            x_t = tl.zeros((BLOCK_M,), tl.float32)
            total = tl.zeros((BLOCK_M,), tl.float64)
            for v0 in range(0, V, BLOCK_V):
                offs_v = v0 + tl.arange(0, BLOCK_V)
                col_ok = offs_v < V
                x = _logits_tile(
                    h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_ok, offs_v, col_ok, H,
                    softcap, HAS_BIAS, HAS_CAP, BLOCK_M, BLOCK_V, BLOCK_K, PREC, UPCAST,
                )  # fmt: skip
                x = tl.where(col_ok[None, :], x, float("-inf"))
                m_i, s_i, x_t, total = _online_lse(
                    x, offs_v, col_ok, tgt, m_i, s_i, x_t, total, HAS_SMOOTHING
                )
            lse = m_i + tl.log(s_i)
            loss = lse - x_t
            if HAS_SMOOTHING:
                mean = (total / V).to(tl.float32)
                loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - mean)
            if HAS_Z:
                loss += z_loss * lse * lse
            w = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
            tl.store(loss_ptr + rows, w * loss, mask=row_ok)
            tl.store(lse_ptr + rows, lse, mask=row_ok)

    @triton.jit
    def _lce_bwd_dh_kernel(
        h_ptr, stride_h, w_ptr, stride_w, b_ptr,
        order_ptr, count_ptr, target_ptr, weight_ptr,
        grad_ptr,  # (N,) float32 d(total) / d(loss_i)
        lse_ptr,  # (N,) float32 from the forward
        dh_ptr,  # (N, H) float32 out, pre-zeroed; each row tile owns its rows (no atomics)
        V, H,
        label_smoothing, z_loss, softcap,
        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
        HAS_Z: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """One program per row tile: loops over vocabulary tiles, dH += dlogits @ W."""
        pid = tl.program_id(0)
        count = tl.load(count_ptr)
        if pid * BLOCK_M < count:
            rows, row_ok = _row_tile(order_ptr, count_ptr, pid, BLOCK_M)
            tgt, lse, coef = _row_terms(target_ptr, lse_ptr, grad_ptr, weight_ptr, rows, row_ok)
            for v0 in range(0, V, BLOCK_V):
                offs_v = v0 + tl.arange(0, BLOCK_V)
                col_ok = offs_v < V
                x = _logits_tile(
                    h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_ok, offs_v, col_ok, H,
                    softcap, HAS_BIAS, HAS_CAP, BLOCK_M, BLOCK_V, BLOCK_K, PREC, UPCAST,
                )  # fmt: skip
                g = _dlogits_tile(
                    x, offs_v, col_ok, row_ok, tgt, lse, coef, V, label_smoothing, z_loss,
                    softcap, HAS_CAP, HAS_SMOOTHING, HAS_Z, False,
                )  # fmt: skip
                g = g.to(w_ptr.dtype.element_ty)
                for k0 in range(0, H, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < H
                    wt = tl.load(
                        w_ptr + offs_v[:, None].to(tl.int64) * stride_w + offs_k[None, :],
                        mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    ptrs = dh_ptr + rows[:, None] * H + offs_k[None, :]
                    msk = row_ok[:, None] & k_ok[None, :]
                    acc = tl.load(ptrs, mask=msk, other=0.0)
                    acc = _dot(g, wt, acc, PREC, UPCAST)
                    tl.store(ptrs, acc, mask=msk)

    @triton.jit
    def _lce_bwd_dw_kernel(
        h_ptr, stride_h, w_ptr, stride_w, b_ptr,
        order_ptr, count_ptr, target_ptr, weight_ptr, grad_ptr, lse_ptr,
        dw_ptr,  # (V, H) float32 out, pre-zeroed; each vocabulary tile owns its rows of dW
        db_ptr,  # (V,) float32 out (unused without HAS_BIAS)
        V, H,
        label_smoothing, z_loss, softcap,
        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
        HAS_Z: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """One program per vocabulary tile: loops over the compacted row tiles (up to the
        device-side count), dW += dlogits.T @ h, in a fixed order (deterministic)."""
        pid_v = tl.program_id(0)
        count = tl.load(count_ptr)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        db = tl.zeros((BLOCK_V,), tl.float32)
        for m0 in range(0, count, BLOCK_M):
            rows, row_ok = _row_tile(order_ptr, count_ptr, m0 // BLOCK_M, BLOCK_M)
            tgt, lse, coef = _row_terms(target_ptr, lse_ptr, grad_ptr, weight_ptr, rows, row_ok)
            x = _logits_tile(
                h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_ok, offs_v, col_ok, H,
                softcap, HAS_BIAS, HAS_CAP, BLOCK_M, BLOCK_V, BLOCK_K, PREC, UPCAST,
            )  # fmt: skip
            g = _dlogits_tile(
                x, offs_v, col_ok, row_ok, tgt, lse, coef, V, label_smoothing, z_loss,
                softcap, HAS_CAP, HAS_SMOOTHING, HAS_Z, False,
            )  # fmt: skip
            if HAS_BIAS:
                db += tl.sum(g, 0)
            gt = tl.trans(g.to(h_ptr.dtype.element_ty))
            for k0 in range(0, H, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < H
                ht = tl.load(
                    h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                ptrs = dw_ptr + offs_v[:, None].to(tl.int64) * H + offs_k[None, :]
                msk = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(ptrs, mask=msk, other=0.0)
                acc = _dot(gt, ht, acc, PREC, UPCAST)
                tl.store(ptrs, acc, mask=msk)
        if HAS_BIAS:
            tl.store(db_ptr + offs_v, db, mask=col_ok)

    @triton.jit
    def _lce_bwd_atomic_kernel(
        h_ptr, stride_h, w_ptr, stride_w, b_ptr,
        order_ptr, count_ptr, target_ptr, weight_ptr, grad_ptr, lse_ptr,
        dh_ptr,  # (N, H) float32 out, pre-zeroed, atomically accumulated
        dw_ptr,  # (V, H) float32 out, pre-zeroed, atomically accumulated
        db_ptr,  # (V,) float32 out, pre-zeroed, atomically accumulated
        V, H,
        label_smoothing, z_loss, softcap,
        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
        HAS_Z: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """deterministic=False: one program per (row tile, vocabulary tile) computes the
        dlogits tile once and adds both products with float32 atomics (one logits recompute
        instead of two; the order of the additions varies from run to run)."""
        pid_m = tl.program_id(0)
        pid_v = tl.program_id(1)
        count = tl.load(count_ptr)
        if pid_m * BLOCK_M < count:
            rows, row_ok = _row_tile(order_ptr, count_ptr, pid_m, BLOCK_M)
            offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = offs_v < V
            tgt, lse, coef = _row_terms(target_ptr, lse_ptr, grad_ptr, weight_ptr, rows, row_ok)
            x = _logits_tile(
                h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_ok, offs_v, col_ok, H,
                softcap, HAS_BIAS, HAS_CAP, BLOCK_M, BLOCK_V, BLOCK_K, PREC, UPCAST,
            )  # fmt: skip
            g = _dlogits_tile(
                x, offs_v, col_ok, row_ok, tgt, lse, coef, V, label_smoothing, z_loss,
                softcap, HAS_CAP, HAS_SMOOTHING, HAS_Z, False,
            )  # fmt: skip
            if HAS_BIAS:
                tl.atomic_add(db_ptr + offs_v, tl.sum(g, 0), mask=col_ok)
            g = g.to(w_ptr.dtype.element_ty)
            gt = tl.trans(g)
            for k0 in range(0, H, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < H
                wt = tl.load(
                    w_ptr + offs_v[:, None].to(tl.int64) * stride_w + offs_k[None, :],
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                hk = tl.load(
                    h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                tl.atomic_add(
                    dh_ptr + rows[:, None] * H + offs_k[None, :],
                    _dot(g, wt, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), PREC, UPCAST),
                    mask=row_ok[:, None] & k_ok[None, :],
                )
                tl.atomic_add(
                    dw_ptr + offs_v[:, None].to(tl.int64) * H + offs_k[None, :],
                    _dot(gt, hk, tl.zeros((BLOCK_V, BLOCK_K), tl.float32), PREC, UPCAST),
                    mask=col_ok[:, None] & k_ok[None, :],
                )

    # --- the slab path's elementwise work (see "CUDA, eager" below): one pass over each slab

    @triton.jit
    def _slab_logits(x_ptr, b_ptr, offs, cols, ok, softcap, HAS_BIAS: tl.constexpr,
                     HAS_CAP: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
        """Logits at x_ptr + offs (float32 h @ W_s.T): + bias at cols, then the softcap."""
        if MASKED:
            x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        else:
            x = tl.load(x_ptr + offs)
        if HAS_BIAS:
            if MASKED:
                x += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            else:
                x += tl.load(b_ptr + cols).to(tl.float32)
        if HAS_CAP:
            # tanh(u) = 2 sigmoid(2u) - 1: saturates to +-1 without overflow.
            x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
        return x

    @triton.jit
    def _slab_fwd_kernel(
        x_ptr,  # (M, C) float32 h @ W_s.T of one slab, rows contiguous
        b_ptr,  # bias from the slab's first column (unused without HAS_BIAS)
        t_ptr,  # (M,) int64 targets
        m_ptr, s_ptr, xt_ptr, tot_ptr,  # (P, M) float32 partial m, s, target logit, sum / V
        M, C, v0,  # rows, slab width, the slab's first column
        V,  # vocabulary size (the row mean is the sum of the partials' sums / V)
        p0, SPAN,  # this slab's first partial row; columns per program along grid axis 1
        softcap,
        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
        CHUNK: tl.constexpr,  # float32 logits per thread and load (16 bytes)
        STAGES: tl.constexpr,  # cp.async stages of the sweep (GPU)
        FAST_EXP: tl.constexpr,  # GPU: exps with subnormal results flushed (_exp_ftz)
    ):  # fmt: skip
        """One (BLOCK_M rows, SPAN columns) piece of a slab, folded into an online logsumexp
        and written as partial row p0 + program_id(1) (m: the largest chunk anchor, within 8
        of the piece's max; s: the sum of exp(x - m); the target logit; the piece's float64
        sum of x / V); _slab_fwd combines the partials once, after the last slab. Reads
        the slab once; the column split keeps the GPU busy when few rows carry loss.

        The tile is (BLOCK_M, BLOCK_C // CHUNK, CHUNK): each thread loads CHUNK contiguous
        logits of one row and keeps the online logsumexp per (row, chunk column) as the masked
        cross-entropy's forward does (a sum against an anchor that starts at -FLT_MAX and moves
        to a chunk's max, clamped to FLT_MAX, only when that exceeds it by more than 8): no
        reduction across threads inside the loop (the per-row state took 63 shuffles and 9
        barriers per tile, ~28 instructions per logit in sm_90 SASS). The target logit is read
        once after the sweep. Rows past M read row M - 1 (never stored): no row masks."""
        NC: tl.constexpr = BLOCK_C // CHUNK
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c_lo = tl.program_id(1) * SPAN
        c_hi = tl.minimum(C, c_lo + SPAN)
        row_ok = offs_m < M
        base = tl.minimum(offs_m, M - 1).to(tl.int64) * C
        cols0 = (tl.arange(0, NC) * CHUNK)[:, None] + tl.arange(0, CHUNK)[None, :]
        # The bias is read at the logits' own (BLOCK_M, NC, CHUNK) shape (each row re-reads it
        # from L1): a (1, NC, CHUNK) tile took a layout of its own, with shuffles in the loop.
        rows0 = tl.zeros([BLOCK_M, 1, 1], tl.int32)
        a_c = tl.full([BLOCK_M, NC], _ANCHOR0, tl.float32)
        z_c = tl.zeros([BLOCK_M, NC], tl.float32)
        t_c = tl.zeros([BLOCK_M, NC], tl.float64)
        c_full = c_lo + (c_hi - c_lo) // BLOCK_C * BLOCK_C  # whole tiles end here
        for c0 in tl.range(c_lo, c_full, BLOCK_C, num_stages=STAGES):
            cols = c0 + cols0
            offs = base[:, None, None] + cols[None, :, :]
            x = _slab_logits(x_ptr, b_ptr, offs, cols[None, :, :] + rows0, True, softcap,
                             HAS_BIAS, HAS_CAP, False)  # fmt: skip
            a_c, z_c, t_c = _chunk_lse_step(x, True, a_c, z_c, t_c, 2, False, HAS_SMOOTHING,
                                            FAST_EXP)  # fmt: skip
        if c_full < c_hi:
            cols = c_full + cols0
            offs = base[:, None, None] + cols[None, :, :]
            ok = cols[None, :, :] < c_hi
            x = _slab_logits(x_ptr, b_ptr, offs, cols[None, :, :] + rows0, ok, softcap,
                             HAS_BIAS, HAS_CAP, True)  # fmt: skip
            a_c, z_c, t_c = _chunk_lse_step(x, ok, a_c, z_c, t_c, 2, True, HAS_SMOOTHING,
                                            FAST_EXP)  # fmt: skip
        m_i, s_i = _chunk_lse_total(a_c, z_c, 1)
        tgt = tl.load(t_ptr + offs_m, mask=row_ok, other=-1) - v0  # column in the slab
        t_ok = row_ok & (tgt >= c_lo) & (tgt < c_hi)
        x_t = _slab_logits(x_ptr, b_ptr, base + tgt, tgt, t_ok, softcap, HAS_BIAS, HAS_CAP,
                           True)  # fmt: skip
        x_t = tl.where(t_ok, x_t, 0.0)
        out = (p0 + tl.program_id(1)).to(tl.int64) * M + offs_m
        tl.store(m_ptr + out, m_i, mask=row_ok)
        tl.store(s_ptr + out, s_i, mask=row_ok)
        tl.store(xt_ptr + out, x_t, mask=row_ok)
        if HAS_SMOOTHING:
            tl.store(tot_ptr + out, (tl.sum(t_c, 1) / V).to(tl.float32), mask=row_ok)

    @triton.jit
    def _slab_bwd_kernel(
        x_ptr,  # (M, C) float32 h @ W_s.T of one slab, rows contiguous
        b_ptr,  # bias from the slab's first column (unused without HAS_BIAS)
        t_ptr,  # (M,) int64 targets
        lse_ptr,  # (M,) float32 from the forward
        coef_ptr,  # (M,) float32 grad_output * weight
        g_ptr,  # (M, C) out: d(loss) / d(h @ W_s.T) in the head's dtype
        dbp_ptr,  # (cdiv(M, BLOCK_M), C) float32 out: column sums per row tile (HAS_DB)
        M, C, v0, V,  # rows, slab width, the slab's first column, vocabulary size
        label_smoothing, z_loss, softcap,
        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
        HAS_Z: tl.constexpr, HAS_DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
        FAST_EXP: tl.constexpr,  # GPU: exps with subnormal results flushed (_exp_ftz)
    ):  # fmt: skip
        """One (BLOCK_M, BLOCK_C) tile of the slab's dlogits: reads the float32 logits once and
        writes the GEMM operand once (the torch composition made six passes)."""
        pid_m = tl.program_id(0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = offs_m < M
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        offs = offs_m.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        x = _epilogue(x, b_ptr, cols, col_ok, softcap, HAS_BIAS, HAS_CAP)
        tgt = tl.load(t_ptr + offs_m, mask=row_ok, other=-1) - v0  # column in the slab
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + offs_m, mask=row_ok, other=0.0)
        g = _dlogits_tile(
            x, cols, col_ok, row_ok, tgt, lse, coef, V, label_smoothing, z_loss, softcap,
            HAS_CAP, HAS_SMOOTHING, HAS_Z, FAST_EXP,
        )  # fmt: skip
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=ok)
        if HAS_DB:
            tl.store(dbp_ptr + pid_m * C + cols, tl.sum(g, 0), mask=col_ok)


def _blocks(H: int, dtype: torch.dtype) -> dict:
    # Not tuned on a GPU yet (no device in this session): 64 x 128 tiles with BLOCK_K 64 keep
    # a bf16 (a, b) stage at 24 KB, so 3 stages fit an H100's shared memory with room to
    # spare; float32 halves BLOCK_K. Under the interpreter (numpy) fewer, wider tiles are
    # faster: BLOCK_V 256 runs the B2-L37-H40-V1003 fwd+bwd in 2.2 s against 11 s at 64.
    if dispatch.triton_interpret():
        return dict(BLOCK_M=16, BLOCK_V=256, BLOCK_K=64)
    bk = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=min(bk, max(16, triton.next_power_of_2(H))))


def _compact_rows(valid: Tensor) -> tuple[Tensor, Tensor]:
    """(order (N,) int64 with the rows that carry loss first, count (1,) int32), on the device
    and without a host sync: a stable sort of the mask, not nonzero()."""
    order = torch.argsort((~valid).to(torch.int8), stable=True)
    count = valid.sum(dtype=torch.int32).reshape(1)
    return order, count


def _common(hidden, W, bias, label_smoothing, z_loss, softcap):
    return dict(
        HAS_BIAS=bias is not None,
        HAS_CAP=softcap != 0.0,
        HAS_SMOOTHING=label_smoothing != 0.0,
        HAS_Z=z_loss != 0.0,
        # IEEE for float32 (TF32 would round the inputs to 10 bits) and float64 (gradcheck).
        PREC="ieee" if hidden.dtype in (torch.float32, torch.float64) else "tf32",
        UPCAST=dispatch.triton_interpret(),
        **_blocks(hidden.shape[1], hidden.dtype),
    )


def _triton_fwd(hidden, W, bias, target, valid, weight, label_smoothing, z_loss, softcap):
    """Reads hidden rows once per vocabulary tile and W once per row tile:
    N_valid * V * H * 2 flops (the logits GEMM) and no (N, V) traffic; the floor is that GEMM.
    Writes 8 bytes per row."""
    N, H = hidden.shape
    V = W.shape[0]
    loss = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return loss, lse
    order, count = _compact_rows(valid)
    kw = _common(hidden, W, bias, label_smoothing, z_loss, softcap)
    grid = (triton.cdiv(N, kw["BLOCK_M"]),)
    _lce_fwd_kernel[grid](
        hidden, hidden.stride(0), W, W.stride(0), bias if bias is not None else W,
        order, count, target, weight, loss, lse, V, H,
        float(label_smoothing), float(z_loss), float(softcap or 1.0), **kw,
    )  # fmt: skip
    return loss, lse


def _triton_bwd(
    grad, hidden, W, bias, target, valid, weight, lse, label_smoothing, z_loss, softcap, det,
    need_dh=True, need_dw=True,
):  # fmt: skip
    """Deterministic: two kernels, each recomputing the logits GEMM once (4 GEMMs of
    N_valid * V * H in all); deterministic=False: one kernel and atomics (3 GEMMs). dH, dW and
    db accumulate in float32; no (N, V) buffer."""
    N, H = hidden.shape
    V = W.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh = torch.zeros((N, H) if need_dh else (0,), **f32)
    dW = torch.zeros((V, H) if need_dw else (0,), **f32)
    db = torch.zeros(V if (bias is not None and need_dw) else 0, **f32)
    if N == 0 or not (need_dh or need_dw):
        return dh, dW, db
    order, count = _compact_rows(valid)
    kw = _common(hidden, W, bias, label_smoothing, z_loss, softcap)
    b = bias if bias is not None else W
    args = (hidden, hidden.stride(0), W, W.stride(0), b, order, count, target, weight, grad, lse)
    opts = (float(label_smoothing), float(z_loss), float(softcap or 1.0))
    tiles_m, tiles_v = triton.cdiv(N, kw["BLOCK_M"]), triton.cdiv(V, kw["BLOCK_V"])
    if det or not (need_dh and need_dw):
        # With one gradient needed, the two-kernel path does no redundant work either.
        if need_dh:
            _lce_bwd_dh_kernel[(tiles_m,)](*args, dh, V, H, *opts, **kw)
        if need_dw:
            _lce_bwd_dw_kernel[(tiles_v,)](*args, dW, db if bias is not None else dW, V, H,
                                            *opts, **kw)  # fmt: skip
    else:
        _lce_bwd_atomic_kernel[(tiles_m, tiles_v)](
            *args, dh, dW, db if bias is not None else dW, V, H, *opts, **kw
        )
    return dh, dW, db


# ---------------------------------------------------------------------------------------------
# CUDA, eager: vocabulary slabs through cuBLAS
# ---------------------------------------------------------------------------------------------
# Measured on an H100 (benchmarks/results/gpu-h100-2026-11-26-run2-lce.md, N 16384, H 4096,
# V 151936, bf16, half masked): the fused Triton kernels above took 49 ms forward but 539 ms
# backward, against 113 ms fwd+bwd for the full-logits eager composition: their dH / dW tiles
# are read-modify-written in global memory once per (row tile, vocabulary tile) pair. Until they
# are tuned on a GPU, eager CUDA calls take this path: the rows that carry loss are gathered
# (one host sync for their count), then the vocabulary is walked in slabs of columns:
#   forward   x = h @ W_s.T (cuBLAS, float32 out), then _slab_fwd_kernel reads x once: bias,
#             softcap, online logsumexp, target logit, row sum (smoothing), as partials per
#             (row tile, column piece) combined once at the end; the pieces split a slab's
#             columns only when the row tiles alone are fewer than two programs per SM (at 256
#             masked rows, 16 programs per slab walked 16k columns each; not yet timed)
#   backward  x again, _slab_bwd_kernel reads it once and writes G = dloss/dlogits in the
#             head's dtype (and db_s's column sums), dH += G @ W_s (cuBLAS accumulating in
#             float32 in place), dW_s = G.T @ h written once (every row is in the slab: no
#             cross-slab reduction, no (V, H) float32 buffer)
# Four GEMMs of N_valid x V x H in all (fwd 1, bwd 3), each slab's logits alive once. On the
# H100 the torch composition of the elementwise work (5 passes over a slab in the forward,
# ~8 in the backward, a float32 product buffer for dH) cost 15 ms of the forward's 30 and
# ~27 ms of the backward's 71 (gpu-h100-2026-11-27-s9-run1); the two kernels make it one pass.
# Chosen inside the ops, at run time, so that torch.compile'd models get it too (the op is
# opaque to the compiler; the count read is fine there); the fused Triton kernels run under
# CUDA-graph capture (no host sync allowed) and with DLM_KERNELS_LCE=fused.
_SLAB_COLS = None  # tests set a small value to cross many slab edges
_SLAB_MIN_ELEMS = 1 << 22  # tests lower it to see the V // 64 slab width at small row counts
_LCE_CHOICES = ("auto", "slab", "fused")


def _use_slab(hidden: Tensor) -> bool:
    """Whether this call (forward or backward op, at run time) takes the slab path."""
    import os

    choice = os.environ.get("DLM_KERNELS_LCE", "auto").strip().lower() or "auto"
    if choice not in _LCE_CHOICES:
        raise ValueError(f"DLM_KERNELS_LCE must be one of {_LCE_CHOICES}, got {choice!r}")
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # its host read of the row count would break the capture: never, even asked
    if choice != "auto":
        return choice == "slab"
    return hidden.is_cuda


def _slab_cols(M: int, V: int) -> int:
    if _SLAB_COLS is not None:
        return _SLAB_COLS
    # ~V / 64 columns (float32 logits of a slab ~1.5% of the bf16 full logits' size), at
    # least 4M elements per slab so that small problems run as one or a few GEMMs.
    cols = max(V // 64, _SLAB_MIN_ELEMS // max(M, 1), 256)
    return min(V, -(-cols // 128) * 128)


_MM_OUT_DTYPE: dict[torch.device, bool] = {}


def _mm_out_dtype_ok(device: torch.device) -> bool:
    """Whether torch.mm(bf16, bf16, out_dtype=float32) exists here (probed once per device)."""
    if device not in _MM_OUT_DTYPE:
        a = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        try:
            _MM_OUT_DTYPE[device] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[device] = False
    return _MM_OUT_DTYPE[device]


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with a float32 result. On CUDA, bf16/fp16 operands stay on the tensor cores and
    accumulate into float32 (torch.mm's out_dtype; a torch without it rounds the product to
    the operands' dtype once); elsewhere the operands are upcast."""
    if a.dtype in (torch.bfloat16, torch.float16):
        if a.is_cuda:
            if _mm_out_dtype_ok(a.device):
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.mm(a, b).to(torch.float32)
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b).to(torch.float32)


_ADDMM_OUT_DTYPE: dict[torch.device, bool] = {}


def _addmm_f32_ok(device: torch.device) -> bool:
    """Whether torch.addmm(c, bf16, bf16, out_dtype=float32, out=c) accumulates in place here
    (probed once per device, result checked): cuBLAS then adds into c in its epilogue."""
    if device not in _ADDMM_OUT_DTYPE:
        ok = False
        if _mm_out_dtype_ok(device):
            c = torch.full((2, 2), 0.5, dtype=torch.float32, device=device)
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            try:
                torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                ok = bool((c == 2.5).all())
            except (RuntimeError, TypeError, NotImplementedError):
                pass
        _ADDMM_OUT_DTYPE[device] = ok
    return _ADDMM_OUT_DTYPE[device]


def _acc_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (float32) += a @ b, in place where the GEMM can (no float32 product buffer): always
    for float32 operands, for bf16 / fp16 where torch.addmm takes out_dtype (probed)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _addmm_f32_ok(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += _mm_f32(a, b)


def _slab_blocks() -> dict:
    # Bandwidth-bound passes over a float32 slab, 16 elements per thread: 128 / 79 registers
    # for the forward / backward kernel with every option, no spills (sm_90, ptxas). Under the
    # interpreter (numpy) fewer, larger tiles run faster.
    if dispatch.triton_interpret():
        return dict(BLOCK_M=16, BLOCK_C=128)
    return dict(BLOCK_M=16, BLOCK_C=256, num_warps=8)


_SLAB_PROGRAMS: dict = {}  # device -> programs the forward kernel aims for per slab


def _slab_programs(device: torch.device) -> int:
    """Programs per slab the forward kernel's grid aims for: two per SM (8 warps at 128
    registers each fit twice); few under the interpreter, where each program costs Python."""
    if dispatch.triton_interpret() or device.type != "cuda":
        return 4
    if device not in _SLAB_PROGRAMS:
        _SLAB_PROGRAMS[device] = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return _SLAB_PROGRAMS[device]


def _slab_split(M: int, cols: int, blk: dict, programs: int) -> tuple[int, int]:
    """(splits, span): the forward cuts each slab's columns into `splits` pieces of `span`
    columns (whole column tiles) when the row tiles alone are fewer than `programs`: at 256
    masked rows the row tiles were 16 programs for a GPU of 132 SMs."""
    tiles_m = triton.cdiv(M, blk["BLOCK_M"])
    col_tiles = triton.cdiv(cols, blk["BLOCK_C"])
    want = max(1, min(col_tiles, triton.cdiv(programs, tiles_m)))
    span = triton.cdiv(col_tiles, want) * blk["BLOCK_C"]
    return triton.cdiv(cols, span), span


def _slab_rows(valid: Tensor, target: Tensor, weight: Tensor):
    idx = valid.nonzero().squeeze(1)  # the one host sync: the count of rows that carry loss
    return idx, target.index_select(0, idx), weight.index_select(0, idx)


def _slab_fwd(hidden, W, bias, target, valid, weight, eps, z, cap):
    N = hidden.shape[0]
    V = W.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss, lse = torch.zeros(N, **f32), torch.zeros(N, **f32)
    idx, t, w = _slab_rows(valid, target, weight)
    M = idx.numel()
    if M == 0:
        return loss, lse
    h = hidden.index_select(0, idx)
    cols = _slab_cols(M, V)
    blk = _slab_blocks()
    interp = dispatch.triton_interpret()
    splits, span = _slab_split(M, cols, blk, _slab_programs(hidden.device))
    # The forward kernel reads the bias once per row of a tile (from L1): float32, 16 bytes per
    # thread like the logits (sm_90: 180 instructions per 16 logits against 213 for bf16).
    b32 = None if bias is None else bias.float()
    # Partial (anchor, sum, target logit, row sum / V) per (slab, column piece, row); pieces a
    # short last slab leaves unwritten stay at the identity (-inf, 0, 0, 0).
    P = triton.cdiv(V, cols) * splits
    m_p = torch.full((P, M), float("-inf"), **f32)
    s_p = torch.zeros(P, M, **f32)
    xt_p = torch.zeros(P, M, **f32)
    tot_p = torch.zeros(P if eps else 1, M, **f32)
    for i, v0 in enumerate(range(0, V, cols)):
        v1 = min(V, v0 + cols)
        x = _mm_f32(h, W[v0:v1].t())
        _slab_fwd_kernel[(triton.cdiv(M, blk["BLOCK_M"]), triton.cdiv(v1 - v0, span))](
            x, b32[v0:] if bias is not None else x, t, m_p, s_p, xt_p, tot_p, M, v1 - v0, v0,
            V, i * splits, span, float(cap or 1.0), HAS_BIAS=bias is not None,
            HAS_CAP=bool(cap), HAS_SMOOTHING=bool(eps), CHUNK=min(4, blk["BLOCK_C"]),
            STAGES=1 if interp else 3, FAST_EXP=not interp, **blk,
        )  # fmt: skip
    m = m_p.amax(0)
    # Every row has written anchors (-FLT_MAX at least); the where keeps the unwritten pieces'
    # -inf from an -inf - -inf. A row whose every logit is -inf has s = 0: its lse is -inf.
    shift = torch.where(m == float("-inf"), 0.0, m)
    s = (s_p * torch.exp(m_p - shift)).sum(0)
    x_t = xt_p.sum(0)
    total = tot_p.sum(0, dtype=torch.float64).float()  # float32 sums overflowed at +-FLT_MAX
    lse_v = m + torch.log(s)
    row = lse_v - x_t
    if eps:
        row = (1.0 - eps) * row + eps * (lse_v - total)
    if z:
        row = row + z * lse_v * lse_v
    loss.index_copy_(0, idx, w * row)
    lse.index_copy_(0, idx, lse_v)
    return loss, lse


def _slab_bwd(grad, hidden, W, bias, target, valid, weight, lse, eps, z, cap, need_dh, need_dw,
              need_dW_matrix=True):  # fmt: skip
    """Gradients in the inputs' dtypes: dh (N, H), dW (V, H), db (V,); empty when not needed.
    need_dW_matrix=False (only the bias trains) skips the dW GEMMs and returns zeros for dW."""
    N, H = hidden.shape
    V = W.shape[0]
    dev = hidden.device
    idx, t, w = _slab_rows(valid, target, weight)
    M = idx.numel()
    dh = torch.zeros((N, H) if need_dh else (0,), dtype=hidden.dtype, device=dev)
    # Every slab writes its rows of dW: no memset unless nothing is written.
    write_dw = need_dw and need_dW_matrix and M > 0
    dW = (torch.empty if write_dw else torch.zeros)(
        (V, H) if need_dw else (0,), dtype=W.dtype, device=dev
    )
    has_db = bias is not None and need_dw
    db = torch.zeros(V if has_db else 0, dtype=bias.dtype if has_db else W.dtype, device=dev)
    if M == 0 or not (need_dh or need_dw):
        return dh, dW, db
    h = hidden.index_select(0, idx)
    lse_v = lse.index_select(0, idx)
    coef = grad.index_select(0, idx) * w
    dh_acc = torch.zeros(M, H, dtype=torch.float32, device=dev) if need_dh else None
    cols = _slab_cols(M, V)
    blk = _slab_blocks()
    tiles_m = triton.cdiv(M, blk["BLOCK_M"])
    g = torch.empty(M, cols, dtype=W.dtype, device=dev)
    dbp = torch.empty(tiles_m if has_db else 1, cols, dtype=torch.float32, device=dev)
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        C = v1 - v0
        x = _mm_f32(h, W[v0:v1].t())
        gs = g if C == cols else g.view(-1)[: M * C].view(M, C)  # contiguous (M, C)
        _slab_bwd_kernel[(tiles_m, triton.cdiv(C, blk["BLOCK_C"]))](
            x, bias[v0:] if bias is not None else x, t, lse_v, coef, gs, dbp, M, C, v0, V,
            float(eps), float(z), float(cap or 1.0), HAS_BIAS=bias is not None,
            HAS_CAP=bool(cap), HAS_SMOOTHING=bool(eps), HAS_Z=bool(z), HAS_DB=has_db,
            FAST_EXP=not dispatch.triton_interpret(), **blk,
        )  # fmt: skip
        del x
        if has_db:
            db[v0:v1] = dbp.view(-1)[: tiles_m * C].view(tiles_m, C).sum(0).to(db.dtype)
        if need_dh:
            _acc_mm(dh_acc, gs, W[v0:v1])
        if write_dw:
            torch.mm(gs.t(), h, out=dW[v0:v1])
    if need_dh:
        dh.index_copy_(0, idx, dh_acc.to(dh.dtype))
    return dh, dW, db


# ---------------------------------------------------------------------------------------------
# CPU path: chunks of gathered rows through the C++ masked-CE ops
# ---------------------------------------------------------------------------------------------
# Elements of one (chunk_rows, V) buffer: 4M, i.e. 131 rows at V=32000 (16 MB per float32
# buffer, two alive at once). Measured on the shared 2-core EPYC at N=2048, H=512, V=32000, half
# masked: 131 and 262 rows cost the same time (5.34 s vs 5.33 s under load; 65 rows: 6.8 s,
# the dW GEMM's K gets too small), and 131 rows keep the peak at ~100 MB, under torch's chunked
# F.linear_cross_entropy (129 MB, same RSS method).
_CPU_CHUNK_ELEMS = 1 << 22


def _cpu_chunk_rows(V: int) -> int:
    return max(16, _CPU_CHUNK_ELEMS // max(V, 1))


def _dh_low(dl: Tensor, W: Tensor, dtype: torch.dtype, w_absmax: float) -> Tensor:
    """dl @ W for one chunk, as float32, with the GEMM in ``dtype`` (bf16 / fp16: no mixed-dtype
    GEMM on the CPU). float16 has no float32 range: at an upstream gradient of 1 (reduction
    "mean" / "sum" scale dHidden afterwards) a row could overflow to inf where the true gradient
    fits, so the GEMM runs scaled by a power of two (exact) that keeps its output, bounded by
    max_i sum_j |dl_ij| * w_absmax (max |W|, read once per call), under 2^15, and the scale is
    undone in float32."""
    k = 0
    if dtype == torch.float16:
        bound = float(dl.abs().sum(1, dtype=torch.float32).max()) * w_absmax
        if math.isfinite(bound) and bound > 2.0**15:
            k = math.ceil(math.log2(bound / 2.0**15))
    d = (dl * 2.0**-k if k else dl).to(dtype)
    out = (d @ W).to(torch.float32)
    return out * 2.0**k if k else out


def _cpu_run(
    h, W, b, target, valid, weight, eps, z, cap, grad_rows, want_loss, want_grad, lse_rows=None,
    want_dh=True, want_dw=True,
):  # fmt: skip
    """Loop over chunks of the valid rows of ``h`` (N, H).

    grad_rows: None (d total / d loss_i = 1 for every row: the grad-in-forward case) or (N,)
    float32 per-row gradients (reduction="none", recomputed in the backward from ``lse_rows``,
    the forward's (N,) logsumexp, when ``want_loss`` is False).
    Returns (loss (N,) f32, lse (N,) f32, dh (N, H) f32, dW (V, H) f32, db (V,) f32); the
    pieces that were not asked for are empty (want_dh / want_dw: a frozen input's gradient is
    never computed, e.g. a frozen LM head under LoRA skips the dW GEMM, a third of the work).
    """
    ops = dispatch.cpp_ops()
    N, H = h.shape
    V = W.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    # Pieces not asked for are distinct empty tensors: a custom op's outputs may not alias.
    loss = torch.zeros(N if want_loss else 0, **f32)
    lse = torch.zeros(N if want_loss else 0, **f32)
    want_dh, want_dw = want_grad and want_dh, want_grad and want_dw
    dh = torch.zeros((N, H) if want_dh else (0,), **f32)
    dW = torch.zeros((V, H) if want_dw else (0,), **f32)
    db = torch.zeros(V if (want_dw and b is not None) else 0, **f32)
    idx = valid.nonzero().squeeze(1)  # host sync: free on the CPU, and it sizes the work
    n = idx.numel()
    if n == 0:
        return loss, lse, dh, dW, db
    hs = h.index_select(0, idx)
    ts, ws = target.index_select(0, idx), weight.index_select(0, idx)
    gs = None if grad_rows is None else grad_rows.to(torch.float32).index_select(0, idx)
    C = _cpu_chunk_rows(V)
    ones_valid = torch.ones(min(C, n), dtype=torch.bool, device=h.device)
    Wt = W.t()
    low = h.dtype != torch.float32
    w_absmax = float(W.abs().max()) if want_dh and h.dtype == torch.float16 else 0.0  # _dh_low
    for s in range(0, n, C):
        e = min(n, s + C)
        rows = idx[s:e]
        hc, tc, wc, vc = hs[s:e], ts[s:e], ws[s:e], ones_valid[: e - s]
        x = torch.addmm(b, hc, Wt) if b is not None else hc @ Wt
        if cap:
            # Softcap in float32 (as the reference): x <- cap * tanh(x / cap), in place.
            x = x.to(torch.float32)
            x.div_(cap).tanh_().mul_(cap)
        if want_loss:
            lc, lsec = ops.masked_ce_fwd(x, tc, vc, wc, eps, z)
            loss.index_copy_(0, rows, lc)
            lse.index_copy_(0, rows, lsec)
        else:
            lsec = lse_rows.index_select(0, rows)
        if not want_grad:
            continue
        gc = torch.ones(e - s, **f32) if gs is None else gs[s:e].contiguous()
        dl = ops.masked_ce_bwd(gc, x, tc, vc, wc, lsec, eps, z)
        if cap:
            # d(cap * tanh(u / cap)) / du = 1 - (capped / cap)^2, computed in place from x.
            x.div_(cap).square_().neg_().add_(1.0)
            dl.mul_(x)
        del x
        if low:
            # No mixed-dtype GEMM on the CPU: the dW GEMM runs in float32 (the accumulator's
            # precision, as the issue asks), the dHidden GEMM in the input dtype.
            if want_dw:
                dl32 = dl.to(torch.float32)
                dW.addmm_(dl32.t(), hc.to(torch.float32))
                if b is not None:
                    db.add_(dl32.sum(0))
                del dl32
            if want_dh:
                dh.index_copy_(0, rows, _dh_low(dl, W, h.dtype, w_absmax))
        else:
            if want_dw:
                dW.addmm_(dl.t(), hc)
                if b is not None:
                    db.add_(dl.sum(0))
            if want_dh:
                dh.index_copy_(0, rows, dl @ W)
        del dl
    return loss, lse, dh, dW, db


# ---------------------------------------------------------------------------------------------
# custom ops (one entry point per direction; `impl` picks the kernel family)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dlm_kernels::masked_lce_fwd", mutates_args=())
def _masked_lce_fwd(
    hidden: Tensor,
    lm_head_weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    valid: Tensor,
    weight: Tensor,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduce: bool,
    deterministic: bool,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """Returns (loss, lse (N,) float32): loss is the () float32 sum over rows when ``reduce``,
    else (N,) float32 (0 at rows that carry no loss). The backward recomputes the logits."""
    if impl == "cpp":
        loss, lse, *_ = _cpu_run(
            hidden, lm_head_weight, bias, target, valid, weight,
            label_smoothing, z_loss, softcap, None, True, False,
        )  # fmt: skip
    else:
        if _use_slab(hidden):
            loss, lse = _slab_fwd(
                hidden, lm_head_weight, bias, target, valid, weight, label_smoothing, z_loss,
                softcap,
            )  # fmt: skip
        else:
            loss, lse = _triton_fwd(
                hidden, lm_head_weight, bias, target, valid, weight, label_smoothing, z_loss,
                softcap,
            )  # fmt: skip
        # No host-side range check on CUDA (it would sync): an out-of-range target at a row
        # that carries loss gives NaN, never a plausible number.
        V = lm_head_weight.shape[0]
        loss = loss.masked_fill(valid & ((target < 0) | (target >= V)), float("nan"))
    return (loss.sum() if reduce else loss), lse


@_masked_lce_fwd.register_fake
def _(hidden, lm_head_weight, bias, target, valid, weight, label_smoothing, z_loss, softcap,
      reduce, deterministic, impl):  # fmt: skip
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    loss = hidden.new_empty((), **f32) if reduce else hidden.new_empty(N, **f32)
    return loss, hidden.new_empty(N, **f32)


@torch.library.custom_op("dlm_kernels::masked_lce_bwd", mutates_args=())
def _masked_lce_bwd(
    grad: Tensor,
    hidden: Tensor,
    lm_head_weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    valid: Tensor,
    weight: Tensor,
    lse: Tensor,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    deterministic: bool,
    need_dh: bool,
    need_dw: bool,
    need_dW_matrix: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad: (N,) float32 d(total)/d(loss_i). Returns (dh (N, H), dW (V, H), db (V,)) in the
    dtypes of hidden, lm_head_weight and bias (accumulated in float32), recomputing the logits
    from ``lse``; dh is empty without ``need_dh``, dW without ``need_dw``, db without
    ``need_dw`` and a bias; without ``need_dW_matrix`` (only the bias trains) the slab path
    skips the dW GEMMs."""
    grad = grad.to(torch.float32).contiguous()
    if impl == "cpp":
        _, _, dh, dW, db = _cpu_run(
            hidden, lm_head_weight, bias, target, valid, weight,
            label_smoothing, z_loss, softcap, grad, False, True, lse_rows=lse,
            want_dh=need_dh, want_dw=need_dw,
        )  # fmt: skip
    elif _use_slab(hidden):
        return _slab_bwd(
            grad, hidden, lm_head_weight, bias, target, valid, weight, lse,
            label_smoothing, z_loss, softcap, need_dh, need_dw, need_dW_matrix,
        )  # fmt: skip
    else:
        dh, dW, db = _triton_bwd(
            grad, hidden, lm_head_weight, bias, target, valid, weight, lse,
            label_smoothing, z_loss, softcap, deterministic, need_dh, need_dw,
        )  # fmt: skip
    return (
        dh.to(hidden.dtype),
        dW.to(lm_head_weight.dtype),
        db.to(_bias_dtype(bias, lm_head_weight)),
    )


def _bias_dtype(bias, W):
    return bias.dtype if bias is not None else W.dtype


@_masked_lce_bwd.register_fake
def _(grad, hidden, lm_head_weight, bias, target, valid, weight, lse, label_smoothing, z_loss,
      softcap, deterministic, need_dh, need_dw, need_dW_matrix, impl):  # fmt: skip
    N, H = hidden.shape
    V = lm_head_weight.shape[0]
    nb = V if (bias is not None and need_dw) else 0
    return (
        hidden.new_empty((N, H) if need_dh else (0,)),
        lm_head_weight.new_empty((V, H) if need_dw else (0,)),
        hidden.new_empty(nb, dtype=_bias_dtype(bias, lm_head_weight)),
    )


def _cast_grads(grads, hidden, W, bias, needs):
    """Gradients -> each input's dtype (a no-op where they already are); None for an input
    that needs none."""
    dh, dW, db = grads
    return (
        dh.to(hidden.dtype) if needs[0] else None,
        dW.to(W.dtype) if needs[1] else None,
        db.to(bias.dtype) if (bias is not None and needs[2]) else None,
    )


def _setup_context(ctx, inputs, output):
    (hidden, W, bias, target, valid, weight, eps, z, cap, reduce, det, impl) = inputs
    ctx.save_for_backward(hidden, W, bias, target, valid, weight, output[1])
    ctx.opts = (eps, z, cap, reduce, det, impl)


def _backward(ctx, grad_loss, grad_lse):
    eps, z, cap, reduce, det, impl = ctx.opts
    hidden, W, bias, target, valid, weight, lse = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 12
    g_rows = grad_loss.to(torch.float32).expand(valid.shape) if reduce else grad_loss
    needs = ctx.needs_input_grad[:3]
    need_dw = needs[1] or (bias is not None and needs[2])
    grads = _masked_lce_bwd(
        g_rows, hidden, W, bias, target, valid, weight, lse, eps, z, cap, det, needs[0], need_dw,
        needs[1], impl,
    )  # fmt: skip
    return (*_cast_grads(grads, hidden, W, bias, needs), *([None] * 9))


_masked_lce_fwd.register_autograd(_backward, setup_context=_setup_context)
dispatch.refuse_second_order(_masked_lce_bwd, "masked_linear_cross_entropy")


class _CpuGradInForward(torch.autograd.Function):
    """CPU path with a reduction: the gradients of the summed loss are computed in the forward
    (one pass over the logits instead of two), the backward only scales them (Liger's trick).

    A plain autograd.Function, not the custom op, on purpose: the gradients live on ``ctx`` and
    the backward drops them, so autograd adopts the (V, H) float32 buffer as
    ``lm_head_weight.grad`` instead of cloning it. Through the custom-op wrapper autograd always
    cloned it (measured: +62 MB peak at V=32000, H=512, 2-core EPYC). Eager only: the public
    function takes the custom op while torch.compile traces.
    """

    @staticmethod
    def forward(ctx, hidden, W, bias, target, valid, weight, eps, z, cap):
        needs = ctx.needs_input_grad[:3]
        loss, lse, dh, dW, db = _cpu_run(
            hidden, W, bias, target, valid, weight, eps, z, cap, None, True, True,
            want_dh=needs[0], want_dw=needs[1] or (bias is not None and needs[2]),
        )  # fmt: skip
        ctx.grads = (dh, dW, db)
        ctx.like = (hidden, W, bias, needs)
        ctx.mark_non_differentiable(lse)
        return loss.sum(), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if torch.is_grad_enabled():  # create_graph=True: the forward's gradients carry no graph
            raise RuntimeError(
                "masked_linear_cross_entropy: no second-order gradients (create_graph=True) on "
                "the CPU path with a reduction, whose gradients are computed in the forward; "
                "use the reference (DLM_KERNELS_IMPL=reference) for higher-order gradients"
            )
        if ctx.grads is None:
            raise RuntimeError(
                "masked_linear_cross_entropy: backward ran twice through a graph whose gradients "
                "were computed in the forward (CPU path); retain_graph=True is not supported "
                "there: use reduction='none' and reduce outside to backward twice"
            )
        grads, ctx.grads = ctx.grads, None
        hidden, W, bias, needs = ctx.like
        ctx.like = None
        # Scale the float32 buffers in place (they are ours alone now), then cast: a no-op for
        # float32 inputs, so lm_head_weight.grad is the buffer itself.
        g = grad_loss.to(torch.float32)
        for t in grads:
            t.mul_(g)
        return (*_cast_grads(grads, hidden, W, bias, needs), *([None] * 6))


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
def _check_head(name, hidden, lm_head_weight, bias, target, softcap):
    if not isinstance(hidden, Tensor) or hidden.dtype not in _FLOAT:
        got = hidden.dtype if isinstance(hidden, Tensor) else type(hidden).__name__
        raise TypeError(f"{name}: hidden must be a float32/bfloat16/float16 tensor, got {got}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{name}: hidden must have shape (..., H) with H >= 1")
    if not isinstance(lm_head_weight, Tensor) or lm_head_weight.dim() != 2:
        got = (
            tuple(lm_head_weight.shape)
            if isinstance(lm_head_weight, Tensor)
            else type(lm_head_weight).__name__
        )
        raise ValueError(f"{name}: lm_head_weight must be a (V, H) tensor, got {got}")
    V, H = lm_head_weight.shape
    if V < 1 or H != hidden.shape[-1]:
        raise ValueError(
            f"{name}: lm_head_weight must have shape (V, H) with V >= 1 and H = hidden's last "
            f"dimension {hidden.shape[-1]}, got {tuple(lm_head_weight.shape)}"
        )
    if lm_head_weight.dtype != hidden.dtype:
        raise TypeError(
            f"{name}: lm_head_weight must have hidden's dtype {hidden.dtype}, "
            f"got {lm_head_weight.dtype}"
        )
    if lm_head_weight.device != hidden.device:
        raise ValueError(
            f"{name}: lm_head_weight is on {lm_head_weight.device}, expected {hidden.device}"
        )
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (V,):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{name}: bias must be a ({V},) tensor, got {got}")
        if bias.dtype != hidden.dtype:
            raise TypeError(
                f"{name}: bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}"
            )
        if bias.device != hidden.device:
            raise ValueError(f"{name}: bias is on {bias.device}, expected {hidden.device}")
    if target is not None:  # None: fused_head_unmask_step, which shares these checks
        if not isinstance(target, Tensor):
            got = type(target).__name__
            raise TypeError(f"{name}: target must be an integer tensor, got {got}")
        if tuple(hidden.shape[:-1]) != tuple(target.shape):
            raise ValueError(
                f"{name}: hidden {tuple(hidden.shape)} must be target's shape "
                f"{tuple(target.shape)} plus a hidden dimension"
            )
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"{name}: softcap must be None or a positive float, got {softcap!r}")
        if not (0.0 < float(softcap) < float("inf")):
            raise ValueError(f"{name}: softcap must be a positive finite float, got {softcap}")


def _autocast(hidden, W, bias):
    """Under torch.autocast the LM head runs in the autocast dtype, as F.linear would there
    (a bf16 model keeping float32 master weights); gradients flow back through the casts."""
    if not isinstance(hidden, Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, W, bias
    dt = torch.get_autocast_dtype(hidden.device.type)
    castable = (torch.float32, torch.bfloat16, torch.float16)

    def cast(x):
        return x.to(dt) if isinstance(x, Tensor) and x.dtype in castable else x

    return cast(hidden), cast(W), cast(bias)


def masked_linear_cross_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalizer: float | Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    deterministic: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """The LM head and the masked cross-entropy in one op, without materialising the logits.

    Same value as ``masked_cross_entropy(hidden @ lm_head_weight.T + bias, target, mask, weight,
    ...)``; only positions that carry loss are multiplied by the LM head. Gradients flow to
    ``hidden``, ``lm_head_weight`` and ``bias`` (accumulated in float32, returned in their dtype).

    Args:
        hidden: (..., H) float32, bfloat16 or float16 (float64 runs the reference): the final
            hidden states. Under torch.autocast, hidden, lm_head_weight and bias are cast to
            the autocast dtype first (as F.linear would be).
        lm_head_weight: (V, H), hidden's dtype and device: the LM head / unembedding matrix.
        target: (...) int64 token ids; must lie in [0, V) wherever the position carries loss.
        mask: (...) bool, True where the position carries loss (the masked tokens of the
            diffusion loss). None: every position whose target != ignore_index.
        weight: (...) float, or any shape that broadcasts to it such as (B, 1): a per-position
            factor, e.g. the ELBO weight 1/t of each sequence. None: 1. Gets no gradient.
        bias: (V,) hidden's dtype, or None (default): the LM head's bias.
        reduction: "mean" (sum / number of positions carrying loss, 0 if there are none),
            "sum", or "none" ((...) float32 with zeros at positions carrying no loss).
        ignore_index: target value that carries no loss (default -100).
        label_smoothing: eps in [0, 1]: (1 - eps) * NLL + eps * mean over the vocabulary of -log p.
        z_loss: coefficient of logsumexp^2 (PaLM's z-loss), >= 0.
        normalizer: with reduction="mean", divide the sum by this instead (the ELBO divides by
            B * L). A number or a one-element tensor.
        softcap: None (default) or c > 0: the logits become ``c * tanh(logits / c)`` (Gemma 2)
            before the loss.
        return_lse: also return the (...) float32 logsumexp of each position (0 where the
            position carries no loss), detached (no gradient flows back through it on any
            path); useful for logging the z-loss. For a z-loss that trains, use ``z_loss``.
        deterministic: True (default): the weight gradient is reduced in a fixed order. False
            lets the Triton path accumulate it with float32 atomics (one backward kernel instead
            of two; run-to-run bit differences). The CPU path is always deterministic.

    Returns:
        float32 scalar, or (...) for reduction="none" (float64 for float64 inputs); with
        ``return_lse``, the pair (loss, lse).

    Example:
        >>> h, W = torch.randn(2, 37, 40), torch.randn(1003, 40)
        >>> target, mask = torch.randint(0, 1003, (2, 37)), torch.rand(2, 37) < 0.5
        >>> loss = masked_linear_cross_entropy(h, W, target, mask, 1 / torch.rand(2, 1))
    """
    name = "masked_linear_cross_entropy"
    hidden, lm_head_weight, bias = _autocast(hidden, lm_head_weight, bias)
    with torch.autocast(hidden.device.type if isinstance(hidden, Tensor) else "cpu", enabled=False):
        return _masked_linear_cross_entropy(
            name, hidden, lm_head_weight, target, mask, weight, bias, reduction, ignore_index,
            label_smoothing, z_loss, normalizer, softcap, return_lse, deterministic,
        )  # fmt: skip


def _masked_linear_cross_entropy(
    name, hidden, lm_head_weight, target, mask, weight, bias, reduction, ignore_index,
    label_smoothing, z_loss, normalizer, softcap, return_lse, deterministic,
):  # fmt: skip
    _check_head(name, hidden, lm_head_weight, bias, target, softcap)
    check_options(name, reduction, label_smoothing, z_loss, normalizer)
    if not isinstance(deterministic, bool):
        raise TypeError(f"{name}: deterministic must be a bool, got {deterministic!r}")
    V, H = lm_head_weight.shape
    shape = target.shape
    t, valid, w = prepare_rows(name, target, mask, weight, ignore_index, V, hidden.device)
    h2 = hidden.reshape(-1, H)
    eps, z = float(label_smoothing), float(z_loss)
    cap = None if softcap is None else float(softcap)
    impl = dispatch.select(hidden.device)
    if impl == "reference" or hidden.dtype == torch.float64:
        loss, lse = reference.masked_linear_cross_entropy_rows(
            h2, lm_head_weight, bias, t, valid, w, eps, z, cap
        )
        out = reduce_rows(name, loss, valid, shape, reduction, normalizer)
    else:
        reduce = reduction != "none"
        tensors = (hidden, lm_head_weight, bias)
        needs_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in tensors
        )
        # The CPU path computes the gradients of the summed loss during the forward (one pass
        # over the logits instead of two); with reduction="none" the per-row grad_output is
        # known only in the backward, which then recomputes the logits chunk by chunk.
        grad_in_fwd = impl == "cpp" and reduce and needs_grad and dispatch.plain_eager()
        W = lm_head_weight if lm_head_weight.is_contiguous() else lm_head_weight.contiguous()
        b = None if bias is None else bias.contiguous()
        if grad_in_fwd:
            loss, lse = _CpuGradInForward.apply(h2.contiguous(), W, b, t, valid, w, eps, z, cap)
        else:
            loss, lse = _masked_lce_fwd(
                h2.contiguous(), W, b, t, valid, w, eps, z, cap or 0.0, reduce, deterministic, impl
            )
        out = reduce_rows(name, loss, valid, shape, reduction, normalizer)
    if return_lse:
        # Detached on every path: the custom ops' backward ignores a gradient flowing into the
        # lse, so an attached lse would silently drop it (e.g. a user's own z-loss on it).
        return out, lse.detach().reshape(shape)
    return out
