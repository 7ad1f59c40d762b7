#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace dlm {
// One draw per row of logits (R, V) float32/bf16/fp16 (last dim contiguous), the C++ side of
// dlm_kernels.sample_tokens / unmask_step. rows (R,) int64: the Philox counter's row of each
// logits row; valid (R,) bool: rows to draw (others: token 0, confidence -inf); temperature,
// top_p, min_p (R,) float64; top_k (R,) int64; mode 0 prob, 1 raw_prob, 2 margin,
// 3 neg_entropy, 4 random (confidence left 0 for Python to fill). Returns {tokens (R,) int64,
// confidence (R,) float32}. The rules are those of reference.sample_tokens_rows. The Philox key
// is (seed, offset) for every row, or (seeds[i], offsets[i]) for row i when both (R,) int64
// tensors are given.
std::vector<at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& rows,
                                    const at::Tensor& valid, const at::Tensor& temperature,
                                    const at::Tensor& top_k, const at::Tensor& top_p,
                                    const at::Tensor& min_p, int64_t mode, int64_t seed,
                                    int64_t offset, const c10::optional<at::Tensor>& seeds,
                                    const c10::optional<at::Tensor>& offsets, bool has_topk,
                                    bool has_topp, bool has_minp);

// Philox4x32-10 words for counters (c0[i], c1, c2, c3) and key (seed lo, seed hi): (n, 4) int64.
// Exposed for the tests that check all paths share one generator.
at::Tensor philox4x32(const at::Tensor& c0, int64_t c1, int64_t c2, int64_t c3, int64_t seed);
}  // namespace dlm
