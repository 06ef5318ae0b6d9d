// The register tile of pdcluster's float32 linears (f32_mm.cpp, q4f32_mm.cpp), shared so that both compute every
// y[m, n] as the same FMA chain over k in order: the same bits from either weight form.
//
//   w   float32 blocks of COLS columns of W.T: w[k * COLS + j] = W[j, k] within a block
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace pdcluster_f32 {

constexpr int64_t COLS = 64;                 // columns per block: 4 vectors of 16
constexpr int64_t MR = 6;                    // rows of x per tile: 6 x 4 accumulators + 4 of W + 1 of x <= 32

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

}  // namespace pdcluster_f32
