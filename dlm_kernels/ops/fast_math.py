"""Triton math shared by the kernel modules (each imports it inside its own ``try`` block, so a
missing or broken Triton only switches the Triton paths off)."""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except Exception:  # a Triton without libdevice: exps keep their subnormals (slower, same sums)
    libdevice = None

if libdevice is not None:

    @triton.jit
    def _exp_ftz(x, FAST: tl.constexpr):
        # exp with subnormal results flushed to 0: on a GPU one MUFU.EX2 after the scaling
        # (tl.exp's ex2.approx.f32 adds a compare and two predicated multiplies per element to
        # keep subnormals, ~3 of ~15 instructions per element of the greedy sampler's pass in
        # sm_90 SASS). The interpreter has no libdevice: tl.exp there (FAST False). The two
        # differ only for results under 2^-126: nothing next to a sum of at least 1, and in a
        # gradient scale * exp(x - lse) only where |scale| * 2^-126 is itself negligible.
        if FAST:
            return libdevice.fast_expf(x)
        else:
            return tl.exp(x)

else:

    @triton.jit
    def _exp_ftz(x, FAST: tl.constexpr):
        return tl.exp(x)


# The online logsumexp of the cross-entropy kernels, kept per chunk: each thread loads CHUNK
# contiguous logits (16 bytes) along axis AXIS of its tile and keeps, per chunk row, a sum z of
# exp(x - a) against an anchor a that moves to a chunk's max only when that exceeds it by more
# than 8 (terms stay below e^8; a move multiplies z by less than e^-8). Per logit one max,
# subtract, exp and add, and no reduction across threads until the end. The anchor starts at
# _ANCHOR0 = -FLT_MAX, not -inf, so that no select is needed: a chunk of -inf adds exp(-inf) = 0,
# a NaN adds NaN (a GPU's max drops NaN, the sum keeps it), a +inf moves the anchor to FLT_MAX
# and adds inf (lse = +inf), and any finite chunk max moves the anchor off -FLT_MAX.
_ANCHOR0 = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _chunk_lse_step(x, keep, a_c, z_c, t_c, AXIS: tl.constexpr, MASKED: tl.constexpr,
                    HAS_SUM: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    # One tile x (float32, chunks along AXIS) folded into the anchors a_c and sums z_c (and,
    # with HAS_SUM, the float64 sums t_c of x: a float32 sum of x, or of x * fl(1 / V), which
    # rounds up, overflowed on rows near +-FLT_MAX, whose mean is finite). MASKED: only the
    # logits where keep is True count (a ragged tile).
    if MASKED:
        x = tl.where(keep, x, float("-inf"))
    cm = tl.max(x, AXIS)
    mv = cm > a_c + 8.0  # False for NaN
    a_n = tl.where(mv, tl.minimum(cm, 3.4028234663852886e38), a_c)
    f = tl.where(mv, _exp_ftz(a_c - a_n, FAST), 1.0)
    z_c = z_c * f + tl.sum(_exp_ftz(x - tl.expand_dims(a_n, AXIS), FAST), AXIS)
    if HAS_SUM:
        if MASKED:
            t_c += tl.sum(tl.where(keep, x, 0.0).to(tl.float64), AXIS)
        else:
            t_c += tl.sum(x.to(tl.float64), AXIS)
    return a_n, z_c, t_c


@triton.jit
def _chunk_lse_total(a_c, z_c, AXIS: tl.constexpr):
    # (m, s) with lse = m + log(s), reduced over the chunk rows along AXIS: m is the largest
    # anchor (within 8 of the max). Chunk rows still at -FLT_MAX saw only -inf and -FLT_MAX, or
    # a NaN (its z is NaN): they scale by exp(0) = 1 if every row did (all -inf: s = 0, lse =
    # -inf), else by 0 (a NaN z stays NaN).
    m = tl.max(a_c, AXIS)
    return m, tl.sum(z_c * tl.exp(a_c - tl.expand_dims(m, AXIS)), AXIS)
