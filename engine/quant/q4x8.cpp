// pdcluster::q4x8_mm: 4-bit weights x 8-bit activations on AVX-512 VNNI, for decode rows on CPU.
// Reference: engine/quant/q4x8.py (q4x8_mm_ref), the same arithmetic in torch ops.
//
//   x   float32 [M, K]          activations; K % 64 == 0
//   w   uint8   [N, K/2]        codes c[n, k] in 0..15, a row in blocks of ng = min(16, groups left) groups
//                               of 32 (g0 = the block's first group): for u in 0..3, 4 * ng bytes, byte
//                               4 l + j = c(g0 + l, 8u + j) | c(g0 + l, 8u + 4 + j) << 4 (c(g, i): weight i
//                               of group g). So a 64-byte vector holds 4 weights of each of 16 groups, one
//                               int32 lane per group, and 8 vpdpbusd sum a whole block's groups in lanes.
//                               A last block of ng <= 4 groups (K = 576: 16 + 2) is in chunks of 2 groups
//                               instead, one vpdpbusd each: 32 bytes, byte i = c(i) | c(32 + i) << 4
//                               (c(i): weight i of the chunk's 64).
//   d   float16 [N, K/32]       per group of 32 weights: w[n, k] = d[n, g] * c[n, k] + mn[n, g]
//   mn  float16 [N, K/32]       (GGUF Q4_1's form), g = k / 32
//   ->  float32 [M, N]
//
// Each 32-block of a row of x is rounded to int8 on its own symmetric scale (dx = amax / 127, as
// llama.cpp's Q8_1 activations), so per group: d * dx * sum(c * qx) + mn * dx * sum(qx); the integer
// sums are exact (vpdpbusd: u8 x s8 -> s32). A row of the result depends on that row of x alone;
// a row of x with a non-finite value gives a row of NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace {

constexpr int64_t GROUP = 32;
constexpr int64_t BLOCK = 16;          // groups per block: one int32 lane each
constexpr int64_t PREFETCH_ROWS = 8;   // weight rows prefetched ahead of the one computed
constexpr int64_t CHUNK_TAIL = 4;      // a last block of at most this many groups is in 2-group chunks

inline bool chunked(int64_t ng) { return ng <= CHUNK_TAIL && ng < BLOCK; }

// A row of x in the kernel's order: per block, 8 vectors v of 4 * ng bytes, byte 4 l + j =
// qx(g0 + l, 4v + j); dx / sx [K/32]: dx = amax / 127, qx = round-half-even(x / dx), sx = dx * sum(qx).
// Returns false if the row holds a non-finite value.
bool quantize_row(const float* x, int64_t K, int8_t* tmp, int8_t* qx, float* dx, float* sx) {
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
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp + g * GROUP), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp + g * GROUP + 16), _mm512_cvtsepi32_epi8(qb));
    dx[g] = d;
    sx[g] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
  const uint32_t* src = reinterpret_cast<const uint32_t*>(tmp);     // 4 weights at a time
  uint32_t* dst = reinterpret_cast<uint32_t*>(qx);
  for (int64_t g0 = 0; g0 < G; g0 += BLOCK) {
    const int64_t ng = G - g0 < BLOCK ? G - g0 : BLOCK;
    if (chunked(ng)) {                                              // natural order
      for (int64_t i = 0; i < ng * 8; ++i)
        dst[g0 * 8 + i] = src[g0 * 8 + i];
      continue;
    }
    for (int64_t v = 0; v < 8; ++v)
      for (int64_t l = 0; l < ng; ++l)
        dst[g0 * 8 + v * ng + l] = src[(g0 + l) * 8 + v];
  }
  return std::isfinite(_mm512_reduce_add_ps(nonfinite));
}

// The last ng groups of row n in 2-group chunks (see chunked): lanes 0-7 sum the chunk's first group,
// 8-15 its second; the per-group scale is spread over the lanes by a permute.
void dot_chunks(const uint8_t* w, const at::Half* d, const at::Half* mn, const int8_t* qx, const float* dx,
                const float* sx, int64_t M, int64_t K, int64_t ng, __m512* acc) {
  const int64_t G = K / GROUP;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __mmask16 gm = static_cast<__mmask16>((1u << ng) - 1);
  const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, d));
  const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, mn));
  __m512i c[CHUNK_TAIL / 2], idx[CHUNK_TAIL / 2];
  for (int64_t k = 0; k < ng / 2; ++k) {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * k));
    c[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)),
                              _mm256_and_si256(_mm256_srli_epi16(b, 4), low4), 1);
    idx[k] = _mm512_set_epi32(2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1,
                              2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k);
  }
  for (int64_t m = 0; m < M; ++m) {
    const __m512 scale = _mm512_mul_ps(dv, _mm512_maskz_loadu_ps(gm, dx + m * G));
    for (int64_t k = 0; k < ng / 2; ++k) {
      __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[k], _mm512_loadu_si512(qx + m * K + 64 * k));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_permutexvar_ps(idx[k], scale), acc[m]);
    }
    acc[m] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(gm, sx + m * G), acc[m]);
  }
}

// Row n of w against rows 0..M-1 of x (kernel order): acc[m] += per-group lanes; the float sums run in a
// fixed order (blocks, then lanes), independent of M, N and threads.
void dot_rows(const uint8_t* w, const at::Half* d, const at::Half* mn, const int8_t* qx, const float* dx,
              const float* sx, int64_t M, int64_t K, __m512* acc) {
  const int64_t G = K / GROUP;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t m = 0; m < M; ++m)
    acc[m] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += BLOCK) {
    const int64_t ng = G - g0 < BLOCK ? G - g0 : BLOCK;
    if (chunked(ng)) {
      dot_chunks(w + g0 * GROUP / 2, d + g0, mn + g0, qx + g0 * GROUP, dx + g0, sx + g0, M, K, ng, acc);
      continue;
    }
    const int64_t span = 4 * ng;                                    // bytes per vector of this block
    const __mmask64 bm = ng == BLOCK ? ~0ULL : (1ULL << span) - 1;
    const __mmask16 gm = static_cast<__mmask16>((1u << ng) - 1);
    const uint8_t* wb = w + g0 * GROUP / 2;
    __m512i c[8];                                                   // the block's codes, as 8 vectors v
    for (int u = 0; u < 4; ++u) {
      __m512i b = _mm512_maskz_loadu_epi8(bm, wb + u * span);
      c[2 * u] = _mm512_and_si512(b, low4);
      c[2 * u + 1] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, d + g0));
    const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, mn + g0));
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xb = qx + m * K + g0 * GROUP;
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();   // two chains: even / odd v
      for (int v = 0; v < 8; v += 2) {
        s0 = _mm512_dpbusd_epi32(s0, c[v], _mm512_maskz_loadu_epi8(bm, xb + v * span));
        s1 = _mm512_dpbusd_epi32(s1, c[v + 1], _mm512_maskz_loadu_epi8(bm, xb + (v + 1) * span));
      }
      const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));   // lane l: group g0 + l
      const __m512 scale = _mm512_mul_ps(dv, _mm512_maskz_loadu_ps(gm, dx + m * G + g0));
      acc[m] = _mm512_fmadd_ps(isum, scale, acc[m]);
      acc[m] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(gm, sx + m * G + g0), acc[m]);
    }
  }
}

at::Tensor q4x8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d, const at::Tensor& mn) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "q4x8_mm: x must be float32 [M, K] on CPU");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "q4x8_mm: w must be uint8 [N, K/2]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && mn.scalar_type() == at::kHalf, "q4x8_mm: d and mn must be float16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / GROUP;
  TORCH_CHECK(K % 64 == 0 && w.size(1) * 2 == K, "q4x8_mm: K must be a multiple of 64 and w [N, K/2]");
  TORCH_CHECK(d.size(0) == N && d.size(1) == G && mn.sizes() == d.sizes(), "q4x8_mm: d and mn must be [N, K/32]");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), dc = d.contiguous(), mc = mn.contiguous();
  at::Tensor qx = at::empty({M, K}, x.options().dtype(at::kChar)), tmp = at::empty({K}, qx.options());
  at::Tensor dx = at::empty({M, G}, x.options()), sx = at::empty({M, G}, x.options());
  std::vector<char> finite(M);
  for (int64_t m = 0; m < M; ++m)
    finite[m] = quantize_row(xc.data_ptr<float>() + m * K, K, tmp.data_ptr<int8_t>(), qx.data_ptr<int8_t>() + m * K,
                             dx.data_ptr<float>() + m * G, sx.data_ptr<float>() + m * G);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const at::Half *dp = dc.data_ptr<at::Half>(), *mp = mc.data_ptr<at::Half>();
  const int8_t* qp = qx.data_ptr<int8_t>();
  const float *dxp = dx.data_ptr<float>(), *sxp = sx.data_ptr<float>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // rows n split across torch's threads; each weight row is read and unpacked once for all M rows of x
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<__m512> acc(M);
    for (int64_t n = begin; n < end; ++n) {
      if (n + PREFETCH_ROWS < end) {                 // the row PREFETCH_ROWS ahead, into L1 (L3 latency is
        const char* r = reinterpret_cast<const char*>(wp + (n + PREFETCH_ROWS) * (K / 2));   // what bounds a row)
        for (int64_t b = 0; b < K / 2; b += 64)
          _mm_prefetch(r + b, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(dp + (n + PREFETCH_ROWS) * G), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(mp + (n + PREFETCH_ROWS) * G), _MM_HINT_T0);
      }
      dot_rows(wp + n * (K / 2), dp + n * G, mp + n * G, qp, dxp, sxp, M, K, acc.data());
      for (int64_t m = 0; m < M; ++m)
        yp[m * N + n] = finite[m] ? _mm512_reduce_add_ps(acc[m]) : nan;
    }
  });
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
