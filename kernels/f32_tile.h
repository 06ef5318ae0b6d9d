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

// R rows of x times V vectors (16 columns each) of one block, from w (the block's first column of the tile;
// k rows COLS apart) into y (N apart). pf: the block whose rows k = phase mod pstep this tile prefetches.
template <int R, int V>
inline void tile(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t ncols, const float* pf,
                 int64_t pstep, int64_t phase) {
  __m512 a[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) a[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (pf != nullptr && k % pstep == phase)  // this tile's share of the next chunk: one k row in pstep
      for (int v = 0; v < V; ++v) _mm_prefetch(reinterpret_cast<const char*>(pf + k * COLS + 16 * v), _MM_HINT_T1);
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(w + k * COLS + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k]);
      for (int v = 0; v < V; ++v) a[r][v] = _mm512_fmadd_ps(xb, wv[v], a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      const int64_t left = ncols - 16 * v;
      const __mmask16 mask = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
      _mm512_mask_storeu_ps(y + r * N + 16 * v, mask, a[r][v]);
    }
}

using TileFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, const float*, int64_t,
                       int64_t);
constexpr TileFn TILES[MR + 1] = {nullptr, tile<1, 4>, tile<2, 4>, tile<3, 4>, tile<4, 4>, tile<5, 4>, tile<6, 4>};
constexpr TileFn HALF_TILES[MR + 1] = {nullptr, tile<1, 2>, tile<2, 2>, tile<3, 2>, tile<4, 2>, tile<5, 2>,
                                       tile<6, 2>};

// tile() over k = k0 .. k0 + kc - 1 only, the accumulators carried in y between the calls of one sweep over K
// (first: they start from zero): stored and reloaded as float32, so the calls over k0 = 0, kc, 2 kc, ... run
// tile()'s FMA chain, bit for bit. x: the rows' starts (k = 0).
template <int R, int V>
inline void tile_part(const float* x, int64_t K, int64_t k0, int64_t kc, const float* w, float* y, int64_t N,
                      int64_t ncols, bool first) {
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

using PartFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t, int64_t, bool);
constexpr PartFn PARTS[MR + 1] = {nullptr, tile_part<1, 4>, tile_part<2, 4>, tile_part<3, 4>, tile_part<4, 4>,
                                  tile_part<5, 4>, tile_part<6, 4>};
constexpr PartFn HALF_PARTS[MR + 1] = {nullptr, tile_part<1, 2>, tile_part<2, 2>, tile_part<3, 2>, tile_part<4, 2>,
                                       tile_part<5, 2>, tile_part<6, 2>};

}  // namespace pdcluster_f32
