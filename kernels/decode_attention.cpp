// pdcluster::paged_decode_attention: decode attention over the paged KV cache on CPU (AVX-512), read in place.
// Its torch reference is decode_attention.py's paged_decode_attention_ref (the Triton kernel's too).
//
//   q        float32 [B, H, D]             one row per decode token (a verify step's drafts are rows too)
//   k_cache  float32 [NB, BS, KVH, D]      token t of row b: block block_tables[b, t / BS], slot t % BS
//   v_cache  float32 [NB, BS, KVH, D]
//   block_tables int64 [B, W]; seq_lens int64 [B]: row b attends to positions 0..seq_lens[b]-1 (0: an empty
//                slot, its output row is zeros, as the reference's)
//   -> float32 [B, H, D]
//
// Why: the torch path gathers every row's blocks into a contiguous copy (read + write) and then SDPA reads it
// again, with a float mask over the padded width; at a decode step that is most of attention's time. Here each
// (row, KV head) pair reads its K/V rows once for all H/KVH query heads of its group (group<NV, REP>: scores
// 16 positions at a time, one pass over V), or per query head from L1/L2 for other head counts (group<NV, 1>).
// Arithmetic per query head: s_t = (q . k_t) * scale, p_t = exp(s_t - max s), o = (sum_t p_t v_t) / sum_t p_t,
// in float32; exp is a degree-6 polynomial on [-ln2/2, ln2/2] scaled by 2^n (~1 ulp for exp's range here).
// A row's result does not depend on its batch-mates or on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd_exp.h"

namespace {

using pdcluster_simd::exp_ps;

// s[t] = exp(s[t] - m) for t < n, in place; returns their sum.
inline float exp_sum(float* s, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (t < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), mv)));
    _mm512_mask_storeu_ps(s + t, tail, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// out[j] = sum of a[j]'s 16 lanes, for 16 vectors at once (46 instructions instead of 16 full reductions):
// halves, then quarters, then pairs are added across vectors, leaving position j in lane (j % 4) * 4 + j / 4,
// which the last permutation (its own inverse) puts back in order.
inline __m512 reduce16(const __m512* a) {
  __m512 r[8], s[4], u[2];
  for (int i = 0; i < 8; ++i)
    r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44), _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
  const __m512 v = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v);
}

// The REP query heads of one KV head against its positions 0..n-1: out + r * D = softmax(q_r K^T * scale) V.
// Scores 16 positions at a time (reduce16), the rest one by one; then one pass over V for all REP heads, each V
// row loaded once. s: REP rows of stride `ld` floats. NV = D / 16 vectors per row; rows[t] = offset of position
// t's row in the caches (floats). A head count per KV head without its own instance runs group<NV, 1> per head.
template <int NV, int REP>
void group(const float* q, const float* kc, const float* vc, const int64_t* rows, int64_t n, float scale,
           float* s, int64_t ld, float* out) {
  float m[REP];
  for (int r = 0; r < REP; ++r)
    m[r] = -std::numeric_limits<float>::infinity();
  int64_t t0 = 0;
  for (; t0 + 16 <= n; t0 += 16) {
    for (int r = 0; r < REP; ++r) {
      __m512 qv[NV], acc[16];
      for (int c = 0; c < NV; ++c)
        qv[c] = _mm512_loadu_ps(q + r * NV * 16 + 16 * c);
      for (int j = 0; j < 16; ++j) {
        const float* k = kc + rows[t0 + j];
        acc[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
        for (int c = 1; c < NV; ++c)
          acc[j] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), acc[j]);
      }
      const __m512 sv = _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale));
      _mm512_storeu_ps(s + r * ld + t0, sv);
      const float mx = _mm512_reduce_max_ps(sv);
      m[r] = mx > m[r] ? mx : m[r];
    }
  }
  for (; t0 < n; ++t0) {
    const float* k = kc + rows[t0];
    for (int r = 0; r < REP; ++r) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + r * NV * 16), _mm512_loadu_ps(k));
      for (int c = 1; c < NV; ++c)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * NV * 16 + 16 * c), _mm512_loadu_ps(k + 16 * c), acc);
      const float sc = _mm512_reduce_add_ps(acc) * scale;
      s[r * ld + t0] = sc;
      m[r] = sc > m[r] ? sc : m[r];
    }
  }
  float sum[REP];
  for (int r = 0; r < REP; ++r)
    sum[r] = exp_sum(s + r * ld, n, m[r]);
  __m512 o[REP][NV];
  for (int r = 0; r < REP; ++r)
    for (int c = 0; c < NV; ++c)
      o[r][c] = _mm512_setzero_ps();
  for (int64_t u = 0; u < n; ++u) {
    const float* v = vc + rows[u];
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c)
      vv[c] = _mm512_loadu_ps(v + 16 * c);
    for (int r = 0; r < REP; ++r) {
      const __m512 p = _mm512_set1_ps(s[r * ld + u]);
      for (int c = 0; c < NV; ++c)
        o[r][c] = _mm512_fmadd_ps(p, vv[c], o[r][c]);
    }
  }
  for (int r = 0; r < REP; ++r) {
    const __m512 denom = _mm512_set1_ps(sum[r]);
    for (int c = 0; c < NV; ++c)
      _mm512_storeu_ps(out + r * NV * 16 + 16 * c, _mm512_div_ps(o[r][c], denom));
  }
}

constexpr int LANES = 16;      // floats per vector

}  // namespace

#include "decode_attention_driver.h"
