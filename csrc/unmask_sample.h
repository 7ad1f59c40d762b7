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

// The commit half of unmask_step for B rows of L positions (reference.select_commits, then
// torch.where(commit, tok, x)), one pass per row with no (B, L) sort. x, tok (B, L) int64; conf
// (B, L) float32; cand (B, L) bool. rule 0: num_transfer (B,) int64, the most confident
// candidates (alg_temp > 0: ranked by conf / alg_temp + Gumbel noise); 1: threshold (B,)
// float64, every candidate with conf >= tau and the best one; 2: factor; 3: theta (B,) float64,
// each candidate with probability theta. Philox keys as sample_rows, per row when seeds/offsets
// are given; left_pad (B,) int64 keys position l as l - left_pad[b] of a batch of one row.
// pos (M,) int64: tok and conf are then (M,), the draws at flat positions pos (b * L + l), and
// every other position has confidence -inf (so it must not be a candidate).
// Returns {new x, commit (B, L) bool}.
std::vector<at::Tensor> commit_rows(const at::Tensor& x, const at::Tensor& tok,
                                    const at::Tensor& conf, const at::Tensor& cand, int64_t rule,
                                    const c10::optional<at::Tensor>& num_transfer,
                                    const c10::optional<at::Tensor>& threshold, double factor,
                                    double alg_temp, const c10::optional<at::Tensor>& theta,
                                    int64_t seed, int64_t offset,
                                    const c10::optional<at::Tensor>& seeds,
                                    const c10::optional<at::Tensor>& offsets,
                                    const c10::optional<at::Tensor>& left_pad,
                                    const c10::optional<at::Tensor>& pos);

// "avx2" if the explicit AVX2 paths (greedy rows, Philox) were compiled in, else "scalar".
const char* simd_path();
// True if built with -march=native (setup.py's default, when the compiler accepts it).
bool built_for_native();

// Philox4x32-10 words for counters (c0[i], c1, c2, c3) and key (seed lo, seed hi): (n, 4) int64.
// Exposed for the tests that check all paths share one generator.
at::Tensor philox4x32(const at::Tensor& c0, int64_t c1, int64_t c2, int64_t c3, int64_t seed);
}  // namespace dlm
