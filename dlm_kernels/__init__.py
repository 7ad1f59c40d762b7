"""dlm-kernels: fused kernels for masked diffusion language models."""

__version__ = "0.1.0"

from dlm_kernels import nn  # the module forms: dlm_kernels.nn.MaskedLinearCrossEntropy
from dlm_kernels.ops.attention import bidirectional_attention
from dlm_kernels.ops.cross_entropy import masked_cross_entropy
from dlm_kernels.ops.fused_head_sample import fused_head_unmask_step
from dlm_kernels.ops.linear_cross_entropy import masked_linear_cross_entropy
from dlm_kernels.ops.unmask_sample import sample_tokens, unmask_step

__all__ = [
    "masked_cross_entropy",
    "masked_linear_cross_entropy",
    "nn",
    "bidirectional_attention",
    "sample_tokens",
    "unmask_step",
    "fused_head_unmask_step",
]
