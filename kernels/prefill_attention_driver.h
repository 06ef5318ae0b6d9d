// pdcluster::paged_chunk_attention's driver, shared by prefill_attention.cpp (AVX-512) and prefill_attention_avx2.cpp
// (AVX2): the argument checks, the (KV head, row tile) pairs across torch's threads with each tile's query heads
// transposed into lanes, the op's registration. The including file defines, in an anonymous namespace before the
// include:
//   LANES        floats per vector (16 or 8)
//   MAX_LANES    query heads per tile (48: rows * (H / KVH) <= 48)
//   TILES[hv]    for hv = 1 .. MAX_LANES / LANES: the tile of hv vectors of heads, prefill_attention.cpp's tile<HV>:
//                void fn(qt, limit, D, k_cache, v_cache, rows, n, ot)
// Shapes and arithmetic: prefill_attention.cpp's header. Exactly one of the two sources is built into a library.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace {

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
      const int64_t nq = (r1 - r0) * rep, hv = (nq + LANES - 1) / LANES, L = hv * LANES;
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
