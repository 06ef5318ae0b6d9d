// pdcluster::q4x8_mm's driver, shared by q4x8.cpp (AVX-512 VNNI) and q4x8_avx2.cpp (AVX2): the argument checks,
// x's rows rounded to int8, the blocks of 16 weight rows split across torch's threads, the op's registration and
// its AOTInductor C shim. The including file defines, in an anonymous namespace before the include:
//   GROUP, ROWS, PREFETCH_BLOCKS, MAX_X (int64_t constants: q4x8.cpp's meanings),
//   bool quantize_row(const float* x, int64_t K, int8_t* qx, float* dx, float* sx)
//   template <int MX> void block(w, d, mn, qx, dx, sx, K, y, N, next, next_d, next_mn)   (y[m, 0..15], m < MX)
// Layout and arithmetic: q4x8.cpp's header. Exactly one of the two sources is built into a library.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace {

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
