// pdcluster::q4x8_mm on AVX2 + FMA + F16C (no AVX-512): the op of q4x8.cpp, for hosts without AVX-512 VNNI
// (AMD Zen 2/3, older Xeons). Same layout, same rounding of x, same sums: results equal q4x8.cpp's bit for bit.
// Reference: engine/quant/q4x8.py (q4x8_mm_ref), the same arithmetic in torch ops.
//
//   x   float32 [M, K]          activations; K % 32 == 0
//   w   uint8   [N, K/2]        q4x8.cpp's blocks of 16 interleaved rows: a 64-byte run holds 4 codes of each of
//                               16 rows, so its first 32 bytes are rows 0..7 of the block and its last 32 rows 8..15:
//                               one 256-bit vector, one int32 lane per row
//   d   float16 [N, K/32]       w[n, k] = d[n, g] * c[n, k] + mn[n, g], stored per block as in q4x8.cpp
//   mn  float16 [N, K/32]
//   ->  float32 [M, N]
//
// Without vpdpbusd, a group's integer sum per row is vpmaddubsw (u8 code x s8 x, pairs -> int16) then vpmaddwd
// by ones (int16 pairs -> int32), as llama.cpp's AVX2 Q4 dot product. Exact: a pair is at most 2 * 15 * 127 =
// 3,810, the 8 pairs of a lane summed in int16 at most 30,480 < 32,767 (x's codes are in -127..127).
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
constexpr int64_t ROWS = 16;           // weight rows per block (q4x8.cpp's layout): two vectors of 8 lanes here
constexpr int64_t PREFETCH_BLOCKS = 1; // as q4x8.cpp: the next block is prefetched while one is computed
constexpr int64_t MAX_X = 3;           // rows of x per pass over a block: 6 sums + 4 weight vectors + 2 of x + 1 mask
                                       // in the 16 registers (4 rows spill: slower)

float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

// A row of x: qx [K] (natural order), dx / sx [K/32]: dx = amax / 127, qx = round-half-even(x / dx) (the default
// MXCSR rounding, as q4x8.cpp's explicit one), sx = dx * sum(qx). Returns false if the row holds a non-finite value.
bool quantize_row(const float* x, int64_t K, int8_t* qx, float* dx, float* sx) {
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);     // undoes packs' 128-bit lane interleave
  __m256 nonfinite = zero;
  const int64_t G = K / GROUP;
  for (int64_t g = 0; g < G; ++g) {
    __m256 v[4];
    __m256 amax = zero;
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + g * GROUP + 8 * i);
      nonfinite = _mm256_add_ps(nonfinite, _mm256_mul_ps(v[i], zero));    // NaN once any is inf or NaN
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    const float d = hmax(amax) / 127.0f;
    __m256i q[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    if (d > 0.0f && std::isfinite(d)) {
      const __m256 vd = _mm256_set1_ps(d);
      for (int i = 0; i < 4; ++i)
        q[i] = _mm256_cvtps_epi32(_mm256_div_ps(v[i], vd));
    }
    const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qx + g * GROUP), q8);
    dx[g] = d;
    sx[g] = d * static_cast<float>(hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                                               _mm256_add_epi32(q[2], q[3]))));
  }
  alignas(32) float nf[8];
  _mm256_store_ps(nf, nonfinite);
  float s = 0.0f;
  for (float f : nf)
    s += f;
  return std::isfinite(s);
}

// One block of 16 rows (w, d, mn at the block) against MX rows of x: y[m, 0..15] for m < MX (row stride N). The
// block's two 256-bit halves (rows 0..7 and 8..15 of each 64-byte run) are summed side by side, so each
// broadcast of x's codes serves both. next: the block PREFETCH_BLOCKS ahead, or null; prefetched a group at a time.
// A lane's int16 sums and float32 steps run in the same order as with one half at a time (results unchanged).
template <int MX>
void block(const uint8_t* w, const at::Half* d, const at::Half* mn, const int8_t* qx, const float* dx,
           const float* sx, int64_t K, float* y, int64_t N, const uint8_t* next, const at::Half* next_d,
           const at::Half* next_mn) {
  const int64_t G = K / GROUP;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MX][2];
  #pragma GCC unroll 8
  for (int m = 0; m < MX; ++m)
    acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * ROWS * GROUP / 2;
    if (next != nullptr) {
      const char* p = reinterpret_cast<const char*>(next + g * ROWS * GROUP / 2);
      #pragma GCC unroll 8
      for (int i = 0; i < 4; ++i)
        _mm_prefetch(p + 64 * i, _MM_HINT_T0);
      if ((g & 1) == 0) {                                   // 2 groups of scales per 64-byte line
        _mm_prefetch(reinterpret_cast<const char*>(next_d + g * ROWS), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next_mn + g * ROWS), _MM_HINT_T0);
      }
    }
    __m256i s16[MX][2];                                     // per lane (row), its group's sum as int16 pairs
    #pragma GCC unroll 8
    for (int m = 0; m < MX; ++m)
      s16[m][0] = s16[m][1] = _mm256_setzero_si256();
    #pragma GCC unroll 8
    for (int u = 0; u < 4; ++u) {
      __m256i lo[2], hi[2];
      #pragma GCC unroll 8
      for (int h = 0; h < 2; ++h) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * u + 32 * h));
        lo[h] = _mm256_and_si256(b, low4);                                 // weights 8u .. 8u + 3 of each row
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);          // weights 8u + 4 .. 8u + 7
      }
      #pragma GCC unroll 8
      for (int m = 0; m < MX; ++m) {
        const int32_t* xq = reinterpret_cast<const int32_t*>(qx + m * K + g * GROUP);   // 4 codes of x a lane
        const __m256i x0 = _mm256_set1_epi32(xq[2 * u]), x1 = _mm256_set1_epi32(xq[2 * u + 1]);
        #pragma GCC unroll 8
        for (int h = 0; h < 2; ++h) {
          s16[m][h] = _mm256_add_epi16(s16[m][h], _mm256_maddubs_epi16(lo[h], x0));
          s16[m][h] = _mm256_add_epi16(s16[m][h], _mm256_maddubs_epi16(hi[h], x1));
          asm("" : "+x"(s16[m][h]));        // summed here: else GCC computes all 8 products first and spills them
        }
      }
    }
    #pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) {
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + g * ROWS + 8 * h)));
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g * ROWS + 8 * h)));
      #pragma GCC unroll 8
      for (int m = 0; m < MX; ++m) {
        const __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[m][h], ones));
        acc[m][h] = _mm256_fmadd_ps(isum, _mm256_mul_ps(dv, _mm256_set1_ps(dx[m * G + g])), acc[m][h]);
        acc[m][h] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx[m * G + g]), acc[m][h]);
      }
    }
  }
  #pragma GCC unroll 8
  for (int m = 0; m < MX; ++m) {
    _mm256_storeu_ps(y + m * N, acc[m][0]);
    _mm256_storeu_ps(y + m * N + 8, acc[m][1]);
  }
}

}  // namespace

#include "q4x8_driver.h"     // q4x8_mm: checks, threads, registration, C shim (as q4x8.cpp)
