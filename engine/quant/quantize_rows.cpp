// pdcluster::quantize_rows: each row of x rounded to 8 bits on its own symmetric scale, in one op.
// Reference: engine/quant/cpu_linear.py _round_rows (torch ops); the same arithmetic, bit for bit:
//   sx = max(amax(|x|), 1e-30) / 127 (float32),  q = nearbyint(x / sx) (half to even),  q += 128 if shift.
//
//   x  float32 [M, K]  ->  (q int8 [M, K] (uint8 with shift), sx float32 [M, 1])
//
// Why: _round_rows is 5 torch ops, each a pass over x (abs, amax, div, round, the cast); on 2,048-row prefill
// chunks of the int8 copies they took ~45% of the prefill (bench/RESULTS.md, "pdcluster's own CPU ops, called
// directly").
// Here a row is read twice (its max, then its codes), the rows split across torch's threads.
// A row with a NaN keeps a NaN scale (its codes are then 0): the row's result stays non-finite, as the
// reference's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, bool shift) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "quantize_rows: x must be float32 [M, K] on CPU");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor q = at::empty({M, K}, xc.options().dtype(shift ? at::kByte : at::kChar));
  at::Tensor sx = at::empty({M, 1}, xc.options());
  const float* xp = xc.data_ptr<float>();
  uint8_t* qp = static_cast<uint8_t*>(q.data_ptr());
  float* sp = sx.data_ptr<float>();
  const __m512 offset = _mm512_set1_ps(shift ? 128.0f : 0.0f);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = xp + m * K;
      __m512 mx = _mm512_setzero_ps();
      bool nan = false;
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_loadu_ps(row + k);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
      }
      float amax = _mm512_reduce_max_ps(mx);
      for (; k < K; ++k) {
        nan |= std::isnan(row[k]);
        amax = std::fabs(row[k]) > amax ? std::fabs(row[k]) : amax;
      }
      const float s = nan ? std::numeric_limits<float>::quiet_NaN() : (amax > 1e-30f ? amax : 1e-30f) / 127.0f;
      sp[m] = s;
      uint8_t* out = qp + m * K;
      if (nan) {
        std::fill(out, out + K, static_cast<uint8_t>(shift ? 128 : 0));
        continue;
      }
      const __m512 sv = _mm512_set1_ps(s);
      for (k = 0; k + 16 <= K; k += 16) {
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + k), sv),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_add_ps(r, offset))));
      }
      for (; k < K; ++k)
        out[k] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(row[k] / s) + (shift ? 128.0f : 0.0f)));
    }
  });
  return {q, sx};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdcluster, m) {
  m.def("quantize_rows(Tensor x, bool shift) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("quantize_rows", &quantize_rows);
}

// AOTInductor's direct call (engine/cpu_ext.py C_SHIMS), as the other ops'.
extern "C" AOTITorchError aoti_torch_cpu_quantize_rows(AtenTensorHandle x, int32_t shift, AtenTensorHandle* ret0,
                                                       AtenTensorHandle* ret1) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    auto [q, sx] = quantize_rows(*torch::aot_inductor::tensor_handle_to_tensor_pointer(x), shift != 0);
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(q));
    *ret1 = torch::aot_inductor::new_tensor_handle(std::move(sx));
  });
}
