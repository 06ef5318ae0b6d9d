// pdcluster::paged_decode_attention on AVX2 + FMA (no AVX-512): decode_attention.cpp's op for hosts without AVX-512
// (AMD Zen 2/3, older Xeons). Same arguments, checks and arithmetic per query head (decode_attention.cpp's
// header); the sums run 8 lanes wide, so their order (and the last bits) differ from the AVX-512 op's. Reference:
// decode_attention.py's paged_decode_attention_ref.
//
// Per (row, KV head) pair, group<NV, REP> scores 8 positions at a time for each of the group's REP query heads (8
// accumulators, one q vector at a time: 10 of the 16 registers), then passes over V once per CB vectors of a row,
// all REP heads at once (REP * CB accumulators and REP broadcast weights in registers).
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "simd_exp.h"

namespace {

using pdcluster_simd::exp8_ps;
using pdcluster_simd::first8;
using pdcluster_simd::hmax8;
using pdcluster_simd::hsum8;

// s[t] = exp(s[t] - m) for t < n, in place; returns their sum.
inline float exp_sum(float* s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (t < n) {
    const __m256i tail = first8(n - t);
    const __m256 e = _mm256_and_ps(exp8_ps(_mm256_sub_ps(_mm256_maskload_ps(s + t, tail), mv)),
                                   _mm256_castsi256_ps(tail));
    _mm256_maskstore_ps(s + t, tail, e);
    sum = _mm256_add_ps(sum, e);
  }
  return hsum8(sum);
}

// out lane j = sum of a[j]'s 8 lanes
inline __m256 reduce8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 lo = _mm256_hadd_ps(s01, s23), hi = _mm256_hadd_ps(s45, s67);   // [a0..a3 halves | a4..a7 halves]
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// vectors of a V row per pass over the positions: the largest divisor of NV with REP * CB + REP + 1 <= 16 registers
constexpr int cb(int nv, int rep) {
  int c = (15 - rep) / rep;
  c = c < 1 ? 1 : c;
  while (nv % c != 0) --c;
  return c;
}

// decode_attention.cpp's group<NV, REP> with NV = D / 8 vectors of 8 per row: out + r * D = softmax(q_r K^T *
// scale) V for the REP query heads of one KV head over its positions 0..n-1 (rows[t]: position t's row offset in
// the caches, floats). s: REP rows of stride ld floats (ld >= n + 8).
template <int NV, int REP>
void group(const float* q, const float* kc, const float* vc, const int64_t* rows, int64_t n, float scale,
           float* s, int64_t ld, float* out) {
  float m[REP];
  for (int r = 0; r < REP; ++r)
    m[r] = -std::numeric_limits<float>::infinity();
  const __m256 scv = _mm256_set1_ps(scale);
  int64_t t0 = 0;
  for (; t0 + 8 <= n; t0 += 8) {
    const float* k[8];
    for (int j = 0; j < 8; ++j)
      k[j] = kc + rows[t0 + j];
    for (int r = 0; r < REP; ++r) {
      const float* qr = q + r * NV * 8;
      __m256 acc[8];
      const __m256 q0 = _mm256_loadu_ps(qr);
      for (int j = 0; j < 8; ++j)
        acc[j] = _mm256_mul_ps(q0, _mm256_loadu_ps(k[j]));
      for (int c = 1; c < NV; ++c) {
        const __m256 qv = _mm256_loadu_ps(qr + 8 * c);
        for (int j = 0; j < 8; ++j)
          acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + 8 * c), acc[j]);
      }
      const __m256 sv = _mm256_mul_ps(reduce8(acc), scv);
      _mm256_storeu_ps(s + r * ld + t0, sv);
      const float mx = hmax8(sv);
      m[r] = mx > m[r] ? mx : m[r];
    }
  }
  for (; t0 < n; ++t0) {
    const float* k = kc + rows[t0];
    for (int r = 0; r < REP; ++r) {
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q + r * NV * 8), _mm256_loadu_ps(k));
      for (int c = 1; c < NV; ++c)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * NV * 8 + 8 * c), _mm256_loadu_ps(k + 8 * c), acc);
      const float sc = hsum8(acc) * scale;
      s[r * ld + t0] = sc;
      m[r] = sc > m[r] ? sc : m[r];
    }
  }
  __m256 denom[REP];
  for (int r = 0; r < REP; ++r)
    denom[r] = _mm256_set1_ps(exp_sum(s + r * ld, n, m[r]));
  constexpr int CB = cb(NV, REP);
  for (int c0 = 0; c0 < NV; c0 += CB) {
    __m256 o[REP][CB];
    for (int r = 0; r < REP; ++r)
      for (int c = 0; c < CB; ++c)
        o[r][c] = _mm256_setzero_ps();
    for (int64_t u = 0; u < n; ++u) {
      const float* v = vc + rows[u] + 8 * c0;
      __m256 p[REP];
      for (int r = 0; r < REP; ++r)
        p[r] = _mm256_broadcast_ss(s + r * ld + u);
      for (int c = 0; c < CB; ++c) {
        const __m256 vv = _mm256_loadu_ps(v + 8 * c);
        for (int r = 0; r < REP; ++r)
          o[r][c] = _mm256_fmadd_ps(p[r], vv, o[r][c]);
      }
    }
    for (int r = 0; r < REP; ++r)
      for (int c = 0; c < CB; ++c)
        _mm256_storeu_ps(out + r * NV * 8 + 8 * (c0 + c), _mm256_div_ps(o[r][c], denom[r]));
  }
}

constexpr int LANES = 8;      // floats per vector

}  // namespace

#include "decode_attention_driver.h"
