// pdcluster::q4x8_mm: 4-bit weights x 8-bit activations on AVX-512 VNNI, for decode rows on CPU.
// Reference: engine/quant/q4x8.py (q4x8_mm_ref), the same arithmetic in torch ops.
//
//   x   float32 [M, K]          activations; K % 32 == 0
//   w   uint8   [N, K/2]        codes c[n, k] in 0..15, rows interleaved 16 at a time (N % 16 == 0; pack pads):
//                               for block b (rows 16 b .. 16 b + 15) and group g (weights 32 g .. 32 g + 31),
//                               256 bytes at (b * K/32 + g) * 256: for u in 0..3, 64 bytes, byte 4 l + j =
//                               c(16 b + l, 32 g + 8 u + j) | c(16 b + l, 32 g + 8 u + 4 + j) << 4. A 64-byte
//                               vector then holds 4 weights of each of 16 rows, one int32 lane per row, so
//                               vpdpbusd sums each row's group in its own lane: no horizontal sums.
//   d   float16 [N, K/32]       per group of 32 weights: w[n, k] = d[n, g] * c[n, k] + mn[n, g] (GGUF Q4_1's
//   mn  float16 [N, K/32]       form), g = k / 32, stored in the same blocks: (b * K/32 + g) * 16 + l
//   ->  float32 [M, N]
//
// Each 32-block of a row of x is rounded to int8 on its own symmetric scale (dx = amax / 127, as
// llama.cpp's Q8_1 activations), so per group: d * dx * sum(c * qx) + mn * dx * sum(qx); the integer
// sums are exact (vpdpbusd: u8 x s8 -> s32). A result sums its groups in order, whatever M, N and the
// threads; a row of x with a non-finite value gives a row of NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {

constexpr int64_t GROUP = 32;
constexpr int64_t ROWS = 16;           // weight rows per block: one int32 lane each
constexpr int64_t PREFETCH_BLOCKS = 1; // the block this far ahead is prefetched while one is computed (weights
                                       // streamed from DRAM; bench/RESULTS.md, "q4x8 with rows interleaved")
constexpr int64_t MAX_X = 4;           // rows of x per pass over a block (their sums stay in registers)

// A row of x: qx [K] (natural order), dx / sx [K/32]: dx = amax / 127, qx = round-half-even(x / dx),
// sx = dx * sum(qx). Returns false if the row holds a non-finite value.
bool quantize_row(const float* x, int64_t K, int8_t* qx, float* dx, float* sx) {
  __m512 nonfinite = _mm512_setzero_ps();
  const int64_t G = K / GROUP;
  for (int64_t g = 0; g < G; ++g) {
    __m512 a = _mm512_loadu_ps(x + g * GROUP), b = _mm512_loadu_ps(x + g * GROUP + 16);
    nonfinite = _mm512_add_ps(nonfinite, _mm512_add_ps(_mm512_mul_ps(a, _mm512_setzero_ps()),
                                                       _mm512_mul_ps(b, _mm512_setzero_ps())));
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float d = amax / 127.0f;
    __m512i qa = _mm512_setzero_si512(), qb = _mm512_setzero_si512();
    if (d > 0.0f && std::isfinite(d)) {
      __m512 vd = _mm512_set1_ps(d);       // x / d rounded to nearest even: torch.round(x / d)
      qa = _mm512_cvt_roundps_epi32(_mm512_div_ps(a, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      qb = _mm512_cvt_roundps_epi32(_mm512_div_ps(b, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + g * GROUP), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + g * GROUP + 16), _mm512_cvtsepi32_epi8(qb));
    dx[g] = d;
    sx[g] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
  return std::isfinite(_mm512_reduce_add_ps(nonfinite));
}

// One block of 16 weight rows (w, d, mn at the block) against MX rows of x: y[m, 0..15] for m < MX (row
// stride N). next: the block PREFETCH_BLOCKS ahead, or null; its bytes are prefetched a group at a time.
template <int MX>
void block(const uint8_t* w, const at::Half* d, const at::Half* mn, const int8_t* qx, const float* dx,
           const float* sx, int64_t K, float* y, int64_t N, const uint8_t* next, const at::Half* next_d,
           const at::Half* next_mn) {
  const int64_t G = K / GROUP;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MX];
  for (int m = 0; m < MX; ++m)
    acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * ROWS * GROUP / 2;
    if (next != nullptr) {
      const char* p = reinterpret_cast<const char*>(next + g * ROWS * GROUP / 2);
      for (int i = 0; i < 4; ++i)
        _mm_prefetch(p + 64 * i, _MM_HINT_T0);
      if ((g & 1) == 0) {                                   // 2 groups of scales per 64-byte line
        _mm_prefetch(reinterpret_cast<const char*>(next_d + g * ROWS), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next_mn + g * ROWS), _MM_HINT_T0);
      }
    }
    __m512i c[8];                                           // c[v] lane l: weights 4v .. 4v + 3 of row l
    for (int u = 0; u < 4; ++u) {
      const __m512i b = _mm512_loadu_si512(wg + 64 * u);
      c[2 * u] = _mm512_and_si512(b, low4);
      c[2 * u + 1] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + g * ROWS)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + g * ROWS)));
    for (int m = 0; m < MX; ++m) {
      const int32_t* xq = reinterpret_cast<const int32_t*>(qx + m * K + g * GROUP);   // 4 codes of x a lane
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], _mm512_set1_epi32(xq[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[1], _mm512_set1_epi32(xq[1]));
      __m512i s2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[2], _mm512_set1_epi32(xq[2]));
      __m512i s3 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[3], _mm512_set1_epi32(xq[3]));
      s0 = _mm512_dpbusd_epi32(s0, c[4], _mm512_set1_epi32(xq[4]));
      s1 = _mm512_dpbusd_epi32(s1, c[5], _mm512_set1_epi32(xq[5]));
      s2 = _mm512_dpbusd_epi32(s2, c[6], _mm512_set1_epi32(xq[6]));
      s3 = _mm512_dpbusd_epi32(s3, c[7], _mm512_set1_epi32(xq[7]));
      const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)));
      acc[m] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dv, _mm512_set1_ps(dx[m * G + g])), acc[m]);
      acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[m * G + g]), acc[m]);
    }
  }
  for (int m = 0; m < MX; ++m)
    _mm512_storeu_ps(y + m * N, acc[m]);
}

}  // namespace

#include "q4x8_driver.h"     // q4x8_mm: checks, threads, registration, C shim
