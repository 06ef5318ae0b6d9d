// pdcluster::greedy_head: the greedy token of h @ W.T (the LM head's argmax) without reading all of W in float32.
// Reference: kernels/greedy_head.py (greedy_head_ref, the same screen in torch; the answer is argmax(h @ W.T)).
//
//   h      float32 [N, E]   hidden rows after the final norm
//   q      int8    [V, E]   W rounded per row: W[v] ~ scale[v] * q[v]
//   scale  float32 [V]
//   slack  float32 [V]      per unit of |h|_1, how far scale[v] * (h . q[v]) and our float32 h . W[v] may each be
//                           from the real h . W[v] (kernels/greedy_head.py: slack)
//   w      float32 [V, E]   W itself (the tied embedding)
//   ->     int64 [N]        per row the v of the largest float32 h . W[v] (the first of equals), or -1 where h's row
//                           is not finite (the caller takes the full logits then)
//
// Why: a greedy step needs only the argmax, and the full head reads 4 bytes a weight (113 MB for SmolLM2's 49,152 x
// 576, ~9 ms a step on one core). The screen reads 1 (q), bounds each logit to approx[v] +- b[v] with
// b[v] = |h|_1 slack[v], and keeps only the v whose upper end reaches the best lower end: that set provably holds
// the argmax of the float32 logits (greedy_head.py says why). Those few (1-5 typically) are scored in float32 from w
// and the best taken. Each exact score is one FMA chain over E in 16 lanes, then a fixed-order lane sum: the same
// bits whatever N, the batch-mates or the threads, and on AVX2 hosts (the same 16 chains in two 8-lane registers).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int64_t VB = 4;      // head rows per block: each q chunk converted once for every h row in the group
constexpr int64_t RB = 4;      // h rows per group: RB x VB accumulators

// approx[r][v0 + j] = scale * (h_r . q_{v0+j}) for RB' <= RB rows and VB' <= VB head rows; E a multiple of 16.
template <int R, int J>
inline void screen_block(const float* h, int64_t E, const int8_t* q, const float* scale, float* approx, int64_t V,
                         int64_t v0) {
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; e += 16) {
    __m512 qv[J];
    for (int j = 0; j < J; ++j) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (v0 + j) * E + e));
      qv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
    for (int r = 0; r < R; ++r) {
      const __m512 hv = _mm512_loadu_ps(h + r * E + e);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(hv, qv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) approx[r * V + v0 + j] = _mm512_reduce_add_ps(acc[r][j]) * scale[v0 + j];
}

#else
constexpr int64_t VB = 2;      // AVX2 (16 registers): RB x VB accumulators of 8 lanes + VB of q + 1 of h
constexpr int64_t RB = 4;

// As above, 8 lanes (the sums in another order: the screen's bounds hold for any order, greedy_head.py gamma).
template <int R, int J>
inline void screen_block(const float* h, int64_t E, const int8_t* q, const float* scale, float* approx, int64_t V,
                         int64_t v0) {
  __m256 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t e = 0; e < E; e += 8) {
    __m256 qv[J];
    for (int j = 0; j < J; ++j) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (v0 + j) * E + e));
      qv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
    for (int r = 0; r < R; ++r) {
      const __m256 hv = _mm256_loadu_ps(h + r * E + e);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(hv, qv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      const __m128 s4 = _mm_add_ps(_mm256_extractf128_ps(acc[r][j], 1), _mm256_castps256_ps128(acc[r][j]));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      approx[r * V + v0 + j] = (_mm_cvtss_f32(s2) + _mm_cvtss_f32(_mm_movehdup_ps(s2))) * scale[v0 + j];
    }
}
#endif

template <int R>
void screen_rows(const float* h, int64_t E, const int8_t* q, const float* scale, float* approx, int64_t V,
                 int64_t begin, int64_t end) {
  int64_t v = begin;
  for (; v + VB <= end; v += VB) screen_block<R, VB>(h, E, q, scale, approx, V, v);
  for (; v < end; ++v) screen_block<R, 1>(h, E, q, scale, approx, V, v);
}

constexpr int64_t VCHUNK = 256;  // head rows of q swept by every group of h rows in turn: 144 KB at E = 576, in L2
                                 //   (q streamed from memory once, not once per RB rows of h)

using ScreenFn = void (*)(const float*, int64_t, const int8_t*, const float*, float*, int64_t, int64_t, int64_t);
constexpr ScreenFn SCREEN[RB] = {screen_rows<1>, screen_rows<2>, screen_rows<3>, screen_rows<4>};

#if defined(__AVX512F__)
// h . w in float32: 16 lanes, one FMA chain each over E in order, then _mm512_reduce_add_ps (a fixed tree).
inline float exact_dot(const float* h, const float* w, int64_t E) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; e += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(h + e), _mm512_loadu_ps(w + e), acc);
  return _mm512_reduce_add_ps(acc);
}
#else
// The same 16 chains as the AVX-512 build, lanes 0-7 and 8-15 in two registers, then _mm512_reduce_add_ps's tree
// (GCC's avx512fintrin.h: high 8 + low 8, high 4 + low 4, {0, 1} + {2, 3}, then [0] + [1]): the same bits.
inline float exact_dot(const float* h, const float* w, int64_t E) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int64_t e = 0; e < E; e += 16) {
    lo = _mm256_fmadd_ps(_mm256_loadu_ps(h + e), _mm256_loadu_ps(w + e), lo);
    hi = _mm256_fmadd_ps(_mm256_loadu_ps(h + e + 8), _mm256_loadu_ps(w + e + 8), hi);
  }
  const __m256 s8 = _mm256_add_ps(hi, lo);
  const __m128 s4 = _mm_add_ps(_mm256_extractf128_ps(s8, 1), _mm256_castps256_ps128(s8));
  const __m128 s2 = _mm_add_ps(s4, _mm_shuffle_ps(s4, s4, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(s2) + _mm_cvtss_f32(_mm_shuffle_ps(s2, s2, 1));
}
#endif

at::Tensor greedy_head(const at::Tensor& h, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& slack,
                       const at::Tensor& w) {
  TORCH_CHECK(h.dim() == 2 && q.dim() == 2 && w.dim() == 2, "greedy_head: h [N, E], q [V, E], w [V, E]");
  const int64_t N = h.size(0), E = h.size(1), V = q.size(0);
  TORCH_CHECK(h.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && q.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kFloat && slack.scalar_type() == at::kFloat,
              "greedy_head: h, w, scale, slack float32; q int8");
  TORCH_CHECK(q.size(1) == E && w.size(0) == V && w.size(1) == E && scale.numel() == V && slack.numel() == V,
              "greedy_head: shapes disagree: h [N, E], q and w [V, E], scale and slack [V]");
  TORCH_CHECK(E % 16 == 0 && E > 0 && V > 0, "greedy_head: E must be a positive multiple of 16, V > 0");
  TORCH_CHECK(h.is_contiguous() && q.is_contiguous() && w.is_contiguous() && scale.is_contiguous() &&
                  slack.is_contiguous(),
              "greedy_head: contiguous tensors only");
  at::Tensor out = at::full({N}, -1, h.options().dtype(at::kLong));
  if (N == 0) return out;
  const float* hp = h.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* kp = slack.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();

  // |h_r|_1, rounded up: every bound below is a multiple of it. A non-finite row is left to the full logits.
  std::vector<float> h1(N);
  std::vector<char> ok(N);
  for (int64_t r = 0; r < N; ++r) {
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += std::fabs(static_cast<double>(hp[r * E + e]));
    ok[r] = std::isfinite(s) && s < 1e30;
    h1[r] = static_cast<float>(s * (1 + 1e-6));
  }
  at::Tensor approx_t = at::empty({N, V}, h.options());
  float* approx = approx_t.data_ptr<float>();
  at::parallel_for(0, V, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += VCHUNK) {          // every group of h rows over one chunk of q (L2)
      const int64_t c1 = std::min(end, c0 + VCHUNK);
      for (int64_t r0 = 0; r0 < N; r0 += RB) {
        const int64_t rows = std::min<int64_t>(RB, N - r0);
        SCREEN[rows - 1](hp + r0 * E, E, qp, sp, approx + r0 * V, V, c0, c1);
      }
    }
  });
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (!ok[r]) continue;
      const float* a = approx + r * V;
      const float b1 = h1[r];
      float thr = -std::numeric_limits<float>::infinity();        // the best lower end: max(a - b)
      for (int64_t v = 0; v < V; ++v) thr = std::max(thr, a[v] - b1 * kp[v]);
      float best = -std::numeric_limits<float>::infinity();
      int64_t arg = -1;
      for (int64_t v = 0; v < V; ++v) {
        if (!(a[v] + b1 * kp[v] >= thr)) continue;                // its upper end falls short: not the argmax
        const float x = exact_dot(hp + r * E, wp + v * E, E);
        if (x > best || (arg < 0 && !std::isnan(x))) best = x, arg = v;   // first of equals, as argmax
      }
      op[r] = arg;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdcluster, m) {
  m.def("greedy_head(Tensor h, Tensor q, Tensor scale, Tensor slack, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("greedy_head", &greedy_head);
}
