#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace dlm {
// logits (N, V) float32/bf16/fp16 with a contiguous last dim; target (N,) int64; valid (N,) bool;
// weight (N,) float32. Returns {loss (N,), lse (N,)} in float32 (0 at invalid rows).
// write_grad: overwrite logits in place with d(loss_i)/d(logits_i) (grad_output 1).
std::vector<at::Tensor> masked_ce_fwd(const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& valid, const at::Tensor& weight,
                                      double label_smoothing, double z_loss,
                                      bool write_grad = false);
// grad (N,) float32: d(total)/d(loss_i). Returns dlogits (N, V) in the dtype of logits.
at::Tensor masked_ce_bwd(const at::Tensor& grad, const at::Tensor& logits,
                         const at::Tensor& target, const at::Tensor& valid,
                         const at::Tensor& weight, const at::Tensor& lse, double label_smoothing,
                         double z_loss);
}  // namespace dlm
