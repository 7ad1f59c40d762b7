// The per-row draw of one unmasking step on the CPU: filters, Gumbel-max draw, confidence.
//
// Per valid row (rules of reference.sample_tokens_rows, which sorts; nothing here sorts V):
//   1. one pass: sanitise (NaN -> -inf, +inf -> FLT_MAX) into a float buffer, max, argmax.
//   2. weights w_j = exp(x_j / T - max / T) in float64 (only when a filter or the confidence
//      needs the distribution).
//   3. top_k: std::nth_element on a copy (O(V)); top_p: a mass histogram (<= 2048 bins) over the
//      values that survive top_k picks the bin holding the threshold, then a weighted
//      quickselect over that bin's (value, weight) pairs: exact, ties kept together.
//   4. one pass over the kept tokens: normaliser, entropy / second value, and the Gumbel-max
//      draw. A token whose uniform u <= 1 - c (c = exp(z_j - best), so u <= exp(-c)) cannot beat
//      the running best: most tokens skip the two float64 logs and only pay the Philox rounds.
// Rows run in parallel (at::parallel_for); a row's result never depends on the thread count.
#include "unmask_sample.h"

#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

// NaN and inf logits are handled by IEEE semantics here (the greedy max loop skips NaN through
// the operand order of maxps / minps, which -ffast-math lets the compiler swap).
#if defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__
#error "csrc/unmask_sample.cpp needs NaN and inf semantics: build without -ffast-math"
#endif

namespace dlm {

namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr double kInf = std::numeric_limits<double>::infinity();
// Philox streams (counter word 3), as reference.STREAM_*: token draws, the "random" confidence,
// alg_temp's Gumbel-top-k and the ancestral rule's coin flips.
constexpr uint32_t kStreamToken = 0, kStreamAlgTemp = 2, kStreamAncestral = 3;

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
  // (int32 casts: the values fit in 26 bits, and AVX2 converts signed int32 to double)
  const double k = static_cast<double>(static_cast<int32_t>(c[0] >> 6)) * 67108864.0 +
                   static_cast<double>(static_cast<int32_t>(c[1] >> 6));
  return (k + 0.5) * 0x1p-52;
}

// philox_uniform for n columns cols[0..n) (row, off, stream and key shared), into out[0..n).
// With AVX2, eight counters per step in explicit intrinsics: 32 x 32 -> 64-bit products of the
// even and the odd lanes (vpmuludq), their high and low words recombined by blends. gcc's own
// vectorisation of philox_uniform's loop runs 2.6x slower (it widens every lane to 64 bits).
// The words, and so the uniforms, are bit-identical to philox_uniform's.
inline void philox_uniforms(const uint32_t* cols, int64_t n, uint32_t row, uint32_t off,
                            uint32_t stream, uint32_t k0, uint32_t k1, double* out) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256i M0 = _mm256_set1_epi32(static_cast<int>(kM0));
  const __m256i M1 = _mm256_set1_epi32(static_cast<int>(kM1));
  for (; i + 8 <= n; i += 8) {
    __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + i));
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(row));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(off));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(stream));
    uint32_t a0 = k0, a1 = k1;
    for (int r = 0; r < 10; ++r) {
      const __m256i pe0 = _mm256_mul_epu32(c0, M0);
      const __m256i po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), M0);
      const __m256i pe1 = _mm256_mul_epu32(c2, M1);
      const __m256i po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), M1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(a0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(a1)));
      c1 = lo1;
      c3 = lo0;
      a0 += kW0;
      a1 += kW1;
    }
    const __m256i hw = _mm256_srli_epi32(c0, 6), lw = _mm256_srli_epi32(c1, 6);
    for (int h = 0; h < 2; ++h) {
      const __m128i hh = h ? _mm256_extracti128_si256(hw, 1) : _mm256_castsi256_si128(hw);
      const __m128i lh = h ? _mm256_extracti128_si256(lw, 1) : _mm256_castsi256_si128(lw);
      const __m256d k = _mm256_fmadd_pd(_mm256_cvtepi32_pd(hh), _mm256_set1_pd(67108864.0),
                                        _mm256_cvtepi32_pd(lh));
      _mm256_storeu_pd(out + i + 4 * h,
                       _mm256_mul_pd(_mm256_add_pd(k, _mm256_set1_pd(0.5)),
                                     _mm256_set1_pd(0x1p-52)));
    }
  }
#endif
#pragma omp simd
  for (int64_t q = i; q < n; ++q) out[q] = philox_uniform(cols[q], row, off, stream, k0, k1);
}

// exp(x) in float64, branch-free so that gcc vectorises the loops that call it (std::exp does
// not): n = round(x / ln2) by the 1.5 * 2^52 trick (its low bits then hold n, so 2^n is built
// with integer ops AVX2 has), r = x - n ln2 (two-word ln2), a degree-13 Taylor polynomial on
// |r| <= ln2 / 2 (truncation < 1e-17 relative), times 2^n. Within a few ulp of std::exp;
// exp(x < -708) = 0 (and exp(-inf) = 0); the inputs here are always <= 0 (x - max).
inline double exp_d(double x) {
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double xc = x < -708.0 ? -708.0 : x;
  const double t = xc * 1.4426950408889634 + magic;
  const double n = t - magic;
  const double r = (xc - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
  double p = 1.6059043836821613e-10;  // 1/13!
  p = p * r + 2.08767569878681e-09;
  p = p * r + 2.505210838544172e-08;
  p = p * r + 2.755731922398589e-07;
  p = p * r + 2.755731922398589e-06;
  p = p * r + 2.48015873015873e-05;
  p = p * r + 1.984126984126984e-04;
  p = p * r + 1.388888888888889e-03;
  p = p * r + 8.333333333333333e-03;
  p = p * r + 4.166666666666666e-02;
  p = p * r + 1.666666666666667e-01;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  uint64_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const uint64_t bits = (tb + 1023u) << 52;  // low bits of tb: n (two's complement)
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const double out = p * scale;
  return x < -708.0 ? 0.0 : out;
}

struct Params {
  int mode;
  bool has_topk, has_topp, has_minp;
  uint32_t k0, k1, off;
};

struct Scratch {
  std::vector<float> x;                     // sanitised row
  std::vector<double> w;                    // exp(z - max z)
  std::vector<float> sel;                   // top_k's heap or nth_element copy
  std::vector<uint32_t> idx;                // kept token indices
  std::vector<std::pair<float, double>> c;  // (value, weight) for the top-p quickselect
  std::vector<double> hist;                 // mass per value bin (top-p)
  std::vector<int16_t> bin;                 // value bin per token (top-p)
};

// The smallest value v among the pairs with mass(values > v) < target (always <= top).
// `above` is the mass of the values above every pair (those all kept).
float top_p_threshold(std::vector<std::pair<float, double>>& c, double target, float top,
                      double above) {
  float best = top;
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

// The first j in [0, V) with x[j] == v (v is the max of x[0..V), so one exists; V - 1 otherwise).
inline int64_t first_index_of(const float* x, int64_t V, float v) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 wv = _mm512_set1_ps(v);
  for (; j + 16 <= V; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), wv, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(static_cast<unsigned>(hit));
  }
#endif
#if defined(__AVX2__)
  const __m256 vv = _mm256_set1_ps(v);
  for (; j + 8 <= V; j += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), vv, _CMP_EQ_OQ));
    if (hit) return j + __builtin_ctz(static_cast<unsigned>(hit));
  }
#endif
  while (j < V - 1 && x[j] != v) ++j;
  return j;
}

// The greedy pass found a block (x, starting at logit b) whose max bm beats the running max m:
// record bm's first index and rescale the running sums Z = sum exp(x - m) and
// ent = sum exp(x - m) (x - m) from m to bm (online softmax).
inline void raise_max(const float* x, int64_t n, int64_t b, float bm, float* m, int64_t* amax,
                      double* Z, double* ent) {
  *amax = b + first_index_of(x, n, bm);
  if (*Z > 0.0) {
    const double dm = static_cast<double>(*m) - static_cast<double>(bm);
    const double r = std::exp(dm);
    *ent = r * (*ent + dm * *Z);
    *Z *= r;
  }
  *m = bm;
}

// The greedy confidence from the pass's sums: mode 0 "prob" p1 = 1 / Z, 2 "margin" p1 - p2 =
// (1 - exp(sec - m)) / Z (0 when the max occurs twice), 3 "neg_entropy" ent / Z - log Z.
inline float greedy_conf(int mode, float m, float sec, double Z, double ent) {
  if (mode == 2)
    return static_cast<float>(
        sec == m ? 0.0 : (1.0 - std::exp(static_cast<double>(sec) - static_cast<double>(m))) / Z);
  return static_cast<float>(mode == 0 ? 1.0 / Z : ent / Z - std::log(Z));
}

#if defined(__AVX2__) && defined(__FMA__)
// The constants of exp8 / exp16 below (the 2^r polynomial highest power first): one set for
// both widths, so that they give the same bits per lane.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
constexpr float kExp2Poly[6] = {1.33079e-3f, 9.67156e-3f, 5.550585e-2f, 2.4022241e-1f,
                                6.9314709e-1f, 1.0f};

// Explicit AVX2 for the greedy pass: gcc's vectorisation of the scalar loop below ran at ~16
// cycles per 8 logits; these run at ~5, and the next block is prefetched while the exps of this
// one are computed, so the pass runs near the speed of reading the logits once.
inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

inline float hmax8(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}

// exp(d) for d in [-86, 0] (the caller clamps) as 2^y, y = d log2 e: n = round(y) by the
// 1.5 * 2^23 trick (whose low mantissa bits, shifted, are also n's exponent bits), r = y - n in
// one FMA, 2^r by a degree-5 polynomial fitted for relative error on [-1/2, 1/2] (1.04e-7, under
// float32's 2^-23), then n added into the exponent bits. exp(0) = 1 exactly.
inline __m256 exp8(__m256 d) {
  const __m256 l2e = _mm256_set1_ps(kLog2e);
  const __m256 magic = _mm256_set1_ps(kRoundMagic);
  const __m256 nm = _mm256_fmadd_ps(d, l2e, magic);
  const __m256 r = _mm256_fmsub_ps(d, l2e, _mm256_sub_ps(nm, magic));
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(nm), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

// Top two of (m1, s1) and (m2, s2), each a largest value and the next one with multiplicity
// (the second equals the first when the first occurs twice).
inline void merge_top2(__m256 m1, __m256 s1, __m256 m2, __m256 s2, __m256* m, __m256* s) {
  *m = _mm256_max_ps(m1, m2);
  *s = _mm256_max_ps(_mm256_min_ps(m1, m2), _mm256_max_ps(s1, s2));
}

#if defined(__AVX512F__)
// The same two block passes with 16 lanes where the build machine has AVX-512 (-march=native):
// half the instructions per logit for the exp pass, which bounds the greedy step. exp16 is
// exp8 lane for lane (the same operations, so the same bits per element); only the order of
// the float32 block sums differs (2 x 16 lanes instead of 4 x 8).
inline __m512 exp16(__m512 d) {
  const __m512 l2e = _mm512_set1_ps(kLog2e);
  const __m512 magic = _mm512_set1_ps(kRoundMagic);
  const __m512 nm = _mm512_fmadd_ps(d, l2e, magic);
  const __m512 r = _mm512_fmsub_ps(d, l2e, _mm512_sub_ps(nm, magic));
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2Poly[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_castps_si512(nm), 23);
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}

// See the AVX2 block_max32 below: max (and with kTop2 the second value with multiplicity) of
// x[0..n), n a multiple of 32, NaN elements skipped.
template <bool kTop2>
inline void block_max32(const float* x, int64_t n, float* out, float* sec) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf, s0 = ninf, s1 = ninf;
  for (int64_t j = 0; j < n; j += 32) {
    const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
    if (kTop2) {
      s0 = _mm512_max_ps(_mm512_min_ps(m0, a), s0);
      s1 = _mm512_max_ps(_mm512_min_ps(m1, b), s1);
    }
    m0 = _mm512_max_ps(a, m0);
    m1 = _mm512_max_ps(b, m1);
  }
  if (kTop2) {
    // Top two with multiplicity of the 32 lanes, merged in scalar code as the AVX2 path does.
    alignas(64) float ml[32], sl[32];
    _mm512_store_ps(ml, m0);
    _mm512_store_ps(ml + 16, m1);
    _mm512_store_ps(sl, s0);
    _mm512_store_ps(sl + 16, s1);
    float bm = ml[0], bs = sl[0];
    for (int q = 1; q < 32; ++q) {
      bs = std::max(std::min(bm, ml[q]), std::max(bs, sl[q]));
      bm = std::max(bm, ml[q]);
    }
    *out = bm;
    *sec = bs;
  } else {
    *out = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  }
}

// See the AVX2 block_exp_sums32 below: sum_j exp(d_j) (and sum_j exp(d_j) d_j if kEnt),
// d_j = max(x_j - m, -86), over x[0..n), n a multiple of 32, prefetching the next block.
template <bool kEnt>
inline void block_exp_sums32(const float* x, int64_t n, float m, const char* pf, int64_t pf_bytes,
                             float* z_out, float* e_out) {
  const __m512 mv = _mm512_set1_ps(m);
  const __m512 lo = _mm512_set1_ps(-86.0f);
  __m512 z[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512 e[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  const int64_t pf_step = pf_bytes / (n / 32);  // bytes of the next block per iteration
  for (int64_t j = 0, k = 0; j < n; j += 32, k += pf_step) {
    if (pf != nullptr) {
      for (int64_t b = 0; b < pf_step; b += 64) _mm_prefetch(pf + k + b, _MM_HINT_T0);
    }
    for (int q = 0; q < 2; ++q) {
      const __m512 dx = _mm512_sub_ps(_mm512_loadu_ps(x + j + 16 * q), mv);
      const __m512 d = _mm512_max_ps(dx, lo);
      __m512 w = exp16(d);
      // Exact zeros below the clamp for the entropy (see the AVX2 version).
      if (kEnt) w = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(dx, lo, _CMP_GE_OQ), w);
      z[q] = _mm512_add_ps(z[q], w);
      if (kEnt) e[q] = _mm512_fmadd_ps(w, d, e[q]);
    }
  }
  *z_out = _mm512_reduce_add_ps(_mm512_add_ps(z[0], z[1]));
  *e_out = kEnt ? _mm512_reduce_add_ps(_mm512_add_ps(e[0], e[1])) : 0.0f;
}
#else
// Max of x[0..n) (n a multiple of 32), NaN elements skipped. With kTop2, *sec gets the second
// value with multiplicity (the max again if it occurs twice): per lane s = max(s, min(m, x))
// before m = max(m, x), two more instructions per vector. NaN: (v)maxps / minps return their
// second operand when either is NaN, so m = max(x, m) keeps m, and min(m, x) hands the NaN to
// s = max(NaN, s), which keeps s: a NaN logit counts as -inf, as in the general path, with no
// NaN check in the loop (the exp pass then clamps its x - m, NaN too, to -86: weight ~0).
template <bool kTop2>
inline void block_max32(const float* x, int64_t n, float* out, float* sec) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m[4] = {ninf, ninf, ninf, ninf}, s[4] = {ninf, ninf, ninf, ninf};
  for (int64_t j = 0; j < n; j += 32) {
    const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
    const __m256 c = _mm256_loadu_ps(x + j + 16), d = _mm256_loadu_ps(x + j + 24);
    if (kTop2) {
      s[0] = _mm256_max_ps(_mm256_min_ps(m[0], a), s[0]);
      s[1] = _mm256_max_ps(_mm256_min_ps(m[1], b), s[1]);
      s[2] = _mm256_max_ps(_mm256_min_ps(m[2], c), s[2]);
      s[3] = _mm256_max_ps(_mm256_min_ps(m[3], d), s[3]);
    }
    m[0] = _mm256_max_ps(a, m[0]);
    m[1] = _mm256_max_ps(b, m[1]);
    m[2] = _mm256_max_ps(c, m[2]);
    m[3] = _mm256_max_ps(d, m[3]);
  }
  if (kTop2) {
    __m256 m01, s01, m23, s23, mv, sv;
    merge_top2(m[0], s[0], m[1], s[1], &m01, &s01);
    merge_top2(m[2], s[2], m[3], s[3], &m23, &s23);
    merge_top2(m01, s01, m23, s23, &mv, &sv);
    alignas(32) float ml[8], sl[8];
    _mm256_store_ps(ml, mv);
    _mm256_store_ps(sl, sv);
    float bm = ml[0], bs = sl[0];
    for (int q = 1; q < 8; ++q) {
      bs = std::max(std::min(bm, ml[q]), std::max(bs, sl[q]));
      bm = std::max(bm, ml[q]);
    }
    *out = bm;
    *sec = bs;
  } else {
    *out = hmax8(_mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
  }
}

// sum_j exp(d_j) and sum_j exp(d_j) d_j (the latter only if kEnt), d_j = max(x_j - m, -86), over
// x[0..n) (n a multiple of 32). pf/pf_bytes: the next block, prefetched meanwhile.
template <bool kEnt>
inline void block_exp_sums32(const float* x, int64_t n, float m, const char* pf, int64_t pf_bytes,
                             float* z_out, float* e_out) {
  const __m256 mv = _mm256_set1_ps(m);
  const __m256 lo = _mm256_set1_ps(-86.0f);
  __m256 z[4], e[4];
  for (int q = 0; q < 4; ++q) z[q] = e[q] = _mm256_setzero_ps();
  const int64_t pf_step = pf_bytes / (n / 32);  // bytes of the next block per iteration
  for (int64_t j = 0, k = 0; j < n; j += 32, k += pf_step) {
    if (pf != nullptr) {
      for (int64_t b = 0; b < pf_step; b += 64) _mm_prefetch(pf + k + b, _MM_HINT_T0);
    }
    for (int q = 0; q < 4; ++q) {
      const __m256 dx = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8 * q), mv);
      const __m256 d = _mm256_max_ps(dx, lo);
      __m256 w = exp8(d);
      // The entropy needs exact zeros below the clamp (a one-hot row has entropy 0, not
      // -86 e^-86 per -inf logit); the normaliser Z >= 1 cannot see weights of e^-86.
      if (kEnt) w = _mm256_and_ps(w, _mm256_cmp_ps(dx, lo, _CMP_GE_OQ));
      z[q] = _mm256_add_ps(z[q], w);
      if (kEnt) e[q] = _mm256_fmadd_ps(w, d, e[q]);
    }
  }
  *z_out = hsum8(_mm256_add_ps(_mm256_add_ps(z[0], z[1]), _mm256_add_ps(z[2], z[3])));
  *e_out = kEnt ? hsum8(_mm256_add_ps(_mm256_add_ps(e[0], e[1]), _mm256_add_ps(e[2], e[3])))
                : 0.0f;
}
#endif  // __AVX512F__

// The common greedy step (T = 0, no filter, confidence "prob", "margin" or "neg_entropy"; the
// caller maps "raw_prob" to "prob") in one pass over the row, by blocks of kGBlk logits (float
// rows are read in place, others are converted into an L1-resident buffer): the block's max (and
// for margin its second value; NaN counts as -inf), then its sums of w = exp(x - m) and w (x - m)
// relative to the running max m (online softmax: the running sums are rescaled when the max
// grows). float lanes inside a block, double across blocks; the confidence is a float32
// output. x - m is clamped at -86: in Z a weight of 4e-38 instead of 0 (nothing next to the
// max's 1), in the entropy sums an exact 0. A ragged end is padded with -inf. Returns false,
// having written nothing, if the row holds +inf or nothing but -inf and NaN: the general path
// sanitises those.
template <typename T>
bool greedy_row(const T* src, int64_t V, int mode, int64_t* tok_out, float* conf_out) {
  constexpr int64_t kGBlk = 2048;
  constexpr bool kInPlace = std::is_same<T, float>::value;
  alignas(32) float buf[kGBlk];
  const float ninf = -std::numeric_limits<float>::infinity();
  float m = ninf, sec = ninf;  // the running max and second value (with multiplicity)
  int64_t amax = 0;
  double Z = 0.0, ent = 0.0;  // sum w and sum w (x - m), w = exp(x - m), m the running max
  for (int64_t b = 0; b < V; b += kGBlk) {
    const int64_t n = b + kGBlk < V ? kGBlk : V - b;
    const int64_t n32 = (n + 31) & ~int64_t(31);
    const float* x;
    if (kInPlace && n == n32) {
      x = reinterpret_cast<const float*>(src + b);
    } else {
      for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(src[b + j]);
      for (int64_t j = n; j < n32; ++j) buf[j] = ninf;
      x = buf;
    }
    float bm, bs = ninf;
    if (mode == 2) {
      block_max32<true>(x, n32, &bm, &bs);
    } else {
      block_max32<false>(x, n32, &bm, nullptr);
    }
    if (bm == -ninf) return false;  // +inf: the general path sanitises it
    if (mode == 2) sec = std::max(std::min(m, bm), std::max(sec, bs));
    if (bm > m) raise_max(x, n32, b, bm, &m, &amax, &Z, &ent);
    if (m == ninf) continue;  // every logit so far is -inf: nothing to add
    const int64_t next = b + kGBlk < V ? std::min(kGBlk, V - b - kGBlk) : 0;
    const char* pf = next > 0 ? reinterpret_cast<const char*>(src + b + kGBlk) : nullptr;
    float zb, eb;
    if (mode == 3) {
      block_exp_sums32<true>(x, n32, m, pf, next * static_cast<int64_t>(sizeof(T)), &zb, &eb);
    } else {
      block_exp_sums32<false>(x, n32, m, pf, next * static_cast<int64_t>(sizeof(T)), &zb, &eb);
    }
    Z += zb;
    ent += eb;
  }
  if (m == ninf) return false;
  *tok_out = amax;
  *conf_out = greedy_conf(mode, m, sec, Z, ent);
  return true;
}
// sum_j exp(x_j - m) over a sanitised float row (x_j <= m, -inf allowed): float exps (relative
// error ~1e-7) summed in float within blocks of 2048, in double across them.
inline double exp_sum(const float* x, int64_t V, float m) {
  constexpr int64_t kBlk = 2048;
  const int64_t n32 = V & ~int64_t(31);
  double Z = 0.0;
  for (int64_t b = 0; b < n32; b += kBlk) {
    float zb, eb;
    block_exp_sums32<false>(x + b, std::min(kBlk, n32 - b), m, nullptr, 0, &zb, &eb);
    Z += zb;
  }
  float zt = 0.0f;
  for (int64_t j = n32; j < V; ++j) zt += exp_nonpos(x[j] - m);
  return Z + zt;
}
#else
// The common greedy step (T = 0, no filter, confidence "prob", "margin" or "neg_entropy"; the
// caller maps "raw_prob" to "prob") in one pass over the row: blocks of kGBlk elements are
// converted into an L1-resident buffer, then max and argmax of the block (for margin also its
// second value, with multiplicity) and the block's exp sum relative to the running max (online
// softmax: the running sums are rescaled when the max grows). float exp (~2 ulp) inside a
// block, double across blocks: the confidence is a float32 output. Returns false, having
// written nothing, if the row holds a NaN or an inf: the general path sanitises those.
template <typename T>
bool greedy_row(const T* src, int64_t V, int mode, int64_t* tok_out, float* conf_out) {
  constexpr int64_t kGBlk = 1024;
  float buf[kGBlk];
  const float ninf = -std::numeric_limits<float>::infinity();
  float m = ninf, sec = ninf;  // the running max and second value (with multiplicity)
  int64_t amax = 0;
  double Z = 0.0, ent = 0.0;  // sum w and sum w (x - m), w = exp(x - m), m the running max
  for (int64_t b = 0; b < V; b += kGBlk) {
    const int64_t n = b + kGBlk < V ? kGBlk : V - b;
    float bm = ninf;
    int bad = 0;
#pragma omp simd reduction(max : bm) reduction(| : bad)
    for (int64_t j = 0; j < n; ++j) {
      const float v = static_cast<float>(src[b + j]);
      buf[j] = v;
      bad |= !(v - v == 0.0f);  // NaN or +-inf
      bm = v > bm ? v : bm;
    }
    if (bad) return false;
    if (mode == 2) {
      float bs = ninf;
      int ntop = 0;
#pragma omp simd reduction(max : bs) reduction(+ : ntop)
      for (int64_t j = 0; j < n; ++j) {
        const float v = buf[j];
        ntop += v == bm;
        bs = v != bm && v > bs ? v : bs;
      }
      if (ntop >= 2) bs = bm;
      sec = std::max(std::min(m, bm), std::max(sec, bs));
    }
    if (bm > m) raise_max(buf, n, b, bm, &m, &amax, &Z, &ent);
    float zb = 0.0f, eb = 0.0f;
    if (mode == 3) {
#pragma omp simd reduction(+ : zb, eb)
      for (int64_t j = 0; j < n; ++j) {
        const float d = buf[j] - m;
        const float wj = exp_nonpos(d);
        zb += wj;
        eb += wj * (wj > 0.0f ? d : 0.0f);  // 0 log 0 = 0
      }
    } else {
#pragma omp simd reduction(+ : zb)
      for (int64_t j = 0; j < n; ++j) zb += exp_nonpos(buf[j] - m);
    }
    Z += zb;
    ent += eb;
  }
  *tok_out = amax;
  *conf_out = greedy_conf(mode, m, sec, Z, ent);
  return true;
}
// sum_j exp(x_j - m) over a sanitised float row (x_j <= m, -inf allowed): float exps summed in
// float within blocks of 1024, in double across them.
inline double exp_sum(const float* x, int64_t V, float m) {
  double Z = 0.0;
  for (int64_t b = 0; b < V; b += 1024) {
    const int64_t e = std::min<int64_t>(b + 1024, V);
    float zb = 0.0f;
#pragma omp simd reduction(+ : zb)
    for (int64_t j = b; j < e; ++j) zb += exp_nonpos(x[j] - m);
    Z += zb;
  }
  return Z;
}
#endif

#if defined(__AVX2__)
// For each 8-bit mask, the positions of its set bits, lowest first (the left-pack table).
struct PackTable {
  alignas(32) uint32_t pos[256][8];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int b = 0; b < 8; ++b)
        if (m >> b & 1) pos[m][n++] = static_cast<uint32_t>(b);
      for (; n < 8; ++n) pos[m][n] = 0;
    }
  }
};
const PackTable kPack;
#endif

// idx[0..n) = the j in [0, V) with x[j] >= thr, ascending; returns n. idx has room for V + 8
// entries (the vector path stores 8 at a time).
inline int64_t compact_ge(const float* x, int64_t V, float thr, uint32_t* idx) {
  int64_t nk = 0, j = 0;
#if defined(__AVX2__)
  const __m256 tv = _mm256_set1_ps(thr);
  for (; j + 8 <= V; j += 8) {
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), tv, _CMP_GE_OQ));
    const __m256i p = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.pos[m]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + nk),
                        _mm256_add_epi32(p, _mm256_set1_epi32(static_cast<int>(j))));
    nk += __builtin_popcount(static_cast<unsigned>(m));
  }
#endif
  for (; j < V; ++j) {
    idx[nk] = static_cast<uint32_t>(j);
    nk += x[j] >= thr;
  }
  return nk;
}

// Appends (x[j], w[j]) for every j with bin[j] == b, ascending.
inline void collect_bin(const int16_t* bin, const float* x, const double* w, int64_t V,
                        int16_t b, std::vector<std::pair<float, double>>& out) {
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256i bv = _mm256_set1_epi16(b);
  for (; j + 16 <= V; j += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bin + j));
    // two mask bits per 16-bit lane: keep the low one of each pair
    unsigned m = static_cast<unsigned>(_mm256_movemask_epi8(_mm256_cmpeq_epi16(v, bv))) &
                 0x55555555u;
    while (m) {
      const int64_t q = j + (__builtin_ctz(m) >> 1);
      out.emplace_back(x[q], w[q]);
      m &= m - 1;
    }
  }
#endif
  for (; j < V; ++j)
    if (bin[j] == b) out.emplace_back(x[j], w[j]);
}

// The k-th largest of x[0..V), duplicates counted (1 <= k < V; x holds no NaN). Small k (the
// usual top_k): a min-heap of the k largest so far, fed only by values above its top, which
// an 8-wide compare rules out for almost every vector; a few hundred pushes per row instead of
// nth_element's passes over a copy of the row. Large k: nth_element. `buf` is scratch.
inline float kth_largest(const float* x, int64_t V, int64_t k, std::vector<float>& buf) {
  if (k > 1024 || k * 16 > V) {
    buf.assign(x, x + V);
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
    return buf[k - 1];
  }
  buf.assign(x, x + k);
  std::make_heap(buf.begin(), buf.end(), std::greater<float>());  // min at the front
  float top = buf.front();
  auto push = [&](float v) {
    std::pop_heap(buf.begin(), buf.end(), std::greater<float>());
    buf.back() = v;
    std::push_heap(buf.begin(), buf.end(), std::greater<float>());
    top = buf.front();
  };
  int64_t j = k;
#if defined(__AVX2__)
  for (; j + 8 <= V; j += 8) {
    const __m256 xv = _mm256_loadu_ps(x + j);
    unsigned m = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(xv, _mm256_set1_ps(top), _CMP_GT_OQ)));
    while (m) {
      const float v = x[j + __builtin_ctz(m)];
      if (v > top) push(v);
      m &= m - 1;
    }
  }
#endif
  for (; j < V; ++j)
    if (x[j] > top) push(x[j]);
  return top;
}

template <typename T>
void sample_row(const T* src, int64_t V, uint32_t row, double temp, int64_t topk, double topp,
                double minp, const Params& P, Scratch& s, int64_t* tok_out, float* conf_out) {
  const bool greedy = !(temp > 0.0);
  const bool any_filter = (P.has_topk && topk > 0 && topk < V) || (P.has_topp && topp < 1.0) ||
                          (P.has_minp && minp > 0.0);
  // At T = 0 the token is the row's argmax whatever the filters (they keep the max), so
  // "raw_prob" (the unfiltered softmax's) is the unfiltered "prob": one greedy pass.
  if (greedy && P.mode == 1 && greedy_row(src, V, 0, tok_out, conf_out)) return;
  if (greedy && !any_filter && (P.mode == 0 || P.mode == 2 || P.mode == 3) &&
      greedy_row(src, V, P.mode, tok_out, conf_out))
    return;
  s.x.resize(V);
  float* x = s.x.data();
  const float big = std::numeric_limits<float>::max();
  // Sanitise + max as one branch-free loop (vectorises), then the first index of the max
  // (ties to the lowest index): two passes beat one scalar argmax loop with a branch.
  const float ninf = -std::numeric_limits<float>::infinity();
  float mx = ninf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < V; ++j) {
    float v = static_cast<float>(src[j]);
    v = v != v ? ninf : v;
    v = v == std::numeric_limits<float>::infinity() ? big : v;
    x[j] = v;
    mx = v > mx ? v : mx;
  }
  const int64_t amax = first_index_of(x, V, mx);
  if (mx == -std::numeric_limits<float>::infinity()) {  // no finite logit
    *tok_out = 0;
    *conf_out = -std::numeric_limits<float>::infinity();
    return;
  }
  const double Te = greedy ? 1.0 : temp;
  const double m = static_cast<double>(mx) / Te;
  int64_t tok = amax;
  double conf = 0.0;
  if (greedy && !any_filter && (P.mode == 0 || P.mode == 3)) {
    // The common greedy step: the softmax at T = 1 of the whole row, one vectorised pass.
    // float exp (~2 ulp) inside blocks of 1024, double across blocks: the confidence is a
    // float32 output, and the float path runs ~2x the lanes of exp in double.
    double Z = 0.0, ent = 0.0;
    const float mf = mx;
    for (int64_t b = 0; b < V; b += 1024) {
      const int64_t e = b + 1024 < V ? b + 1024 : V;
      float zb = 0.0f, eb = 0.0f;
#pragma omp simd reduction(+ : zb, eb)
      for (int64_t j = b; j < e; ++j) {
        const float d = x[j] - mf;
        const float wj = fast_exp(d);
        zb += wj;
        eb += wj * (wj > 0.0f ? d : 0.0f);  // 0 log 0 = 0
      }
      Z += zb;
      ent += eb;
    }
    *tok_out = amax;
    *conf_out = static_cast<float>(P.mode == 0 ? 1.0 / Z : ent / Z - std::log(Z));
    return;
  }
  const bool need_dist = !greedy || P.mode == 0 || P.mode == 2 || P.mode == 3;
  if (need_dist) {
    s.w.resize(V);
    double* w = s.w.data();
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) w[j] = exp_d(static_cast<double>(x[j]) / Te - m);
    float thr = -std::numeric_limits<float>::infinity();  // keep x >= thr
    if (P.has_topk && topk > 0 && topk < V) {
      thr = kth_largest(x, V, topk, s.sel);
    }
    if (P.has_topp && topp < 1.0) {
      // A histogram of the mass over kBins value bins (one pass, no data-dependent branches)
      // finds the bin that holds the threshold: every bin above it is kept, every bin below it
      // dropped. The exact quickselect then runs on that one bin's tokens.
      // 2048 bins at real vocabularies; fewer for small ones, where clearing and scanning
      // 2048 bins per row would cost more than the row itself.
      const int kBins = static_cast<int>(std::min<int64_t>(2048, std::max<int64_t>(16, V / 8)));
      const float ninf = -std::numeric_limits<float>::infinity();
      // The kept mass and the lowest finite kept value, as vectorised reductions.
      double zk = 0.0;
      float lo = mx;
#pragma omp simd reduction(+ : zk) reduction(min : lo)
      for (int64_t j = 0; j < V; ++j) {
        const bool kept = x[j] >= thr;
        zk += kept ? w[j] : 0.0;
        const float v = kept && x[j] > ninf ? x[j] : mx;
        lo = v < lo ? v : lo;
      }
      const double target = topp * zk;
      int bs = kBins - 1;
      double above = 0.0;
      s.c.clear();
      if (lo < mx) {
        // Each kept token's bin, monotone in its value (-inf and lo in bin 0; -1: dropped by
        // top_k), computed once in a vectorised loop; then the histogram, the bin holding the
        // threshold, and that bin's tokens.
        const double scale = (kBins - 1) / (static_cast<double>(mx) - static_cast<double>(lo));
        const double dlo = static_cast<double>(lo);
        s.bin.resize(V);
        int16_t* bin = s.bin.data();
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) {
          double bf = (static_cast<double>(x[j]) - dlo) * scale;
          bf = bf < kBins - 1 ? bf : kBins - 1;
          bf = bf > 0.0 ? bf : 0.0;  // also -inf (and NaN, which x never holds) to 0
          const int16_t bi = static_cast<int16_t>(static_cast<int32_t>(bf));
          bin[j] = x[j] >= thr ? bi : static_cast<int16_t>(-1);
        }
        s.hist.assign(kBins, 0.0);
        double* hist = s.hist.data();
        for (int64_t j = 0; j < V; ++j)
          if (bin[j] >= 0) hist[bin[j]] += w[j];
        double A = 0.0;  // mass of the bins above b
        for (int b = kBins - 1; b >= 0; --b) {
          if (!(A < target)) break;
          bs = b;
          above = A;
          A += hist[b];
        }
        collect_bin(bin, x, w, V, static_cast<int16_t>(bs), s.c);
      } else {
        for (int64_t j = 0; j < V; ++j)
          if (x[j] >= thr) s.c.emplace_back(x[j], w[j]);
      }
      thr = top_p_threshold(s.c, target, mx, above);
    }
    const double lz = (P.has_minp && minp > 0.0) ? std::log(minp) : -kInf;
    double Z = 0.0, ent = 0.0, sec = -kInf;
    int64_t ntop = 0;
    double best = -kInf, ebest = 0.0;  // running best score and exp(m - best)
    int64_t bidx = amax;
    constexpr int64_t kBlk = 256;
    // The kept tokens in ascending order, by a branch-free compaction: the Philox rounds (the
    // bulk of a sampled row's cost) then run for kept tokens only, a tenth of the row under a
    // typical top_p. The order of the sums and of the draw is that of a scan over j.
    s.idx.resize(V + 8);
    uint32_t* idx = s.idx.data();
    int64_t nk = 0;
    if (lz == -kInf) {
      nk = compact_ge(x, V, thr, idx);
    } else {
      for (int64_t j = 0; j < V; ++j) {
        idx[nk] = static_cast<uint32_t>(j);
        nk += (x[j] >= thr) & (static_cast<double>(x[j]) / Te - m >= lz);
      }
    }
    // The kept tokens' statistics as vectorised reductions over the row (a scalar loop over the
    // kept list is bound by the latency of its float64 adds).
    const bool use_z = lz != -kInf || P.mode == 2 || P.mode == 3;
    if (!use_z) {
#pragma omp simd reduction(+ : Z)
      for (int64_t j = 0; j < V; ++j) Z += x[j] >= thr ? w[j] : 0.0;
    } else {
#pragma omp simd reduction(+ : Z, ent, ntop) reduction(max : sec)
      for (int64_t j = 0; j < V; ++j) {
        const double z = static_cast<double>(x[j]) / Te;
        const bool kept = (x[j] >= thr) & (z - m >= lz);
        const double wj = kept ? w[j] : 0.0;
        Z += wj;
        ent += wj > 0.0 ? wj * (z - m) : 0.0;
        ntop += kept & (x[j] == mx);
        sec = kept & (x[j] != mx) & (z > sec) ? z : sec;
      }
    }
    if (!greedy) {
      double ub[kBlk];
      unsigned char cand[kBlk];
      for (int64_t b = 0; b < nk; b += kBlk) {
        const int64_t n = std::min<int64_t>(kBlk, nk - b);
        // the block's uniforms
        philox_uniforms(idx + b, n, row, P.off, kStreamToken, P.k0, P.k1, ub);
        // A token beats the best only if -log u < c = exp(z - best); since exp(-c) >= 1 - c,
        // u <= 1 - c rules it out (the 1e-9 relative and 1e-12 absolute slack cover rounding).
        // The test runs vectorised over the block with the best as of the block's start, then
        // again, exactly, for the few tokens that pass it: the best only grows, so a token the
        // first test rules out is ruled out by the second too.
        const double e0 = best > -kInf ? ebest : kInf;
#pragma omp simd
        for (int64_t q = 0; q < n; ++q)
          cand[q] = !(ub[q] < 1.0 - w[idx[b + q]] * e0 * (1.0 + 1e-9) - 1e-12);
        for (int64_t q = 0; q < n; ++q) {
          if (!cand[q]) continue;
          const int64_t j = idx[b + q];
          const double u = ub[q];
          if (best > -kInf) {
            const double c = w[j] * ebest;
            if (u < 1.0 - c * (1.0 + 1e-9) - 1e-12) continue;
          }
          const double score = static_cast<double>(x[j]) / Te - std::log(-std::log(u));
          if (score > best) {
            best = score;
            bidx = j;
            ebest = std::exp(m - best);
          }
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
    // float exps as on the greedy path (a float64 exp pass cost as much as the draw itself)
    conf = std::exp(static_cast<double>(x[tok]) - static_cast<double>(mx)) / exp_sum(x, V, mx);
  }
  *tok_out = tok;
  *conf_out = static_cast<float>(conf);
}

}  // namespace

std::vector<at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& rows,
                                    const at::Tensor& valid, const at::Tensor& temperature,
                                    const at::Tensor& top_k, const at::Tensor& top_p,
                                    const at::Tensor& min_p, int64_t mode, int64_t seed,
                                    int64_t offset, const c10::optional<at::Tensor>& seeds,
                                    const c10::optional<at::Tensor>& offsets, bool has_topk,
                                    bool has_topp, bool has_minp) {
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
  // A filter that is off is never read: its tensor may be a placeholder of any size.
  if (has_topk) check(top_k, at::kLong, "top_k");
  if (has_topp) check(top_p, at::kDouble, "top_p");
  if (has_minp) check(min_p, at::kDouble, "min_p");
  // Per-row Philox keys (a batch of rows that each carry their own seed and step count).
  TORCH_CHECK(seeds.has_value() == offsets.has_value(),
              "sample_rows: give both seeds and offsets or neither");
  if (seeds.has_value()) {
    check(*seeds, at::kLong, "seeds");
    check(*offsets, at::kLong, "offsets");
  }
  const int64_t* sd = seeds.has_value() ? seeds->data_ptr<int64_t>() : nullptr;
  const int64_t* od = offsets.has_value() ? offsets->data_ptr<int64_t>() : nullptr;
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
  const int64_t* kp = has_topk ? top_k.data_ptr<int64_t>() : nullptr;
  const double* pp = has_topp ? top_p.data_ptr<double>() : nullptr;
  const double* mp = has_minp ? min_p.data_ptr<double>() : nullptr;
  int64_t* to = tok.data_ptr<int64_t>();
  float* co = conf.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_rows",
                                  [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    // One row is V work items or more: a grain of one row keeps both cores busy at 256 rows
    // of a real vocabulary; small vocabularies take rows in chunks of >= 32k logits so that a
    // step over a few rows does not open a parallel region for microseconds of work.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      Scratch s;
      Params Q = P;
      for (int64_t i = begin; i < end; ++i) {
        if (!vd[i]) {
          to[i] = 0;
          co[i] = -std::numeric_limits<float>::infinity();
          continue;
        }
        if (sd != nullptr) {
          Q.k0 = static_cast<uint32_t>(static_cast<uint64_t>(sd[i]) & 0xFFFFFFFFu);
          Q.k1 = static_cast<uint32_t>(static_cast<uint64_t>(sd[i]) >> 32);
          Q.off = static_cast<uint32_t>(static_cast<uint64_t>(od[i]) & 0xFFFFFFFFu);
        }
        sample_row<scalar_t>(base + i * stride, V, static_cast<uint32_t>(rw[i]), tp[i],
                             kp != nullptr ? kp[i] : 0, pp != nullptr ? pp[i] : 1.0,
                             mp != nullptr ? mp[i] : 0.0, Q, s, to + i, co + i);
      }
    });
  });
  return {tok, conf};
}

const char* simd_path() {
#if defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

bool built_for_native() {
#if defined(DLM_KERNELS_MARCH_NATIVE)
  return true;
#else
  return false;
#endif
}

std::vector<at::Tensor> commit_rows(const at::Tensor& x, const at::Tensor& tok,
                                    const at::Tensor& conf, const at::Tensor& cand, int64_t rule,
                                    const c10::optional<at::Tensor>& num_transfer,
                                    const c10::optional<at::Tensor>& threshold, double factor,
                                    double alg_temp, const c10::optional<at::Tensor>& theta,
                                    int64_t seed, int64_t offset,
                                    const c10::optional<at::Tensor>& seeds,
                                    const c10::optional<at::Tensor>& offsets,
                                    const c10::optional<at::Tensor>& left_pad,
                                    const c10::optional<at::Tensor>& pos) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kLong && x.is_contiguous(),
              "commit_rows: x must be a contiguous (B, L) int64 tensor");
  const int64_t B = x.size(0), L = x.size(1);
  auto check2 = [B, L](const at::Tensor& t, at::ScalarType st, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == L && t.scalar_type() == st &&
                    t.is_contiguous(),
                "commit_rows: ", name, " must be a contiguous (", B, ", ", L, ") ", st, " tensor");
  };
  // Data pointers of the optional (B,) arguments; given-ness is read from has_value(), since an
  // empty tensor's pointer may be null.
  auto check1 = [B](const c10::optional<at::Tensor>& t, at::ScalarType st,
                    const char* name) -> const void* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == st && t->is_contiguous(),
                "commit_rows: ", name, " must be a contiguous (", B, ",) ", st, " tensor");
    return t->data_ptr();
  };
  check2(cand, at::kBool, "cand");
  // With pos (M,): tok and conf are (M,), the draws at flat positions pos (b * L + l); every
  // other position gets confidence -inf (it is never a candidate: the caller draws at all of
  // them) and keeps its token. Without pos they are (B, L).
  std::vector<int64_t> tok_full;
  std::vector<float> conf_full;
  if (pos.has_value()) {
    const int64_t M = pos->numel();
    TORCH_CHECK(pos->dim() == 1 && pos->scalar_type() == at::kLong && pos->is_contiguous(),
                "commit_rows: pos must be a contiguous (M,) int64 tensor");
    auto check_m = [M](const at::Tensor& t, at::ScalarType st, const char* name) {
      TORCH_CHECK(t.dim() == 1 && t.size(0) == M && t.scalar_type() == st && t.is_contiguous(),
                  "commit_rows: with pos, ", name, " must be a contiguous (", M, ",) ", st,
                  " tensor");
    };
    check_m(tok, at::kLong, "tok");
    check_m(conf, at::kFloat, "conf");
    const int64_t* pp = pos->data_ptr<int64_t>();
    const int64_t* tp = tok.data_ptr<int64_t>();
    const float* fp = conf.data_ptr<float>();
    tok_full.assign(x.data_ptr<int64_t>(), x.data_ptr<int64_t>() + B * L);
    conf_full.assign(B * L, -std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < M; ++i) {
      TORCH_CHECK(pp[i] >= 0 && pp[i] < B * L, "commit_rows: pos[", i, "] = ", pp[i],
                  " is outside [0, ", B * L, ")");
      tok_full[pp[i]] = tp[i];
      conf_full[pp[i]] = fp[i];
    }
  } else {
    check2(tok, at::kLong, "tok");
    check2(conf, at::kFloat, "conf");
  }
  TORCH_CHECK(rule >= 0 && rule <= 3, "commit_rows: rule must be in [0, 3]");
  const auto* nt = static_cast<const int64_t*>(check1(num_transfer, at::kLong, "num_transfer"));
  const auto* th = static_cast<const double*>(check1(threshold, at::kDouble, "threshold"));
  const auto* tt = static_cast<const double*>(check1(theta, at::kDouble, "theta"));
  const auto* sd = static_cast<const int64_t*>(check1(seeds, at::kLong, "seeds"));
  const auto* od = static_cast<const int64_t*>(check1(offsets, at::kLong, "offsets"));
  const auto* lp = static_cast<const int64_t*>(check1(left_pad, at::kLong, "left_pad"));
  TORCH_CHECK(rule != 0 || num_transfer.has_value(), "commit_rows: rule 0 needs num_transfer");
  TORCH_CHECK(rule != 1 || threshold.has_value(), "commit_rows: rule 1 needs threshold");
  TORCH_CHECK(rule != 3 || theta.has_value(), "commit_rows: rule 3 needs theta");
  TORCH_CHECK(seeds.has_value() == offsets.has_value(),
              "commit_rows: give both seeds and offsets or neither");
  auto out = x.clone();
  auto commit = at::zeros({B, L}, x.options().dtype(at::kBool));
  const int64_t* xt = pos.has_value() ? tok_full.data() : tok.data_ptr<int64_t>();
  const float* cf = pos.has_value() ? conf_full.data() : conf.data_ptr<float>();
  const bool* cd = cand.data_ptr<bool>();
  int64_t* xo = out.data_ptr<int64_t>();
  bool* cm = commit.data_ptr<bool>();
  const bool gumbel = rule == 0 && alg_temp > 0.0;
  // Rows are independent and short (L positions): one thread per chunk of rows.
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<std::pair<double, int64_t>> ks;  // (rank key, position) of a row's candidates
    for (int64_t b = begin; b < end; ++b) {
      const int64_t s64 = sd != nullptr ? sd[b] : seed;
      const uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(s64) & 0xFFFFFFFFu);
      const uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(s64) >> 32);
      const uint32_t off =
          static_cast<uint32_t>(static_cast<uint64_t>(od != nullptr ? od[b] : offset));
      // The counter of position l: (column l, row b), or (l - left_pad[b], 0) as for row b alone.
      auto uniform = [&](int64_t l, uint32_t stream) {
        const int64_t col = lp != nullptr ? std::max<int64_t>(l - lp[b], 0) : l;
        const uint32_t row = lp != nullptr ? 0u : static_cast<uint32_t>(b);
        return philox_uniform(static_cast<uint32_t>(col), row, off, stream, k0, k1);
      };
      const bool* c = cd + b * L;
      const float* f = cf + b * L;
      bool* m = cm + b * L;
      if (rule == 3) {  // ancestral: each candidate independently with probability theta
        for (int64_t l = 0; l < L; ++l) m[l] = c[l] && uniform(l, kStreamAncestral) < tt[b];
      } else {
        // Rank keys: the confidence (float64), or conf / alg_temp + Gumbel noise; -inf is
        // clamped to the lowest double so that every candidate outranks non-candidates.
        ks.clear();
        for (int64_t l = 0; l < L; ++l) {
          if (!c[l]) continue;
          double k = static_cast<double>(f[l]);
          if (gumbel) k = k / alg_temp - std::log(-std::log(uniform(l, kStreamAlgTemp)));
          ks.emplace_back(std::max(k, -std::numeric_limits<double>::max()), l);
        }
        const int64_t n = static_cast<int64_t>(ks.size());
        // Descending key, ties to the lowest position (the reference's stable sort); a NaN
        // key ranks above every number, as in torch's descending sort (the samplers never
        // emit one, but a caller's confidences might hold one).
        auto before = [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& o) {
          const bool an = std::isnan(a.first), on = std::isnan(o.first);
          if (an || on) return an && (!on || a.second < o.second);
          return a.first > o.first || (a.first == o.first && a.second < o.second);
        };
        int64_t count = 0;  // commit the first `count` of the ranking
        if (rule == 0) {
          count = std::min(std::max<int64_t>(nt[b], 0), n);
          if (count > 0 && count < n) {
            std::nth_element(ks.begin(), ks.begin() + (count - 1), ks.end(), before);
          }
        } else if (rule == 1) {  // every candidate with conf >= tau, and the best one
          if (n > 0) {
            auto best = std::min_element(ks.begin(), ks.end(), before);
            m[best->second] = true;
          }
          for (const auto& kv : ks) {
            if (static_cast<double>(f[kv.second]) >= th[b]) m[kv.second] = true;
          }
        } else {  // factor: the longest prefix of the ranking with c_i >= 1 - factor / (i + 1)
          std::sort(ks.begin(), ks.end(), before);
          count = n > 0 ? 1 : 0;
          while (count < n &&
                 static_cast<double>(f[ks[count].second]) >=
                     1.0 - factor / (static_cast<double>(count + 1) + 1.0)) {
            ++count;
          }
        }
        for (int64_t i = 0; i < count; ++i) m[ks[i].second] = true;
      }
      const int64_t* t = xt + b * L;
      int64_t* o = xo + b * L;
      for (int64_t l = 0; l < L; ++l) o[l] = m[l] ? t[l] : o[l];
    }
  });
  return {out, commit};
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
