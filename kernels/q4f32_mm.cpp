// pdcluster::q4f32_mm: float32 x @ W.T where W is a float32 weight that holds GGUF Q4_1 values exactly
// (w = float32(d * q) + m, d and m per 32 k of a row, q in 0..15): read as 4-bit codes, computed in float32.
// Reference: kernels/q4f32_mm.py (q4f32_mm_ref: F.linear on the weight rebuilt in torch ops).
//
//   x      float32 [M, K]             any M >= 0, K a multiple of 32
//   codes  uint8   [Np/64, K, 32]     block b, row k, byte j: q of column 64 b + j (low nibble) and of
//                                     column 64 b + 32 + j (high nibble); columns = rows of W
//   dm     float32 [Np/64, K/32, 2, 64] d, then m, of each of the block's 64 columns for k in 32 g .. 32 g + 31
//   n      int                        N <= Np: the columns written
//   ->     float32 [M, N]
//   q4f32_expand(codes, dm) -> float32 [Np/64, K, 64]: the blocks kernels/f32_mm.py pack makes of W
//
// Why: a float32 step at a few rows streams its weights from memory (425 MB a step for SmolLM2-135M, ~37 ms
// on one core here). A float32 engine on a Q4_1 checkpoint holds weights that are Q4_1 values, exactly: their
// codes are 0.75 bytes a weight (4 bits + 2 float32 per 32), 5.3x fewer. Each block is expanded into float32 in a
// per-thread buffer (d * q, then + m: two roundings, as the loader's numpy did), KC_ROWS rows of k at a time (L1)
// for few rows of x, whole (L2) for many, and every tile of x runs f32_tile.h's tile over them: each y[m, n]
// is the FMA chain f32_mm computes on the float32 weight, bit for bit. (Whole blocks for few rows measured 1.23x
// slower at 1 row, 1.06x at 24.) On AVX2 at one or two rows there is no buffer at all: `fused` dequantizes each k
// row in registers into the same FMA chains.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include "f32_tile.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace {

using pdcluster_f32::COLS;
using pdcluster_f32::HALF_TILES;
using pdcluster_f32::MR;
using pdcluster_f32::TILES;
constexpr int64_t G = 32;                    // k per (d, m) group: Q4_1's block
#if defined(__AVX512F__)
constexpr int64_t KC_ROWS = 128;             // k rows expanded at a time up to SPLIT_MAX_ROWS rows of x: 32 KB of
                                             //   a block, L1-resident (64 within 1%, 32 and 192-288 slower)
#else
constexpr int64_t KC_ROWS = 256;             // AVX2 (Zen 3, one thread, one run each): at 16 rows 1.07x 128's speed
                                             //   and 1.22x 64's, at 32 1.25x 64's; at 1 row 1.11x slower than 64
#endif
constexpr int64_t SPLIT_MAX_ROWS = 48;       // more rows: the whole block at once, into L2 (at 408 rows ~10% faster
                                             //   than 128 at a time, a tie at 96; one thread, SmolLM2's linears)

// One half block's 32 columns of one group, d * q + m rounded twice, as numpy's (d * qs) + m: d and m loaded once
// per group, then a k row at a time from its 32 codes (one byte each, 0..15) into out (32 floats).
#if defined(__AVX512F__)
struct HalfRows {
  __m512 d0, d1, m0, m1;
  HalfRows(const float* d, const float* m)
      : d0(_mm512_loadu_ps(d)), d1(_mm512_loadu_ps(d + 16)), m0(_mm512_loadu_ps(m)), m1(_mm512_loadu_ps(m + 16)) {}
  // the _round intrinsics keep the compiler from fusing the product and the sum
  static __m512 dequant(__m128i q8, __m512 d, __m512 m) {
    constexpr int RN = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q8));
    return _mm512_add_round_ps(_mm512_mul_round_ps(d, q, RN), m, RN);
  }
  void operator()(__m256i q, float* out) const {
    _mm512_storeu_ps(out, dequant(_mm256_castsi256_si128(q), d0, m0));
    _mm512_storeu_ps(out + 16, dequant(_mm256_extracti128_si256(q, 1), d1, m1));
  }
};
#else
struct HalfRows {                            // AVX2: 8 columns a vector
  __m256 d[4], m[4];
  HalfRows(const float* dp, const float* mp) {
    for (int i = 0; i < 4; ++i) d[i] = _mm256_loadu_ps(dp + 8 * i), m[i] = _mm256_loadu_ps(mp + 8 * i);
  }
  // the empty asm keeps GCC from contracting the product and the sum into an FMA (-ffp-contract=fast: these
  // intrinsics are plain vector arithmetic to it)
  static __m256 dequant(__m128i q8, __m256 d, __m256 m) { return dequant32(_mm256_cvtepu8_epi32(q8), d, m); }
  static __m256 dequant32(__m256i q, __m256 d, __m256 m) {     // q: 8 codes as int32
    __m256 p = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
    asm("" : "+x"(p));
    return _mm256_add_ps(p, m);
  }
  static __m256 dequant8(__m256i q, const float* d, const float* m) {
    return dequant32(q, _mm256_loadu_ps(d), _mm256_loadu_ps(m));
  }
  void operator()(__m256i q, float* out) const {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(out, dequant(lo, d[0], m[0]));
    _mm256_storeu_ps(out + 8, dequant(_mm_srli_si128(lo, 8), d[1], m[1]));
    _mm256_storeu_ps(out + 16, dequant(hi, d[2], m[2]));
    _mm256_storeu_ps(out + 24, dequant(_mm_srli_si128(hi, 8), d[3], m[3]));
  }
};
#endif

#if !defined(__AVX512F__)
// AVX2, at most FUSED_MAX_ROWS rows of x: no block buffer. Each k row's codes are dequantized in registers (HalfRows's
// arithmetic: the product, the asm barrier, the sum) straight into the FMAs, so y[m, n] is the tile's chain over k,
// bit for bit, without storing the expanded block and loading it back (measured, 120 SmolLM2 linears, one Zen 3
// thread: 1 row 1.85x faster, 2 rows 1.20x; 3 rows (2 + 1) 0.89x, so from 3 rows the buffer and the tile again).
constexpr int64_t FUSED_MAX_ROWS = 2;

// R rows (x: their starts, K apart) times halves h0 .. h0 + H - 1 of one block (codes [K, 32], dm [K/32, 2, 64] of
// that block), over all of K; y: the first of those columns (rows N apart), ncols of them real (masked stores).
// 4 H accumulators per row: R = 1 takes both halves (8), R = 2 one (8).
template <int R, int H>
void fused(const float* x, int64_t K, const uint8_t* codes, const float* dm, int64_t h0, float* y, int64_t N,
           int64_t ncols) {
  constexpr int V = 4 * H;
  __m256 a[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) a[r][v] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi32(0x0F);
  for (int64_t g = 0; g < K / G; ++g) {
    const float* d = dm + g * 2 * COLS;
    const float* m = d + COLS;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) {
      __m256 xb[R];
      for (int r = 0; r < R; ++r) xb[r] = _mm256_broadcast_ss(x + r * K + k);
      for (int i = 0; i < 4; ++i) {        // codes 8 i .. 8 i + 7: columns 8 i + j (low nibble), 32 + 8 i + j (high)
        const auto* c8 = reinterpret_cast<const __m128i*>(codes + k * 32 + 8 * i);
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(c8));
        for (int hh = 0; hh < H; ++hh) {
          const int64_t h = h0 + hh;
          const __m256i q = h == 0 ? _mm256_and_si256(b, low4) : _mm256_srli_epi32(b, 4);
          const __m256 w = HalfRows::dequant8(q, d + 32 * h + 8 * i, m + 32 * h + 8 * i);
          for (int r = 0; r < R; ++r) a[r][4 * hh + i] = _mm256_fmadd_ps(xb[r], w, a[r][4 * hh + i]);
        }
      }
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int v = 0; v < V; ++v) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(ncols - 8 * v)), lane);
    for (int r = 0; r < R; ++r) _mm256_maskstore_ps(y + r * N + 8 * v, mask, a[r][v]);
  }
}
#endif

// k rows k0 .. k0 + kc - 1 (whole groups) of columns lo .. hi - 1 (multiples of 32) of one block into buf
// (float32 [kc, 64], the f32_mm block layout)
void expand(const uint8_t* codes, const float* dm, int64_t k0, int64_t kc, int64_t lo, int64_t hi, float* buf) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t g = k0 / G; g < (k0 + kc) / G; ++g) {
    const float* d = dm + g * 2 * COLS;
    const float* m = d + COLS;
    for (int64_t h = lo / 32; h < hi / 32; ++h) {            // half h: columns 32 h .. 32 h + 31
      const HalfRows rows(d + 32 * h, m + 32 * h);
      for (int64_t k = g * G; k < (g + 1) * G; ++k) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 32));
        const __m256i q = h == 0 ? _mm256_and_si256(v, low4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        rows(q, buf + (k - k0) * COLS + 32 * h);
      }
    }
  }
}

// This thread's block buffer, grown to `floats` (64-byte aligned; reused call after call).
float* thread_buffer(int64_t floats) {
  struct Free { void operator()(float* p) const { std::free(p); } };
  thread_local std::unique_ptr<float, Free> buf;
  thread_local int64_t size = 0;
  if (size < floats) {
    buf.reset(static_cast<float*>(std::aligned_alloc(64, ((floats * 4 + 63) / 64) * 64)));
    TORCH_CHECK(buf != nullptr, "q4f32_mm: out of memory for a ", floats * 4, "-byte block buffer");
    size = floats;
  }
  return buf.get();
}

void check_weight(const at::Tensor& codes, const at::Tensor& dm, int64_t K) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.device().is_cpu() && codes.is_contiguous()
              && codes.size(2) == 32, "q4f32_mm: codes must be contiguous uint8 [Np/64, K, 32] on CPU");
  TORCH_CHECK(K > 0 && K % G == 0 && codes.size(1) == K, "q4f32_mm: K must be a positive multiple of 32 and match "
              "the codes' [", codes.size(0), ", ", codes.size(1), ", 32], got ", K);
  TORCH_CHECK(dm.dim() == 4 && dm.scalar_type() == at::kFloat && dm.device().is_cpu() && dm.is_contiguous() &&
              dm.size(0) == codes.size(0) && dm.size(1) == K / G && dm.size(2) == 2 && dm.size(3) == COLS,
              "q4f32_mm: dm must be contiguous float32 [Np/64, K/32, 2, 64] on CPU (kernels/q4f32_mm.py pack)");
}

at::Tensor q4f32_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& dm, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "q4f32_mm: x must be float32 [M, K] on CPU");
  const int64_t M = x.size(0), K = x.size(1), NB = codes.size(0);
  check_weight(codes, dm, K);
  TORCH_CHECK(n > (NB - 1) * COLS && n <= NB * COLS, "q4f32_mm: n = ", n, " does not fit ", NB, " blocks of 64");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* dp = dm.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if !defined(__AVX512F__)
  if (M <= FUSED_MAX_ROWS) {             // the same ranges of half blocks across threads; no buffer
    at::parallel_for(0, 2 * NB, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin / 2; b < (end + 1) / 2; ++b) {
        const int64_t lo = std::max<int64_t>(0, begin * 32 - b * COLS);
        const int64_t hi = std::min<int64_t>(COLS, end * 32 - b * COLS);
        const int64_t ncols = std::min(hi, n - b * COLS) - lo;
        if (ncols <= 0) continue;
        const uint8_t* cb = cp + b * K * 32;
        const float* db = dp + b * (K / G) * 2 * COLS;
        float* yb = yp + b * COLS + lo;
        if (M == 1) {
          (hi - lo == COLS ? fused<1, 2> : fused<1, 1>)(xp, K, cb, db, lo / 32, yb, n, ncols);
        } else {
          for (int64_t h = lo / 32; h < hi / 32 && 32 * h - lo < ncols; ++h)
            fused<2, 1>(xp, K, cb, db, h, yb + 32 * h - lo, n, std::min<int64_t>(32, ncols - (32 * h - lo)));
        }
      }
    });
    return y;
  }
#endif
  const int64_t T = (M + MR - 1) / MR;                             // tiles of x
  const int64_t KC = M <= SPLIT_MAX_ROWS ? std::min(K, KC_ROWS) : K;
  // threads split the columns in halves of a block (32), as f32_mm does; each expands only its own half, KC rows
  // of k at a time, and every tile of x sweeps those, its sums carried in y between them (f32_tile.h tile)
  at::parallel_for(0, 2 * NB, 1, [&](int64_t begin, int64_t end) {
    float* buf = thread_buffer(KC * COLS);
    for (int64_t b = begin / 2; b < (end + 1) / 2; ++b) {
      const int64_t lo = std::max<int64_t>(0, begin * 32 - b * COLS);              // this range's columns of b
      const int64_t hi = std::min<int64_t>(COLS, end * 32 - b * COLS);
      const int64_t ncols = std::min(hi, n - b * COLS) - lo;                       // <= 0: padding only
      if (ncols <= 0) continue;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        expand(cp + b * K * 32, dp + b * (K / G) * 2 * COLS, k0, kc, lo, hi, buf);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t m0 = t * MR, r = std::min(MR, M - m0);
          (hi - lo == COLS ? TILES : HALF_TILES)[r](xp + m0 * K, K, k0, kc, buf + lo, yp + m0 * n + b * COLS + lo,
                                                     n, ncols, k0 == 0, nullptr, 1, 0);
        }
      }
    }
  });
  return y;
}

at::Tensor q4f32_expand(const at::Tensor& codes, const at::Tensor& dm) {
  const int64_t NB = codes.dim() == 3 ? codes.size(0) : 0, K = codes.dim() == 3 ? codes.size(1) : 0;
  check_weight(codes, dm, K);
  at::Tensor w = at::empty({NB, K, COLS}, dm.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* dp = dm.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      expand(cp + b * K * 32, dp + b * (K / G) * 2 * COLS, 0, K, 0, COLS, wp + b * K * COLS);
  });
  return w;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdcluster, m) {
  m.def("q4f32_mm(Tensor x, Tensor codes, Tensor dm, int n) -> Tensor");
  m.def("q4f32_expand(Tensor codes, Tensor dm) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("q4f32_mm", &q4f32_mm);
  m.impl("q4f32_expand", &q4f32_expand);
}

// AOTInductor's direct call (engine/cpu_ext.py C_SHIMS), for the compiled decode layer's float linears.
extern "C" AOTITorchError aoti_torch_cpu_q4f32_mm(AtenTensorHandle x, AtenTensorHandle codes, AtenTensorHandle dm,
                                                  int64_t n, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor y = q4f32_mm(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(codes),
                            *tensor_handle_to_tensor_pointer(dm), n);
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(y));
  });
}
