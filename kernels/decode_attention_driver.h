// pdcluster::paged_decode_attention's driver, shared by decode_attention.cpp (AVX-512) and decode_attention_avx2.cpp
// (AVX2): the argument checks, the (row, KV head) pairs across torch's threads, the op's registration and its
// AOTInductor C shim. The including file defines, in an anonymous namespace before the include:
//   LANES                           floats per vector (16 or 8)
//   template <int NV, int REP> void group(q, k_cache, v_cache, rows, n, scale, s, ld, out)
//                                   REP query heads of one KV head at head_dim NV * LANES (decode_attention.cpp's)
// Shapes and arithmetic: decode_attention.cpp's header. Exactly one of the two sources is built into a library.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using GroupFn = void (*)(const float*, const float*, const float*, const int64_t*, int64_t, float, float*, int64_t,
                         float*);

template <int NV>
GroupFn group_rep(int64_t rep) {
  switch (rep) {
    case 1: return group<NV, 1>;
    case 2: return group<NV, 2>;
    case 3: return group<NV, 3>;
    case 4: return group<NV, 4>;
    case 6: return group<NV, 6>;
    case 8: return group<NV, 8>;
    default: return nullptr;
  }
}

// The kernel for rep query heads per KV head at head_dim D; nullptr if D has none (every supported D has one for
// rep == 1).
GroupFn group_for(int64_t D, int64_t rep) {
  switch (D) {
    case 32: return group_rep<32 / LANES>(rep);
    case 64: return group_rep<64 / LANES>(rep);
    case 96: return group_rep<96 / LANES>(rep);
    case 128: return group_rep<128 / LANES>(rep);
    case 256: return group_rep<256 / LANES>(rep);
    default: return nullptr;
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3,
              "paged_decode_attention: q must be float32 [B, H, D] on CPU");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.dim() == 4 &&
              k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode_attention: caches must be contiguous float32 [NB, BS, KVH, D] of one shape");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 &&
              seq_lens.scalar_type() == at::kLong && seq_lens.dim() == 1,
              "paged_decode_attention: block_tables must be int64 [B, W], seq_lens int64 [B]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), KVH = k_cache.size(2), W = block_tables.size(1);
  TORCH_CHECK(k_cache.size(3) == D && KVH > 0 && H % KVH == 0, "paged_decode_attention: head_dim or heads mismatch");
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "paged_decode_attention: one table and length per row");
  const GroupFn one = group_for(D, 1);                   // one query head at a time: every supported head_dim
  TORCH_CHECK(one != nullptr, "paged_decode_attention: head_dim must be 32, 64, 96, 128 or 256, got ", D);
  const at::Tensor qc = q.contiguous(), tc = block_tables.contiguous(), lc = seq_lens.contiguous();
  const int64_t *tp = tc.data_ptr<int64_t>(), *lp = lc.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {                 // every position a row reads lies in the cache
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= W * BS, "paged_decode_attention: row ", b, " attends to ", lp[b],
                " positions; its table holds ", W * BS);
    for (int64_t j = 0; j < (lp[b] + BS - 1) / BS; ++j)
      TORCH_CHECK(tp[b * W + j] >= 0 && tp[b * W + j] < NB, "paged_decode_attention: block ", tp[b * W + j],
                  " of row ", b, " is outside the cache (", NB, " blocks)");
    longest = lp[b] > longest ? lp[b] : longest;
  }
  at::Tensor out = at::empty({B, H, D}, qc.options());
  const float *qp = qc.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rep = H / KVH;
  const float sc = static_cast<float>(scale);
  const GroupFn gfn = group_for(D, rep);
  // (row, KV head) pairs across torch's threads; a pair's rep query heads share its K/V rows (from L2)
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows(longest);
    std::vector<float> s((gfn != nullptr ? rep : 1) * (longest + 16));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, g = i % KVH, n = lp[b];
      if (n == 0) {
        std::fill(op + (b * H + g * rep) * D, op + (b * H + (g + 1) * rep) * D, 0.0f);
        continue;
      }
      for (int64_t t = 0; t < n; ++t)
        rows[t] = ((tp[b * W + t / BS] * BS + t % BS) * KVH + g) * D;
      if (gfn != nullptr) {
        gfn(qp + (b * H + g * rep) * D, kp, vp, rows.data(), n, sc, s.data(), longest + 16, op + (b * H + g * rep) * D);
        continue;
      }
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h)
        one(qp + (b * H + h) * D, kp, vp, rows.data(), n, sc, s.data(), longest + 16, op + (b * H + h) * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdcluster, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}

// AOTInductor's direct call (engine/cpu_ext.py C_SHIMS): the compiled decode layer calls this instead of going
// through its proxy executor (~4 us a call, boxed arguments).
extern "C" AOTITorchError aoti_torch_cpu_paged_decode_attention(AtenTensorHandle q, AtenTensorHandle k_cache,
                                                                AtenTensorHandle v_cache, AtenTensorHandle tables,
                                                                AtenTensorHandle lens, double scale,
                                                                AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor out = paged_decode_attention(*tensor_handle_to_tensor_pointer(q), *tensor_handle_to_tensor_pointer(k_cache),
                                            *tensor_handle_to_tensor_pointer(v_cache),
                                            *tensor_handle_to_tensor_pointer(tables),
                                            *tensor_handle_to_tensor_pointer(lens), scale);
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(out));
  });
}
