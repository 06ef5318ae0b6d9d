// pdcluster::f32_mm: float32 x @ W.T on AVX-512 or AVX2 for any row count, W interleaved 64 columns at a time.
// Reference: kernels/f32_mm.py (f32_mm_ref: F.linear on the unpacked weight).
//
//   x   float32 [M, K]         any M >= 0, K >= 1
//   w   float32 [Np/64, K, 64] block b holds columns 64 b .. 64 b + 63 of W.T: w[b, k, j] = W[64 b + j, k]
//                              (kernels/f32_mm.py pack; N padded to Np, a multiple of 64, with zero rows)
//   n   int                    N <= Np: the columns written
//   ->  float32 [M, N]
//
// Why: MKL's sgemm runs 4-32 rows (decode batches, speculative verification, short prefills, the tail of a
// cached prefix) at 1.45-1.78x the time these rows need: it packs W on every call. Here W is packed once, at
// load; a tile of 6 rows x 64 columns keeps 24 accumulators in registers, per k 4 loads of W and 6 broadcasts
// of x for 24 FMAs (AVX2: 16 columns a pass, 12 accumulators; f32_tile.h). Blocks are taken a chunk
// (~CHUNK_BYTES, L2) at a time: every 6-row tile of x runs over the chunk from L2 while the next chunk is
// prefetched, a share per tile.
//
// Each y[m, n] is one FMA chain over k in order: the same bits whatever M, the other rows, N's padding and the
// threads (batch-invariant). Non-finite values propagate as IEEE arithmetic does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include "f32_tile.h"

#include <algorithm>
#include <cstdint>

namespace {

using pdcluster_f32::COLS;
using pdcluster_f32::HALF_TILES;
using pdcluster_f32::MR;
using pdcluster_f32::TILES;
constexpr int64_t CHUNK_BYTES = 256 * 1024;  // blocks swept by every tile before the next (L2-resident)

at::Tensor f32_mm(const at::Tensor& x, const at::Tensor& w, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "f32_mm: x must be float32 [M, K] on CPU");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kFloat && w.device().is_cpu() && w.size(2) == COLS && w.is_contiguous(),
              "f32_mm: w must be contiguous float32 [Np/64, K, 64] on CPU (kernels/f32_mm.py pack)");
  const int64_t M = x.size(0), K = x.size(1), NB = w.size(0);
  TORCH_CHECK(w.size(1) == K && K > 0, "f32_mm: x is [M, ", K, "], w is [", NB, ", ", w.size(1), ", 64]");
  TORCH_CHECK(n > (NB - 1) * COLS && n <= NB * COLS, "f32_mm: n = ", n, " does not fit ", NB, " blocks of 64");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t block = K * COLS;                                  // floats of one block
  const int64_t CH = std::max<int64_t>(1, CHUNK_BYTES / (block * 4));
  const int64_t T = (M + MR - 1) / MR;                             // tiles of x
  // threads split the columns in halves of a block (32), so that 9 blocks (N = 576) split 4.5 / 4.5 on 2 threads;
  // a range's first and last block may be half blocks
  at::parallel_for(0, 2 * NB, 1, [&](int64_t begin, int64_t end) {
    const int64_t b_begin = begin / 2, b_end = (end + 1) / 2;      // blocks this range touches
    for (int64_t c0 = b_begin; c0 < b_end; c0 += CH) {
      const int64_t c1 = std::min(b_end, c0 + CH);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t m0 = t * MR, r = std::min(MR, M - m0);
        for (int64_t b = c0; b < c1; ++b) {
          const int64_t lo = std::max<int64_t>(0, begin * 32 - b * COLS);          // this range's columns of b
          const int64_t hi = std::min<int64_t>(COLS, end * 32 - b * COLS);
          const int64_t ncols = std::min(hi, n - b * COLS) - lo;                   // <= 0: padding only
          if (ncols <= 0) continue;
          // tile t prefetches the rows k = t mod T of block b + CH (none past this range)
          const float* pf = b + CH < b_end ? wp + (b + CH) * block + lo : nullptr;
          (hi - lo == COLS ? TILES : HALF_TILES)[r](xp + m0 * K, K, 0, K, wp + b * block + lo,
                                                     yp + m0 * n + b * COLS + lo, n, ncols, true, pf, T, t);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdcluster, m) {
  m.def("f32_mm(Tensor x, Tensor w, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("f32_mm", &f32_mm);
}

// AOTInductor's direct call (engine/cpu_ext.py C_SHIMS), for the compiled decode layer's float linears.
extern "C" AOTITorchError aoti_torch_cpu_f32_mm(AtenTensorHandle x, AtenTensorHandle w, int64_t n, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor y = f32_mm(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(w), n);
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(y));
  });
}
