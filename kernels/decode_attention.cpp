// pdcluster::paged_decode_attention: decode attention over the paged KV cache on CPU (AVX-512), read in place.
// Its torch reference is decode_attention.py's paged_decode_attention_ref (the Triton kernel's too).
//
//   q        float32 [B, H, D]             one row per decode token (a verify step's drafts are rows too)
//   k_cache  float32 [NB, BS, KVH, D]      token t of row b: block block_tables[b, t / BS], slot t % BS
//   v_cache  float32 [NB, BS, KVH, D]
//   block_tables int64 [B, W]; seq_lens int64 [B]: row b attends to positions 0..seq_lens[b]-1 (0: an empty
//                slot, its output row is zeros, as the reference's)
//   -> float32 [B, H, D]
//
// Why: the torch path gathers every row's blocks into a contiguous copy (read + write) and then SDPA reads it
// again, with a float mask over the padded width; at a decode step that is most of attention's time. Here each
// (row, KV head) pair reads its K/V rows once, from L2 for the 2nd..H/KVH-th query head of the group.
// Arithmetic per query head: s_t = (q . k_t) * scale, p_t = exp(s_t - max s), o = (sum_t p_t v_t) / sum_t p_t,
// in float32; exp is a degree-6 polynomial on [-ln2/2, ln2/2] scaled by 2^n (~1 ulp for exp's range here).
// A row's result does not depend on its batch-mates or on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

inline __m512 exp_ps(__m512 x) {          // x <= 0 (scores minus their max); below -87.3 the result is ~0
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);          // x - n ln2 in two parts (Cephes)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// One query head against positions 0..n-1 of one KV head: out[0..D) = softmax(q K^T * scale) V.
// NV = D / 16 vectors per row; rows(t) = offset of position t's row in the caches (floats).
template <int NV>
void head(const float* q, const float* kc, const float* vc, const int64_t* rows, int64_t n, float scale,
          float* s, float* out) {
  __m512 qv[NV];
  for (int c = 0; c < NV; ++c)
    qv[c] = _mm512_loadu_ps(q + 16 * c);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    const float* k = kc + rows[t];
    __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
    for (int c = 1; c < NV; ++c)
      acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), acc);
    s[t] = _mm512_reduce_add_ps(acc) * scale;
    m = s[t] > m ? s[t] : m;
  }
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (t < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), mv)));
    _mm512_mask_storeu_ps(s + t, tail, e);
    sum = _mm512_add_ps(sum, e);
  }
  __m512 o[NV];
  for (int c = 0; c < NV; ++c)
    o[c] = _mm512_setzero_ps();
  for (int64_t u = 0; u < n; ++u) {
    const float* v = vc + rows[u];
    const __m512 p = _mm512_set1_ps(s[u]);
    for (int c = 0; c < NV; ++c)
      o[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16 * c), o[c]);
  }
  const __m512 denom = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
  for (int c = 0; c < NV; ++c)
    _mm512_storeu_ps(out + 16 * c, _mm512_div_ps(o[c], denom));
}

using HeadFn = void (*)(const float*, const float*, const float*, const int64_t*, int64_t, float, float*, float*);

HeadFn head_for(int64_t D) {
  switch (D) {
    case 32: return head<2>;
    case 64: return head<4>;
    case 96: return head<6>;
    case 128: return head<8>;
    case 256: return head<16>;
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
  const HeadFn fn = head_for(D);
  TORCH_CHECK(fn != nullptr, "paged_decode_attention: head_dim must be 32, 64, 96, 128 or 256, got ", D);
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
  // (row, KV head) pairs across torch's threads; a pair's rep query heads share its K/V rows (from L2)
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows(longest);
    std::vector<float> s(longest + 16);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, g = i % KVH, n = lp[b];
      if (n == 0) {
        std::fill(op + (b * H + g * rep) * D, op + (b * H + (g + 1) * rep) * D, 0.0f);
        continue;
      }
      for (int64_t t = 0; t < n; ++t)
        rows[t] = ((tp[b * W + t / BS] * BS + t % BS) * KVH + g) * D;
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t h = g * rep + r;
        fn(qp + (b * H + h) * D, kp, vp, rows.data(), n, sc, s.data(), op + (b * H + h) * D);
      }
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
