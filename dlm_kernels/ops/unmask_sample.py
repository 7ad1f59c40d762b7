"""One sampling step of a masked diffusion LM: filter, draw, score and commit.

``sample_tokens`` draws one token per row of (N, V) logits and scores it; ``unmask_step`` does
that for the masked positions of x (B, L) and commits some of them. The per-logit work (filters,
Gumbel draw, confidence) is one kernel per row (Triton on CUDA, C++ on CPU); choosing which
positions commit is a few torch ops over (B, L), shared by every path, with no host sync.

Randomness. Every uniform is Philox4x32-10 keyed by the seed, with counter (column, row, offset,
stream): a draw depends only on (seed, offset, row, column), never on block sizes, thread counts
or the backend, so the reference, C++ and Triton paths draw the same tokens for the same seed.
The Gumbel noise is float64: u has 52 random bits, g = -log(-log u) (LLaDA's reason: float32
Gumbel noise hurts quality). With ``seed=None`` one seed is drawn per call on the host from
``generator`` (a CPU torch.Generator) or the global torch RNG: a CPU draw, never a device sync.
Pass ``seed`` and a step counter as ``offset`` for reproducible generation.

Tie and filter rules (shared with ``reference.sample_tokens_rows``): see ``sample_tokens``.
Only rounding differences between the paths can change a result: the scores of the Gumbel draw
are float64 on every path (two candidates must tie to ~1e-15); the weights that decide the top-p
and min-p boundaries are float64 in the reference and C++ paths and float32 exps (summed in
float64) in the Triton kernel, so there a boundary token's fate can differ when the mass above it
is within ~1e-7 (relative) of top_p's target; the drawn token changes only if that token is drawn.
"""

from __future__ import annotations

import math
import os
from numbers import Real

import torch
from torch import Tensor

from dlm_kernels import dispatch, reference

try:
    import triton
    import triton.language as tl

    from dlm_kernels.ops.fast_math import _exp_ftz
except Exception:  # no triton, or a broken one: the Triton path is never selected
    triton = None

_CONF_MODES = {"prob": 0, "raw_prob": 1, "margin": 2, "neg_entropy": 3, "random": 4}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _load_x(base, offs, V):
        # NaN -> -inf (never drawn), +inf -> FLT_MAX, -0 -> +0 (so the int keys order like the
        # float compares of the other paths), upcast to float32.
        return _fix_x(_load_raw(base, offs, V))

    @triton.jit
    def _load_raw(base, offs, V):
        # The logits as stored (-inf past V): a load whose _fix_x comes later (prefetch).
        return tl.load(base + offs, mask=offs < V, other=float("-inf"))

    @triton.jit
    def _fix_x(raw):
        x = raw.to(tl.float32)
        x = tl.where(x != x, float("-inf"), x)
        x = tl.where(x == float("inf"), 3.4028234663852886e38, x)
        return tl.where(x == 0.0, 0.0, x)

    @triton.jit
    def _inv_temp(Te):
        # 1 / T as a finite, normal float32 (T in (0, 2.9e-39) or above 8e37 would give inf or
        # a denormal/zero, and then NaN weights from 0 * inf or -inf * 0).
        return tl.minimum(tl.maximum(1.0 / Te, 1.2e-38), 3.0e38).to(tl.float32)

    @triton.jit
    def _key(x, SHIFT: tl.constexpr):
        # Order-preserving int32 key of a float32 from _load_x (negative floats have their low
        # bits flipped), shifted right by SHIFT: the values widened from bf16 (SHIFT 16) or
        # fp16 (13) have those low bits all equal, so distinct values keep distinct keys in a
        # range 2**SHIFT times narrower (fewer search passes). FLT_MAX (+inf's stand-in) is
        # the one value with other low bits: under bf16 it gets bf16 +inf's key, one above
        # bf16's largest finite value.
        b = x.to(tl.int32, bitcast=True)
        k = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
        if SHIFT > 0:
            k = k >> SHIFT
            if SHIFT == 16:
                k = tl.where(x == 3.4028234663852886e38, k + 1, k)
        return k

    @triton.jit
    def _chunk_state(BLOCK_V: tl.constexpr, CHUNK: tl.constexpr):
        # The greedy rows' state per chunk row of a [BLOCK_V // CHUNK, CHUNK] tile: chunk
        # starts, columns in a chunk, best chunk max, start of its first chunk, anchor, sum.
        NC: tl.constexpr = BLOCK_V // CHUNK
        ninf = float("-inf")
        m_c = tl.full([NC], ninf, tl.float32)
        a_c = tl.full([NC], ninf, tl.float32)
        s_c = tl.zeros([NC], tl.int32)
        z_c = tl.zeros([NC], tl.float64)
        return tl.arange(0, NC) * CHUNK, tl.arange(0, CHUNK), m_c, s_c, a_c, z_c

    @triton.jit
    def _greedy_prob_row(base, r, V, tok_ptr, conf_ptr, BLOCK_V: tl.constexpr,
                         CHUNK: tl.constexpr, FAST_EXP: tl.constexpr):  # fmt: skip
        # A greedy row's argmax and softmax probability (confidence prob or raw_prob at T = 0)
        # in one pass. The tile is [BLOCK_V // CHUNK, CHUNK]: each thread loads CHUNK
        # contiguous logits (16 bytes) and keeps its state per chunk row, not per element: the
        # best chunk max and the start of the first chunk holding it, and a float64 sum of
        # exp(x - a) against an anchor a that moves to a chunk's max only when that exceeds it
        # by more than 8 (terms stay below e^8; a rescale multiplies the sum by less than e^-8,
        # so its float32 factor never compounds). Per element: the NaN rewrite, one subtract,
        # one exp, one add and the chunk max (sm_90 SASS: ~11 instructions per bf16 element
        # against ~25 for per-element state); the max's index is found at the end in its chunk.
        ninf = float("-inf")
        crow, ccol, m_c, s_c, a_c, z_c = _chunk_state(BLOCK_V, CHUNK)
        for start in range(0, V, BLOCK_V):
            cs = start + crow
            offs = cs[:, None] + ccol[None, :]
            x = tl.load(base + offs, mask=offs < V, other=ninf).to(tl.float32)
            # NaN -> -inf: never the max, weight 0 (explicit: the interpreter's maximum
            # propagates NaN where the GPU's ignores it). +inf is left as it is (a row holding
            # one gets NaN sums, replaced after the loop).
            x = tl.where(x == x, x, ninf)
            cm = tl.max(x, 1)
            top = cm > m_c  # strictly: the first chunk holding the max keeps it
            s_c = tl.where(top, cs, s_c)
            m_c = tl.where(top, cm, m_c)
            mv = cm > a_c + 8.0  # also a first finite value (anchor -inf)
            a_n = tl.where(mv, cm, a_c)
            f = tl.where(mv, _exp_ftz(a_c - a_n, FAST_EXP), 1.0).to(tl.float64)
            # A chunk of -inf only beside an anchor of -inf: -inf - -inf is NaN, adds nothing.
            e = tl.sum(_exp_ftz(x - a_n[:, None], FAST_EXP), 1)
            z_c = z_c * f + tl.where(cm > ninf, e, 0.0).to(tl.float64)
            a_c = a_n
        mx = tl.max(m_c, 0)
        if mx == ninf:
            tl.store(tok_ptr + r, 0)
            tl.store(conf_ptr + r, ninf)
        else:
            # The lowest chunk start among the chunks that hold the max holds its lowest index
            # (chunks are disjoint and each keeps its first); -0 and +0 compare equal.
            c0 = tl.min(tl.where(m_c == mx, s_c, 2147483647), 0)
            offs = c0 + ccol
            x = tl.load(base + offs, mask=offs < V, other=ninf).to(tl.float32)
            x = tl.where(x == x, x, ninf)
            amax = tl.min(tl.where(x == mx, offs, 2147483647), 0).to(tl.int64)
            if mx == float("inf"):
                # +inf counts as FLT_MAX on every path: the token is the first value >= FLT_MAX
                # (a FLT_MAX before the first +inf wins), and each such value has weight 1, the
                # rest 0. A second pass, for such rows only (no clamp in the loop).
                zi = tl.zeros_like(s_c)  # per chunk row: as few registers as the loop
                ii = tl.zeros_like(s_c) + 2147483647
                for start in range(0, V, BLOCK_V):
                    o2 = start + crow[:, None] + ccol[None, :]  # (new names: see the search)
                    x2 = tl.load(base + o2, mask=o2 < V, other=ninf).to(tl.float32)
                    top2 = x2 >= 3.4028234663852886e38
                    zi += tl.sum(top2.to(tl.int32), 1)
                    ii = tl.minimum(ii, tl.min(tl.where(top2, o2, 2147483647), 1))
                Z = tl.sum(zi, 0).to(tl.float64)
                amax = tl.min(ii, 0).to(tl.int64)
            else:
                dl = tl.where(a_c > ninf, a_c.to(tl.float64) - mx.to(tl.float64), ninf)
                Z = tl.sum(tl.exp(dl) * z_c, 0)
            tl.store(tok_ptr + r, amax)
            tl.store(conf_ptr + r, (1.0 / Z).to(tl.float32))

    @triton.jit
    def _greedy_row(base, r, V, tok_ptr, conf_ptr, MODE: tl.constexpr, BLOCK_V: tl.constexpr,
                    CHUNK: tl.constexpr, FAST_EXP: tl.constexpr):  # fmt: skip
        # One greedy row (T = 0; no active filter unless MODE 1) in one pass over its logits:
        # prob / raw_prob and margin / neg_entropy, each with per-chunk state.
        if (MODE == 0) | (MODE == 1):
            _greedy_prob_row(base, r, V, tok_ptr, conf_ptr, BLOCK_V, CHUNK, FAST_EXP)
        else:
            _greedy_chunk_row(base, r, V, tok_ptr, conf_ptr, MODE, BLOCK_V, CHUNK, FAST_EXP)

    @triton.jit
    def _greedy_chunk_row(base, r, V, tok_ptr, conf_ptr, MODE: tl.constexpr,
                          BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
                          FAST_EXP: tl.constexpr):  # fmt: skip
        # A greedy margin (MODE 2) or neg_entropy (MODE 3) row in one pass, with the state of
        # _greedy_prob_row per 16-byte chunk row: the best chunk max and the start of the first
        # chunk holding it, and a float64 sum of exp(x - a) against a lazily moved anchor a;
        # margin also keeps the chunk row's second value with multiplicity, neg_entropy the
        # float64 sum of exp(x - a) (x - a). +inf is rewritten to FLT_MAX (every path counts
        # it so), NaN to -inf (never the max, weight 0). sm_90 SASS at 2048 x 8 warps: 151
        # (margin) and 162 (neg_entropy) instructions per 8 bf16 logits, 32 registers, against
        # 228 / 74 and 332 / 92 with per-lane state.
        ninf = float("-inf")
        crow, ccol, m_c, s_c, a_c, z_c = _chunk_state(BLOCK_V, CHUNK)
        if MODE == 2:
            sec_c = m_c  # -inf
        if MODE == 3:
            e_c = tl.zeros_like(z_c)
        for start in range(0, V, BLOCK_V):
            cs = start + crow
            offs = cs[:, None] + ccol[None, :]
            x = tl.load(base + offs, mask=offs < V, other=ninf).to(tl.float32)
            x = tl.where(x == x, x, ninf)
            x = tl.where(x == float("inf"), 3.4028234663852886e38, x)
            cm = tl.max(x, 1)
            if MODE == 2:
                # The chunk's second value (its max again if it holds the max twice), then
                # the chunk row's: of two multisets with maxima m, m' and seconds s, s', the
                # union's second is max(min(m, m'), s, s').
                is_top = x == cm[:, None]
                two = tl.sum(is_top.to(tl.int32), 1) >= 2
                c2 = tl.where(two, cm, tl.max(tl.where(is_top, ninf, x), 1))
                sec_c = tl.maximum(tl.maximum(sec_c, c2), tl.minimum(m_c, cm))
            top = cm > m_c  # strictly: the first chunk holding the max keeps it
            s_c = tl.where(top, cs, s_c)
            m_c = tl.where(top, cm, m_c)
            mv = cm > a_c + 8.0  # also a first finite value (anchor -inf)
            a_n = tl.where(mv, cm, a_c)
            fe = tl.where(mv, _exp_ftz(a_c - a_n, FAST_EXP), 1.0)
            d = x - a_n[:, None]  # NaN for -inf beside an anchor of -inf: weight 0 below
            ex = _exp_ftz(d, FAST_EXP)
            live = cm > ninf
            e = tl.where(live, tl.sum(ex, 1), 0.0).to(tl.float64)
            if MODE == 3:
                # Moving the anchor from a to a': sum e' (x - a') = f (E + (a - a') Z). A
                # chunk adds sum e (x - a) = sum e (x - cm) + (cm - a) sum e: its float32
                # products measured from the chunk max, not the anchor (up to 8 below it,
                # whose terms e^8 x 8 lost 2e-6 relative in the final cancellation of
                # E / Z - log Z), and the offset in float64 on the sum shared with Z.
                xc = x - cm[:, None]
                ent = tl.where(live, tl.sum(tl.where(ex > 0.0, ex * xc, 0.0), 1), 0.0)
                off = tl.where(live, cm.to(tl.float64) - a_n.to(tl.float64), 0.0)
                dm = tl.where(mv & (a_c > ninf), a_c.to(tl.float64) - a_n.to(tl.float64), 0.0)
                e_c = fe.to(tl.float64) * (e_c + dm * z_c) + ent.to(tl.float64) + off * e
            z_c = z_c * fe.to(tl.float64) + e
            a_c = a_n
        mx = tl.max(m_c, 0)
        if mx == ninf:
            tl.store(tok_ptr + r, 0)
            tl.store(conf_ptr + r, ninf)
        else:
            c0 = tl.min(tl.where(m_c == mx, s_c, 2147483647), 0)
            offs = c0 + ccol
            x = tl.load(base + offs, mask=offs < V, other=ninf).to(tl.float32)
            x = tl.where(x == x, x, ninf)
            x = tl.where(x == float("inf"), 3.4028234663852886e38, x)
            tl.store(tok_ptr + r, tl.min(tl.where(x == mx, offs, 2147483647), 0).to(tl.int64))
            # Each chunk row's sums moved from its anchor to the row max, in float64.
            dl = tl.where(a_c > ninf, a_c.to(tl.float64) - mx.to(tl.float64), ninf)
            f = tl.exp(dl)
            Z = tl.sum(f * z_c, 0)
            if MODE == 2:
                # The row's second value with multiplicity (as each chunk row's above), and
                # p1 - p2 = (1 - exp(sec - mx)) / Z, 0 for a tie at the top.
                n_top = tl.sum((m_c == mx).to(tl.int32), 0)
                sec = tl.max(tl.where(m_c != mx, m_c, ninf), 0)
                sec = tl.where(n_top >= 2, mx, sec)
                sec = tl.maximum(sec, tl.max(sec_c, 0))
                e2 = tl.exp(sec.to(tl.float64) - mx.to(tl.float64))
                tl.store(conf_ptr + r, tl.where(sec == mx, 0.0, (1.0 - e2) / Z).to(tl.float32))
            elif MODE == 3:  # (MODE 4, random, never gets here: no one-pass path)
                ES = tl.sum(tl.where(f > 0.0, f * (e_c + dl * z_c), 0.0), 0)
                tl.store(conf_ptr + r, (ES / Z - tl.log(Z)).to(tl.float32))

    @triton.jit
    def _sample_rows_kernel(
        logits_ptr,  # (R, V) float32/bf16/fp16, last dim contiguous
        stride_row,  # elements between rows of logits
        rows_ptr,  # (R,) int64: the Philox counter's row for each logits row
        valid_ptr,  # (R,) bool: rows to draw (others get token 0, confidence -inf)
        temp_ptr,  # (R,) float64 temperature, <= 0: argmax
        topk_ptr,  # (R,) int64, <= 0 or >= V: off
        topp_ptr,  # (R,) float64, >= 1: off
        minp_ptr,  # (R,) float64, <= 0: off
        tok_ptr,  # (R,) int64 out
        conf_ptr,  # (R,) float32 out
        V,  # vocabulary size
        seed,  # Philox key (64 bits)
        offset,  # Philox counter word 2
        seeds_ptr,  # (R,) int64 per-row keys (PER_ROW_KEY)
        offsets_ptr,  # (R,) int32 per-row counter words 2 (PER_ROW_KEY)
        MODE: tl.constexpr,  # 0 prob, 1 raw_prob, 2 margin, 3 neg_entropy, 4 random
        HAS_TOPK: tl.constexpr,
        HAS_TOPP: tl.constexpr,
        HAS_MINP: tl.constexpr,
        PER_ROW_KEY: tl.constexpr,  # seed / offset per row from seeds_ptr / offsets_ptr
        BLOCK_V: tl.constexpr,  # vocabulary tile
        BLOCK_S: tl.constexpr,  # vocabulary tile of the threshold searches
        NPIV: tl.constexpr,  # pivots per pass of the threshold searches
        SHIFT: tl.constexpr,  # key shift: 16 for bf16 logits, 13 for fp16, 0 for float32
        GREEDY: tl.constexpr = False,  # every row greedy (T = 0), no active filter but MODE 1's
        CHUNK: tl.constexpr = 8,  # logits per thread and load of the greedy prob rows (16 bytes)
        FAST_EXP: tl.constexpr = False,  # the greedy prob rows' exps flush subnormals (GPU)
        STAGES: tl.constexpr = 3,  # cp.async stages of the passes over BLOCK_V tiles (GPU)
    ):
        r = tl.program_id(0).to(tl.int64)
        base = logits_ptr + r * stride_row
        cols0 = tl.arange(0, BLOCK_V)
        ninf = float("-inf")
        T = tl.load(temp_ptr + r)
        # The common greedy row (T = 0, no active filter, confidence prob, margin or
        # neg_entropy) in one pass: an online softmax (running max, per-chunk sums rescaled when
        # it grows). raw_prob at T = 0 is always one pass: the token is the row's argmax
        # whatever the filters (they keep the max), and its confidence the unfiltered prob.
        one_pass = (T <= 0.0) & ((MODE == 0) | (MODE == 2) | (MODE == 3))
        if HAS_TOPK:
            kf = tl.load(topk_ptr + r)
            one_pass = one_pass & ((kf <= 0) | (kf >= V))
        if HAS_TOPP:
            one_pass = one_pass & (tl.load(topp_ptr + r) >= 1.0)
        if HAS_MINP:
            one_pass = one_pass & (tl.load(minp_ptr + r) <= 0.0)
        if MODE == 1:
            one_pass = T <= 0.0
        if not tl.load(valid_ptr + r):
            tl.store(tok_ptr + r, 0)
            tl.store(conf_ptr + r, ninf)
        elif GREEDY:  # (constexpr) every row greedy: the kernel holds this path alone
            tl.static_assert(MODE != 4, "confidence random has no one-pass greedy path")
            _greedy_row(base, r, V, tok_ptr, conf_ptr, MODE, BLOCK_V, CHUNK, FAST_EXP)
        elif one_pass:
            _greedy_row(base, r, V, tok_ptr, conf_ptr, MODE, BLOCK_V, CHUNK, FAST_EXP)
        else:
            # Pass 1: max and its lowest index. (State per lane or per chunk here, as the
            # greedy rows keep it, saves the tile reductions, but in sm_90 ptxas per-lane state
            # spilled margin rows with every filter and per-chunk state took prob rows from 128
            # to 165 registers: one program per SM instead of two.)
            mx = tl.full([], ninf, tl.float32)
            amax = tl.full([], 0, tl.int64)
            for start in tl.range(0, V, BLOCK_V, num_stages=STAGES):
                offs = start + cols0
                x = _load_x(base, offs, V)
                tm = tl.max(x, 0)
                ti = tl.min(tl.where(x == tm, offs, 2147483647), 0).to(tl.int64)
                upd = tm > mx
                amax = tl.where(upd, ti, amax)
                mx = tl.where(upd, tm, mx)
            if mx == ninf:
                tl.store(tok_ptr + r, 0)
                tl.store(conf_ptr + r, ninf)
            else:
                Te = tl.where(T > 0.0, T, 1.0).to(tl.float64)
                mz = mx.to(tl.float64) / Te
                tok = amax
                conf = tl.zeros([], tl.float64)
                need_dist = (T > 0.0) | (MODE == 0) | (MODE == 2) | (MODE == 3)
                if need_dist:
                    kmin = _key(tl.full([], ninf, tl.float32), SHIFT).to(tl.int64)
                    kk = kmin  # keep key(x) >= kk
                    kmax = _key(mx, SHIFT).to(tl.int64)
                    # top_k and top_p thresholds by NPIV-way searches over the order-preserving
                    # int32 keys: each pass over the row tests NPIV pivots spread over the open
                    # interval, so a search takes ceil(log_(NPIV+1) of the key range) passes at
                    # most: 4 for bf16 logits, 5 for fp16, 8 for float32. The answer is always a
                    # data key (the count and the mass change only there). Per pass, each
                    # element costs 3 (top_k) or 4 (top_p) instructions per pivot: the
                    # [NPIV, BLOCK_S] compares go into per-lane accumulators (pivots in
                    # registers, elements across threads) reduced once after the pass, not per
                    # tile (sm_90 SASS: ~80 / ~97 instructions per element and pass, against
                    # ~740 with [BLOCK_S, NPIV] tiles reduced per tile and int64 keys). The
                    # weights are float32 exps: a float64 exp per element and pass cost ~10x
                    # the read of the row on a GPU.
                    ip = tl.arange(0, NPIV)
                    colS = tl.arange(0, BLOCK_S)
                    if HAS_TOPK:
                        k = tl.load(topk_ptr + r)
                        if (k > 0) & (k < V):
                            # Largest key K with count(key >= K) >= k (the k-th largest value):
                            # count(key >= lo) >= k > count(key >= he) throughout (he = hi + 1,
                            # exclusive, so that pivots split the open interval as top_p's do:
                            # an inclusive hi cost a fifth pass on bf16 for ~1 in 5 thresholds).
                            lo = kmin
                            he = kmax + 1
                            while he - lo > 1:
                                piv = lo + 1 + ((he - lo - 1) * (ip + 1)) // (NPIV + 1)
                                p32 = piv.to(tl.int32)
                                cnt2 = tl.zeros([NPIV, BLOCK_S], tl.int32)
                                # Loads two tiles ahead: a tile is one element per thread
                                # (2 bytes under bf16, too narrow for cp.async pipelining),
                                # and at ~100 instructions per element with 8-16 warps per SM
                                # a load issued at its own iteration left each warp waiting
                                # out the memory latency every iteration.
                                ra = _load_raw(base, colS, V)
                                rb = _load_raw(base, BLOCK_S + colS, V)
                                for start in range(0, V, BLOCK_S):
                                    rc = _load_raw(base, start + 2 * BLOCK_S + colS, V)
                                    kx = _key(_fix_x(ra), SHIFT)  # kmin past V
                                    cnt2 += (kx[None, :] >= p32[:, None]).to(tl.int32)
                                    ra = rb
                                    rb = rc
                                # count(>= piv) falls with the pivot: the last pivot that keeps
                                # k raises lo to it, the first that does not lowers he to it.
                                ok = tl.sum(cnt2, 1) >= k
                                nok = tl.sum(ok.to(tl.int32), 0)
                                lo = tl.where(nok > 0, tl.max(tl.where(ok, piv, lo), 0), lo)
                                he = tl.where(nok < NPIV, tl.min(tl.where(ok, he, piv), 0), he)
                            kk = lo
                    if HAS_TOPP:
                        p = tl.load(topp_ptr + r)
                        if p < 1.0:
                            invT = _inv_temp(Te)
                            kk32 = kk.to(tl.int32)
                            zs = tl.zeros([BLOCK_V], tl.float64)
                            for start in tl.range(0, V, BLOCK_V, num_stages=STAGES):
                                offs = start + cols0
                                x = _load_x(base, offs, V)
                                w = tl.exp((x - mx) * invT)
                                zs += tl.where(_key(x, SHIFT) >= kk32, w, 0.0).to(tl.float64)
                            Z = tl.sum(zs, 0)
                            target = p * Z
                            # Smallest K with mass(key > K) < target: kept = key >= K.
                            # mass(key > lo) >= target > mass(key > hi) throughout.
                            lo = kk - 1
                            hi = kmax
                            # A data bound on lo: the (at most V) values below x_lo, whose
                            # weights are under (1 - p) Z / (2 V), hold under half the mass
                            # top_p drops, so lo = key(x_lo) - 1 keeps the invariant with a
                            # margin of (1 - p) Z / 2 (the float32 exps' and x_lo's rounding
                            # cost < 7% of a weight while |x_lo| / T < 1e6). The searches then
                            # start from the values that can matter, not from -inf's key: on
                            # bf16 logits whose max is ~10 or more above the kept tail, 1-2
                            # passes fewer of the 4.
                            if p < 0.9999:
                                wlo = (1.0 - p) * Z / (2.0 * V)
                                xlo = mx.to(tl.float64) + tl.log(wlo) / invT.to(tl.float64)
                                xlo32 = xlo.to(tl.float32)
                                if tl.abs(xlo32) * invT < 1e6:
                                    klo = _key(xlo32, SHIFT).to(tl.int64) - 1
                                    lo = tl.maximum(lo, klo)
                            while hi - lo > 1:
                                # Pivots in (lo, hi): lo itself is never tested (its mass
                                # is the whole kept mass, which summation order could put
                                # under a target within rounding of it).
                                piv = lo + 1 + ((hi - lo - 1) * (ip + 1)) // (NPIV + 1)
                                p32 = piv.to(tl.int32)
                                # float64 lanes: the float32 weights sum exactly as the target's
                                # (float32 lanes over a whole row, ~600 terms at V 151936, lost
                                # small weights next to a large one: relative error up to 2e-6
                                # in a numpy model of the GPU layout). One more instruction per
                                # pivot and element than float32 lanes in sm_90 SASS.
                                acc2 = tl.zeros([NPIV, BLOCK_S], tl.float64)
                                ra = _load_raw(base, colS, V)  # two tiles ahead, as top_k's
                                rb = _load_raw(base, BLOCK_S + colS, V)
                                for start in range(0, V, BLOCK_S):
                                    rc = _load_raw(base, start + 2 * BLOCK_S + colS, V)
                                    x = _fix_x(ra)
                                    kx = _key(x, SHIFT)
                                    w = tl.where(kx >= kk32, tl.exp((x - mx) * invT), 0.0)
                                    w64 = w.to(tl.float64)
                                    acc2 += tl.where(kx[None, :] > p32[:, None], w64[None, :], 0.0)
                                    ra = rb
                                    rb = rc
                                acc = tl.sum(acc2, 1)
                                # mass(key > piv) falls with the pivot: the first pivot under
                                # the target lowers hi to it, the last one at or over it raises
                                # lo to it.
                                under = acc < target
                                nund = tl.sum(under.to(tl.int32), 0)
                                hi = tl.where(nund > 0, tl.min(tl.where(under, piv, hi), 0), hi)
                                lo = tl.where(nund < NPIV, tl.max(tl.where(under, lo, piv), 0), lo)
                            kk = tl.maximum(hi, kk)  # never below top_k's threshold
                    lz = tl.full([], ninf, tl.float64)
                    if HAS_MINP:
                        mp = tl.load(minp_ptr + r)
                        if mp > 0.0:
                            lz = tl.log(mp)
                    # Final pass: normaliser, entropy / second value, and the Gumbel-max draw.
                    # Philox counter words 1-3: the row, the offset, stream 0 (tokens).
                    # New names: the compiler rejects an argument retyped in a branch (the
                    # scalar seed is i32 when small, a loaded one int64).
                    if PER_ROW_KEY:
                        key = tl.load(seeds_ptr + r)
                        ctr = tl.load(offsets_ptr + r)
                    else:
                        key = seed
                        ctr = offset
                    c1 = (tl.zeros([BLOCK_V], tl.int64) + tl.load(rows_ptr + r)).to(tl.uint32)
                    c2 = (tl.zeros([BLOCK_V], tl.int32) + ctr).to(tl.uint32, bitcast=True)
                    c3 = tl.zeros([BLOCK_V], tl.uint32)
                    invT = _inv_temp(Te)
                    kk32 = kk.to(tl.int32)
                    zf = tl.zeros([BLOCK_V], tl.float64)
                    ent = tl.zeros([BLOCK_V], tl.float64)
                    ntop = tl.zeros([BLOCK_V], tl.int32)
                    sec = tl.full([BLOCK_V], ninf, tl.float32)  # the second value (a logit)
                    best = tl.full([], ninf, tl.float64)
                    bidx = amax
                    for start in tl.range(0, V, BLOCK_V, num_stages=STAGES):
                        offs = start + cols0
                        x = _load_x(base, offs, V)
                        keep = (_key(x, SHIFT) >= kk32) & (offs < V)
                        if HAS_MINP:  # the rule of the other paths, in float64
                            keep = keep & (x.to(tl.float64) / Te - mz >= lz)
                        d = tl.where(keep, (x - mx) * invT, ninf)
                        w = tl.exp(d)  # float32: see the searches
                        zf += w.to(tl.float64)
                        if MODE == 3:
                            ent += tl.where(w > 0.0, w * d, 0.0).to(tl.float64)  # 0 log 0 = 0
                        if MODE == 2:
                            ntop += (keep & (x == mx)).to(tl.int32)
                            sec = tl.maximum(sec, tl.where(keep & (x != mx), x, ninf))
                        # A tile with no kept token cannot change the draw (most tiles of a
                        # row whose top_p / top_k keep a few hundred tokens): no Philox.
                        if (T > 0.0) & (tl.max(keep.to(tl.int32), 0) > 0):
                            c0 = offs.to(tl.uint32)
                            w0, w1, _, _ = tl.philox(key, c0, c1, c2, c3)
                            # Token j beats the best score only if u > exp(-c), c =
                            # exp(z - best); exp(-c) >= 1 - c, and u < u_up = (top 24 bits
                            # + 1) 2^-24. A tile where no kept token has u_up > 1 - c
                            # cannot change the best: it skips the float64 logs. c in
                            # float32 as exp(d + mz - best) (one exp, no denormal
                            # products): relative error < 1e-5 for any c that matters, the
                            # slack below; a NaN or inf c keeps the token.
                            u_up = ((w0 >> 8).to(tl.float32) + 1.0) * 5.9604644775390625e-08
                            c = tl.exp(d + (mz - best).to(tl.float32))
                            cand = keep & ~(u_up < 1.0 - c * 1.00001 - 1e-6)
                            if (best == ninf) | (tl.max(cand.to(tl.int32), 0) > 0):
                                kb = (w0 >> 6).to(tl.float64) * 67108864.0 + (w1 >> 6).to(
                                    tl.float64
                                )
                                u = (kb + 0.5) * 2.220446049250313e-16
                                z = x.to(tl.float64) / Te
                                s = tl.where(keep, z - tl.log(-tl.log(u)), ninf)
                                tm = tl.max(s, 0)
                                ti = tl.min(tl.where(s == tm, offs, 2147483647), 0).to(tl.int64)
                                upd = tm > best
                                bidx = tl.where(upd, ti, bidx)
                                best = tl.where(upd, tm, best)
                    Z = tl.sum(zf, 0)
                    tok = bidx
                    if MODE == 0:
                        xt = _load_x(base, tok + tl.arange(0, 1), V)
                        wt = tl.exp(xt.to(tl.float64) / Te - mz)
                        conf = tl.sum(wt, 0) / Z
                    if MODE == 2:
                        p1 = 1.0 / Z
                        s2 = tl.max(sec, 0).to(tl.float64) / Te
                        p2 = tl.where(tl.sum(ntop, 0) >= 2, p1, tl.exp(s2 - mz) / Z)
                        conf = p1 - p2
                    if MODE == 3:
                        conf = tl.sum(ent, 0) / Z - tl.log(Z)
                if MODE == 1:
                    # Untempered, unfiltered softmax of the drawn token (LLaDA low_confidence).
                    zr = tl.zeros([BLOCK_V], tl.float64)
                    for start in tl.range(0, V, BLOCK_V, num_stages=STAGES):
                        offs = start + cols0
                        x = _load_x(base, offs, V)
                        zr += tl.exp(x.to(tl.float64) - mx.to(tl.float64))
                    xt = _load_x(base, tok + tl.arange(0, 1), V)
                    et = tl.exp(xt.to(tl.float64) - mx.to(tl.float64))
                    conf = tl.sum(et, 0) / tl.sum(zr, 0)
                tl.store(tok_ptr + r, tok)
                tl.store(conf_ptr + r, conf.to(tl.float32))


def _as_int32(v: int) -> int:
    # The counter word travels as an int32 and is bitcast back to uint32 in the kernel.
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def _block_v(V: int) -> int:
    # Under the interpreter a bigger tile is simply faster (numpy vectorises it).
    cap = 65536 if dispatch.triton_interpret() else 2048
    return min(cap, triton.next_power_of_2(V))


def _block_s(V: int) -> int:
    # The searches hold [NPIV, BLOCK_S] per-lane accumulators: one element per thread (32 x
    # the default launch's 8 warps; two per thread cost the same instructions per element and
    # pass in sm_90 SASS, and spilled at 8 warps). The autotune candidates use the same rule.
    return min(_block_v(V), 32 * 8 if not dispatch.triton_interpret() else 65536)


# Keys of logits widened from these dtypes drop the low bits that are always equal.
_KEY_SHIFT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}


def _sample_configs(V: int) -> list:
    """Candidate (BLOCK_V, num_warps) for the autotuner; the first is the untuned default.

    Every candidate compiles for sm_90 without register spills (checked offline with ptxas);
    which is fastest is for the card to say (one row per program: the tile trades registers,
    and so resident programs, against loop trips).
    """
    n = _NPIV
    cands = [(2048, 8, n), (1024, 4, n), (4096, 8, n), (1024, 8, n), (512, 4, n), (2048, 8, 8),
             (2048, 8, 4)]  # fmt: skip
    cap = triton.next_power_of_2(V)
    out, seen = [], set()
    for bv, nw, npiv in cands:
        bv = min(bv, cap)
        if (bv, nw, npiv) not in seen:
            seen.add((bv, nw, npiv))
            bs = min(bv, 32 * nw)
            meta = {"BLOCK_V": bv, "BLOCK_S": bs, "NPIV": npiv, "STAGES": _stages(bv)}
            out.append(triton.Config(meta, num_warps=nw))
    return out


def _stages(block_v: int, mode: int = 0) -> int:
    """cp.async stages of the passes over BLOCK_V tiles: 3 (two tiles in flight while one is
    computed); 2 for 4096-wide tiles and margin rows (3 spilled registers there with top_k in
    sm_90 ptxas)."""
    return 2 if block_v >= 4096 or mode == 2 else 3


# Pivots per pass of the top_k / top_p searches: ceil(log_(NPIV+1) of the key range) passes of
# ~6 instructions per element and pivot (sm_90 SASS, 16 pivots: ~97 per element and pass).
# Fewer pivots cost more passes over the row (from L2) but fewer instructions in all when the
# range is narrow (the top_p bound): 8 and 4 are autotune candidates on a GPU, untimed so far.
_NPIV = 16


def _prune_configs(configs, named_args, **kwargs):
    """Rows without a top_k / top_p search compile the same kernel for every NPIV: one each.
    The stages follow the confidence mode (_stages)."""
    if not (kwargs.get("HAS_TOPK") or kwargs.get("HAS_TOPP")):
        configs = [c for c in configs if c.kwargs["NPIV"] == _NPIV]
    mode = kwargs.get("MODE", 0)
    return [triton.Config({**c.kwargs, "STAGES": _stages(c.kwargs["BLOCK_V"], mode)},
                          num_warps=c.num_warps) for c in configs]  # fmt: skip


_TUNERS: dict = {}  # V bucket -> triton.autotune wrapper of _sample_rows_kernel


def _autotune_on() -> bool:
    return not dispatch.triton_interpret() and os.environ.get("DLM_KERNELS_AUTOTUNE", "1") != "0"


def _triton_sample(logits, rows, valid, temp, topk, topp, minp, mode, seed, offset, seeds,
                   offsets, flags, greedy=False):  # fmt: skip
    """One program per row; passes over a valid row: 1 for a greedy row without filters (online
    softmax), else 2 + the threshold searches (log_17 of the key range passes each at most: 4
    for bf16 logits, 5 for fp16, 8 for float32) + the final pass.

    The floor is one read of the logits (R * V * itemsize bytes); the searches re-read the row
    (from L2 on a GPU). On a GPU the tile and warp count are autotuned at the first launch of
    each (V, mode, filters) (DLM_KERNELS_AUTOTUNE=0: the default tile); during a CUDA graph
    capture, always the default tile (eager and replayed steps may then run different tiles:
    the same tokens except at the rounding-level top-p boundaries the module doc describes).
    """
    R, V = logits.shape
    tok = torch.empty(R, dtype=torch.int64, device=logits.device)
    conf = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R == 0:
        return tok, conf
    has_topk, has_topp, has_minp = flags
    per_row = seeds is not None
    if per_row:  # counter word 2 as int32 bits (offsets lie in [0, 2**32))
        offsets = torch.where(offsets >= 2**31, offsets - 2**32, offsets).to(torch.int32)
    else:  # placeholders, never read
        seeds, offsets = rows, valid
    args = (logits, logits.stride(0), rows, valid, temp, topk, topp, minp, tok, conf, V, seed,
            _as_int32(offset), seeds, offsets)  # fmt: skip
    # greedy: the caller knows every row's T is 0 (a scalar temperature of 0) and no filter is
    # on: a kernel compiled with the one-pass path alone (fewer registers: more rows resident).
    # (confidence "random", MODE 4, has no one-pass path: its rows take the general kernel,
    # which stores the 0 that the host then replaces with the row's uniform draw.)
    greedy = bool(greedy) and mode != 4 and not (has_topk or has_topp or has_minp)
    chunk = min(16 // logits.element_size(), triton.next_power_of_2(V))
    meta = dict(MODE=mode, HAS_TOPK=has_topk, HAS_TOPP=has_topp, HAS_MINP=has_minp,
                PER_ROW_KEY=per_row, SHIFT=_KEY_SHIFT[logits.dtype], GREEDY=greedy,
                FAST_EXP=not dispatch.triton_interpret())  # fmt: skip
    capturing = logits.is_cuda and torch.cuda.is_current_stream_capturing()
    if _autotune_on() and logits.is_cuda and not capturing:
        bucket = triton.next_power_of_2(V)
        tuner = _TUNERS.get(bucket)
        if tuner is None:
            tuner = triton.autotune(
                _sample_configs(V),
                key=["V", "MODE", "HAS_TOPK", "HAS_TOPP", "HAS_MINP", "GREEDY"],
                prune_configs_by={"early_config_prune": _prune_configs},
            )(_sample_rows_kernel)
            _TUNERS[bucket] = tuner
        tuner[(R,)](*args, **meta, CHUNK=chunk)
        return tok, conf
    bv = _block_v(V)
    _sample_rows_kernel[(R,)](*args, **meta, BLOCK_V=bv, BLOCK_S=_block_s(V), NPIV=_NPIV,
                              CHUNK=min(chunk, bv), STAGES=_stages(bv, mode),
                              num_warps=8)  # fmt: skip
    return tok, conf


# ---------------------------------------------------------------------------------------------
# custom op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dlm_kernels::sample_rows", mutates_args=())
def _sample_rows_op(
    logits: Tensor,
    rows: Tensor,
    valid: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    mode: int,
    seed: int,
    offset: int,
    seeds: Tensor | None,
    offsets: Tensor | None,
    has_topk: bool,
    has_topp: bool,
    has_minp: bool,
    impl: str,
    greedy: bool = False,
) -> tuple[Tensor, Tensor]:
    flags = (has_topk, has_topp, has_minp)
    if impl == "cpp":
        tok, conf = dispatch.cpp_ops().sample_rows(
            logits, rows, valid, temperature, top_k, top_p, min_p, mode, seed, offset, seeds,
            offsets, has_topk, has_topp, has_minp,
        )  # fmt: skip
        return tok, conf
    return _triton_sample(logits, rows, valid, temperature, top_k, top_p, min_p, mode, seed,
                          offset, seeds, offsets, flags, greedy)  # fmt: skip


@_sample_rows_op.register_fake
def _(logits, rows, valid, temperature, top_k, top_p, min_p, mode, seed, offset, seeds, offsets,
      has_topk, has_topp, has_minp, impl, greedy=False):  # fmt: skip
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.int64), logits.new_empty(n, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# argument handling shared by the public functions
# ---------------------------------------------------------------------------------------------
def _draw_seed(name: str, seed, generator) -> int:
    if seed is not None:
        s = dispatch.as_int(seed)
        if s is None or not 0 <= s < 2**63:
            raise ValueError(f"{name}: seed must be an int in [0, 2**63), got {seed!r}")
        return s
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{name}: generator must be a torch.Generator, got {type(generator)}")
        if generator.device.type != "cpu":
            raise ValueError(
                f"{name}: generator must be a CPU torch.Generator (the seed is drawn on the host "
                f"so that no device sync happens), got one on {generator.device}"
            )
    # One CPU draw per call: never a device sync.
    return int(torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64))


def _check_offset(name: str, offset) -> int:
    if offset is None:
        return 0
    o = dispatch.as_int(offset)
    if o is None or not 0 <= o < 2**32:
        raise ValueError(f"{name}: offset must be an int in [0, 2**32), got {offset!r}")
    return o


def _key_tensor(name: str, arg: str, value: Tensor, n: int, device, hi: int | None,
                lo: int = 0) -> Tensor:  # fmt: skip
    """A per-row seed / offset / left_pad: an (n,) integer tensor with values in [lo, hi)."""
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.is_complex():
        raise TypeError(f"{name}: {arg} must be an int or an ({n},) integer tensor, got "
                        f"{value.dtype}")  # fmt: skip
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(f"{name}: {arg} must be an int or an ({n},) tensor, got shape "
                         f"{tuple(value.shape)}")  # fmt: skip
    if value.device != device:
        raise ValueError(f"{name}: {arg} is on {value.device}, expected {device}")
    t = value.to(torch.int64).contiguous()
    if _host_checkable(t) and n:
        bad = (t < lo) if hi is None else (t < lo) | (t >= hi)
        if bool(bad.any()):
            raise ValueError(f"{name}: every {arg} must lie in [{lo}, {hi or 2**63})")
    return t


def _step_keys(name, B, L, device, seed, offset, left_pad, generator):
    """(seed, offset, left_pad) of a step over x (B, L): ints or checked (B,) int64 tensors."""
    if isinstance(seed, Tensor):
        seed = _key_tensor(name, "seed", seed, B, device, None)  # int64: < 2**63
    else:
        seed = _draw_seed(name, seed, generator)
    if isinstance(offset, Tensor):
        offset = _key_tensor(name, "offset", offset, B, device, 2**32)
    else:
        offset = _check_offset(name, offset)
    if left_pad is not None:
        if not isinstance(left_pad, Tensor):
            raise TypeError(f"{name}: left_pad must be a ({B},) integer tensor, got "
                            f"{type(left_pad).__name__}")  # fmt: skip
        # Negative: the window starts -left_pad positions after the row's first real token.
        left_pad = _key_tensor(name, "left_pad", left_pad, B, device, L + 1, lo=-(2**31))
    return seed, offset, left_pad


def _check_left_pad(name: str, cand: Tensor, left_pad) -> None:
    """Positions before left_pad[b] are padding: none may be a candidate (checked on the CPU,
    where it costs no sync; their draws would share the counter of the row's first position)."""
    if left_pad is None or not _host_checkable(cand) or not cand.numel():
        return
    pos = torch.arange(cand.shape[1], device=cand.device)
    if bool((cand & (pos[None, :] < left_pad[:, None])).any()):
        raise ValueError(f"{name}: a position before left_pad is a candidate (masked and allowed "
                         "by candidates); exclude the padding with candidates=")  # fmt: skip


def _keys_at(pos: Tensor, L: int, seed, offset, left_pad):
    """Counter rows and keys of the draws at flat positions pos (b * L + l), see unmask_step."""
    if not isinstance(seed, Tensor) and not isinstance(offset, Tensor) and left_pad is None:
        return pos, seed, offset
    b = torch.div(pos, L, rounding_mode="floor") if L else pos
    rows = pos if left_pad is None else (pos - b * L - left_pad[b]).clamp_min(0)
    return (rows, seed[b] if isinstance(seed, Tensor) else seed,
            offset[b] if isinstance(offset, Tensor) else offset)  # fmt: skip


def _host_checkable(t: Tensor) -> bool:
    return t.device.type == "cpu" and dispatch.values_readable(t)


# Temperatures in (0, this) are refused, and infinite ones: there logits / T overflows float64
# (near the subnormals, for logits of 1e4) or is inf / inf, which gave NaN confidences on the
# kernel paths and no draw on the reference. Down to this, every path agrees (tested at 1e-39
# and 1e-200, where 1 / T overflows float32). 0 is greedy.
_MIN_TEMPERATURE = 1e-200


def _per_row(name, arg, value, n, dtype, device, lo=None, hi=None, lo_open=False,
             temperature=False) -> Tensor:  # fmt: skip
    """A scalar or (n,) tensor option as an (n,) tensor of ``dtype`` on ``device``.

    Values are range-checked (and NaN rejected) for scalars and CPU tensors (a CUDA check would
    sync). ``temperature``: also finite, and 0 or at least _MIN_TEMPERATURE.
    """

    def what() -> str:  # built only to raise (formatting traces badly under torch.compile)
        if temperature:
            return f"0 (greedy) or a finite number >= {_MIN_TEMPERATURE:g}"
        if lo is not None and hi is not None:
            return f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        if lo is not None:
            return f"{'>' if lo_open else '>='} {lo}"
        return "a number (not NaN)" if hi is None else f"<= {hi}"

    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name}: {arg} must be a number or a real tensor, got {value.dtype}")
        if dtype == torch.int64 and value.dtype.is_floating_point:
            raise TypeError(f"{name}: {arg} must be an int or an integer tensor, got {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n):
            raise ValueError(f"{name}: {arg} must be a scalar or a ({n},) tensor, got "
                             f"shape {tuple(value.shape)}")  # fmt: skip
        if value.device != device:
            raise ValueError(f"{name}: {arg} is on {value.device}, expected {device}")
        t = value.to(dtype).expand(n).contiguous()
        if _host_checkable(t) and t.numel():
            bad = t.isnan().any() if t.dtype.is_floating_point else torch.tensor(False)
            if lo is not None:
                bad |= ((t <= lo) if lo_open else (t < lo)).any()
            if hi is not None:
                bad |= (t > hi).any()
            if temperature:
                bad |= (t.isinf() | ((t > 0) & (t < _MIN_TEMPERATURE))).any()
            if bool(bad):
                raise ValueError(f"{name}: every {arg} must be {what()}, got {t.tolist()[:8]}")
        return t
    if dispatch.is_bool(value) or not isinstance(value, Real):
        raise TypeError(f"{name}: {arg} must be a number or a tensor, got {type(value).__name__}")
    if dtype == torch.int64:
        if (iv := dispatch.as_int(value)) is None:
            raise TypeError(f"{name}: {arg} must be an int, got {value!r}")
        value = iv
    else:
        value = float(value)  # numpy scalars included
    if dtype == torch.int64 and not -(2**63) <= value < 2**63:
        raise ValueError(f"{name}: {arg} must fit in int64, got {value}")
    if (
        value != value
        or (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and value > hi)
        or (temperature and (abs(value) == math.inf or 0 < value < _MIN_TEMPERATURE))
    ):
        raise ValueError(f"{name}: {arg} must be {what()}, got {value}")
    return torch.full((n,), value, dtype=dtype, device=device)


def _options(name, n, device, temperature, top_k, top_p, min_p, confidence):
    if confidence not in _CONF_MODES:
        raise ValueError(f"{name}: confidence must be one of {tuple(_CONF_MODES)}, got "
                         f"{confidence!r}")  # fmt: skip
    temp = _per_row(name, "temperature", temperature, n, torch.float64, device, lo=0.0,
                    temperature=True)  # fmt: skip
    tk = None if top_k is None else _per_row(name, "top_k", top_k, n, torch.int64, device, lo=0)
    tp = None
    if top_p is not None:
        tp = _per_row(name, "top_p", top_p, n, torch.float64, device, lo=0.0, hi=1.0, lo_open=True)
    mp = None if min_p is None else _per_row(name, "min_p", min_p, n, torch.float64, device,
                                             lo=0.0, hi=1.0)  # fmt: skip
    return temp, tk, tp, mp


def all_greedy(temperature) -> bool:
    """True when the temperature argument is known on the host, without a sync, to be 0 for
    every row: a number, or a CPU tensor whose values can be read."""
    if isinstance(temperature, Tensor):
        return _host_checkable(temperature) and bool((temperature == 0).all())
    return isinstance(temperature, Real) and not dispatch.is_bool(temperature) and temperature == 0


def _check_logits(name: str, logits) -> None:
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        got = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"{name}: logits must be a floating-point tensor, got {got}")
    if logits.shape[-1] < 1 if logits.dim() else True:
        raise ValueError(f"{name}: logits must have a vocabulary dimension V >= 1")


# Placeholders of the filters that are off, for the direct C++ call (which never reads them).
_OFF = {dt: torch.empty(0, dtype=dt) for dt in (torch.int64, torch.float64)}


def _sample(logits2d, rows, valid, temp, tk, tp, mp, confidence, seed, offset, greedy=False):
    """Dispatch the per-row draw; (tokens int64 (R,), confidence float32 (R,)).

    seed and offset: ints (one Philox key for every row) or (R,) int64 tensors (per row).
    greedy: every T is 0 (``all_greedy`` of the temperature argument), known on the host.
    """
    R, V = logits2d.shape
    per_row = isinstance(seed, Tensor) or isinstance(offset, Tensor)
    if per_row:
        seed = (seed if isinstance(seed, Tensor) else torch.full_like(rows, seed)).contiguous()
        offset = offset if isinstance(offset, Tensor) else torch.full_like(rows, offset)
        offset = offset.contiguous()
    impl = dispatch.select(logits2d.device)
    if impl == "reference" or logits2d.dtype not in _KERNEL_DTYPES:
        tok, conf = reference.sample_tokens_rows(logits2d, rows, temp, tk, tp, mp, confidence,
                                                 seed, offset)  # fmt: skip
        ninf = torch.full_like(conf, float("-inf"))
        return torch.where(valid, tok, torch.zeros_like(tok)), torch.where(valid, conf, ninf)
    x = logits2d if logits2d.stride(-1) == 1 else logits2d.contiguous()
    dev = x.device
    # Eager CPU calls skip the custom op's Python layers (~40 us of a step that costs ~150 us at
    # small vocabularies); torch.compile and tracers still see the registered op.
    direct = impl == "cpp" and dispatch.plain_eager()

    def off(dtype, fill):  # the tensor of a filter that is off: never read by the kernels
        if direct:  # the C++ function accepts any placeholder: no (R,) allocation
            return _OFF[dtype]
        return torch.full((R,), fill, dtype=dtype, device=dev)

    args = (
        x, rows.contiguous(), valid.contiguous(), temp,
        off(torch.int64, 0) if tk is None else tk,
        off(torch.float64, 1.0) if tp is None else tp,
        off(torch.float64, 0.0) if mp is None else mp,
        _CONF_MODES[confidence], 0 if per_row else seed, 0 if per_row else offset,
        seed if per_row else None, offset if per_row else None,
        tk is not None, tp is not None, mp is not None,
    )  # fmt: skip
    if direct:
        tok, conf = dispatch.cpp_ops().sample_rows(*args)
    else:
        tok, conf = _sample_rows_op(*args, impl, greedy)
    if confidence == "random":
        u = reference.philox_uniform(torch.zeros_like(rows), rows, reference.STREAM_CONFIDENCE,
                                     seed, offset).to(torch.float32)  # fmt: skip
        conf = torch.where(conf == float("-inf"), conf, u)
    return tok, conf


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def sample_tokens(
    logits: Tensor,
    *,
    temperature: float | Tensor = 0.0,
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
    confidence: str = "prob",
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row of logits and score it (Dream's sample_tokens, fused).

    Args:
        logits: (N, V) float32, bfloat16 or float16 (float64 runs the reference).
        temperature: float or (N,) tensor: 0 (the default: argmax, ties to the lowest index)
            or a finite value >= 1e-200 (below it logits / T may overflow float64).
        top_k: int or (N,) int tensor: keep every token whose logit is >= the k-th largest (ties
            at the boundary all kept). None, 0 or >= V: off.
        top_p: float or (N,) tensor in (0, 1]: keep token j iff the mass (after top_k,
            renormalised) of the tokens with a strictly larger logit is < top_p: the smallest
            set with mass >= top_p, tied tokens kept together, the top token always. None or 1: off.
        min_p: float or (N,) tensor in [0, 1]: drop tokens with p < min_p * p_max. None or 0: off.
            Filters apply in the order top_k, top_p, min_p (docs/MATH.md; Dream: top_p first).
        confidence: "prob" (p of the token under the filtered, tempered distribution, Dream's
            maskgit_plus; at T = 0 the distribution is the filtered softmax at T = 1, as in
            Dream), "raw_prob" (under the untempered, unfiltered softmax, LLaDA's
            low_confidence), "margin" (p1 - p2 of the filtered, tempered distribution, Dream's
            topk_margin), "neg_entropy" (sum p log p of it, 0 log 0 = 0, Dream's entropy without
            its 1e-10), "random" (a Philox U(0, 1), LLaDA's random).
        generator: CPU torch.Generator to draw the seed from when ``seed`` is None.
        seed: int in [0, 2**63): the Philox key. None: drawn from ``generator`` / torch's RNG.
            Or an (N,) integer tensor: one key per row.
        offset: int in [0, 2**32), default 0: the Philox counter's step word; or an (N,)
            integer tensor, one per row.

    Returns:
        (tokens int64 (N,), confidence float32 (N,)). NaN logits count as -inf; a row with no
        finite logit gives token 0 and confidence -inf. Tokens are always in [0, V).

    Example:
        >>> logits = torch.randn(4, 1003)
        >>> tok, conf = sample_tokens(logits, temperature=0.7, top_p=0.95, seed=0)
        >>> tok0, _ = sample_tokens(logits)                      # greedy
    """
    name = "sample_tokens"
    _check_logits(name, logits)
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be (N, V), got shape {tuple(logits.shape)}")
    N, V = logits.shape
    dev = logits.device
    temp, tk, tp, mp = _options(name, N, dev, temperature, top_k, top_p, min_p, confidence)
    seed, offset, _ = _step_keys(name, N, 1, dev, seed, offset, None, generator)
    rows = torch.arange(N, dtype=torch.int64, device=dev)
    valid = torch.ones(N, dtype=torch.bool, device=dev)
    return _sample(logits, rows, valid, temp, tk, tp, mp, confidence, seed, offset,
                   all_greedy(temperature))  # fmt: skip


def select_and_commit(
    x, tok, conf, cand, nt, th, factor, alg_temp, tt, seed, offset, left_pad, pos=None
):
    """(new x, commit) of a step from its drawn tokens and confidences, all (B, L) (or, given
    pos (M,), the M draws at flat positions pos, b * L + l, ascending, which must include
    every candidate): the rule of reference.select_commits, then tok where committed. Eager CPU
    calls with the C++ extension run it as one C++ pass per row (commit_rows: ~20 ops and a
    (B, L) sort fewer, which is most of a small-vocabulary step's own time; with pos, the
    scatter back to (B, L) too); elsewhere the torch ops of the reference, which need no host
    sync."""
    cpp = (
        x.device.type == "cpu"
        and dispatch.plain_eager()
        and dispatch.select(x.device, has_triton=False) == "cpp"
    )
    if pos is not None and not cpp:  # back to (B, L): -inf confidence where nothing was drawn
        # Gathers, not scatters: torch.compile's inductor (CPU, torch 2.13) fused the read of
        # x.reshape(-1).scatter(0, pos, tok) into a kernel before the scatter's own loop, so
        # the commits took x's values (mask_id) instead of the drawn tokens.
        B, L = x.shape
        flat = torch.arange(B * L, dtype=torch.int64, device=x.device)
        slot = torch.searchsorted(pos, flat)  # in [0, M]; pos is ascending
        hit = torch.cat([pos, pos.new_full((1,), -1)])[slot] == flat
        ninf = conf.new_full((1,), float("-inf"))
        conf = torch.where(hit, torch.cat([conf, ninf])[slot], ninf).reshape(B, L)
        tok = torch.cat([tok, tok.new_zeros(1)])[slot]
        tok = torch.where(hit, tok, x.reshape(-1)).reshape(B, L)  # never committed elsewhere
        pos = None
    if not cpp:
        commit = reference.select_commits(
            conf, cand, num_transfer=nt, threshold=th, factor=factor, alg_temp=alg_temp,
            theta=tt, seed=seed, offset=offset, left_pad=left_pad,
        )  # fmt: skip
        return torch.where(commit, tok, x), commit
    # the reference's order of precedence (only one is ever given: check_rules)
    rule = 3 if tt is not None else 0 if nt is not None else 1 if th is not None else 2
    per_row = isinstance(seed, Tensor) or isinstance(offset, Tensor)
    B = x.shape[0]
    seeds = offsets = None
    if per_row:
        i64 = torch.int64
        seeds = seed if isinstance(seed, Tensor) else torch.full((B,), seed, dtype=i64)
        offsets = offset if isinstance(offset, Tensor) else torch.full((B,), offset, dtype=i64)
    new_x, commit = dispatch.cpp_ops().commit_rows(
        x.contiguous(), tok.contiguous(), conf.contiguous(), cand.contiguous(), rule,
        None if nt is None else nt.contiguous(), None if th is None else th.contiguous(),
        float(factor or 0.0), float(alg_temp or 0.0), None if tt is None else tt.contiguous(),
        0 if per_row else seed, 0 if per_row else offset,
        None if seeds is None else seeds.contiguous(),
        None if offsets is None else offsets.contiguous(),
        None if left_pad is None else left_pad.contiguous(),
        None if pos is None else pos.contiguous(),
    )  # fmt: skip
    return new_x, commit


def check_rules(name, num_transfer, threshold, factor, alg_temp, ancestral, theta) -> None:
    """Validate the selection rule of a step (shared by unmask_step and the fused head)."""
    rules = [num_transfer is not None, threshold is not None, factor is not None, bool(ancestral)]
    if sum(rules) != 1:
        raise ValueError(
            f"{name}: give exactly one of num_transfer, threshold, factor or ancestral=True"
        )
    if ancestral and theta is None:
        raise ValueError(f"{name}: ancestral=True needs theta (the unmasking probability)")
    if theta is not None and not ancestral:
        raise ValueError(f"{name}: theta applies to ancestral=True only")
    if alg_temp is not None:
        if isinstance(alg_temp, bool) or not isinstance(alg_temp, (int, float)) or alg_temp < 0:
            raise ValueError(f"{name}: alg_temp must be a float >= 0, got {alg_temp!r}")
        if alg_temp > 0 and num_transfer is None:
            raise ValueError(f"{name}: alg_temp applies to the num_transfer rule only")
    if factor is not None and (
        isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0
    ):
        raise ValueError(f"{name}: factor must be a float > 0, got {factor!r}")


def candidate_mask(name: str, x: Tensor, masked: Tensor, candidates) -> Tensor:
    """Masked positions that may commit: ``masked & candidates`` after checking candidates."""
    if candidates is None:
        return masked
    B, L = x.shape
    if not isinstance(candidates, Tensor) or candidates.dtype != torch.bool:
        raise TypeError(f"{name}: candidates must be a (B, L) bool tensor")
    if candidates.shape != x.shape or candidates.device != x.device:
        raise ValueError(f"{name}: candidates must be a ({B}, {L}) bool tensor on {x.device}, "
                         f"got {tuple(candidates.shape)} on {candidates.device}")  # fmt: skip
    return masked & candidates


def unmask_step(
    x: Tensor,
    logits: Tensor,
    *,
    mask_id: int,
    num_transfer: int | Tensor | None = None,
    threshold: float | Tensor | None = None,
    factor: float | None = None,
    alg_temp: float | None = None,
    candidates: Tensor | None = None,
    ancestral: bool = False,
    theta: float | Tensor | None = None,
    temperature: float | Tensor = 0.0,
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
    confidence: str = "prob",
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int | Tensor | None = None,
    left_pad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One unmasking step: draw a token at every candidate masked position, commit some of them.

    Args:
        x: (B, L) int64, the current sequences; masked positions hold ``mask_id``.
        logits: (B, L, V), or (M, V) for the M masked positions of x in row-major order (only
            those rows are read). float32/bfloat16/float16; float64 runs the reference. Dream's
            shift (position i predicted at i - 1) is the caller's job.
        mask_id: the mask token id.
        num_transfer: int or (B,) int tensor: commit this many per row (the most confident
            candidates; clamped to the row's candidate count).
        threshold: float or (B,) tensor (Fast-dLLM): commit every candidate with confidence >=
            tau, and at least the most confident one per row.
        factor: float (Fast-dLLM's factor rule): with c_1 >= c_2 >= ... the row's sorted
            confidences, commit the longest prefix with c_i >= 1 - factor / (i + 1) (at least 1).
        Exactly one of num_transfer / threshold / factor, or ancestral=True.
        alg_temp: with num_transfer, draw the positions without replacement from
            softmax(confidence / alg_temp) (Gumbel-top-k, Dream's alg_temp). None or 0: off.
        candidates: (B, L) bool: only masked positions that are True here may commit (the current
            semi-autoregressive block). None: every masked position.
        ancestral, theta: commit each candidate independently with probability theta (float or
            (B,) tensor in [0, 1]; the seed's algorithm, Dream's "origin"; theta = 1 commits all).
        temperature, top_k, top_p, min_p, confidence: as in :func:`sample_tokens` (per-row
            tensors are (B,)).
        generator, seed, offset: as in :func:`sample_tokens`; per-row tensors are (B,) (row b's
            key and step count). Token draws use counter row b * L + l for position (b, l)
            whatever the logits layout.
        left_pad: (B,) integer tensor in [-2**31, L]: the draws of position (b, l) are then
            keyed as position l - left_pad[b] of a batch of one row, so that with per-row seed
            and offset a left-padded row draws what it would draw alone, unpadded, in one call
            for the whole batch (rows with the same key and the same logits then draw the
            same). Positions before left_pad[b] must not be candidates (a ValueError on the
            CPU). A negative value keys a window cut from a longer row: x[:, w:] with
            left_pad = pad - w draws what the whole row draws at those positions (the sampler
            passes only the block it draws from).

    Returns:
        (new x (B, L) int64, committed (B, L) bool). Ties in confidence commit the lowest
        position first. A row with nothing masked is returned unchanged.

    Example:
        >>> x = torch.full((2, 37), 99); logits = torch.randn(2, 37, 100)
        >>> x, done = unmask_step(x, logits, mask_id=99, num_transfer=4, temperature=0.7,
        ...                       top_p=0.95, seed=0, offset=step)
    """
    name = "unmask_step"
    if not isinstance(x, Tensor) or x.dtype != torch.int64 or x.dim() != 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name}: x must be a (B, L) int64 tensor, got {got}")
    _check_logits(name, logits)
    B, L = x.shape
    dev = x.device
    if logits.device != dev:
        raise ValueError(f"{name}: logits is on {logits.device}, expected {dev}")
    m = dispatch.as_int(mask_id)
    if m is None:
        raise TypeError(f"{name}: mask_id must be an int, got {type(mask_id).__name__}")
    mask_id = m
    check_rules(name, num_transfer, threshold, factor, alg_temp, ancestral, theta)
    masked = x == mask_id
    cand = candidate_mask(name, x, masked, candidates)

    # Map logits rows to positions (b * L + l) without a host sync.
    flat_cand = cand.reshape(-1)
    if logits.dim() == 3:
        if tuple(logits.shape[:2]) != (B, L):
            raise ValueError(f"{name}: logits must be ({B}, {L}, V) or (masked count, V), got "
                             f"{tuple(logits.shape)}")  # fmt: skip
        V = logits.shape[-1]
        logits2d = logits.reshape(B * L, V)
        pos = torch.arange(B * L, dtype=torch.int64, device=dev)
        valid = flat_cand
        identity = True  # row i of logits2d is position i
    elif logits.dim() == 2:
        M, V = logits.shape
        flat_mask = masked.reshape(-1)
        if _host_checkable(x):  # the CPU: reading the count costs no sync
            pos = flat_mask.nonzero().view(-1)
            if pos.shape[0] != M:
                raise ValueError(f"{name}: logits has {M} rows but x has {pos.shape[0]} "
                                 "masked positions")  # fmt: skip
        else:  # slot i of the masked positions, without a host sync
            slot = torch.cumsum(flat_mask.to(torch.int64), 0) - 1
            slot = torch.where(flat_mask, slot, torch.full_like(slot, M)).clamp_max(M)
            pos = torch.zeros(M + 1, dtype=torch.int64, device=dev)
            pos.scatter_(0, slot, torch.arange(B * L, dtype=torch.int64, device=dev))
            pos = pos[:M]
        logits2d = logits
        valid = flat_cand[pos] if M else flat_cand[:0]
        identity = False
    else:
        raise ValueError(f"{name}: logits must be (B, L, V) or (M, V), got {logits.dim()} dims")

    def per_pos(arg, value, dtype, **kw):
        if not isinstance(value, Tensor):  # a checked scalar, one value per logits row
            return _per_row(name, arg, value, logits2d.shape[0], dtype, dev, **kw)
        t = _per_row(name, arg, value, B, dtype, dev, **kw).repeat_interleave(L)
        return t if identity else t[pos]

    if confidence not in _CONF_MODES:
        raise ValueError(f"{name}: confidence must be one of {tuple(_CONF_MODES)}, got "
                         f"{confidence!r}")  # fmt: skip
    temp = per_pos("temperature", temperature, torch.float64, lo=0.0, temperature=True)
    tk = None if top_k is None else per_pos("top_k", top_k, torch.int64, lo=0)
    tp = None
    if top_p is not None:
        tp = per_pos("top_p", top_p, torch.float64, lo=0.0, hi=1.0, lo_open=True)
    mp = None if min_p is None else per_pos("min_p", min_p, torch.float64, lo=0.0, hi=1.0)
    nt = th = tt = None
    if num_transfer is not None:
        nt = _per_row(name, "num_transfer", num_transfer, B, torch.int64, dev, lo=0)
    if threshold is not None:
        th = _per_row(name, "threshold", threshold, B, torch.float64, dev)
    if ancestral:
        tt = _per_row(name, "theta", theta, B, torch.float64, dev, lo=0.0, hi=1.0)
    seed, offset, left_pad = _step_keys(name, B, L, dev, seed, offset, left_pad, generator)
    _check_left_pad(name, cand, left_pad)

    krows, kseed, koff = _keys_at(pos, L, seed, offset, left_pad)
    tok, conf = _sample(logits2d, krows, valid, temp, tk, tp, mp, confidence, kseed, koff,
                        all_greedy(temperature))  # fmt: skip
    if identity:
        # Already in (B, L) order, with -inf confidence wherever no token was drawn (the token
        # there is never committed: commits are candidates).
        return select_and_commit(x, tok.reshape(B, L), conf.reshape(B, L), cand, nt, th, factor,
                                 alg_temp, tt, seed, offset, left_pad)  # fmt: skip
    # The draws at the masked positions pos (every candidate among them), scattered back to
    # (B, L) by select_and_commit (inside the C++ pass on the CPU).
    return select_and_commit(x, tok, conf, cand, nt, th, factor, alg_temp, tt, seed, offset,
                             left_pad, pos)  # fmt: skip
