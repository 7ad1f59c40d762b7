"""Pure-PyTorch references: the meaning of every op in dlm_kernels.

Each reference is written for clarity, not speed, and computes in float32 (float64 when given
float64 inputs), so that tests can run it in float64 as the ground truth. The kernels in
``dlm_kernels/ops/`` must agree with these functions; where a reference is also the CPU fallback
it must stay free of host syncs where it can.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_cross_entropy"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------------
def masked_cross_entropy_rows(
    logits: Tensor,
    target: Tensor,
    valid: Tensor,
    weight: Tensor | None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and logsumexp of (N, V) logits; 0 at rows where ``valid`` is False.

    loss_i = w_i * ((1 - eps) * (lse_i - x_i[y_i]) + eps * (lse_i - mean_j x_ij) + z * lse_i^2)
    """
    dt = _compute_dtype(logits)
    V = logits.shape[-1]
    # Invalid rows are replaced by zeros (not dropped: no host sync), so that a NaN or -inf in a
    # row that carries no loss cannot leak into the result or the gradient.
    x = torch.where(valid[:, None], logits.to(dt), torch.zeros((), dtype=dt, device=logits.device))
    tgt = torch.where(valid, target, torch.zeros_like(target)).clamp(0, V - 1)
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(-1, tgt[:, None]).squeeze(-1)
    loss = nll
    if label_smoothing:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    if weight is not None:
        loss = loss * weight.to(dt)
    zero = torch.zeros((), dtype=dt, device=logits.device)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)


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
) -> Tensor:
    """Reference for :func:`dlm_kernels.masked_cross_entropy` (same arguments, no checks)."""
    V = logits.shape[-1]
    shape = target.shape
    valid = target != ignore_index
    if mask is not None:
        valid = valid & mask
    if weight is not None:
        weight = torch.broadcast_to(weight, shape).reshape(-1)
    loss, _ = masked_cross_entropy_rows(
        logits.reshape(-1, V), target.reshape(-1), valid.reshape(-1), weight,
        label_smoothing, z_loss,
    )
    if reduction == "none":
        return loss.reshape(shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        return total / normalizer
    return total / valid.sum().clamp_min(1)
