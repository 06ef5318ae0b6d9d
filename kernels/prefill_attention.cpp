// pdcluster::paged_chunk_attention: one prefill chunk's attention over its sequence's paged KV cache on CPU (AVX-512),
// K/V read in place. Its torch reference is prefill_attention.py's paged_prefill_attention_ref (one sequence).
//
//   q        float32 [Q, H, D]          the chunk's rows: the last Q of the sequence's ctx_len positions
//   k_cache  float32 [NB, BS, KVH, D]   position t: block block_table[t / BS], slot t % BS (the chunk's own K/V
//   v_cache  float32 [NB, BS, KVH, D]   already stored)
//   block_table int64 [W]               W * BS >= ctx_len
//   ctx_len  int                        Q <= ctx_len; row i attends to positions 0 .. ctx_len - Q + i
//   -> float32 [Q, H, D]
//
// Why: the torch path gathers the sequence's blocks into a contiguous copy, repeats it for every query head of a
// KV head (GQA), and runs SDPA with a [Q, ctx_len] mask; for a short chunk over a long cached prefix (a prefix
// hit's uncached tail, a conversation's next turn) the copies cost as much as the attention. Here the query heads
// of up to 48 / (H / KVH) rows that share one KV head sit in vector lanes (3 vectors at most) and stream that head's
// K/V 16 positions at a time, each K/V element broadcast once for all of them, with an online softmax (flash
// attention) kept lane-wise: no horizontal reductions, K/V read in place.
// Arithmetic per query head: s_t = (q * scale) . k_t in d order; running max m, sum l and output o rescaled by
// exp(m - m') when the max grows; o / l at the end; float32, exp as in decode_attention.cpp. A row's result does not
// depend on the chunk's other rows or on the thread count (for finite K/V).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "simd_exp.h"

namespace {

constexpr int64_t TN = 16;       // positions per step: one vector of scores

using pdcluster_simd::exp_ps;

// One tile of query heads, the heads in vector lanes (HV vectors of 16): qt [D][HV * 16] holds them transposed and
// scaled, lane h seeing positions < limit[h] (padding lanes see position 0 only), over positions 0 .. n - 1 (n = the
// largest limit) whose K/V rows start at rows[t] (floats, in both caches). Per 16 positions: scores s[j][h] =
// sum_d qt[d][h] k_j[d] (8 positions x HV vectors of accumulators, k_j[d] broadcast), the online softmax lane-wise,
// then ot[d][h] = ot[d][h] * alpha[h] + sum_j p[j][h] v_j[d] (8 dims x HV vectors of accumulators). ot: [D][HV * 16],
// the output transposed, divided by the softmax sums at the end. Steps past a lane's limit change nothing in it
// (alpha = 1, p = 0), so a row's result does not depend on its tile-mates.
template <int HV>
void tile(const float* qt, const int32_t* limit, int64_t D, const float* kc, const float* vc, const int64_t* rows,
          int64_t n, float* ot) {
  constexpr int L = HV * 16;
  alignas(64) float st[TN * L];
  __m512 m[HV], l[HV];
  __m512i lim[HV];
  for (int v = 0; v < HV; ++v) {
    m[v] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    l[v] = _mm512_setzero_ps();
    lim[v] = _mm512_loadu_si512(limit + 16 * v);
  }
  std::fill(ot, ot + D * L, 0.0f);
  for (int64_t t0 = 0; t0 < n; t0 += TN) {
    const int64_t jn = std::min<int64_t>(TN, n - t0);
    const float* kr[TN];
    const float* vr[TN];
    for (int64_t j = 0; j < TN; ++j) {                  // lanes past n read position t0's row (masked)
      kr[j] = kc + rows[j < jn ? t0 + j : t0];
      vr[j] = vc + rows[j < jn ? t0 + j : t0];
    }
    for (int jb = 0; jb < TN; jb += 8) {                // scores of 8 positions at a time
      __m512 acc[8][HV];
      for (int jj = 0; jj < 8; ++jj)
        for (int v = 0; v < HV; ++v) acc[jj][v] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        __m512 qv[HV];
        for (int v = 0; v < HV; ++v) qv[v] = _mm512_load_ps(qt + d * L + 16 * v);
        for (int jj = 0; jj < 8; ++jj) {
          const __m512 kb = _mm512_set1_ps(kr[jb + jj][d]);
          for (int v = 0; v < HV; ++v) acc[jj][v] = _mm512_fmadd_ps(qv[v], kb, acc[jj][v]);
        }
      }
      for (int jj = 0; jj < 8; ++jj)
        for (int v = 0; v < HV; ++v) _mm512_store_ps(st + (jb + jj) * L + 16 * v, acc[jj][v]);
    }
    __m512 alpha[HV];
    for (int v = 0; v < HV; ++v) {                      // the online softmax, 16 heads per vector
      __mmask16 valid[TN];
      __m512 mt = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < TN; ++j) {
        valid[j] = j < jn ? _mm512_cmpgt_epi32_mask(lim[v], _mm512_set1_epi32(static_cast<int32_t>(t0 + j))) : 0;
        mt = _mm512_mask_max_ps(mt, valid[j], mt, _mm512_load_ps(st + j * L + 16 * v));
      }
      const __m512 m_new = _mm512_max_ps(m[v], mt);
      alpha[v] = exp_ps(_mm512_sub_ps(m[v], m_new));    // 1 where the max holds; ~0 on the first step
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < TN; ++j) {
        const __m512 p = _mm512_maskz_mov_ps(valid[j], exp_ps(_mm512_sub_ps(_mm512_load_ps(st + j * L + 16 * v), m_new)));
        _mm512_store_ps(st + j * L + 16 * v, p);
        sum = _mm512_add_ps(sum, p);
      }
      l[v] = _mm512_fmadd_ps(l[v], alpha[v], sum);
      m[v] = m_new;
    }
    for (int64_t d0 = 0; d0 < D; d0 += 8) {             // ot += P^T V, 8 dims at a time
      __m512 acc[8][HV];
      for (int dd = 0; dd < 8; ++dd)
        for (int v = 0; v < HV; ++v) acc[dd][v] = _mm512_mul_ps(_mm512_load_ps(ot + (d0 + dd) * L + 16 * v), alpha[v]);
      for (int64_t j = 0; j < jn; ++j) {
        __m512 pv[HV];
        for (int v = 0; v < HV; ++v) pv[v] = _mm512_load_ps(st + j * L + 16 * v);
        for (int dd = 0; dd < 8; ++dd) {
          const __m512 vb = _mm512_set1_ps(vr[j][d0 + dd]);
          for (int v = 0; v < HV; ++v) acc[dd][v] = _mm512_fmadd_ps(pv[v], vb, acc[dd][v]);
        }
      }
      for (int dd = 0; dd < 8; ++dd)
        for (int v = 0; v < HV; ++v) _mm512_store_ps(ot + (d0 + dd) * L + 16 * v, acc[dd][v]);
    }
  }
  for (int64_t d = 0; d < D; ++d)
    for (int v = 0; v < HV; ++v)
      _mm512_store_ps(ot + d * L + 16 * v, _mm512_div_ps(_mm512_load_ps(ot + d * L + 16 * v), l[v]));
}

using TileFn = void (*)(const float*, const int32_t*, int64_t, const float*, const float*, const int64_t*, int64_t,
                        float*);
constexpr TileFn TILES[4] = {nullptr, tile<1>, tile<2>, tile<3>};
constexpr int64_t MAX_LANES = 48;    // query heads per tile: rows * (H / KVH) <= 48, in up to 3 vectors

at::Tensor paged_chunk_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_table, int64_t ctx_len, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3,
              "paged_chunk_attention: q must be float32 [Q, H, D] on CPU");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.dim() == 4 &&
              k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_chunk_attention: caches must be contiguous float32 [NB, BS, KVH, D] of one shape");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 1,
              "paged_chunk_attention: block_table must be int64 [W]");
  const int64_t Q = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), KVH = k_cache.size(2), W = block_table.size(0);
  TORCH_CHECK(k_cache.size(3) == D && KVH > 0 && H % KVH == 0 && H / KVH <= MAX_LANES,
              "paged_chunk_attention: head_dim or heads mismatch (at most 48 query heads per KV head)");
  TORCH_CHECK(D > 0 && D % 8 == 0 && D <= 512, "paged_chunk_attention: head_dim must be a multiple of 8 up to 512, "
              "got ", D);
  TORCH_CHECK(Q <= ctx_len && ctx_len <= W * BS && ctx_len < (int64_t{1} << 31), "paged_chunk_attention: ", Q,
              " rows over ", ctx_len, " positions; the table holds ", W * BS);
  const at::Tensor qc = q.contiguous(), tc = block_table.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t j = 0; j < (ctx_len + BS - 1) / BS; ++j)
    TORCH_CHECK(tp[j] >= 0 && tp[j] < NB, "paged_chunk_attention: block ", tp[j], " is outside the cache (", NB,
                " blocks)");
  at::Tensor out = at::empty({Q, H, D}, qc.options());
  if (Q == 0) return out;
  const float *qp = qc.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rep = H / KVH, start = ctx_len - Q;
  const int64_t rt = MAX_LANES / rep;                   // rows per tile
  const int64_t tiles = (Q + rt - 1) / rt;
  const float sc = static_cast<float>(scale);
  // (KV head, row tile) pairs across torch's threads
  at::parallel_for(0, KVH * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows(ctx_len);
    alignas(64) int32_t limit[MAX_LANES];
    float* buf = static_cast<float*>(std::aligned_alloc(64, 2 * D * MAX_LANES * sizeof(float)));
    float *qt = buf, *ot = buf + D * MAX_LANES;
    int64_t rows_g = -1;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / tiles, r0 = (i % tiles) * rt, r1 = std::min(Q, r0 + rt);
      if (g != rows_g) {                                // position t's row of KV head g, in floats
        for (int64_t t = 0; t < ctx_len; ++t)
          rows[t] = ((tp[t / BS] * BS + t % BS) * KVH + g) * D;
        rows_g = g;
      }
      const int64_t nq = (r1 - r0) * rep, hv = (nq + 15) / 16, L = hv * 16;
      std::fill(qt, qt + D * L, 0.0f);
      for (int64_t h = 0; h < L; ++h)                   // padding lanes: position 0 only
        limit[h] = h < nq ? static_cast<int32_t>(start + r0 + h / rep + 1) : 1;
      for (int64_t h = 0; h < nq; ++h) {                // lane h: row r0 + h / rep, query head g * rep + h % rep
        const float* src = qp + ((r0 + h / rep) * H + g * rep + h % rep) * D;
        for (int64_t d = 0; d < D; ++d) qt[d * L + h] = src[d] * sc;
      }
      TILES[hv](qt, limit, D, kp, vp, rows.data(), start + r1, ot);
      for (int64_t h = 0; h < nq; ++h) {
        float* dst = op + ((r0 + h / rep) * H + g * rep + h % rep) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = ot[d * L + h];
      }
    }
    std::free(buf);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdcluster, m) {
  m.def("paged_chunk_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, int ctx_len, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("paged_chunk_attention", &paged_chunk_attention);
}
