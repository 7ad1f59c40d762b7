// The per-row draw of one unmasking step on the CPU: filters, Gumbel-max draw, confidence.
//
// Per valid row (rules of reference.sample_tokens_rows, which sorts; nothing here sorts V):
//   1. one pass: sanitise (NaN -> -inf, +inf -> FLT_MAX) into a float buffer, max, argmax.
//   2. weights w_j = exp(x_j / T - max / T) in float64 (only when a filter or the confidence
//      needs the distribution).
//   3. top_k: std::nth_element on a copy (O(V)); top_p: a weighted quickselect over the
//      (value, weight) pairs that survive top_k: expected O(V), exact, ties kept together.
//   4. one pass over the kept tokens: normaliser, entropy / second value, and the Gumbel-max
//      draw. A token whose uniform u <= 1 - c (c = exp(z_j - best), so u <= exp(-c)) cannot beat
//      the running best: most tokens skip the two float64 logs and only pay the Philox rounds.
// Rows run in parallel (at::parallel_for); a row's result never depends on the thread count.
#include "unmask_sample.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"

namespace dlm {

namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr double kInf = std::numeric_limits<double>::infinity();

inline void philox10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = static_cast<uint32_t>(p1);
    c[2] = n2;
    c[3] = static_cast<uint32_t>(p0);
    k0 += kW0;
    k1 += kW1;
  }
}

// u = (k + 1/2) 2^-52 with k from the top 26 bits of words 0 and 1: exact in float64, in (0, 1).
inline double philox_uniform(uint32_t col, uint32_t row, uint32_t off, uint32_t stream,
                             uint32_t k0, uint32_t k1) {
  uint32_t c[4] = {col, row, off, stream};
  philox10(c, k0, k1);
  const double k = static_cast<double>(c[0] >> 6) * 67108864.0 + static_cast<double>(c[1] >> 6);
  return (k + 0.5) * 0x1p-52;
}

struct Params {
  int mode;
  bool has_topk, has_topp, has_minp;
  uint32_t k0, k1, off;
};

struct Scratch {
  std::vector<float> x;                     // sanitised row
  std::vector<double> w;                    // exp(z - max z)
  std::vector<float> sel;                   // nth_element copy
  std::vector<std::pair<float, double>> c;  // (value, weight) for the top-p quickselect
};

// The smallest value v among the pairs with mass(values > v) < target (always <= top).
float top_p_threshold(std::vector<std::pair<float, double>>& c, double target, float top) {
  float best = top;
  double above = 0.0;
  size_t lo = 0, hi = c.size();
  while (lo < hi) {
    const float piv = c[lo + (hi - lo) / 2].first;
    // Three-way partition of [lo, hi): > piv, == piv, < piv (runs of ties cost one step).
    size_t gt = lo, i = lo, lt = hi;
    while (i < lt) {
      if (c[i].first > piv) {
        std::swap(c[gt++], c[i++]);
      } else if (c[i].first < piv) {
        std::swap(c[i], c[--lt]);
      } else {
        ++i;
      }
    }
    double sg = 0.0, se = 0.0;
    for (size_t j = lo; j < gt; ++j) sg += c[j].second;
    for (size_t j = gt; j < lt; ++j) se += c[j].second;
    if (above + sg < target) {  // piv is kept: the answer is piv or below it
      best = piv;
      above += sg + se;
      lo = lt;
    } else {  // piv is dropped, and so is everything below it
      hi = gt;
    }
  }
  return best;
}

template <typename T>
void sample_row(const T* src, int64_t V, uint32_t row, double temp, int64_t topk, double topp,
                double minp, const Params& P, Scratch& s, int64_t* tok_out, float* conf_out) {
  s.x.resize(V);
  float* x = s.x.data();
  const float big = std::numeric_limits<float>::max();
  float mx = -std::numeric_limits<float>::infinity();
  int64_t amax = 0;
  for (int64_t j = 0; j < V; ++j) {
    float v = static_cast<float>(src[j]);
    v = std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
    v = v == std::numeric_limits<float>::infinity() ? big : v;
    x[j] = v;
    if (v > mx) {
      mx = v;
      amax = j;
    }
  }
  if (mx == -std::numeric_limits<float>::infinity()) {  // no finite logit
    *tok_out = 0;
    *conf_out = -std::numeric_limits<float>::infinity();
    return;
  }
  const bool greedy = !(temp > 0.0);
  const double Te = greedy ? 1.0 : temp;
  const double m = static_cast<double>(mx) / Te;
  int64_t tok = amax;
  double conf = 0.0;
  const bool need_dist = !greedy || P.mode == 0 || P.mode == 2 || P.mode == 3;
  if (need_dist) {
    s.w.resize(V);
    double* w = s.w.data();
    for (int64_t j = 0; j < V; ++j) w[j] = std::exp(static_cast<double>(x[j]) / Te - m);
    float thr = -std::numeric_limits<float>::infinity();  // keep x >= thr
    if (P.has_topk && topk > 0 && topk < V) {
      s.sel.assign(x, x + V);
      std::nth_element(s.sel.begin(), s.sel.begin() + (topk - 1), s.sel.end(),
                       std::greater<float>());
      thr = s.sel[topk - 1];
    }
    if (P.has_topp && topp < 1.0) {
      s.c.clear();
      double zk = 0.0;
      for (int64_t j = 0; j < V; ++j) {
        if (x[j] >= thr) {
          s.c.emplace_back(x[j], w[j]);
          zk += w[j];
        }
      }
      thr = top_p_threshold(s.c, topp * zk, mx);
    }
    const double lz = (P.has_minp && minp > 0.0) ? std::log(minp) : -kInf;
    double Z = 0.0, ent = 0.0, sec = -kInf;
    int64_t ntop = 0;
    double best = -kInf, ebest = 0.0;  // running best score and exp(m - best)
    int64_t bidx = amax;
    for (int64_t j = 0; j < V; ++j) {
      if (!(x[j] >= thr)) continue;
      const double z = static_cast<double>(x[j]) / Te;
      if (!(z - m >= lz)) continue;
      const double wj = w[j];
      Z += wj;
      if (P.mode == 3 && wj > 0.0) ent += wj * (z - m);
      if (P.mode == 2) {
        if (x[j] == mx) {
          ++ntop;
        } else {
          sec = std::max(sec, z);
        }
      }
      if (!greedy) {
        const double u = philox_uniform(static_cast<uint32_t>(j), row, P.off, 0, P.k0, P.k1);
        if (best > -kInf) {
          // Beats best only if -log u < c = exp(z - best); since exp(-c) >= 1 - c, u <= 1 - c
          // rules it out. The 1e-9 relative and 1e-12 absolute slack cover rounding.
          const double c = wj * ebest;
          if (u < 1.0 - c * (1.0 + 1e-9) - 1e-12) continue;
        }
        const double score = z - std::log(-std::log(u));
        if (score > best) {
          best = score;
          bidx = j;
          ebest = std::exp(m - best);
        }
      }
    }
    tok = greedy ? amax : bidx;
    if (P.mode == 0) {
      conf = w[tok] / Z;
    } else if (P.mode == 2) {
      const double p1 = 1.0 / Z;
      const double p2 = ntop >= 2 ? p1 : std::exp(sec - m) / Z;
      conf = p1 - p2;
    } else if (P.mode == 3) {
      conf = ent / Z - std::log(Z);
    }
  }
  if (P.mode == 1) {  // untempered, unfiltered softmax (LLaDA low_confidence)
    double zr = 0.0;
    const double dm = static_cast<double>(mx);
    for (int64_t j = 0; j < V; ++j) zr += std::exp(static_cast<double>(x[j]) - dm);
    conf = std::exp(static_cast<double>(x[tok]) - dm) / zr;
  }
  *tok_out = tok;
  *conf_out = static_cast<float>(conf);
}

}  // namespace

std::vector<at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& rows,
                                    const at::Tensor& valid, const at::Tensor& temperature,
                                    const at::Tensor& top_k, const at::Tensor& top_p,
                                    const at::Tensor& min_p, int64_t mode, int64_t seed,
                                    int64_t offset, bool has_topk, bool has_topp,
                                    bool has_minp) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1,
              "sample_rows: logits must be (R, V) with a contiguous last dim");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "sample_rows: logits must be float32, bfloat16 or float16");
  const int64_t R = logits.size(0), V = logits.size(1);
  auto check = [R](const at::Tensor& t, at::ScalarType st, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == R && t.scalar_type() == st && t.is_contiguous(),
                "sample_rows: ", name, " must be a contiguous (", R, ",) ", st, " tensor");
  };
  check(rows, at::kLong, "rows");
  check(valid, at::kBool, "valid");
  check(temperature, at::kDouble, "temperature");
  check(top_k, at::kLong, "top_k");
  check(top_p, at::kDouble, "top_p");
  check(min_p, at::kDouble, "min_p");
  TORCH_CHECK(mode >= 0 && mode <= 4, "sample_rows: mode must be in [0, 4]");
  auto tok = at::empty({R}, logits.options().dtype(at::kLong));
  auto conf = at::empty({R}, logits.options().dtype(at::kFloat));
  Params P;
  P.mode = static_cast<int>(mode);
  P.has_topk = has_topk;
  P.has_topp = has_topp;
  P.has_minp = has_minp;
  P.k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
  P.k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  P.off = static_cast<uint32_t>(static_cast<uint64_t>(offset) & 0xFFFFFFFFu);
  const int64_t* rw = rows.data_ptr<int64_t>();
  const bool* vd = valid.data_ptr<bool>();
  const double* tp = temperature.data_ptr<double>();
  const int64_t* kp = top_k.data_ptr<int64_t>();
  const double* pp = top_p.data_ptr<double>();
  const double* mp = min_p.data_ptr<double>();
  int64_t* to = tok.data_ptr<int64_t>();
  float* co = conf.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_rows",
                                  [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    // One row is V work items or more: a grain of one row keeps both cores busy at 256 rows.
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      Scratch s;
      for (int64_t i = begin; i < end; ++i) {
        if (!vd[i]) {
          to[i] = 0;
          co[i] = -std::numeric_limits<float>::infinity();
          continue;
        }
        sample_row<scalar_t>(base + i * stride, V, static_cast<uint32_t>(rw[i]), tp[i], kp[i],
                             pp[i], mp[i], P, s, to + i, co + i);
      }
    });
  });
  return {tok, conf};
}

at::Tensor philox4x32(const at::Tensor& c0, int64_t c1, int64_t c2, int64_t c3, int64_t seed) {
  TORCH_CHECK(c0.dim() == 1 && c0.scalar_type() == at::kLong, "philox4x32: c0 must be (n,) int64");
  auto src = c0.contiguous();
  const int64_t n = src.size(0);
  auto out = at::empty({n, 4}, src.options());
  const int64_t* in = src.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
  const uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t c[4] = {static_cast<uint32_t>(in[i]), static_cast<uint32_t>(c1),
                     static_cast<uint32_t>(c2), static_cast<uint32_t>(c3)};
    philox10(c, k0, k1);
    for (int q = 0; q < 4; ++q) o[4 * i + q] = c[q];
  }
  return out;
}

}  // namespace dlm
