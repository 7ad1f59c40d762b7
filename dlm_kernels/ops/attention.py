"""Bidirectional attention with padding, varlen, block-causal and KV-cached queries.

flash_attn_func's layout: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D). The Triton kernels follow
FlashAttention-2: the forward keeps a running (max, sum) per query row (online softmax) and writes
one float32 logsumexp per row; the backward recomputes the probabilities from it, with a
preprocessing pass (delta = rowsum(dO * O)), a dK/dV kernel that loops over query blocks and a dQ
kernel that loops over key blocks. No atomics by default: each program owns the rows it writes,
and the dK/dV program of a key head loops over the query heads of its group (GQA) itself.
``deterministic=False`` drops the dQ kernel: the dK/dV kernel adds dS K into a float32 dQ buffer
with atomics (FlashAttention-2's own backward; 10 instead of 14 flops per pair and dimension,
dQ's last bits then vary between runs). Not yet timed on a GPU: bench_attention.py reports it
as the "ours_atomic_dq" provider, and the default changes only if it wins there.

Which keys a query sees (the one rule the kernels, the reference and the tests share):
    query i sits at key position p = Sk - Sq + i (Sq < Sk: the queries are the last Sq positions,
    a block against a cached prefix); key j is visible when attention_mask[b, j] is True and, with
    block_size, when j // block_size <= p // block_size. A query whose own position p is padding
    sees nothing. A query that sees nothing gets output 0, lse -inf and zero gradients.

Work skipped: key tiles before a row's first or after its last real key (left/right padding),
query tiles that hold only padding, and key tiles past the block of a query tile's last query
(block-causal). A hole of padding in the middle of a row is masked, not skipped. Only the edge
tiles pay for per-element masks; whole tiles inside the visible range run unmasked.

Tiles: on a GPU, triton.autotune picks each kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages)
by timing a short list of candidates (_autotune_configs: today's fixed choice plus unmeasured
Hopper alternatives) at the first launch of each head dim, dtype, mask/varlen/block-causal flag
set and power-of-two bucket of Sq and Sk: one compile per candidate, then a few timed runs, so
the first call of a new shape class takes seconds. DLM_KERNELS_AUTOTUNE=0 (read at each launch)
and the CPU interpreter run the fixed choice (_tiles) alone. Under CUDA graph capture an untuned
key runs the fixed choice too: call once before capturing.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from numbers import Real

import torch
from torch import Tensor

from dlm_kernels import dispatch, reference
from dlm_kernels.ops import attention_flash

try:
    import triton
    import triton.language as tl
except Exception:  # no triton, or a broken one: the Triton path is never selected
    triton = None

_LOG2E = 1.4426950408889634  # log2(e): the kernels work in base 2 (exp2 is one instruction)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """tl.dot with float32 accumulation. "upcast": the operands (already rounded to bfloat16)
        are multiplied as float32, because the Triton 3.6 interpreter's bfloat16 tl.dot returns
        garbage (~1e10 for unit inputs); the products are the same as a bf16 tensor-core dot."""
        if PRECISION == "upcast":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _head_dim_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Columns that hold the head dim. A constant-true mask when D is a power of two, so
        that loads stay vectorised (and cp.async-pipelined); `offs_d < D` would defeat that."""
        if HEAD_DIM == BLOCK_D:
            return tl.full([BLOCK_D], 1, tl.int1)
        else:
            return offs_d < HEAD_DIM

    @triton.jit
    def _seq_bounds(b, cu_q_ptr, cu_k_ptr, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
        """(first packed row of the queries, of the keys, number of queries, of keys) of b."""
        if VARLEN:
            q_start = tl.load(cu_q_ptr + b).to(tl.int64)
            len_q = tl.load(cu_q_ptr + b + 1) - tl.load(cu_q_ptr + b)
            k_start = tl.load(cu_k_ptr + b).to(tl.int64)
            len_k = tl.load(cu_k_ptr + b + 1) - tl.load(cu_k_ptr + b)
        else:
            q_start = tl.zeros([], tl.int64)
            len_q = tl.zeros([], tl.int32) + seqlen_q
            k_start = tl.zeros([], tl.int64)
            len_k = tl.zeros([], tl.int32) + seqlen_k
        return q_start, k_start, len_q, len_k

    @triton.jit
    def _key_range(
        b, start_m, len_q, len_k, row_ok, kv_lo_ptr, kv_hi_ptr, block_size,
        HAS_MASK: tl.constexpr, BLOCK_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """[lo, hi): the keys a query tile may see; tiles outside are never loaded. [lo, mid):
        whole tiles that every query of the tile may see (no per-element mask but padding).

        Padding: keys before the first real key or after the last one of the row (the common
        left/right padding) are skipped, and a tile of padding queries loops over nothing.
        Block-causal: keys past the block of the tile's last query are skipped.
        """
        lo = tl.zeros([], tl.int32)
        hi = len_k
        if HAS_MASK:
            lo = tl.load(kv_lo_ptr + b)
            hi = tl.load(kv_hi_ptr + b)
            hi = tl.where(tl.sum(row_ok.to(tl.int32), 0) > 0, hi, lo)
        if BLOCK_CAUSAL:
            last_pos = len_k - len_q + tl.minimum(start_m + BLOCK_M, len_q) - 1
            hi = tl.minimum(hi, (last_pos // block_size + 1) * block_size)
        lo = (lo // BLOCK_N) * BLOCK_N  # aligned tiles load aligned rows
        full = hi
        if BLOCK_CAUSAL:  # keys before the end of the first query's block
            first_pos = len_k - len_q + start_m
            full = tl.minimum(full, (first_pos // block_size + 1) * block_size)
        mid = lo + (tl.maximum(full - lo, 0) // BLOCK_N) * BLOCK_N
        return lo, mid, hi, full

    @triton.jit
    def _dense_range(b, lo, hi, full, kv_lo_ptr, BLOCK_N: tl.constexpr):
        """A row whose real keys are one run [kv_lo, kv_hi) (left or right padding, the common
        case) needs no mask reads: [lo, e1) is the partial tile before the first aligned tile
        (keys from kv_lo on), [lo_c, mid) whole tiles every query of the tile may see, [mid,
        hi) the edge tiles. With lo, hi, full of _key_range."""
        k_first = tl.load(kv_lo_ptr + b)
        lo_c = ((k_first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        e1 = tl.maximum(tl.minimum(lo_c, hi), lo)
        mid = lo_c + (tl.maximum(full - lo_c, 0) // BLOCK_N) * BLOCK_N
        return k_first, e1, lo_c, mid

    @triton.jit
    def _fwd_tiles(
        acc, m_i, l_i,  # running output sum, max (base 2), sum of exp2 of one query tile
        q, k_base, v_base, mask_row, pos_m, offs_d, d_ok,
        start, end,  # key range [start, end), start a multiple of BLOCK_N
        begin,  # CHECK: keys before begin are not seen either (a dense row's first tile)
        stride_ks, stride_vs, sm_scale2, block_size,
        HAS_MASK: tl.constexpr,
        CHECK: tl.constexpr,  # mask per element (the last tiles): bounds and block-causal
        BLOCK_CAUSAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        POS_SCALE: tl.constexpr,  # sm_scale2 > 0 (every real call): see the fold below
    ):  # fmt: skip
        """Online softmax over key tiles. Query rows are not masked here: padding and
        out-of-range rows hold q = 0 and are overwritten by the caller.

        POS_SCALE: with a positive scale, max(s * c) = max(s) * c, so the row max is taken on
        the raw scores and scaled once per row, and exp2(s * c - m) is one FFMA per score: in
        sm_90 SASS, 32 of the 383 instructions per 128 x 64 tile and thread were the separate
        scaling FMUL. A scale <= 0 (allowed, never useful) takes the general form."""
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if CHECK:
                col_ok = (offs_n < end) & (offs_n >= begin)
                if HAS_MASK:
                    col_ok = col_ok & (tl.load(mask_row + offs_n, mask=col_ok, other=0) != 0)
            else:
                col_ok = tl.load(mask_row + offs_n) != 0 if HAS_MASK else offs_n >= 0
            # Padding keys load as 0, so NaN or inf stored there cannot reach the sums.
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(
                k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0
            )
            v = tl.load(
                v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0
            )
            s = _dot(q, tl.trans(k), PRECISION)
            if not POS_SCALE:
                s = s * sm_scale2
            if CHECK:
                vis = col_ok[None, :]
                if BLOCK_CAUSAL:
                    vis = vis & ((offs_n[None, :] // block_size) <= (pos_m[:, None] // block_size))
                s = tl.where(vis, s, float("-inf"))
            elif HAS_MASK:
                s = tl.where(col_ok[None, :], s, float("-inf"))
            if POS_SCALE:
                m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale2)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps shift 0: exp2(-inf - 0) = 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            if POS_SCALE:
                p = tl.math.exp2(s * sm_scale2 - shift[:, None])
            else:
                p = tl.math.exp2(s - shift[:, None])
            alpha = tl.math.exp2(m_i - shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _dq_tiles(
        dq, q, do, lse2, delta,  # one query tile: dq accumulator, lse * log2(e) (+inf: no key)
        k_base, v_base, mask_row, pos_m, offs_d, d_ok, start, end,
        begin,  # CHECK: keys before begin are not seen either (a dense row's first tile)
        stride_ks, sm_scale2, block_size,
        HAS_MASK: tl.constexpr,
        CHECK: tl.constexpr,
        BLOCK_CAUSAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """dQ += dS K over key tiles; rows that saw nothing have lse2 = +inf, hence p = 0."""
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if CHECK:
                col_ok = (offs_n < end) & (offs_n >= begin)
                if HAS_MASK:
                    col_ok = col_ok & (tl.load(mask_row + offs_n, mask=col_ok, other=0) != 0)
            else:
                col_ok = tl.load(mask_row + offs_n) != 0 if HAS_MASK else offs_n >= 0
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(
                k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0
            )
            v = tl.load(
                v_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0
            )
            s = _dot(q, tl.trans(k), PRECISION) * sm_scale2
            p = tl.math.exp2(s - lse2[:, None])
            if CHECK:
                vis = col_ok[None, :]
                if BLOCK_CAUSAL:
                    vis = vis & ((offs_n[None, :] // block_size) <= (pos_m[:, None] // block_size))
                p = tl.where(vis, p, 0.0)
            elif HAS_MASK:
                p = tl.where(col_ok[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v), PRECISION)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION)
        return dq

    @triton.jit
    def _dkdv_tiles(
        dk, dv, k, v,  # one key tile: accumulators and its keys / values
        q_base, do_base, lse_base, delta_base,  # query head h: row 0 of q, do, lse, delta
        dq_base,  # ATOMIC_DQ: row 0 of head h in the float32 dQ accumulator (q's layout)
        mask_row, pos0, offs_n, offs_d, d_ok, col_ok, start, end,
        row_begin,  # queries before row_begin are padding (a dense row; start otherwise)
        stride_qs, stride_ds, sm_scale2, block_size,
        HAS_MASK: tl.constexpr,
        CHECK: tl.constexpr,  # apply the block-causal rule per element (the first tiles)
        BLOCK_CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        PRECISION: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
    ):  # fmt: skip
        """dV += P^T dO and dK += dS^T Q over query tiles [start, end); with ATOMIC_DQ also
        dQ += dS K, added into the accumulator with float32 atomics (FlashAttention-2's
        backward: no dQ kernel recomputing S and dP). Padding and out-of-range queries load
        lse = -inf, hence p = 0. Padding and out-of-range keys (col_ok False) load k = v = 0:
        their dK / dV are zeroed by the caller, and with ATOMIC_DQ their p is zeroed here,
        since p = exp(-lse) there overflows to inf for a row whose lse is below about -88
        (-11 once cast to fp16), and inf x 0 in dS K would put NaN in the row's dQ."""
        for start_m in range(start, end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            pos_m = pos0 + offs_m
            row_ok = (offs_m < end) & (offs_m >= row_begin)
            if HAS_MASK:
                row_ok = row_ok & (tl.load(mask_row + pos_m, mask=row_ok, other=0) != 0)
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(
                q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0
            )
            do = tl.load(
                do_base + offs_m[:, None] * stride_ds + offs_d[None, :], mask=q_mask, other=0.0
            )
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("-inf"))
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
            # Rows that saw nothing (lse -inf) get p = 0 through lse2 = +inf.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            sT = _dot(k, tl.trans(q), PRECISION) * sm_scale2
            pT = tl.math.exp2(sT - lse2[None, :])
            if CHECK:
                pT = tl.where(
                    (offs_n[:, None] // block_size) <= (pos_m[None, :] // block_size), pT, 0.0
                )
            if ATOMIC_DQ:
                pT = tl.where(col_ok[:, None], pT, 0.0)
            dv += _dot(pT.to(do.dtype), do, PRECISION)
            dpT = _dot(v, tl.trans(do), PRECISION)
            dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
            dk += _dot(dsT, q, PRECISION)
            if ATOMIC_DQ:
                dq = _dot(tl.trans(dsT), k, PRECISION)
                tl.atomic_add(
                    dq_base + offs_m[:, None] * stride_qs + offs_d[None, :], dq, mask=q_mask,
                    sem="relaxed",
                )  # fmt: skip
        return dk, dv

    @triton.jit
    def _fwd_two(
        acc, m_i, l_i, q, k_base, v_base, mask_row, pos_m, offs_d, d_ok, lo, mid, hi,
        stride_ks, stride_vs, sm_scale2, block_size,
        HAS_MASK: tl.constexpr, BLOCK_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, POS_SCALE: tl.constexpr,
    ):  # fmt: skip
        """Whole tiles [lo, mid) (no per-element mask), then the edge tiles [mid, hi)."""
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, q, k_base, v_base, mask_row, pos_m, offs_d, d_ok, lo, mid, lo,
            stride_ks, stride_vs, sm_scale2, block_size,
            HAS_MASK, False, BLOCK_CAUSAL, BLOCK_N, PRECISION, POS_SCALE,
        )  # fmt: skip
        return _fwd_tiles(
            acc, m_i, l_i, q, k_base, v_base, mask_row, pos_m, offs_d, d_ok, mid, hi, mid,
            stride_ks, stride_vs, sm_scale2, block_size,
            HAS_MASK, True, BLOCK_CAUSAL, BLOCK_N, PRECISION, POS_SCALE,
        )  # fmt: skip

    @triton.jit
    def _dq_two(
        dq, q, do, lse2, delta, k_base, v_base, mask_row, pos_m, offs_d, d_ok, lo, mid, hi,
        stride_ks, sm_scale2, block_size,
        HAS_MASK: tl.constexpr, BLOCK_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """_fwd_two's split for dQ."""
        dq = _dq_tiles(
            dq, q, do, lse2, delta, k_base, v_base, mask_row, pos_m, offs_d, d_ok, lo, mid, lo,
            stride_ks, sm_scale2, block_size, HAS_MASK, False, BLOCK_CAUSAL, BLOCK_N, PRECISION,
        )  # fmt: skip
        return _dq_tiles(
            dq, q, do, lse2, delta, k_base, v_base, mask_row, pos_m, offs_d, d_ok, mid, hi, mid,
            stride_ks, sm_scale2, block_size, HAS_MASK, True, BLOCK_CAUSAL, BLOCK_N, PRECISION,
        )  # fmt: skip

    @triton.jit
    def _dkdv_two(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, mask_row, pos0, offs_n,
        offs_d, d_ok, col_ok, q_lo, q_mid, q_hi, row_begin, stride_qs, stride_ds, sm_scale2,
        block_size,
        HAS_MASK: tl.constexpr, BLOCK_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
        PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    ):  # fmt: skip
        """Query tiles [q_lo, q_mid) with the block-causal rule per element, then [q_mid,
        q_hi) without; queries before row_begin are padding."""
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, mask_row, pos0,
            offs_n, offs_d, d_ok, col_ok, q_lo, q_mid, row_begin, stride_qs, stride_ds,
            sm_scale2, block_size,
            HAS_MASK, BLOCK_CAUSAL, BLOCK_CAUSAL, BLOCK_M, PRECISION, ATOMIC_DQ,
        )  # fmt: skip
        return _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, mask_row, pos0,
            offs_n, offs_d, d_ok, col_ok, q_mid, q_hi, row_begin, stride_qs, stride_ds,
            sm_scale2, block_size,
            HAS_MASK, False, BLOCK_CAUSAL, BLOCK_M, PRECISION, ATOMIC_DQ,
        )  # fmt: skip

    @triton.jit
    def _attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr,  # (B, Sq, Hq, D), (B, Sk, Hkv, D) x2; varlen: (total, H, D)
        o_ptr,  # out, strides of q's layout, dtype of q
        lse_ptr,  # out (B, Hq, Sq) float32 natural-log lse; varlen (Hq, total_q)
        mask_ptr,  # (B, Sk) uint8, 1 = real key (read only when HAS_MASK)
        kv_lo_ptr, kv_hi_ptr,  # (B,) int32: first real key, one past the last real key
        kv_dense_ptr,  # (B,) uint8: 1 if the real keys are the one run [kv_lo, kv_hi)
        cu_q_ptr, cu_k_ptr,  # (B + 1,) int32 packed offsets (read only when VARLEN)
        stride_qb, stride_qs, stride_qh,  # element strides of q (batch stride 0 when varlen)
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_lh,  # lse strides (batch stride 0 when varlen)
        stride_mb,  # attention_mask row stride
        n_heads_q,  # Hq
        group,  # Hq // Hkv: query head h reads key head h // group
        seqlen_q, seqlen_k,  # Sq, Sk (dense layout only)
        sm_scale2,  # softmax_scale * log2(e)
        block_size,  # block-causal block (read only when BLOCK_CAUSAL)
        bucket_q, bucket_k,  # autotune key only (unused): Sq, Sk rounded up to a power of two
        HEAD_DIM: tl.constexpr,  # D
        HAS_MASK: tl.constexpr,
        VARLEN: tl.constexpr,
        BLOCK_CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr,  # query tile
        BLOCK_N: tl.constexpr,  # key tile
        BLOCK_D: tl.constexpr,  # D rounded up to a power of two (>= 16), masked
        PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" keeps float32 exact
        POS_SCALE: tl.constexpr,  # sm_scale2 > 0 (see _fwd_tiles)
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads_q).to(tl.int64)
        h = pid_bh % n_heads_q
        hk = h // group
        q_start, k_start, len_q, len_k = _seq_bounds(
            b, cu_q_ptr, cu_k_ptr, seqlen_q, seqlen_k, VARLEN
        )
        start_m = pid_m * BLOCK_M
        if start_m < len_q:  # varlen: programs past a short sequence's end have nothing to do
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
            pos_m = len_k - len_q + offs_m  # key position of each query
            row_in = offs_m < len_q
            row_ok = row_in
            if HAS_MASK:  # a padding query sees nothing
                real = tl.load(mask_ptr + b * stride_mb + pos_m, mask=row_in, other=0)
                row_ok = row_in & (real != 0)
            q_base = q_ptr + b * stride_qb + q_start * stride_qs + h * stride_qh
            k_base = k_ptr + b * stride_kb + k_start * stride_ks + hk * stride_kh
            v_base = v_ptr + b * stride_vb + k_start * stride_vs + hk * stride_vh
            q = tl.load(
                q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0,
            )  # fmt: skip
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            lo, mid, hi, full = _key_range(
                b, start_m, len_q, len_k, row_ok, kv_lo_ptr, kv_hi_ptr, block_size,
                HAS_MASK, BLOCK_CAUSAL, BLOCK_M, BLOCK_N,
            )  # fmt: skip
            mask_row = mask_ptr + b * stride_mb
            if HAS_MASK:
                if tl.load(kv_dense_ptr + b) != 0:
                    # One run of real keys: bounds instead of mask reads (the loads of a key
                    # tile's mask sat in each iteration's critical path, and its select on
                    # every score): the first partial tile, whole tiles, the edge tiles.
                    k_first, e1, lo_c, mid = _dense_range(b, lo, hi, full, kv_lo_ptr, BLOCK_N)
                    acc, m_i, l_i = _fwd_tiles(
                        acc, m_i, l_i, q, k_base, v_base, mask_row, pos_m, offs_d, d_ok, lo,
                        e1, k_first, stride_ks, stride_vs, sm_scale2, block_size,
                        False, True, BLOCK_CAUSAL, BLOCK_N, PRECISION, POS_SCALE,
                    )  # fmt: skip
                    acc, m_i, l_i = _fwd_two(
                        acc, m_i, l_i, q, k_base, v_base, mask_row, pos_m, offs_d, d_ok, lo_c,
                        mid, hi, stride_ks, stride_vs, sm_scale2, block_size,
                        False, BLOCK_CAUSAL, BLOCK_N, PRECISION, POS_SCALE,
                    )  # fmt: skip
                else:
                    acc, m_i, l_i = _fwd_two(
                        acc, m_i, l_i, q, k_base, v_base, mask_row, pos_m, offs_d, d_ok, lo,
                        mid, hi, stride_ks, stride_vs, sm_scale2, block_size,
                        True, BLOCK_CAUSAL, BLOCK_N, PRECISION, POS_SCALE,
                    )  # fmt: skip
            else:
                acc, m_i, l_i = _fwd_two(
                    acc, m_i, l_i, q, k_base, v_base, mask_row, pos_m, offs_d, d_ok, lo, mid,
                    hi, stride_ks, stride_vs, sm_scale2, block_size,
                    False, BLOCK_CAUSAL, BLOCK_N, PRECISION, POS_SCALE,
                )  # fmt: skip
            seen = (l_i > 0.0) & row_ok  # padding rows ran with q = 0: discard them here
            l_safe = tl.where(seen, l_i, 1.0)
            out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
            lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            o_base = o_ptr + b * stride_ob + q_start * stride_os + h * stride_oh
            tl.store(
                o_base + offs_m[:, None] * stride_os + offs_d[None, :],
                out.to(o_ptr.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :],
            )  # fmt: skip
            tl.store(lse_ptr + b * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=row_in)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        o_ptr, do_ptr,  # out and d(out), the layout of q
        dlse_ptr,  # d(lse) (float32, layout of lse), read only when HAS_DLSE
        delta_ptr,  # out: rowsum(dO * O) - dlse, float32, the layout of lse
        cu_q_ptr,  # (B + 1,) int32 (VARLEN)
        stride_ob, stride_os, stride_oh,
        stride_db, stride_ds, stride_dh,  # strides of do
        stride_lb, stride_lh,  # strides of lse / delta / dlse
        n_heads_q, seqlen_q,
        HEAD_DIM: tl.constexpr,
        HAS_DLSE: tl.constexpr,
        VARLEN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads_q).to(tl.int64)
        h = pid_bh % n_heads_q
        q_start, _, len_q, _ = _seq_bounds(b, cu_q_ptr, cu_q_ptr, seqlen_q, seqlen_q, VARLEN)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < len_q
        msk = row_in[:, None] & _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
        o = tl.load(
            o_ptr + b * stride_ob + (q_start + offs_m[:, None]) * stride_os + h * stride_oh
            + offs_d[None, :], mask=msk, other=0.0,
        ).to(tl.float32)  # fmt: skip
        do = tl.load(
            do_ptr + b * stride_db + (q_start + offs_m[:, None]) * stride_ds + h * stride_dh
            + offs_d[None, :], mask=msk, other=0.0,
        ).to(tl.float32)  # fmt: skip
        delta = tl.sum(o * do, 1)
        l_off = b * stride_lb + h * stride_lh + q_start + offs_m
        if HAS_DLSE:
            # d lse / d s = p, so a gradient on lse enters as ds = p * (dp - (delta - dlse)).
            delta -= tl.load(dlse_ptr + l_off, mask=row_in, other=0.0)
        tl.store(delta_ptr + l_off, delta, mask=row_in)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr,
        dk_ptr, dv_ptr,  # out: layouts of k and v (contiguous, same strides as k)
        dq_ptr,  # ATOMIC_DQ: float32 dQ accumulator, zeroed, q's layout (same strides as q)
        lse_ptr, delta_ptr,  # float32, layout of lse
        mask_ptr, kv_lo_ptr, kv_hi_ptr, kv_dense_ptr, cu_q_ptr, cu_k_ptr,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,  # also the strides of dk, dv, v
        stride_db, stride_ds, stride_dh,  # strides of do
        stride_lb, stride_lh,
        stride_mb,
        n_heads_k,  # Hkv
        group,  # Hq // Hkv: this program sums over query heads hk * group .. hk * group + group
        seqlen_q, seqlen_k,
        sm_scale2,  # softmax_scale * log2(e)
        sm_scale,  # softmax_scale
        block_size,
        bucket_q, bucket_k,  # autotune key only (unused)
        HEAD_DIM: tl.constexpr,
        HAS_MASK: tl.constexpr,
        VARLEN: tl.constexpr,
        BLOCK_CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr,  # query tile (inner loop)
        BLOCK_N: tl.constexpr,  # key tile (owned by the program)
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads_k).to(tl.int64)
        hk = pid_bh % n_heads_k
        q_start, k_start, len_q, len_k = _seq_bounds(
            b, cu_q_ptr, cu_k_ptr, seqlen_q, seqlen_k, VARLEN
        )
        start_n = pid_n * BLOCK_N
        if start_n < len_k:
            off = len_k - len_q  # key position of query 0
            offs_n = start_n + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
            col_in = offs_n < len_k
            col_ok = col_in
            # The queries that may see this key tile: [q_lo, q_hi).
            q_lo = tl.zeros([], tl.int32)
            q_hi = len_q
            if HAS_MASK:
                real_k = tl.load(mask_ptr + b * stride_mb + offs_n, mask=col_in, other=0)
                col_ok = col_in & (real_k != 0)
                # Real queries sit at real positions, all inside [kv_lo, kv_hi).
                q_lo = tl.maximum(q_lo, tl.load(kv_lo_ptr + b) - off)
                q_hi = tl.minimum(q_hi, tl.load(kv_hi_ptr + b) - off)
                q_hi = tl.where(tl.sum(col_ok.to(tl.int32), 0) > 0, q_hi, q_lo)
            if BLOCK_CAUSAL:  # query p sees key j iff p >= (j // block_size) * block_size
                q_lo = tl.maximum(q_lo, (start_n // block_size) * block_size - off)
            q_lo = (q_lo // BLOCK_M) * BLOCK_M
            q_mid = q_lo  # [q_lo, q_mid): tiles with the block-causal rule applied per element
            if BLOCK_CAUSAL:  # queries from full_from on see every key of this tile
                full_from = ((start_n + BLOCK_N - 1) // block_size) * block_size - off
                q_mid = q_lo + tl.cdiv(tl.maximum(full_from - q_lo, 0), BLOCK_M) * BLOCK_M
                q_mid = tl.minimum(q_mid, q_hi)
            kv_mask = col_ok[:, None] & d_ok[None, :]
            kv_off = b * stride_kb + (k_start + offs_n[:, None]) * stride_ks + hk * stride_kh
            k = tl.load(k_ptr + kv_off + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_off + offs_d[None, :], mask=kv_mask, other=0.0)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            mask_row = mask_ptr + b * stride_mb
            # One run of real keys (see the forward): a query row is real iff its position is
            # at or after the first real key (q_hi ends the run), with no mask reads per tile.
            for h in range(hk * group, hk * group + group):  # GQA: sum over the group here
                q_base = q_ptr + b * stride_qb + q_start * stride_qs + h * stride_qh
                dq_base = dq_ptr + b * stride_qb + q_start * stride_qs + h * stride_qh
                do_base = do_ptr + b * stride_db + q_start * stride_ds + h * stride_dh
                l_off = b * stride_lb + h * stride_lh + q_start
                if HAS_MASK:
                    if tl.load(kv_dense_ptr + b) != 0:
                        dk, dv = _dkdv_two(
                            dk, dv, k, v, q_base, do_base, lse_ptr + l_off, delta_ptr + l_off,
                            dq_base, mask_row, off, offs_n, offs_d, d_ok, col_ok, q_lo, q_mid,
                            q_hi, tl.load(kv_lo_ptr + b) - off, stride_qs, stride_ds,
                            sm_scale2, block_size,
                            False, BLOCK_CAUSAL, BLOCK_M, PRECISION, ATOMIC_DQ,
                        )  # fmt: skip
                    else:
                        dk, dv = _dkdv_two(
                            dk, dv, k, v, q_base, do_base, lse_ptr + l_off, delta_ptr + l_off,
                            dq_base, mask_row, off, offs_n, offs_d, d_ok, col_ok, q_lo, q_mid,
                            q_hi, q_lo, stride_qs, stride_ds, sm_scale2, block_size,
                            True, BLOCK_CAUSAL, BLOCK_M, PRECISION, ATOMIC_DQ,
                        )  # fmt: skip
                else:
                    dk, dv = _dkdv_two(
                        dk, dv, k, v, q_base, do_base, lse_ptr + l_off, delta_ptr + l_off,
                        dq_base, mask_row, off, offs_n, offs_d, d_ok, col_ok, q_lo, q_mid, q_hi,
                        q_lo, stride_qs, stride_ds, sm_scale2, block_size,
                        False, BLOCK_CAUSAL, BLOCK_M, PRECISION, ATOMIC_DQ,
                    )  # fmt: skip
            # Padding keys ran with k = v = 0 against real queries: their gradients are 0.
            dk = tl.where(col_ok[:, None], dk, 0.0)
            dv = tl.where(col_ok[:, None], dv, 0.0)
            out_mask = col_in[:, None] & d_ok[None, :]
            tl.store(
                dk_ptr + kv_off + offs_d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty),
                mask=out_mask,
            )  # fmt: skip
            tl.store(
                dv_ptr + kv_off + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=out_mask
            )

    @triton.jit
    def _attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr,
        dq_ptr,  # out: the layout of q (same strides)
        lse_ptr, delta_ptr,
        mask_ptr, kv_lo_ptr, kv_hi_ptr, kv_dense_ptr, cu_q_ptr, cu_k_ptr,
        stride_qb, stride_qs, stride_qh,  # also the strides of dq
        stride_kb, stride_ks, stride_kh,  # also the strides of v
        stride_db, stride_ds, stride_dh,
        stride_lb, stride_lh,
        stride_mb,
        n_heads_q, group,
        seqlen_q, seqlen_k,
        sm_scale2, sm_scale,
        block_size,
        bucket_q, bucket_k,  # autotune key only (unused)
        HEAD_DIM: tl.constexpr,
        HAS_MASK: tl.constexpr,
        VARLEN: tl.constexpr,
        BLOCK_CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr,  # query tile (owned by the program)
        BLOCK_N: tl.constexpr,  # key tile (inner loop)
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads_q).to(tl.int64)
        h = pid_bh % n_heads_q
        hk = h // group
        q_start, k_start, len_q, len_k = _seq_bounds(
            b, cu_q_ptr, cu_k_ptr, seqlen_q, seqlen_k, VARLEN
        )
        start_m = pid_m * BLOCK_M
        if start_m < len_q:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
            pos_m = len_k - len_q + offs_m
            row_in = offs_m < len_q
            row_ok = row_in
            if HAS_MASK:
                real = tl.load(mask_ptr + b * stride_mb + pos_m, mask=row_in, other=0)
                row_ok = row_in & (real != 0)
            q_mask = row_ok[:, None] & d_ok[None, :]
            q_off = b * stride_qb + (q_start + offs_m[:, None]) * stride_qs + h * stride_qh
            q = tl.load(q_ptr + q_off + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(
                do_ptr + b * stride_db + (q_start + offs_m[:, None]) * stride_ds + h * stride_dh
                + offs_d[None, :], mask=q_mask, other=0.0,
            )  # fmt: skip
            l_off = b * stride_lb + h * stride_lh + q_start + offs_m
            lse = tl.load(lse_ptr + l_off, mask=row_ok, other=float("-inf"))
            delta = tl.load(delta_ptr + l_off, mask=row_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            k_base = k_ptr + b * stride_kb + k_start * stride_ks + hk * stride_kh
            v_base = v_ptr + b * stride_kb + k_start * stride_ks + hk * stride_kh
            lo, mid, hi, full = _key_range(
                b, start_m, len_q, len_k, row_ok, kv_lo_ptr, kv_hi_ptr, block_size,
                HAS_MASK, BLOCK_CAUSAL, BLOCK_M, BLOCK_N,
            )  # fmt: skip
            mask_row = mask_ptr + b * stride_mb
            if HAS_MASK:
                if tl.load(kv_dense_ptr + b) != 0:  # one run of real keys: see the forward
                    k_first, e1, lo_c, mid = _dense_range(b, lo, hi, full, kv_lo_ptr, BLOCK_N)
                    dq = _dq_tiles(
                        dq, q, do, lse2, delta, k_base, v_base, mask_row, pos_m, offs_d, d_ok,
                        lo, e1, k_first, stride_ks, sm_scale2, block_size,
                        False, True, BLOCK_CAUSAL, BLOCK_N, PRECISION,
                    )  # fmt: skip
                    dq = _dq_two(
                        dq, q, do, lse2, delta, k_base, v_base, mask_row, pos_m, offs_d, d_ok,
                        lo_c, mid, hi, stride_ks, sm_scale2, block_size,
                        False, BLOCK_CAUSAL, BLOCK_N, PRECISION,
                    )  # fmt: skip
                else:
                    dq = _dq_two(
                        dq, q, do, lse2, delta, k_base, v_base, mask_row, pos_m, offs_d, d_ok,
                        lo, mid, hi, stride_ks, sm_scale2, block_size,
                        True, BLOCK_CAUSAL, BLOCK_N, PRECISION,
                    )  # fmt: skip
            else:
                dq = _dq_two(
                    dq, q, do, lse2, delta, k_base, v_base, mask_row, pos_m, offs_d, d_ok, lo,
                    mid, hi, stride_ks, sm_scale2, block_size,
                    False, BLOCK_CAUSAL, BLOCK_N, PRECISION,
                )  # fmt: skip
            tl.store(
                dq_ptr + q_off + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
                mask=row_in[:, None] & d_ok[None, :],
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _tiles(D: int, dtype: torch.dtype, kind: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one kernel ("fwd", "dkdv", "dq") when it
    runs with one config: under the interpreter and with DLM_KERNELS_AUTOTUNE=0. On a GPU it is
    also the first candidate of the autotuner (see _autotune_configs), so tuning never has to do
    without it.

    Interpreter: small unequal tiles (fast in numpy, and M != N catches tile-edge bugs). GPU:
    FlashAttention-2's usual choices, shrunk as a row of the tile grows (bf16 D 256, float32)
    so that shared memory stays under the H100's 227 KiB (sizes from compiling for sm_90: fwd
    bf16 D128 128x64x3 stages 128 KiB; float32 D128 at 128x64 took 225 KiB, hence 64x32).
    Untuned; measured once on an H100 (bf16 B4 S4096 H16 D128): fwd 474 TFLOP/s (0.78x SDPA),
    bwd 170 (0.32x).
    """
    if dispatch.triton_interpret():
        return {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}[kind] + (1, 1)
    return _gpu_tiles(D, dtype, kind)


def _gpu_tiles(D: int, dtype: torch.dtype, kind: str) -> tuple[int, int, int, int]:
    row_bytes = _row_bytes(D, dtype)
    if kind == "fwd":
        if row_bytes <= 256:  # bf16 D <= 128, float32 D <= 64
            return 128, 64, 4 if row_bytes <= 128 else 8, 3
        return (64, 32, 4, 2) if row_bytes <= 512 else (32, 32, 4, 1)
    if row_bytes <= 256:
        return 64, 64, 4 if row_bytes <= 128 else 8, 2
    return (32, 32, 4, 1) if row_bytes <= 512 else (16, 32, 4, 1)


def _row_bytes(D: int, dtype: torch.dtype) -> int:
    """Bytes of one row of a Q/K/V tile: BLOCK_D (D rounded up to a power of two) x itemsize."""
    return max(16, 1 << (D - 1).bit_length()) * torch.empty((), dtype=dtype).element_size()


# Autotuning candidates besides _tiles' choice, (BLOCK_M, BLOCK_N, num_warps, num_stages) per
# kernel and per (float32?, bytes of a tile row, at least 128). UNMEASURED: plausible Hopper
# alternatives (FA2 and the Triton tutorial's tiles: fwd 64/128 x 64/128, dK/dV a short query
# tile against a long key tile, dQ the reverse); the autotuner times them on the GPU at first use.
# Each was compiled ahead of time for sm_90 (Triton 3.6, ptxas, with and without mask and
# block-causal): all fit in the 227 KiB of shared memory (largest: fwd bf16 D128 128x128 3
# stages, 224 KiB), and candidates that spilled hundreds of bytes of registers were left out.
# Spills that remain: bf16 dK/dV with mask + block-causal (the default 64x64 at D128: 516 bytes;
# 16x128 8 warps: 4) and the float32 defaults (exact FMA dots, no tensor cores: fwd D128 64x32
# spills 31 KB; 16x16 tiles none), which is why float32 gets small tiles to choose from.
# With a mask the kernels hold two loop sets (one run of real keys, and any other mask), which
# costs some candidates a few spilled registers, all outside the loops but one reload per tile
# (bf16 D128 with mask: fwd 128x128 8 warps 2 stages 8 bytes; dq 128x64 4 bytes, 64x128 32;
# dK/dV with block-causal 32x128 124 and 172 bytes).
_CANDIDATES: dict[tuple[str, bool, int], list[tuple[int, int, int, int]]] = {
    # 16-bit, D <= 64
    ("fwd", False, 128): [(128, 128, 8, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 32, 4, 3),
                          (64, 64, 4, 4), (64, 128, 4, 3)],
    ("dkdv", False, 128): [(64, 64, 8, 2), (32, 64, 8, 2), (16, 128, 8, 2), (32, 128, 8, 2),
                           (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)],
    ("dq", False, 128): [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3),
                         (64, 64, 4, 3)],
    # 16-bit, D 65..128 (the goal shape D 128)
    ("fwd", False, 256): [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3),
                          (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 8, 3)],
    ("dkdv", False, 256): [(16, 128, 8, 2), (16, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3),
                           (32, 64, 8, 2), (64, 64, 8, 1), (32, 64, 8, 3)],
    ("dq", False, 256): [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                         (64, 64, 4, 3), (64, 32, 4, 3), (64, 128, 8, 2)],
    # 16-bit, D 129..256
    ("fwd", False, 512): [(64, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2),
                          (64, 32, 4, 3), (32, 64, 4, 2)],
    ("dkdv", False, 512): [(32, 32, 8, 2), (16, 32, 4, 1), (16, 32, 4, 2), (32, 32, 4, 2),
                           (16, 64, 8, 2), (32, 64, 8, 2)],
    ("dq", False, 512): [(32, 32, 8, 2), (32, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 3),
                         (32, 64, 8, 2), (32, 64, 4, 2), (128, 32, 8, 2)],
    # float32, D <= 32, 64, 128, 256
    ("fwd", True, 128): [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    ("dkdv", True, 128): [(32, 64, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
    ("dq", True, 128): [(64, 32, 4, 2), (32, 64, 4, 2)],
    ("fwd", True, 256): [(32, 32, 4, 2), (16, 64, 4, 2)],
    ("dkdv", True, 256): [(16, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("dq", True, 256): [(32, 32, 4, 2), (16, 64, 4, 2)],
    ("fwd", True, 512): [(16, 16, 4, 2), (16, 32, 4, 2)],
    ("dkdv", True, 512): [(16, 32, 4, 2), (16, 16, 4, 2)],
    ("dq", True, 512): [(32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
    ("fwd", True, 1024): [(16, 16, 4, 2), (16, 16, 4, 1)],
    ("dkdv", True, 1024): [(16, 16, 4, 2)],
    ("dq", True, 1024): [(16, 16, 4, 2)],
}  # fmt: skip


def _config(tiles: tuple[int, int, int, int]):
    bm, bn, warps, stages = tiles
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _autotune_configs(kind: str, D: int, dtype: torch.dtype) -> list:
    """The triton.Config candidates the autotuner times for one kernel ("fwd", "dkdv", "dq") at
    head dim D and dtype: _tiles' GPU choice first, then the unmeasured alternatives."""
    row_bytes = max(128, _row_bytes(D, dtype))
    tiles = [_gpu_tiles(D, dtype, kind)]
    tiles += [t for t in _CANDIDATES[(kind, dtype == torch.float32, row_bytes)] if t not in tiles]
    return [_config(t) for t in tiles]


_KERNEL_NAMES = {
    "fwd": "_attn_fwd_kernel",
    "dkdv": "_attn_bwd_dkdv_kernel",
    "dq": "_attn_bwd_dq_kernel",
}
_TUNERS: dict = {}  # (kind, atomic dQ?, float32?, row bytes) -> triton.autotune wrapper
_BEST: dict = {}  # (kind, key of one launch) -> the triton.Config the autotuner chose
_FORCED: dict = {}  # kind -> triton.Config forced by forced_configs() (tests)
# The autotuner's timer; None: Triton's default (CUDA events, median of many runs). Tests put a
# stand-in here to drive the real autotuner under the interpreter.
_DO_BENCH = None
# What one config is tuned for: the values of these kernel arguments (Triton adds the dtype of
# every tensor argument). bucket_q / bucket_k are Sq / Sk rounded up to a power of two, so that
# a new sequence length retunes only when it crosses a power of two.
# ATOMIC_DQ (dK/dV kernel only) is absent from the other kernels' arguments: Triton skips it there.
_TUNE_KEY = ("HEAD_DIM", "HAS_MASK", "VARLEN", "BLOCK_CAUSAL", "PRECISION", "ATOMIC_DQ",
             "bucket_q", "bucket_k")  # fmt: skip


def _autotune_on() -> bool:
    """Read at every launch (cheap) so that tests and users can flip DLM_KERNELS_AUTOTUNE."""
    return not dispatch.triton_interpret() and os.environ.get("DLM_KERNELS_AUTOTUNE", "1") != "0"


def _bucket(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


@contextlib.contextmanager
def forced_configs(*, fwd=None, dkdv=None, dq=None) -> Iterator[None]:
    """Run the given kernels with one triton.Config each (BLOCK_M, BLOCK_N, num_warps,
    num_stages) inside the block, bypassing the autotuner and _tiles: for tests that prove every
    candidate of _autotune_configs correct, and for benchmarks that time one config.

    Example:
        >>> cfg = _autotune_configs("fwd", 64, torch.bfloat16)[1]
        >>> with forced_configs(fwd=cfg):
        ...     out = bidirectional_attention(q, k, v)
    """
    saved = dict(_FORCED)
    _FORCED.update({k: c for k, c in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)) if c is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _launch(kind: str, grid, args: tuple, meta: dict, D: int, dtype: torch.dtype) -> None:
    """Launch one kernel with the tiles chosen for it.

    One config (no tuning) under the interpreter, with DLM_KERNELS_AUTOTUNE=0, or when forced;
    otherwise triton.autotune times every candidate of _autotune_configs at the first launch of
    each key (_TUNE_KEY: one compile per candidate and flag set, then a few timed runs each) and
    later launches reuse the winner. The kernels only store their outputs, except the dK/dV
    kernel with ATOMIC_DQ, which adds into its dQ accumulator: its tuner zeroes that before
    each timed run and before the real one (reset_to_zero). grid(META) reads BLOCK_M / BLOCK_N
    of the config that runs.
    """
    kernel = globals()[_KERNEL_NAMES[kind]]  # looked up at launch: tests wrap the kernels
    cfg = _FORCED.get(kind)
    if cfg is None and _autotune_on():
        key = (kind, dtype, *(meta.get(name) for name in _TUNE_KEY))
        cfg = _BEST.get(key)
        on_cuda = args[0].device.type == "cuda"  # args[0] is q in every kernel
        if cfg is None and on_cuda and torch.cuda.is_current_stream_capturing():
            # Timing the candidates would launch and synchronise inside the capture.
            warnings.warn(
                f"{_NAME}: no tuned tiles for {key} while a CUDA graph is captured; using the "
                "default tiles. Run the same shapes once before capturing to use tuned ones.",
                RuntimeWarning,
                stacklevel=2,
            )
        elif cfg is None:
            atomic = bool(meta.get("ATOMIC_DQ", False))
            cls = (kind, atomic, dtype == torch.float32, max(128, _row_bytes(D, dtype)))
            tuner = _TUNERS.get(cls)
            if tuner is None:
                configs = _autotune_configs(kind, D, dtype)
                # DLM_KERNELS_AUTOTUNE_MAX=n: time only the first n candidates (the default
                # first), one compile each: gpu_check.sh's budget on a fresh machine.
                n_max = int(os.environ.get("DLM_KERNELS_AUTOTUNE_MAX", "0") or 0)
                configs = configs[:n_max] if n_max > 0 else configs
                tuner = triton.autotune(
                    configs, key=list(_TUNE_KEY), do_bench=_DO_BENCH,
                    reset_to_zero=["dq_ptr"] if atomic else None,
                )(kernel)  # fmt: skip
                _TUNERS[cls] = tuner
            tuner[grid](*args, **meta)
            _BEST[key] = tuner.best_config
            return
    if cfg is None:
        cfg = _config(_tiles(D, dtype, kind))
    kernel[grid](*args, **meta, **cfg.all_kwargs())


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs keep exact float32 products (TF32 would miss the float32 tolerance).
    if dtype == torch.bfloat16 and dispatch.triton_interpret():
        return "upcast"  # see _dot
    return "ieee" if dtype == torch.float32 else "tf32"


def _layout(x: Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, sequence, head) element strides; the batch stride of a packed tensor is 0."""
    return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))


def _key_bounds(mask: Tensor | None, dummy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mask as uint8, first real key, one past the last real key, 1 where the real keys are
    that one run) per row: no host sync."""
    if mask is None:
        return dummy, dummy, dummy, dummy
    Sk = mask.shape[1]
    idx = torch.arange(Sk, device=mask.device, dtype=torch.int32)
    lo = torch.where(mask, idx, Sk).amin(dim=1).to(torch.int32)
    hi = torch.where(mask, idx + 1, 0).amax(dim=1).to(torch.int32)
    dense = (mask.sum(dim=1, dtype=torch.int32) == hi - lo).view(torch.uint8)
    return mask.contiguous().view(torch.uint8), lo, hi, dense


def _shapes(q: Tensor, k: Tensor, cu_q: Tensor | None):
    if cu_q is not None:
        return cu_q.numel() - 1, q.shape[1], k.shape[1], q.shape[2]
    return q.shape[0], q.shape[2], k.shape[2], q.shape[3]


def _lse_shape(q: Tensor, varlen: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _triton_fwd(q, k, v, mask, cu_q, cu_k, max_q, max_k, block_size, scale):
    """One pass over Q and O and, per query tile, one over the visible K and V tiles.

    Flops 4 * B * Hq * Sq * Sk_visible * D; bytes (Q + O) + (K + V) * ceil(Sq / BLOCK_M)
    (mostly L2 hits), so the op is compute-bound for Sq >= ~256 on an H100.
    """
    varlen = cu_q is not None
    B, Hq, Hkv, D = _shapes(q, k, cu_q)
    out = torch.empty_like(q)
    lse = torch.empty(_lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or B == 0:
        return out, lse
    if k.numel() == 0:  # no keys at all: every row sees nothing
        return out.zero_(), lse.fill_(float("-inf"))
    m8, lo, hi, dense = _key_bounds(mask, q)
    Sq, Sk = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
    args = (
        q, k, v, out, lse, m8, lo, hi, dense,
        cu_q if varlen else q, cu_k if varlen else q,
        *_layout(q, varlen), *_layout(k, varlen), *_layout(v, varlen), *_layout(out, varlen),
        0 if varlen else lse.stride(0), lse.stride(-2),
        m8.stride(0) if mask is not None else 0,
        Hq, Hq // Hkv, Sq, Sk, scale * _LOG2E, block_size or 1,
    )  # fmt: skip
    meta = dict(
        bucket_q=_bucket(Sq), bucket_k=_bucket(Sk),
        HEAD_DIM=D, HAS_MASK=mask is not None, VARLEN=varlen, BLOCK_CAUSAL=bool(block_size),
        BLOCK_D=max(16, triton.next_power_of_2(D)), PRECISION=_precision(q.dtype),
        POS_SCALE=scale > 0,
    )  # fmt: skip
    _launch("fwd", lambda META: (triton.cdiv(Sq, META["BLOCK_M"]), B * Hq), args, meta, D, q.dtype)
    return out, lse


def _triton_bwd(do, q, k, v, out, lse, dlse, mask, cu_q, cu_k, max_q, max_k, block_size, scale,
                deterministic=True):  # fmt: skip
    """Three kernels: delta (reads O, dO), dK/dV (per key tile: Q, dO of the visible query
    tiles of every head in the group) and dQ (per query tile: the visible K, V tiles).
    Flops 14 * B * Hq * Sq * Sk_visible * D: S and dP are computed in both kernels.

    deterministic=False: two kernels. The dK/dV kernel also forms dS K for each query tile and
    adds it into a zeroed float32 dQ buffer with atomics (FlashAttention-2's backward): 10 * B *
    Hq * Sq * Sk_visible * D flops, plus B * Hq * Sq * D * ceil(Sk / BLOCK_N) float32 atomic
    adds, whose order - hence dQ's last bits - varies from run to run.
    """
    varlen = cu_q is not None
    B, Hq, Hkv, D = _shapes(q, k, cu_q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    m8, lo, hi, dense = _key_bounds(mask, q)
    Sq, Sk = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
    BLOCK_D = max(16, triton.next_power_of_2(D))
    stride_l = (0 if varlen else lse.stride(0), lse.stride(-2))
    stride_m = m8.stride(0) if mask is not None else 0
    cu_q_, cu_k_ = (cu_q, cu_k) if varlen else (q, q)
    flags = dict(
        bucket_q=_bucket(Sq), bucket_k=_bucket(Sk),
        HEAD_DIM=D, HAS_MASK=mask is not None, VARLEN=varlen, BLOCK_CAUSAL=bool(block_size),
        BLOCK_D=BLOCK_D, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    atomic = not deterministic
    # q is contiguous (bidirectional_attention makes it so): the accumulator shares its strides.
    dq_acc = torch.zeros_like(q, dtype=torch.float32) if atomic else None
    delta = torch.empty_like(lse)
    # A memory-bound row sum with its own fixed tile: independent of the tiles tuned below.
    BM_pre = 16 if dispatch.triton_interpret() else 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(Sq, BM_pre), B * Hq)](
        out, do, dlse if dlse is not None else lse, delta, cu_q_,
        *_layout(out, varlen), *_layout(do, varlen), *stride_l, Hq, Sq,
        HEAD_DIM=D, HAS_DLSE=dlse is not None, VARLEN=varlen, BLOCK_M=BM_pre, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    _launch(
        "dkdv", lambda META: (triton.cdiv(Sk, META["BLOCK_N"]), B * Hkv),
        (
            q, k, v, do, dk, dv, dq_acc if atomic else dk, lse, delta, m8, lo, hi, dense,
            cu_q_, cu_k_,
            *_layout(q, varlen), *_layout(k, varlen), *_layout(do, varlen), *stride_l, stride_m,
            Hkv, Hq // Hkv, Sq, Sk, scale * _LOG2E, scale, block_size or 1,
        ),
        dict(flags, ATOMIC_DQ=atomic), D, q.dtype,
    )  # fmt: skip
    if atomic:
        return dq_acc.mul_(scale).to(q.dtype), dk, dv
    _launch(
        "dq", lambda META: (triton.cdiv(Sq, META["BLOCK_M"]), B * Hq),
        (
            q, k, v, do, dq, lse, delta, m8, lo, hi, dense, cu_q_, cu_k_,
            *_layout(q, varlen), *_layout(k, varlen), *_layout(do, varlen), *stride_l, stride_m,
            Hq, Hq // Hkv, Sq, Sk, scale * _LOG2E, scale, block_size or 1,
        ),
        flags, D, q.dtype,
    )  # fmt: skip
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dlm_kernels::bidirectional_attention_fwd", mutates_args=())
def _attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention_mask: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    softmax_scale: float,
    deterministic: bool,  # the backward's choice, read by _setup_context
) -> tuple[Tensor, Tensor]:
    return _triton_fwd(
        q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        block_size, softmax_scale,
    )  # fmt: skip


@_attn_fwd.register_fake
def _(q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k, max_q, max_k, block_size, scale, det):
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("dlm_kernels::bidirectional_attention_bwd", mutates_args=())
def _attn_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    attention_mask: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    softmax_scale: float,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    do = do.contiguous()
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    return _triton_bwd(
        do, q, k, v, out, lse, dlse, attention_mask, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, block_size, softmax_scale, deterministic,
    )  # fmt: skip


@_attn_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, mask, cu_q, cu_k, max_q, max_k, block_size, scale, det):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, max_q, max_k, block_size, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k)
    ctx.opts = (max_q, max_k, block_size, scale, deterministic)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _attn_bwd(grad_out, q, k, v, out, lse, grad_lse, mask, cu_q, cu_k, *ctx.opts)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
dispatch.refuse_second_order(_attn_bwd, "bidirectional_attention")


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
_NAME = "bidirectional_attention"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _err(msg: str, kind=ValueError):
    return kind(f"{_NAME}: {msg}")


def _check_int(name: str, x, minimum: int) -> int:
    n = dispatch.as_int(x)
    if n is None:
        raise _err(f"{name} must be an int, got {type(x).__name__}", TypeError)
    x = n
    if x < minimum:
        raise _err(f"{name} must be >= {minimum}, got {x}")
    return x


def _host_checks(cu: Tensor) -> bool:
    """Whether to check the values of cu_seqlens: always on CPU (free); on CUDA it would stall
    the stream, so only with DLM_KERNELS_CHECK=1 (as masked_cross_entropy's target check);
    never while traced (dispatch.values_readable)."""
    if not dispatch.values_readable(cu):
        return False
    device = cu.device
    if device.type == "cpu":
        return True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return os.environ.get("DLM_KERNELS_CHECK", "0") == "1"


def _check_qkv(q, k, v, ndim: int, layout: str):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise _err(f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        if t.dtype not in _FLOATS:
            raise _err(
                f"{name} must be float16, bfloat16, float32 (or float64: the reference), got "
                f"{t.dtype}",
                TypeError,
            )
        if t.dim() != ndim:
            raise _err(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise _err(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    if not (q.device == k.device == v.device):
        raise _err(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise _err(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    D, Hq, Hkv = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != D:
        raise _err(f"q and k must have the same head dim, got {D} and {k.shape[-1]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise _err(f"head dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise _err(
            f"the number of query heads ({Hq}) must be a multiple of the number of key/value "
            f"heads ({Hkv}) (GQA/MQA)"
        )


def _check_cu(name: str, cu, device) -> Tensor:
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32:
        got = cu.dtype if isinstance(cu, Tensor) else type(cu).__name__
        raise _err(f"{name} must be an int32 tensor of offsets (B + 1,), got {got}", TypeError)
    if cu.dim() != 1 or cu.numel() < 2:
        raise _err(f"{name} must have shape (B + 1,) with B >= 1, got {tuple(cu.shape)}")
    if cu.device != device:
        raise _err(f"{name} is on {cu.device}, expected {device} (the device of q)")
    return cu.contiguous()


def _check_varlen(q, k, cu_q, cu_k, max_q, max_k, block_size):
    if cu_q is None or cu_k is None:
        raise _err("cu_seqlens_q and cu_seqlens_k must be given together")
    cu_q = _check_cu("cu_seqlens_q", cu_q, q.device)
    cu_k = _check_cu("cu_seqlens_k", cu_k, q.device)
    if cu_q.numel() != cu_k.numel():
        raise _err(
            f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got "
            f"{cu_q.numel()} and {cu_k.numel()}"
        )
    if max_q is None or max_k is None:
        raise _err(
            "max_seqlen_q and max_seqlen_k are required with cu_seqlens (the longest sequence "
            "lengths; reading them from cu_seqlens would sync the device)"
        )
    max_q = _check_int("max_seqlen_q", max_q, 0)
    max_k = _check_int("max_seqlen_k", max_k, 0)
    if _host_checks(cu_q):
        for name, cu, total, mx in (
            ("cu_seqlens_q", cu_q, q.shape[0], max_q),
            ("cu_seqlens_k", cu_k, k.shape[0], max_k),
        ):
            lens = cu[1:] - cu[:-1]
            if int(cu[0]) != 0 or bool((lens < 0).any()) or int(cu[-1]) != total:
                raise _err(
                    f"{name} must start at 0, never decrease and end at {total} (the packed "
                    f"length), got {cu.tolist()}"
                )
            if int(lens.max()) > mx:
                raise _err(f"max_seqlen for {name} is {mx} but a sequence has {int(lens.max())}")
        if block_size is not None and bool(((cu_q[1:] - cu_q[:-1]) > (cu_k[1:] - cu_k[:-1])).any()):
            raise _err(
                "with block_size every sequence needs len_q <= len_k (its queries are the "
                "last len_q of its keys)"
            )
    return cu_q, cu_k, max_q, max_k


def bidirectional_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attention_mask: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    block_size: int | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Non-causal attention softmax(scale * Q K^T) V with padding, packing, block-causal masks
    and queries against a cached prefix; flash_attn_func's layout and names.

    Args:
        q: (B, Sq, Hq, D) float16, bfloat16 or float32 (float64 runs the reference); varlen:
            (total_q, Hq, D). D <= 256 (any D; not a power of two is padded internally).
        k, v: (B, Sk, Hkv, D), same dtype and device; varlen: (total_k, Hkv, D). Hq must be a
            multiple of Hkv (GQA/MQA: query head h reads key head h // (Hq // Hkv)).
            Sq <= Sk: with Sq < Sk the queries are the last Sq positions of the key sequence
            (the current block against a KV-cached prefix); query i sits at position Sk - Sq + i.
        attention_mask: (B, Sk) bool, True = real key (default None: all real). A query whose
            own position is padding is a padding row. Not allowed with cu_seqlens.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets of packed sequences (flash-attn's
            varlen); sequence b's queries are the last len_q of its keys. Give both or neither.
        max_seqlen_q, max_seqlen_k: int, the longest query / key sequence; required with
            cu_seqlens (they size the launch grid without a device sync). They must be >= every
            sequence's length: checked on CPU (and on CUDA with DLM_KERNELS_CHECK=1).
        block_size: int >= 1 or None. Block-causal: a query in block j (of its position) sees
            keys in blocks <= j (semi-autoregressive / block diffusion). None: fully bidirectional.
        softmax_scale: float, default 1 / sqrt(D).
        return_lse: also return the float32 log-sum-exp of the scaled scores.
        deterministic: the backward's dQ (Triton). True (default): a dQ kernel of its own, run
            to run identical. False: FlashAttention-2's backward, dQ added with float32 atomics
            by the dK/dV kernel (about 30% fewer flops; dQ's last bits vary between runs).
            Which is faster on a given GPU is for benchmarks/bench_attention.py to say; the
            reference and flash-attn paths ignore it (flash-attn: its own default).

    Returns:
        out: the shape and dtype of q. lse (when return_lse): float32 (B, Hq, Sq), or
        (Hq, total_q) for varlen (float64 for float64 inputs). Gradients flow to q, k and v
        (and through lse when it is used).

    A query row that sees no key - a padding row, or a row whose visible keys are all padding -
    gets out 0, lse -inf and zero gradients, never NaN. Values stored at padding positions
    (even NaN: a KV cache allocated with torch.empty) never reach the result on any path: the
    Triton kernels never read them, the reference zeroes them first.

    On CUDA the kernels autotune their tiles at the first call of each shape class (head dim,
    dtype, mask kind, power of two of Sq and Sk), which takes seconds once per process;
    DLM_KERNELS_AUTOTUNE=0 runs fixed tiles instead. Call once before capturing a CUDA graph.

    Example:
        >>> q, k, v = (torch.randn(2, 37, 4, 64) for _ in range(3))
        >>> mask = torch.arange(37) >= torch.tensor([[0], [5]])  # row 1 is left-padded by 5
        >>> out = bidirectional_attention(q, k, v, attention_mask=mask, block_size=8)
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    _check_qkv(q, k, v, 3 if varlen else 4, "(total, H, D)" if varlen else "(B, S, H, D)")
    if varlen:
        if attention_mask is not None:
            raise _err("attention_mask cannot be combined with cu_seqlens (pack real tokens only)")
        cu_q, cu_k, max_q, max_k = _check_varlen(
            q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size
        )
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise _err("max_seqlen_q / max_seqlen_k apply only with cu_seqlens_q / cu_seqlens_k")
        B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
        if k.shape[0] != B:
            raise _err(f"q and k must have the same batch size, got {B} and {k.shape[0]}")
        if Sq > Sk:
            raise _err(
                f"Sq ({Sq}) must be <= Sk ({Sk}): queries are the last Sq positions of the keys"
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or attention_mask.dtype != torch.bool:
                got = (
                    attention_mask.dtype
                    if isinstance(attention_mask, Tensor)
                    else type(attention_mask).__name__
                )
                raise _err(f"attention_mask must be a bool tensor (True = real key), got {got}",
                           TypeError)  # fmt: skip
            if tuple(attention_mask.shape) != (B, Sk):
                raise _err(
                    f"attention_mask must have shape (B, Sk) = {(B, Sk)}, got "
                    f"{tuple(attention_mask.shape)}"
                )
            if attention_mask.device != q.device:
                raise _err(f"attention_mask is on {attention_mask.device}, expected {q.device}")
        cu_q = cu_k = None
        max_q, max_k = Sq, Sk
    if block_size is not None:
        block_size = _check_int("block_size", block_size, 1)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    elif dispatch.is_bool(softmax_scale) or not isinstance(softmax_scale, Real):  # numpy too
        raise _err(f"softmax_scale must be a float, got {type(softmax_scale).__name__}", TypeError)
    elif not abs(softmax_scale) < math.inf:  # inf or NaN (compares trace under torch.compile)
        raise _err(f"softmax_scale must be finite, got {softmax_scale}")
    softmax_scale = float(softmax_scale)
    if not isinstance(return_lse, bool):
        raise _err(f"return_lse must be a bool, got {type(return_lse).__name__}", TypeError)
    if not isinstance(deterministic, bool):
        raise _err(f"deterministic must be a bool, got {type(deterministic).__name__}", TypeError)

    if dispatch.current_impl() == "flash_attn" and attention_flash.supports(
        q, attention_mask, block_size, return_lse
    ):
        if not attention_flash.available():
            raise RuntimeError(
                "bidirectional_attention: DLM_KERNELS_IMPL=flash_attn but `import flash_attn` "
                "fails; install flash-attn or use DLM_KERNELS_IMPL=auto"
            )
        return attention_flash.attention(
            q, k, v, attention_mask=attention_mask, cu_q=cu_q, cu_k=cu_k, max_q=max_q,
            max_k=max_k, softmax_scale=softmax_scale,
        )  # fmt: skip
    impl = dispatch.select(q.device, has_cpp=False)
    if impl != "triton" or q.dtype not in _TRITON_FLOATS:
        return reference.bidirectional_attention_sdpa(
            q, k, v, attention_mask=attention_mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            block_size=block_size, softmax_scale=softmax_scale, return_lse=return_lse,
        )  # fmt: skip
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    out, lse = _attn_fwd(
        q, k, v, attention_mask, cu_q, cu_k, max_q, max_k, block_size or 0, softmax_scale,
        deterministic,
    )  # fmt: skip
    return (out, lse) if return_lse else out
