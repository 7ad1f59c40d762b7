"""dlm-kernels: fused kernels for masked diffusion language models."""

__version__ = "0.1.0"

from dlm_kernels.ops.cross_entropy import masked_cross_entropy

__all__ = ["masked_cross_entropy"]
