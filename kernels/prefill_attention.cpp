// pdcluster::paged_chunk_attention: one prefill chunk's attention over its sequence's paged KV cache on CPU (AVX-512),
// K/V read in place. Its torch reference is prefill_attention.py's paged_prefill_attention_ref (one sequence).
//
//   q        float32 [Q, H, D]          the chunk's rows: the last Q of the sequence's ctx_len positions
//   k_cache  float32 [NB, BS, KVH, D]   position t: block block_table[t / BS], slot t % BS (the chunk's own K/V
//   v_cache  float32 [NB, BS, KVH, D]   already stored)
//   block_table int64 [W]               W * BS >= ctx_len
//   ctx_len  int                        Q <= ctx_len; row i attends to positions 0 .. ctx_len - Q + i
//   -> float32 [Q, H, D]
//
// Why: the torch path gathers the sequence's blocks into a contiguous copy, repeats it for every query head of a
// KV head (GQA), and runs SDPA with a [Q, ctx_len] mask; for a short chunk over a long cached prefix (a prefix
// hit's uncached tail, a conversation's next turn) the copies cost as much as the attention. Here the query heads
// of up to 48 / (H / KVH) rows that share one KV head sit in vector lanes (3 vectors at most) and stream that head's
// K/V 16 positions at a time, each K/V element broadcast once for all of them, with an online softmax (flash
// attention) kept lane-wise: no horizontal reductions, K/V read in place.
// Arithmetic per query head: s_t = (q * scale) . k_t in d order; running max m, sum l and output o rescaled by
// exp(m - m') when the max grows; o / l at the end; float32, exp as in decode_attention.cpp. A row's result does not
// depend on the chunk's other rows or on the thread count (for finite K/V).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "simd_exp.h"

namespace {

constexpr int64_t TN = 16;       // positions per step: one vector of scores

using pdcluster_simd::exp_ps;

// One tile of query heads, the heads in vector lanes (HV vectors of 16): qt [D][HV * 16] holds them transposed and
// scaled, lane h seeing positions < limit[h] (padding lanes see position 0 only), over positions 0 .. n - 1 (n = the
// largest limit) whose K/V rows start at rows[t] (floats, in both caches). Per 16 positions: scores s[j][h] =
// sum_d qt[d][h] k_j[d] (8 positions x HV vectors of accumulators, k_j[d] broadcast), the online softmax lane-wise,
// then ot[d][h] = ot[d][h] * alpha[h] + sum_j p[j][h] v_j[d] (8 dims x HV vectors of accumulators). ot: [D][HV * 16],
// the output transposed, divided by the softmax sums at the end. Steps past a lane's limit change nothing in it
// (alpha = 1, p = 0), so a row's result does not depend on its tile-mates.
template <int HV>
void tile(const float* qt, const int32_t* limit, int64_t D, const float* kc, const float* vc, const int64_t* rows,
          int64_t n, float* ot) {
  constexpr int L = HV * 16;
  alignas(64) float st[TN * L];
  __m512 m[HV], l[HV];
  __m512i lim[HV];
  for (int v = 0; v < HV; ++v) {
    m[v] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    l[v] = _mm512_setzero_ps();
    lim[v] = _mm512_loadu_si512(limit + 16 * v);
  }
  std::fill(ot, ot + D * L, 0.0f);
  for (int64_t t0 = 0; t0 < n; t0 += TN) {
    const int64_t jn = std::min<int64_t>(TN, n - t0);
    const float* kr[TN];
    const float* vr[TN];
    for (int64_t j = 0; j < TN; ++j) {                  // lanes past n read position t0's row (masked)
      kr[j] = kc + rows[j < jn ? t0 + j : t0];
      vr[j] = vc + rows[j < jn ? t0 + j : t0];
    }
    for (int jb = 0; jb < TN; jb += 8) {                // scores of 8 positions at a time
      __m512 acc[8][HV];
      for (int jj = 0; jj < 8; ++jj)
        for (int v = 0; v < HV; ++v) acc[jj][v] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        __m512 qv[HV];
        for (int v = 0; v < HV; ++v) qv[v] = _mm512_load_ps(qt + d * L + 16 * v);
        for (int jj = 0; jj < 8; ++jj) {
          const __m512 kb = _mm512_set1_ps(kr[jb + jj][d]);
          for (int v = 0; v < HV; ++v) acc[jj][v] = _mm512_fmadd_ps(qv[v], kb, acc[jj][v]);
        }
      }
      for (int jj = 0; jj < 8; ++jj)
        for (int v = 0; v < HV; ++v) _mm512_store_ps(st + (jb + jj) * L + 16 * v, acc[jj][v]);
    }
    __m512 alpha[HV];
    for (int v = 0; v < HV; ++v) {                      // the online softmax, 16 heads per vector
      __mmask16 valid[TN];
      __m512 mt = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < TN; ++j) {
        valid[j] = j < jn ? _mm512_cmpgt_epi32_mask(lim[v], _mm512_set1_epi32(static_cast<int32_t>(t0 + j))) : 0;
        mt = _mm512_mask_max_ps(mt, valid[j], mt, _mm512_load_ps(st + j * L + 16 * v));
      }
      const __m512 m_new = _mm512_max_ps(m[v], mt);
      alpha[v] = exp_ps(_mm512_sub_ps(m[v], m_new));    // 1 where the max holds; ~0 on the first step
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < TN; ++j) {
        const __m512 p = _mm512_maskz_mov_ps(valid[j], exp_ps(_mm512_sub_ps(_mm512_load_ps(st + j * L + 16 * v), m_new)));
        _mm512_store_ps(st + j * L + 16 * v, p);
        sum = _mm512_add_ps(sum, p);
      }
      l[v] = _mm512_fmadd_ps(l[v], alpha[v], sum);
      m[v] = m_new;
    }
    for (int64_t d0 = 0; d0 < D; d0 += 8) {             // ot += P^T V, 8 dims at a time
      __m512 acc[8][HV];
      for (int dd = 0; dd < 8; ++dd)
        for (int v = 0; v < HV; ++v) acc[dd][v] = _mm512_mul_ps(_mm512_load_ps(ot + (d0 + dd) * L + 16 * v), alpha[v]);
      for (int64_t j = 0; j < jn; ++j) {
        __m512 pv[HV];
        for (int v = 0; v < HV; ++v) pv[v] = _mm512_load_ps(st + j * L + 16 * v);
        for (int dd = 0; dd < 8; ++dd) {
          const __m512 vb = _mm512_set1_ps(vr[j][d0 + dd]);
          for (int v = 0; v < HV; ++v) acc[dd][v] = _mm512_fmadd_ps(pv[v], vb, acc[dd][v]);
        }
      }
      for (int dd = 0; dd < 8; ++dd)
        for (int v = 0; v < HV; ++v) _mm512_store_ps(ot + (d0 + dd) * L + 16 * v, acc[dd][v]);
    }
  }
  for (int64_t d = 0; d < D; ++d)
    for (int v = 0; v < HV; ++v)
      _mm512_store_ps(ot + d * L + 16 * v, _mm512_div_ps(_mm512_load_ps(ot + d * L + 16 * v), l[v]));
}

using TileFn = void (*)(const float*, const int32_t*, int64_t, const float*, const float*, const int64_t*, int64_t,
                        float*);
constexpr TileFn TILES[4] = {nullptr, tile<1>, tile<2>, tile<3>};
constexpr int64_t LANES = 16;         // floats per vector
constexpr int64_t MAX_LANES = 48;    // query heads per tile: rows * (H / KVH) <= 48, in up to 3 vectors

}  // namespace

#include "prefill_attention_driver.h"
