// Masked cross-entropy on the CPU: per-row losses and the gradient w.r.t. the logits.
//
// Per valid row i (valid = masked and target != ignore_index, decided by the caller):
//   loss_i = w_i * ((1 - eps) (lse_i - x_iy) + eps (lse_i - mean_j x_ij) + z lse_i^2)
//   dx_ij  = g_i w_i (p_ij (1 + 2 z lse_i) - eps / V - (1 - eps) [j == y_i]),  p = softmax(x_i)
// Rows that are not valid are never read: loss 0, lse 0, gradient 0.
//
// Memory passes for a valid row of V logits: forward reads it twice (max, then sum of exp; the
// second read hits L2 for V up to ~150k floats), backward reads it once more and writes the
// gradient once. Invalid rows cost only the zero write of their gradient.
#include "masked_cross_entropy.h"

#include <ATen/Parallel.h>

#include <vector>

#include "common.h"

namespace dlm {

namespace {

// Rows per parallel chunk: enough work per task to amortise the scheduling.
int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

// Gradient of one valid row, written to g (which may alias x: each element is read before it is
// written): g = coef (p (1 + 2 z lse) - eps / V - (1 - eps) [j == y]).
static inline void row_grad(const float* x, float* g, int64_t V, int64_t y, float coef, float lse,
                            float eps, float z) {
  // Without z-loss the scale is coef itself: 2 z lse is NaN for z = 0 and lse = +inf (a row
  // with a +inf logit), which would poison the whole row where the reference's is NaN only at
  // the +inf logit.
  const float scale = z != 0.0f ? coef * (1.0f + 2.0f * z * lse) : coef;
  const float shift = coef * eps / static_cast<float>(V);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) g[j] = scale * fast_exp(x[j] - lse) - shift;
  g[y] -= coef * (1.0f - eps);
}

// write_grad: also overwrite each row of logits with d(loss_i)/d(logits_i) (zeros for invalid
// rows) while the row is still in cache: Liger-Kernel's trade, no second (N, V) buffer.
template <typename T>
void fwd_impl(const at::Tensor& logits, const int64_t* target, const bool* valid,
              const float* weight, float eps, float z, float* loss, float* lse, bool write_grad) {
  const int64_t N = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  T* base = static_cast<T*>(logits.data_ptr());
  at::parallel_for(0, N, grain_for(V), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same<T, float>::value ? 0 : V);
    for (int64_t i = begin; i < end; ++i) {
      T* row_ptr = base + i * stride;
      if (!valid[i]) {
        loss[i] = 0.0f;
        lse[i] = 0.0f;
        if (write_grad) std::memset(static_cast<void*>(row_ptr), 0, sizeof(T) * V);
        continue;
      }
      float* x;
      if constexpr (std::is_same<T, float>::value) {
        x = row_ptr;
      } else {
        row_to_float(row_ptr, buf.data(), V);
        x = buf.data();
      }
      const RowStats st = row_stats(x, V, eps != 0.0f);
      const float l = st.lse;
      float row = l - x[target[i]];
      if (eps != 0.0f) row = (1.0f - eps) * row + eps * (l - st.mean);
      if (z != 0.0f) row += z * l * l;
      loss[i] = weight[i] * row;
      lse[i] = l;
      if (write_grad) {
        row_grad(x, x, V, target[i], weight[i], l, eps, z);
        if constexpr (!std::is_same<T, float>::value) row_from_float(x, row_ptr, V);
      }
    }
  });
}

template <typename T>
void bwd_impl(const float* grad, const at::Tensor& logits, const int64_t* target,
              const bool* valid, const float* weight, const float* lse, float eps, float z,
              at::Tensor& out) {
  const int64_t N = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const T* base = logits.data_ptr<T>();
  T* obase = out.data_ptr<T>();
  at::parallel_for(0, N, grain_for(V), [&](int64_t begin, int64_t end) {
    const bool conv = !std::is_same<T, float>::value;
    std::vector<float> buf(conv ? 2 * V : 0);
    for (int64_t i = begin; i < end; ++i) {
      T* o = obase + i * V;
      if (!valid[i]) {
        std::memset(static_cast<void*>(o), 0, sizeof(T) * V);
        continue;
      }
      const float* x;
      float* g;
      if constexpr (std::is_same<T, float>::value) {
        x = base + i * stride;
        g = o;
      } else {
        row_to_float(base + i * stride, buf.data(), V);
        x = buf.data();
        g = buf.data() + V;
      }
      row_grad(x, g, V, target[i], grad[i] * weight[i], lse[i], eps, z);
      if constexpr (!std::is_same<T, float>::value) row_from_float(g, o, V);
    }
  });
}

void check_inputs(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& valid,
                  const at::Tensor& weight) {
  TORCH_CHECK(logits.device().is_cpu(), "logits: expected a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "logits: expected shape (N, V), got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "logits: expected a contiguous last dimension");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "logits: expected float32, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t N = logits.size(0);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == N &&
                  target.is_contiguous(),
              "target: expected contiguous int64 of shape (", N, "), got ", target.scalar_type(),
              " ", target.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 1 && valid.size(0) == N &&
                  valid.is_contiguous(),
              "mask: expected contiguous bool of shape (", N, "), got ", valid.scalar_type(), " ",
              valid.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == N &&
                  weight.is_contiguous(),
              "weight: expected contiguous float32 of shape (", N, "), got ",
              weight.scalar_type(), " ", weight.sizes());
}

}  // namespace

std::vector<at::Tensor> masked_ce_fwd(const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& valid, const at::Tensor& weight,
                                      double label_smoothing, double z_loss, bool write_grad) {
  check_inputs(logits, target, valid, weight);
  TORCH_CHECK(!write_grad || logits.is_contiguous(),
              "logits: the in-place gradient needs contiguous logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t* t = target.data_ptr<int64_t>();
  const bool* m = valid.data_ptr<bool>();
  // Checked before the parallel region: an out-of-range target would read outside the row.
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(!m[i] || (t[i] >= 0 && t[i] < V), "target: expected values in [0, ", V,
                ") at masked positions, got ", t[i], " at flat position ", i);
  }
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, opts), lse = at::empty({N}, opts);
  const float eps = static_cast<float>(label_smoothing), z = static_cast<float>(z_loss);
  switch (logits.scalar_type()) {
    case at::kFloat:
      fwd_impl<float>(logits, t, m, weight.data_ptr<float>(), eps, z, loss.data_ptr<float>(),
                      lse.data_ptr<float>(), write_grad);
      break;
    case at::kBFloat16:
      fwd_impl<c10::BFloat16>(logits, t, m, weight.data_ptr<float>(), eps, z,
                              loss.data_ptr<float>(), lse.data_ptr<float>(), write_grad);
      break;
    default:
      fwd_impl<c10::Half>(logits, t, m, weight.data_ptr<float>(), eps, z, loss.data_ptr<float>(),
                          lse.data_ptr<float>(), write_grad);
  }
  return {loss, lse};
}

at::Tensor masked_ce_bwd(const at::Tensor& grad, const at::Tensor& logits,
                         const at::Tensor& target, const at::Tensor& valid,
                         const at::Tensor& weight, const at::Tensor& lse, double label_smoothing,
                         double z_loss) {
  check_inputs(logits, target, valid, weight);
  const int64_t N = logits.size(0);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.dim() == 1 && grad.size(0) == N,
              "grad: expected float32 of shape (", N, "), got ", grad.scalar_type(), " ",
              grad.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == N,
              "lse: expected float32 of shape (", N, ")");
  {
    // The gradient write g[y] must stay inside the row: same check as the forward.
    const int64_t V = logits.size(1);
    const int64_t* t = target.data_ptr<int64_t>();
    const bool* m = valid.data_ptr<bool>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(!m[i] || (t[i] >= 0 && t[i] < V), "target: expected values in [0, ", V,
                  ") at masked positions, got ", t[i], " at flat position ", i);
    }
  }
  at::Tensor g = grad.contiguous(), l = lse.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options());  // contiguous (N, V)
  const float eps = static_cast<float>(label_smoothing), z = static_cast<float>(z_loss);
  const int64_t* t = target.data_ptr<int64_t>();
  const bool* m = valid.data_ptr<bool>();
  const float* w = weight.data_ptr<float>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      bwd_impl<float>(g.data_ptr<float>(), logits, t, m, w, l.data_ptr<float>(), eps, z, out);
      break;
    case at::kBFloat16:
      bwd_impl<c10::BFloat16>(g.data_ptr<float>(), logits, t, m, w, l.data_ptr<float>(), eps, z,
                              out);
      break;
    default:
      bwd_impl<c10::Half>(g.data_ptr<float>(), logits, t, m, w, l.data_ptr<float>(), eps, z, out);
  }
  return out;
}

}  // namespace dlm
