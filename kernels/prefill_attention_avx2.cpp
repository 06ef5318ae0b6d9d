// pdcluster::paged_chunk_attention on AVX2 + FMA (no AVX-512): prefill_attention.cpp's op for hosts without
// AVX-512 (AMD Zen 2/3, older Xeons). Same arguments, checks and arithmetic per query head (prefill_attention.cpp's
// header: the query heads of a tile in vector lanes, K/V streamed 16 positions at a time with an online softmax);
// the lanes are 8 wide here, up to 6 vectors for the tile's 48 heads, and the scores and P^T V run JB positions /
// dims at a time so that JB * HV accumulators and one broadcast fit the 16 registers. A row's result does not
// depend on its tile-mates or the thread count. Reference: prefill_attention.py's paged_prefill_attention_ref.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "simd_exp.h"

namespace {

constexpr int64_t TN = 16;       // positions per step, as prefill_attention.cpp

using pdcluster_simd::exp8_ps;

// positions (scores) or dims (P^T V) per inner step for HV vectors of heads: JB * HV accumulators + 1 broadcast
// <= 16 registers, JB dividing 8
constexpr int jb(int hv) { return hv == 1 ? 8 : hv <= 3 ? 4 : 2; }

// prefill_attention.cpp's tile<HV> with 8-lane vectors: qt [D][HV * 8] the tile's query heads transposed and
// scaled, lane h seeing positions < limit[h] (padding lanes: position 0 only), over positions 0 .. n - 1 whose K/V
// rows start at rows[t] (floats); ot [D][HV * 8] the output, transposed.
template <int HV>
void tile(const float* qt, const int32_t* limit, int64_t D, const float* kc, const float* vc, const int64_t* rows,
          int64_t n, float* ot) {
  constexpr int L = HV * 8, JB = jb(HV);
  alignas(32) float st[TN * L];
  __m256 m[HV], l[HV];
  __m256i lim[HV];
  for (int v = 0; v < HV; ++v) {
    m[v] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    l[v] = _mm256_setzero_ps();
    lim[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(limit + 8 * v));
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
    for (int j0 = 0; j0 < TN; j0 += JB) {               // scores of JB positions at a time
      __m256 acc[JB][HV];
      for (int jj = 0; jj < JB; ++jj)
        for (int v = 0; v < HV; ++v) acc[jj][v] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; ++d)
        for (int jj = 0; jj < JB; ++jj) {
          const __m256 kb = _mm256_broadcast_ss(kr[j0 + jj] + d);
          for (int v = 0; v < HV; ++v)
            acc[jj][v] = _mm256_fmadd_ps(_mm256_load_ps(qt + d * L + 8 * v), kb, acc[jj][v]);
        }
      for (int jj = 0; jj < JB; ++jj)
        for (int v = 0; v < HV; ++v) _mm256_store_ps(st + (j0 + jj) * L + 8 * v, acc[jj][v]);
    }
    __m256 alpha[HV];
    for (int v = 0; v < HV; ++v) {                      // the online softmax, 8 heads per vector
      __m256 valid[TN];
      __m256 mt = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < TN; ++j) {
        valid[j] = j < jn ? _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim[v], _mm256_set1_epi32(static_cast<int32_t>(t0 + j))))
                          : _mm256_setzero_ps();
        mt = _mm256_blendv_ps(mt, _mm256_max_ps(mt, _mm256_load_ps(st + j * L + 8 * v)), valid[j]);
      }
      const __m256 m_new = _mm256_max_ps(m[v], mt);
      alpha[v] = exp8_ps(_mm256_sub_ps(m[v], m_new));   // 1 where the max holds; ~0 on the first step
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < TN; ++j) {
        const __m256 p = _mm256_and_ps(valid[j], exp8_ps(_mm256_sub_ps(_mm256_load_ps(st + j * L + 8 * v), m_new)));
        _mm256_store_ps(st + j * L + 8 * v, p);
        sum = _mm256_add_ps(sum, p);
      }
      l[v] = _mm256_fmadd_ps(l[v], alpha[v], sum);
      m[v] = m_new;
    }
    for (int64_t d0 = 0; d0 < D; d0 += JB) {            // ot += P^T V, JB dims at a time
      __m256 acc[JB][HV];
      for (int dd = 0; dd < JB; ++dd)
        for (int v = 0; v < HV; ++v) acc[dd][v] = _mm256_mul_ps(_mm256_load_ps(ot + (d0 + dd) * L + 8 * v), alpha[v]);
      for (int64_t j = 0; j < jn; ++j)
        for (int dd = 0; dd < JB; ++dd) {
          const __m256 vb = _mm256_broadcast_ss(vr[j] + d0 + dd);
          for (int v = 0; v < HV; ++v)
            acc[dd][v] = _mm256_fmadd_ps(_mm256_load_ps(st + j * L + 8 * v), vb, acc[dd][v]);
        }
      for (int dd = 0; dd < JB; ++dd)
        for (int v = 0; v < HV; ++v) _mm256_store_ps(ot + (d0 + dd) * L + 8 * v, acc[dd][v]);
    }
  }
  for (int64_t d = 0; d < D; ++d)
    for (int v = 0; v < HV; ++v)
      _mm256_store_ps(ot + d * L + 8 * v, _mm256_div_ps(_mm256_load_ps(ot + d * L + 8 * v), l[v]));
}

using TileFn = void (*)(const float*, const int32_t*, int64_t, const float*, const float*, const int64_t*, int64_t,
                        float*);
constexpr TileFn TILES[7] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};
constexpr int64_t LANES = 8;          // floats per vector
constexpr int64_t MAX_LANES = 48;     // query heads per tile: rows * (H / KVH) <= 48, in up to 6 vectors

}  // namespace

#include "prefill_attention_driver.h"
