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

at::Tensor q4x8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d, const at::Tensor& mn) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "q4x8_mm: x must be float32 [M, K] on CPU");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "q4x8_mm: w must be uint8 [N, K/2]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && mn.scalar_type() == at::kHalf, "q4x8_mm: d and mn must be float16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / GROUP;
  TORCH_CHECK(K % GROUP == 0 && K > 0 && w.size(1) * 2 == K, "q4x8_mm: K must be a multiple of 32 and w [N, K/2]");
  TORCH_CHECK(N % ROWS == 0, "q4x8_mm: N must be a multiple of 16 (q4x8.pack pads it)");
  TORCH_CHECK(d.dim() == 2 && d.size(0) == N && d.size(1) == G && mn.sizes() == d.sizes(), "q4x8_mm: d and mn must be [N, K/32]");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), dc = d.contiguous(), mc = mn.contiguous();
  at::Tensor qx = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({M, G}, x.options()), sx = at::empty({M, G}, x.options());
  std::vector<char> finite(M);
  for (int64_t m = 0; m < M; ++m)
    finite[m] = quantize_row(xc.data_ptr<float>() + m * K, K, qx.data_ptr<int8_t>() + m * K,
                             dx.data_ptr<float>() + m * G, sx.data_ptr<float>() + m * G);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const at::Half *dp = dc.data_ptr<at::Half>(), *mp = mc.data_ptr<at::Half>();
  const int8_t* qp = qx.data_ptr<int8_t>();
  const float *dxp = dx.data_ptr<float>(), *sxp = sx.data_ptr<float>();
  const int64_t wblock = ROWS * K / 2, sblock = ROWS * G;      // bytes of codes, scales of one block
  // blocks of 16 rows split across torch's threads; a block is read from memory once, then from L1 for
  // every MAX_X rows of x after the first
  at::parallel_for(0, N / ROWS, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const bool pf = b + PREFETCH_BLOCKS < end;            // (no pointer past this thread's range)
      const uint8_t* next = pf ? wp + (b + PREFETCH_BLOCKS) * wblock : nullptr;
      const at::Half* next_d = pf ? dp + (b + PREFETCH_BLOCKS) * sblock : nullptr;
      const at::Half* next_mn = pf ? mp + (b + PREFETCH_BLOCKS) * sblock : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += MAX_X) {
        const int64_t mx = std::min(MAX_X, M - m0);
        const int8_t* q = qp + m0 * K;
        const float *dxm = dxp + m0 * G, *sxm = sxp + m0 * G;
        float* yb = yp + m0 * N + b * ROWS;
        const uint8_t* nx = m0 == 0 ? next : nullptr;       // prefetched on the first pass
        switch (mx) {
          case 1: block<1>(wp + b * wblock, dp + b * sblock, mp + b * sblock, q, dxm, sxm, K, yb, N, nx, next_d, next_mn); break;
          case 2: block<2>(wp + b * wblock, dp + b * sblock, mp + b * sblock, q, dxm, sxm, K, yb, N, nx, next_d, next_mn); break;
          case 3: block<3>(wp + b * wblock, dp + b * sblock, mp + b * sblock, q, dxm, sxm, K, yb, N, nx, next_d, next_mn); break;
          default: block<4>(wp + b * wblock, dp + b * sblock, mp + b * sblock, q, dxm, sxm, K, yb, N, nx, next_d, next_mn); break;
        }
      }
    }
  });
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t m = 0; m < M; ++m)
    if (!finite[m])
      std::fill(yp + m * N, yp + (m + 1) * N, nan);
  return y;
}

}  // namespace

TORCH_LIBRARY(pdcluster, m) {
  m.def("q4x8_mm(Tensor x, Tensor w, Tensor d, Tensor mn) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("q4x8_mm", &q4x8_mm);
}

// AOTInductor's direct call (engine/cpu_ext.py C_SHIMS): the compiled decode layer calls this instead of going
// through its proxy executor (~4 us a call, boxed arguments).
extern "C" AOTITorchError aoti_torch_cpu_q4x8_mm(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle d,
                                                 AtenTensorHandle mn, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor y = q4x8_mm(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(w),
                           *tensor_handle_to_tensor_pointer(d), *tensor_handle_to_tensor_pointer(mn));
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(y));
  });
}
