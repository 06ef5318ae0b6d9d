// The register tile of pdcluster's float32 linears (f32_mm.cpp, q4f32_mm.cpp), shared so that both compute every
// y[m, n] as the same FMA chain over k in order: the same bits from either weight form, and from either ISA (the
// AVX-512 tile and the AVX2 one below differ only in how many columns one pass holds in registers).
//
//   w   float32 blocks of COLS columns of W.T: w[k * COLS + j] = W[j, k] within a block
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace pdcluster_f32 {

constexpr int64_t COLS = 64;                 // columns per block: 4 vectors of 16 (AVX-512), 8 of 8 (AVX2)
constexpr int64_t MR = 6;                    // rows of x per tile

#if defined(__AVX512F__)
// 6 x 4 accumulators + 4 of W + 1 of x <= 32 registers: a pass holds all 64 columns

// R rows of x times V vectors (16 columns each) of one block over k = k0 .. k0 + kc - 1: w is the block's first
// column of the tile at k = k0 (k rows COLS apart), x the rows' starts (k = 0; rows K apart), y N apart. The sums
// start from zero (first) or from y, where the call over the k before k0 left them: stored and reloaded as
// float32, so calls over consecutive k ranges run one FMA chain over k in order, bit for bit (f32_mm: one call
// over all of K; q4f32_mm: one per range of k it expands). pf: a block whose rows k = phase mod pstep (counted
// from k0) this tile prefetches, or nullptr.
template <int R, int V>
inline void tile(const float* x, int64_t K, int64_t k0, int64_t kc, const float* w, float* y, int64_t N,
                 int64_t ncols, bool first, const float* pf, int64_t pstep, int64_t phase) {
  __m512 a[R][V];
  __mmask16 mask[V];
  for (int v = 0; v < V; ++v) {
    const int64_t left = ncols - 16 * v;
    mask[v] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      a[r][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[v], y + r * N + 16 * v);
  for (int64_t k = 0; k < kc; ++k) {
    if (pf != nullptr && k % pstep == phase)  // this tile's share of the next chunk: one k row in pstep
      for (int v = 0; v < V; ++v) _mm_prefetch(reinterpret_cast<const char*>(pf + k * COLS + 16 * v), _MM_HINT_T1);
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(w + k * COLS + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k0 + k]);
      for (int v = 0; v < V; ++v) a[r][v] = _mm512_fmadd_ps(xb, wv[v], a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(y + r * N + 16 * v, mask[v], a[r][v]);
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t, int64_t, bool,
                        const float*, int64_t, int64_t);
constexpr TileFn TILES[MR + 1] = {nullptr, tile<1, 4>, tile<2, 4>, tile<3, 4>, tile<4, 4>, tile<5, 4>, tile<6, 4>};
constexpr TileFn HALF_TILES[MR + 1] = {nullptr, tile<1, 2>, tile<2, 2>, tile<3, 2>, tile<4, 2>, tile<5, 2>,
                                       tile<6, 2>};
#else
// AVX2 (16 registers): a pass holds P vectors of 8 columns for R rows, R x P accumulators + the x broadcast (W is
// read as the FMAs' memory operand where it does not fit): 1 row x 64 columns, 2 x 32, else 6 x 16. A tile makes
// V / P passes over k (the rows of x stay in L1 between them). The arguments mean what they do above.
template <int R, int V>  // V: vectors of 8 columns in the tile (8: a block, 4: half a block)
inline void tile(const float* x, int64_t K, int64_t k0, int64_t kc, const float* w, float* y, int64_t N,
                 int64_t ncols, bool first, const float* pf, int64_t pstep, int64_t phase) {
  constexpr int P = R == 1 ? V : R == 2 ? (V < 4 ? V : 4) : 2;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int p = 0; 8 * P * p < ncols && p < V / P; ++p) {
    __m256 a[R][P];
    __m256i mask[P];
    for (int v = 0; v < P; ++v)      // lanes j < columns left in this vector: all ones
      mask[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(ncols - 8 * P * p - 8 * v)), lane);
    float* yp = y + 8 * P * p;
    const float* wp = w + 8 * P * p;
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < P; ++v)
        a[r][v] = first ? _mm256_setzero_ps() : _mm256_maskload_ps(yp + r * N + 8 * v, mask[v]);
    for (int64_t k = 0; k < kc; ++k) {
      if (pf != nullptr && p == 0 && k % pstep == phase)   // the whole k row of the next chunk, in the first pass
        for (int c = 0; c < V / 2; ++c)
          _mm_prefetch(reinterpret_cast<const char*>(pf + k * COLS + 16 * c), _MM_HINT_T1);
      __m256 wv[P];
      for (int v = 0; v < P; ++v) wv[v] = _mm256_loadu_ps(wp + k * COLS + 8 * v);
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * K + k0 + k);
        for (int v = 0; v < P; ++v) a[r][v] = _mm256_fmadd_ps(xb, wv[v], a[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < P; ++v) _mm256_maskstore_ps(yp + r * N + 8 * v, mask[v], a[r][v]);
  }
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t, int64_t, bool,
                        const float*, int64_t, int64_t);
constexpr TileFn TILES[MR + 1] = {nullptr, tile<1, 8>, tile<2, 8>, tile<3, 8>, tile<4, 8>, tile<5, 8>, tile<6, 8>};
constexpr TileFn HALF_TILES[MR + 1] = {nullptr, tile<1, 4>, tile<2, 4>, tile<3, 4>, tile<4, 4>, tile<5, 4>,
                                       tile<6, 4>};
#endif

}  // namespace pdcluster_f32
