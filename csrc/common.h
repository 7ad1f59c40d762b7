// Shared helpers for the CPU kernels: a vectorisable exp and row conversion to float.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace dlm {

// exp(xc) for xc in [-87.34, 88.38] (the callers clamp): Cody-Waite range reduction
// xc = n ln2 + r, a degree-6 polynomial for exp(r), then a scale by 2^n through the exponent
// bits. Round to nearest by the 1.5 * 2^23 trick: branch-free, unlike std::nearbyint, which gcc
// leaves as a library call (it must honour the rounding mode) and which stops vectorisation.
static inline float exp_clamped(float xc) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f;
  const float ln2_lo = -2.12194440e-4f;
  const float magic = 12582912.0f;
  const float n = (xc * log2e + magic) - magic;
  float r = xc - n * ln2_hi;
  r = r - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // A NaN argument gives a NaN p; its exponent must not reach the int cast (converting NaN to
  // int32 is undefined behaviour, flagged by UBSan), so it becomes 0 first.
  const float nn = n == n ? n : 0.0f;
  int32_t ni = static_cast<int32_t>(nn);
  ni = ni < -126 ? -126 : ni;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp(x) in float32 with ~2 ulp error, branch-free so that gcc vectorises loops that call it
// (std::exp does not vectorise without -ffast-math, which we avoid because it breaks NaN/inf
// handling). exp(-inf) = 0 and NaN stays NaN; arguments above ~88.38 saturate to inf (float's
// own limit is 88.72; every caller passes x <= 0).
static inline float fast_exp(float x) {
  float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
  xc = xc < -87.3365447504f ? -87.3365447504f : xc;  // NaN fails both compares and stays NaN
  float out = exp_clamped(xc);
  out = x < -87.3365447504f ? 0.0f : out;
  out = x > 88.7228391f ? std::numeric_limits<float>::infinity() : out;
  return out;
}

// fast_exp for finite x <= 0 only: no upper clamp and no inf selects (~1.35x fast_exp's
// throughput in the greedy sampler's pass, which checks its row for NaN and inf first).
static inline float exp_nonpos(float x) {
  const float xc = x < -87.3365447504f ? -87.3365447504f : x;
  return x < -87.3365447504f ? 0.0f : exp_clamped(xc);
}

template <typename T>
static inline float to_float(T v) {
  return static_cast<float>(v);
}

// Copy one row of n elements of type T into a float buffer.
template <typename T>
static inline void row_to_float(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
static inline void row_from_float(const float* src, T* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// Statistics of one float row: max (NaN if any element is NaN) and logsumexp.
struct RowStats {
  float max;
  float lse;
  float mean;  // mean of the elements, for label smoothing
};

static inline RowStats row_stats(const float* x, int64_t n, bool want_mean) {
  float m = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    nan |= (x[j] != x[j]);
  }
  RowStats st;
  if (nan) {
    const float q = std::numeric_limits<float>::quiet_NaN();
    st.max = q;
    st.lse = q;
    st.mean = q;
    return st;
  }
  // All -inf (or empty): logsumexp is -inf; shift by 0 to avoid inf - inf.
  const float shift = std::isinf(m) && m < 0 ? 0.0f : m;
  // Sums are blocked: float lanes within a block of kSumBlock elements (vectorised), double
  // across blocks. A flat float sum over V = 152k terms lost 1.6e-5 relative in the loss.
  constexpr int64_t kSumBlock = 1024;
  double s = 0.0;
  if (std::isinf(shift)) {  // +inf present: logsumexp is +inf
    s = std::numeric_limits<double>::infinity();
  } else {
    for (int64_t b = 0; b < n; b += kSumBlock) {
      const int64_t e = b + kSumBlock < n ? b + kSumBlock : n;
      float part = 0.0f;
#pragma omp simd reduction(+ : part)
      for (int64_t j = b; j < e; ++j) part += fast_exp(x[j] - shift);
      s += part;
    }
  }
  double total = 0.0;
  if (want_mean) {
    for (int64_t b = 0; b < n; b += kSumBlock) {
      const int64_t e = b + kSumBlock < n ? b + kSumBlock : n;
      // double lanes: float ones overflowed to inf on rows of logits near +-3e38, whose
      // mean is finite (the float64 reference's).
      double part = 0.0;
#pragma omp simd reduction(+ : part)
      for (int64_t j = b; j < e; ++j) part += x[j];
      total += part;
    }
  }
  st.max = m;
  st.lse = std::isinf(s) ? static_cast<float>(s) : static_cast<float>(shift + std::log(s));
  st.mean = n > 0 ? static_cast<float>(total / static_cast<double>(n)) : 0.0f;
  return st;
}

}  // namespace dlm
