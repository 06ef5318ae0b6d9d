// pdcluster::int8_mm: int8 x int8 -> int32, exact, on AVX2 (hosts without VNNI, where torch._int_mm is a slow
// generic loop: the 49152 x 576 LM head at 5 rows took ~99 ms; bench/RESULTS.md, "q4x8 on AVX2 hosts").
// Reference: torch._int_mm(a, w.t()), which engine/quant/cpu_linear.py int8_rows calls elsewhere; equal exactly.
//
//   a  int8 [M, K]   rows of x rounded to int8 (cpu_linear.quantize_rows: -127..127)
//   w  int8 [N, K]   weight rows as the engine holds them (any int8, -128 included)
//   -> int32 [M, N]  y[m, n] = sum_k a[m, k] * w[n, k]
//
// Per 32 bytes: vpmaddubsw(|w| as u8, sign(a, w)) -> int16 pairs, each at most 2 * 128 * 127 = 32,512 (no
// saturation, as |a| <= 127), then vpmaddwd by ones -> int32. A weight row is read once per call (it stays in L1
// while up to MAX_A rows of a pass over it); rows of w are split across torch's threads. K need not be a multiple
// of 32 (a scalar tail).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t MAX_A = 4;           // rows of a per pass over a weight row (accumulators in registers)

int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

// y[m * N] for m < MA: rows a[m * K] against one weight row w [K]
template <int MA>
void row(const int8_t* w, const int8_t* a, int64_t K, int32_t* y, int64_t N) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MA];
  for (int m = 0; m < MA; ++m)
    acc[m] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256i wa = _mm256_abs_epi8(wv);                 // -128 -> 0x80, read as u8 128
    for (int m = 0; m < MA; ++m) {
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + m * K + k));
      const __m256i p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(av, wv));   // a * sign(w), 0 where w = 0
      acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(p, ones));
    }
  }
  for (int m = 0; m < MA; ++m) {
    int32_t s = hsum(acc[m]);
    for (int64_t t = k; t < K; ++t)
      s += static_cast<int32_t>(a[m * K + t]) * static_cast<int32_t>(w[t]);
    y[m * N] = s;
  }
}

at::Tensor int8_mm(const at::Tensor& a, const at::Tensor& w) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kChar && a.dim() == 2, "int8_mm: a must be int8 [M, K] on CPU");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2 && w.size(1) == a.size(1),
              "int8_mm: w must be int8 [N, K] on CPU, K as a's");
  const at::Tensor ac = a.contiguous(), wc = w.contiguous();
  const int64_t M = ac.size(0), K = ac.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, ac.options().dtype(at::kInt));
  const int8_t *ap = ac.data_ptr<int8_t>(), *wp = wc.data_ptr<int8_t>();
  int32_t* yp = y.data_ptr<int32_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += MAX_A) {
        const int8_t* am = ap + m0 * K;
        int32_t* ym = yp + m0 * N + n;
        switch (std::min(MAX_A, M - m0)) {
          case 1: row<1>(wp + n * K, am, K, ym, N); break;
          case 2: row<2>(wp + n * K, am, K, ym, N); break;
          case 3: row<3>(wp + n * K, am, K, ym, N); break;
          default: row<4>(wp + n * K, am, K, ym, N); break;
        }
      }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdcluster, m) {
  m.def("int8_mm(Tensor a, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("int8_mm", &int8_mm);
}
