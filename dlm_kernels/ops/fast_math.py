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
