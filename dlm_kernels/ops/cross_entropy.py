"""Masked cross-entropy over (..., V) logits: Triton kernels, C++ ops, dispatch, autograd.

Only positions that carry loss (masked and target != ignore_index) are read; every other row
costs one zero write of its gradient. The forward keeps one float32 logsumexp per row; the
backward recomputes the softmax from it instead of storing (N, V) probabilities.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from dlm_kernels import dispatch, reference

try:
    import triton
    import triton.language as tl

    from dlm_kernels.ops.fast_math import _ANCHOR0, _chunk_lse_step, _chunk_lse_total, _exp_ftz
except Exception:  # no triton (or a broken one): dispatch never selects the Triton path
    triton = None


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _mce_fwd_kernel(
        logits_ptr,  # (N, V) float32/bf16/fp16, last dim contiguous
        stride_row,  # elements between consecutive rows of logits
        target_ptr,  # (N,) int64
        valid_ptr,  # (N,) bool: row carries loss
        weight_ptr,  # (N,) float32 per-row factor
        loss_ptr,  # (N,) float32 out: weighted loss, 0 at invalid rows
        lse_ptr,  # (N,) float32 out: logsumexp, 0 at invalid rows
        V,  # vocabulary size
        label_smoothing,  # eps of label smoothing
        z_loss,  # coefficient of lse^2
        HAS_SMOOTHING: tl.constexpr,  # eps != 0 (skip the row sum otherwise; 0 * inf is NaN)
        HAS_Z: tl.constexpr,  # z_loss != 0
        WRITE_GRAD: tl.constexpr,  # overwrite logits with d(loss_i)/d(logits_i) (Liger's trade)
        BLOCK_V: tl.constexpr,  # vocabulary tile
        CHUNK: tl.constexpr,  # logits per thread and load (16 bytes: 8 bf16/fp16, 4 float32)
        STAGES: tl.constexpr,  # cp.async stages of the sweeps over the row (GPU)
        FAST_EXP: tl.constexpr,  # GPU: exps with subnormal results flushed (see _exp_ftz)
    ):
        row = tl.program_id(0).to(tl.int64)
        valid = tl.load(valid_ptr + row)
        if valid:
            base = logits_ptr + row * stride_row
            target = tl.load(target_ptr + row)
            # Online logsumexp per chunk row of a [BLOCK_V // CHUNK, CHUNK] tile (each thread
            # loads CHUNK contiguous logits): see fast_math._chunk_lse_step.
            NC: tl.constexpr = BLOCK_V // CHUNK
            crow = tl.arange(0, NC) * CHUNK
            ccol = tl.arange(0, CHUNK)
            a_c = tl.full([NC], _ANCHOR0, tl.float32)
            z_c = tl.zeros([NC], tl.float32)
            t_c = tl.zeros([NC], tl.float64)
            # Whole tiles without a mask (no select per logit), then the ragged last one.
            v_full = V - V % BLOCK_V
            for start in tl.range(0, v_full, BLOCK_V, num_stages=STAGES):
                offs = start + crow[:, None] + ccol[None, :]
                x = tl.load(base + offs).to(tl.float32)
                a_c, z_c, t_c = _chunk_lse_step(x, True, a_c, z_c, t_c, 1, False,
                                                HAS_SMOOTHING, FAST_EXP)  # fmt: skip
            if v_full < V:
                offs = v_full + crow[:, None] + ccol[None, :]
                x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                a_c, z_c, t_c = _chunk_lse_step(x, offs < V, a_c, z_c, t_c, 1, True,
                                                HAS_SMOOTHING, FAST_EXP)  # fmt: skip
            a_row, z_row = _chunk_lse_total(a_c, z_c, 0)
            lse = a_row + tl.log(z_row)
            in_range = (target >= 0) & (target < V)
            x_t = tl.load(base + tl.where(in_range, target, 0)).to(tl.float32)
            x_t = tl.where(in_range, x_t, float("nan"))  # never read outside the row
            loss = lse - x_t
            if HAS_SMOOTHING:
                mean = (tl.sum(t_c, 0) / V).to(tl.float32)
                loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - mean)
            if HAS_Z:
                loss += z_loss * lse * lse
            w = tl.load(weight_ptr + row)
            tl.store(loss_ptr + row, w * loss)
            tl.store(lse_ptr + row, lse)
            if WRITE_GRAD:
                # Second sweep over the row, read then overwritten tile by tile (the row has
                # just been read, so on a GPU much of it is still in L2).
                # Without z-loss: w itself (2 z lse is NaN at z = 0, lse = +inf).
                scale = w * (1.0 + 2.0 * z_loss * lse) if HAS_Z else w
                shift = w * label_smoothing / V
                hit = w * (1.0 - label_smoothing)
                t32 = tl.where(in_range, target, -1).to(tl.int32)
                _dlogits_row(base, base, V, t32, lse, scale, shift, hit, BLOCK_V, STAGES,
                             FAST_EXP)  # fmt: skip
        else:
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if WRITE_GRAD:
                base = logits_ptr + row * stride_row
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    zero = tl.zeros([BLOCK_V], tl.float32).to(logits_ptr.dtype.element_ty)
                    tl.store(base + offs, zero, mask=offs < V)

    @triton.jit
    def _dlogits_tile(src, dst, offs, V, t32, lse, scale, shift, hit, MASKED: tl.constexpr,
                      FAST_EXP: tl.constexpr):  # fmt: skip
        # d(loss)/d(logits) of one tile, read at src + offs and stored at dst + offs: scale *
        # softmax - shift, minus hit at the target (t32: the target as int32, -1 when out of
        # range; a 64-bit compare cost ~5 instructions per logit in sm_90 SASS). MASKED: the
        # ragged last tile (lanes past V load nothing and store nothing).
        if MASKED:
            x = tl.load(src + offs, mask=offs < V).to(tl.float32)
        else:
            x = tl.load(src + offs).to(tl.float32)
        g = scale * _exp_ftz(x - lse, FAST_EXP) - shift
        g = tl.where(offs == t32, g - hit, g).to(dst.dtype.element_ty)  # the C++ kernel's order
        if MASKED:
            tl.store(dst + offs, g, mask=offs < V)
        else:
            tl.store(dst + offs, g)

    @triton.jit
    def _dlogits_row(src, dst, V, t32, lse, scale, shift, hit, BLOCK_V: tl.constexpr,
                     STAGES: tl.constexpr, FAST_EXP: tl.constexpr):  # fmt: skip
        # The gradient sweep over one row: whole tiles without masks, then the ragged one.
        v_full = V - V % BLOCK_V
        for start in tl.range(0, v_full, BLOCK_V, num_stages=STAGES):
            offs = start + tl.arange(0, BLOCK_V)
            _dlogits_tile(src, dst, offs, V, t32, lse, scale, shift, hit, False, FAST_EXP)
        if v_full < V:
            offs = v_full + tl.arange(0, BLOCK_V)
            _dlogits_tile(src, dst, offs, V, t32, lse, scale, shift, hit, True, FAST_EXP)

    @triton.jit
    def _mce_bwd_kernel(
        grad_ptr,  # (N,) float32: d(total) / d(loss_i)
        logits_ptr,  # (N, V) input logits
        stride_row,  # elements between rows of logits
        dlogits_ptr,  # (N, V) out, contiguous, dtype of logits
        target_ptr,  # (N,) int64
        valid_ptr,  # (N,) bool
        weight_ptr,  # (N,) float32
        lse_ptr,  # (N,) float32 from the forward
        V,
        label_smoothing,
        z_loss,
        BLOCK_V: tl.constexpr,
        STAGES: tl.constexpr,  # cp.async stages of the sweep over the row (GPU)
        FAST_EXP: tl.constexpr,  # GPU: exps with subnormal results flushed (see _exp_ftz)
    ):
        row = tl.program_id(0).to(tl.int64)
        valid = tl.load(valid_ptr + row)
        out = dlogits_ptr + row * V
        if valid:
            base = logits_ptr + row * stride_row
            target = tl.load(target_ptr + row)
            lse = tl.load(lse_ptr + row)
            coef = tl.load(grad_ptr + row) * tl.load(weight_ptr + row)
            # 2 z lse is NaN at z = 0 and lse = +inf (a +inf logit): the scale is coef then.
            scale = tl.where(z_loss != 0.0, coef * (1.0 + 2.0 * z_loss * lse), coef)
            shift = coef * label_smoothing / V
            hit = coef * (1.0 - label_smoothing)
            t32 = tl.where((target >= 0) & (target < V), target, -1).to(tl.int32)
            _dlogits_row(base, out, V, t32, lse, scale, shift, hit, BLOCK_V, STAGES, FAST_EXP)
        else:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                zero = tl.zeros([BLOCK_V], tl.float32).to(dlogits_ptr.dtype.element_ty)
                tl.store(out + offs, zero, mask=offs < V)


# The GPU tile: 2048 logits per program and sweep step, 4 warps (16 logits, two or four 16-byte
# loads, per thread), 3 cp.async stages (two tiles in flight while one is computed). The sm_90
# build of the old kernels (4096 x 8 warps, no stages, two exps per logit in the forward) loaded
# each tile at the top of its own iteration, and the H200 ran them at ~1 TB/s (bench rows
# N8192-V32000). Untimed on a GPU since.
_GPU_BLOCK_V, _GPU_WARPS, _GPU_STAGES = 2048, 4, 3
# Under the interpreter a bigger tile is simply faster (numpy vectorises it): the whole row up
# to this many columns (tests lower it to run the sweeps' tile-to-tile paths on small rows).
_INTERP_BLOCK_V = 65536


def _launch_meta(V: int) -> dict:
    # Interpreter: _INTERP_BLOCK_V, no stages, no fast exps.
    interp = dispatch.triton_interpret()
    bv = min(_INTERP_BLOCK_V if interp else _GPU_BLOCK_V, triton.next_power_of_2(V))
    return dict(BLOCK_V=bv, STAGES=1 if interp else _GPU_STAGES, FAST_EXP=not interp,
                num_warps=4 if interp else _GPU_WARPS)  # fmt: skip


def _chunk(bv: int, dtype: torch.dtype) -> int:
    return min(bv, 16 // dtype.itemsize)  # one 16-byte load per chunk


def _triton_fwd(logits, target, valid, weight, label_smoothing, z_loss, write_grad=False):
    """Reads each valid row once (online logsumexp): N_valid * V * itemsize bytes, the floor.

    write_grad: also overwrite every row of ``logits`` with its gradient (one more read and one
    write of each row), so that the backward needs no (N, V) buffer of its own.
    """
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return loss, lse
    meta = _launch_meta(V)
    _mce_fwd_kernel[(N,)](
        logits, logits.stride(0), target, valid, weight, loss, lse, V,
        float(label_smoothing), float(z_loss),
        HAS_SMOOTHING=label_smoothing != 0.0, HAS_Z=z_loss != 0.0, WRITE_GRAD=write_grad,
        CHUNK=_chunk(meta["BLOCK_V"], logits.dtype), **meta,
    )  # fmt: skip
    return loss, lse


def _triton_bwd(grad, logits, target, valid, weight, lse, label_smoothing, z_loss):
    """Reads each valid row once and writes every row once: (N_valid + N) * V * itemsize."""
    N, V = logits.shape
    out = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return out
    _mce_bwd_kernel[(N,)](
        grad.contiguous(), logits, logits.stride(0), out, target, valid, weight, lse, V,
        float(label_smoothing), float(z_loss), **_launch_meta(V),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# custom ops (one entry point per direction; `impl` picks the kernel family)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dlm_kernels::masked_ce_fwd", mutates_args=())
def _masked_ce_fwd(
    logits: Tensor,
    target: Tensor,
    valid: Tensor,
    weight: Tensor,
    label_smoothing: float,
    z_loss: float,
    impl: str,
) -> tuple[Tensor, Tensor]:
    if impl == "cpp":
        loss, lse = dispatch.cpp_ops().masked_ce_fwd(
            logits, target, valid, weight, label_smoothing, z_loss
        )
        return loss, lse
    return _triton_fwd(logits, target, valid, weight, label_smoothing, z_loss)


@_masked_ce_fwd.register_fake
def _(logits, target, valid, weight, label_smoothing, z_loss, impl):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("dlm_kernels::masked_ce_bwd", mutates_args=())
def _masked_ce_bwd(
    grad: Tensor,
    logits: Tensor,
    target: Tensor,
    valid: Tensor,
    weight: Tensor,
    lse: Tensor,
    label_smoothing: float,
    z_loss: float,
    impl: str,
) -> Tensor:
    grad = grad.to(torch.float32).contiguous()
    if impl == "cpp":
        return dispatch.cpp_ops().masked_ce_bwd(
            grad, logits, target, valid, weight, lse, label_smoothing, z_loss
        )
    return _triton_bwd(grad, logits, target, valid, weight, lse, label_smoothing, z_loss)


@_masked_ce_bwd.register_fake
def _(grad, logits, target, valid, weight, lse, label_smoothing, z_loss, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, valid, weight, label_smoothing, z_loss, impl = inputs
    ctx.save_for_backward(logits, target, valid, weight, output[1])
    ctx.opts = (label_smoothing, z_loss, impl)


def _backward(ctx, grad_loss, grad_lse):
    logits, target, valid, weight, lse = ctx.saved_tensors
    label_smoothing, z_loss, impl = ctx.opts
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dlogits = _masked_ce_bwd(
        grad_loss, logits, target, valid, weight, lse, label_smoothing, z_loss, impl
    )
    return dlogits, None, None, None, None, None, None


_masked_ce_fwd.register_autograd(_backward, setup_context=_setup_context)
dispatch.refuse_second_order(_masked_ce_bwd, "masked_cross_entropy")


@torch.library.custom_op("dlm_kernels::masked_ce_fwd_grad_", mutates_args=("logits",))
def _masked_ce_fwd_grad_(
    logits: Tensor,
    target: Tensor,
    valid: Tensor,
    weight: Tensor,
    label_smoothing: float,
    z_loss: float,
    impl: str,
) -> Tensor:
    """Per-row losses; overwrites ``logits`` with d(loss_i)/d(logits_i) (declared mutation, so
    autograd's version counter is bumped and torch.compile functionalises it)."""
    if impl == "cpp":
        loss, _ = dispatch.cpp_ops().masked_ce_fwd(
            logits, target, valid, weight, label_smoothing, z_loss, True
        )
        return loss
    loss, _ = _triton_fwd(logits, target, valid, weight, label_smoothing, z_loss, True)
    return loss


@_masked_ce_fwd_grad_.register_fake
def _(logits, target, valid, weight, label_smoothing, z_loss, impl):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


class _GradInForward(torch.autograd.Function):
    """The gradient computed in the forward pass and written over the logits' own storage.

    Saves the (N, V) buffer that the backward would allocate; the logits values are destroyed.
    The mutation bumps autograd's version counter of ``logits``, so any other op that saved
    the logits for its own backward fails loudly instead of reading gradients as logits.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, weight, label_smoothing, z_loss, impl):
        loss = _masked_ce_fwd_grad_(logits, target, valid, weight, label_smoothing, z_loss, impl)
        ctx.save_for_backward(logits)  # now holds d(loss_i)/d(logits_i)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "done", False):
            # Checked before ctx.saved_tensors, whose version check would raise autograd's
            # generic in-place error: the first backward scaled the stored gradient in place.
            raise RuntimeError(
                "masked_cross_entropy: backward ran twice through a graph built with "
                "grad_in_forward=True (its gradient is stored once and scaled in place); "
                "retain_graph=True is not supported there: use grad_in_forward=False"
            )
        ctx.done = True
        (grad,) = ctx.saved_tensors
        # Scaled in place by the per-row upstream gradient: one read and write, no host check
        # for grad_loss == 1 (Liger skips it that way, at the cost of a device sync).
        grad.mul_(grad_loss[:, None])  # computed in float32, rounded once into grad's dtype
        return grad, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_LOGITS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_targets_on_host(target: Tensor, valid: Tensor, V: int) -> bool:
    """Range-check targets eagerly where it costs no device sync (CPU) or when asked for.

    On CUDA the check would stall the stream, so it runs only with DLM_KERNELS_CHECK=1; the
    kernels never read outside a row and give NaN for an out-of-range target instead.
    """
    if not dispatch.values_readable(target):
        return False
    if target.device.type == "cpu":
        return True
    if target.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return os.environ.get("DLM_KERNELS_CHECK", "0") == "1"


def prepare_rows(
    name: str,
    target: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    ignore_index: int,
    V: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (target, mask, weight) against ``target.shape`` and flatten them to rows.

    Returns (target int64 (N,), valid bool (N,), weight float32 (N,)), all contiguous. Shared by
    every loss op so that they accept and reject exactly the same inputs. ``name`` is the op's
    name for error messages.
    """
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.is_complex():
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"{name}: target must be an integer tensor (int64), got {got}")
    if target.dtype == torch.bool:
        raise TypeError(f"{name}: target must be an integer tensor (int64), got torch.bool")
    shape = target.shape
    if target.device != device:
        raise ValueError(f"{name}: target is on {target.device}, expected {device}")
    # In int64: a narrower dtype would wrap ignore_index (-100 is 156 in uint8) and drop a real
    # token from the loss.
    valid = target.to(torch.int64) != ignore_index
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"{name}: mask must be a bool tensor (True = carries loss), got {got}")
        if mask.shape != shape:
            raise ValueError(
                f"{name}: mask must have the shape of target {tuple(shape)}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"{name}: mask is on {mask.device}, expected {device}")
        valid = valid & mask
    if weight is None:
        w = torch.ones(shape, dtype=torch.float32, device=device)
    else:
        if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point:
            got = weight.dtype if isinstance(weight, Tensor) else type(weight).__name__
            raise TypeError(f"{name}: weight must be a floating-point tensor, got {got}")
        try:
            w = torch.broadcast_to(weight, shape)
        except RuntimeError:
            raise ValueError(
                f"{name}: weight must have the shape of target {tuple(shape)} or broadcast to "
                f"it (e.g. (B, 1) for one weight per sequence), got {tuple(weight.shape)}"
            ) from None
        if weight.device != device:
            raise ValueError(f"{name}: weight is on {weight.device}, expected {device}")
        w = w.detach().to(torch.float32)  # data, like target and mask: no gradient flows to it
    target = target.reshape(-1).to(torch.int64).contiguous()
    valid = valid.reshape(-1).contiguous()
    if _check_targets_on_host(target, valid, V):
        bad = valid & ((target < 0) | (target >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}: target must lie in [0, {V}) at positions that carry loss; "
                f"flat position {i} has {int(target[i])}"
            )
    return target, valid, w.reshape(-1).contiguous()


def reduce_rows(
    name: str, loss: Tensor, valid: Tensor, shape, reduction: str, normalizer
) -> Tensor:
    """Apply ``reduction`` to per-row losses without a host sync ("mean" of nothing is 0)."""
    if reduction == "none":
        return loss.reshape(shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:  # a (1,) tensor still gives a scalar loss
        return total / (normalizer.reshape(()) if isinstance(normalizer, Tensor) else normalizer)
    return total / valid.sum().clamp_min(1)


def check_options(name: str, reduction: str, label_smoothing: float, z_loss: float, normalizer):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{name}: label_smoothing must lie in [0, 1], got {label_smoothing}")
    if not float(z_loss) >= 0.0:  # NaN fails too
        raise ValueError(f"{name}: z_loss must be >= 0, got {z_loss}")
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"{name}: normalizer applies to reduction='mean' only")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"{name}: normalizer must be a number or a one-element tensor, got shape "
                f"{tuple(normalizer.shape)}"
            )
        if normalizer.device.type == "cpu" and dispatch.values_readable(normalizer):
            normalizer = float(normalizer)  # free on the CPU; a CUDA check would sync
    if isinstance(normalizer, (int, float)) and not normalizer > 0:
        raise ValueError(f"{name}: normalizer must be > 0, got {normalizer}")


def masked_cross_entropy(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalizer: float | Tensor | None = None,
    grad_in_forward: bool = False,
) -> Tensor:
    """Cross-entropy over the positions that carry loss, with per-position weights.

    Per position: ``weight * (CE with label smoothing + z_loss * logsumexp^2)``, in float32.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 runs the reference).
        target: (...) int64 token ids; must lie in [0, V) wherever the position carries loss.
        mask: (...) bool, True where the position carries loss (the masked tokens of the
            diffusion loss). None: every position whose target != ignore_index. Positions whose
            target == ignore_index never carry loss.
        weight: (...) float, or any shape that broadcasts to it such as (B, 1): a per-position
            factor, e.g. the ELBO weight 1/t of each sequence. None: 1.
        reduction: "mean" (sum / number of positions carrying loss, 0 if there are none),
            "sum", or "none" ((...) float32 with zeros at positions carrying no loss).
        ignore_index: target value that carries no loss (default -100).
        label_smoothing: eps in [0, 1]: (1 - eps) * NLL + eps * mean over the vocabulary of -log p.
        z_loss: coefficient of logsumexp^2 (PaLM's z-loss), >= 0.
        normalizer: with reduction="mean", divide the sum by this instead (the ELBO divides by
            B * L, the number of tokens, not the number of masked ones). A number or a
            one-element tensor.
        grad_in_forward: compute the gradient during the forward pass and write it over the
            logits' storage (Liger-Kernel's trade: no second (N, V) buffer, about half the peak
            memory at large V). The logits are destroyed, so use it only when nothing else
            reads them afterwards; needs contiguous logits that require grad, and the C++ or
            Triton path (the reference ignores it).

    Returns:
        float32 scalar, or (...) for reduction="none" (float64 for float64 logits). Gradients
        flow to ``logits`` only.

    A row whose logits hold a NaN gets a NaN loss; a row whose target logit is -inf gets +inf.
    Rows that carry no loss are never read, so NaN or -inf there is harmless.

    Example:
        >>> logits, target = torch.randn(2, 37, 1003), torch.randint(0, 1003, (2, 37))
        >>> mask = torch.rand(2, 37) < 0.5                       # the masked positions
        >>> t = torch.rand(2, 1)                                 # diffusion time per sequence
        >>> loss = masked_cross_entropy(logits, target, mask, 1 / t, normalizer=2 * 37)
    """
    name = "masked_cross_entropy"
    if not isinstance(logits, Tensor) or logits.dtype not in _FLOAT_LOGITS:
        got = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"{name}: logits must be a float32/bfloat16/float16 tensor, got {got}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name}: logits must have shape (..., V) with V >= 1")
    if not isinstance(target, Tensor):
        raise TypeError(f"{name}: target must be an integer tensor (int64), got {type(target)}")
    if tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ValueError(
            f"{name}: logits {tuple(logits.shape)} must be target's shape {tuple(target.shape)} "
            "plus a vocabulary dimension"
        )
    check_options(name, reduction, label_smoothing, z_loss, normalizer)
    V = logits.shape[-1]
    shape = target.shape
    t, valid, w = prepare_rows(name, target, mask, weight, ignore_index, V, logits.device)
    impl = dispatch.select(logits.device)
    if impl == "reference" or logits.dtype == torch.float64:
        loss, _ = reference.masked_cross_entropy_rows(
            logits.reshape(-1, V), t, valid, w, label_smoothing, z_loss
        )
    elif grad_in_forward and logits.requires_grad and torch.is_grad_enabled():
        if not logits.is_contiguous():
            raise ValueError(f"{name}: grad_in_forward=True needs contiguous logits")
        if logits.is_leaf:
            # Its .grad would be its own storage: the next optimizer step would read garbage.
            raise ValueError(
                f"{name}: grad_in_forward=True needs logits computed by an op (an LM head), not "
                "a leaf tensor: the gradient is written over the logits' own storage"
            )
        x = logits.view(-1, V)
        loss = _GradInForward.apply(x, t, valid, w, float(label_smoothing), float(z_loss), impl)
    else:
        x = logits.reshape(-1, V)
        if x.stride(-1) != 1:
            x = x.contiguous()
        loss, _ = _masked_ce_fwd(x, t, valid, w, float(label_smoothing), float(z_loss), impl)
    return reduce_rows(name, loss, valid, shape, reduction, normalizer)
