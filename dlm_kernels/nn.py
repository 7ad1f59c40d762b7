"""torch.nn modules around the dlm_kernels ops, for models that keep their own layers."""

from __future__ import annotations

from torch import Tensor, nn

from dlm_kernels.ops.cross_entropy import check_options
from dlm_kernels.ops.linear_cross_entropy import masked_linear_cross_entropy

__all__ = ["MaskedLinearCrossEntropy"]


class MaskedLinearCrossEntropy(nn.Module):
    """Module form of :func:`dlm_kernels.masked_linear_cross_entropy`.

    Holds the loss options; the model keeps its own LM head and passes its weight (and bias) at
    each call, so weight tying and sharding stay the model's business (as Liger-Kernel's
    ``LigerFusedLinearCrossEntropyLoss`` does).

    Args:
        reduction: "mean" (default), "sum" or "none".
        ignore_index: target value that carries no loss (default -100).
        label_smoothing: eps in [0, 1] (default 0).
        z_loss: coefficient of logsumexp^2, >= 0 (default 0).
        softcap: None (default) or c > 0: logits become c * tanh(logits / c).
        deterministic: fixed-order weight-gradient reduction on the GPU (default True).

    Shapes in ``forward``: hidden (..., H), lm_head_weight (V, H), target / mask (...), weight
    broadcastable to (...), bias (V,); returns a float32 scalar or (...) for "none".

    Example:
        >>> head = torch.nn.Linear(40, 1003, bias=False)
        >>> loss_fn = MaskedLinearCrossEntropy(label_smoothing=0.1)
        >>> loss = loss_fn(hidden, head.weight, target, mask, weight=1 / t)
    """

    def __init__(
        self,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        deterministic: bool = True,
    ) -> None:
        super().__init__()
        name = "MaskedLinearCrossEntropy"
        check_options(name, reduction, label_smoothing, z_loss, None)
        # The rest of the checks now, not at the first forward (they cost nothing).
        if softcap is not None and (
            isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0
        ):
            raise ValueError(f"{name}: softcap must be None or > 0, got {softcap!r}")
        if not isinstance(deterministic, bool):
            raise TypeError(f"{name}: deterministic must be a bool, got {deterministic!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"{name}: ignore_index must be an int, got {ignore_index!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.deterministic = deterministic

    def forward(
        self,
        hidden: Tensor,
        lm_head_weight: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        weight: Tensor | None = None,
        *,
        bias: Tensor | None = None,
        normalizer: float | Tensor | None = None,
        return_lse: bool = False,
    ):
        return masked_linear_cross_entropy(
            hidden, lm_head_weight, target, mask, weight, bias=bias, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, normalizer=normalizer, softcap=self.softcap,
            return_lse=return_lse, deterministic=self.deterministic,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, deterministic={self.deterministic}"
        )
