// pdcluster::int8_amx_mm: int8 x int8 -> int32 GEMM on AMX tiles, over a weight prepacked once into tiles.
// Reference: torch._int_mm(x, w.t()) (engine/quant/int8_amx.py): the same exact integer sums, so the same result.
//
//   x      int8  [M, K]                 K % 64 == 0 (any M: a last partial 16-row tile is padded with zeros)
//   tiles  int8  [N/16, K/64, 16, 64]   tiles[nt, kc, kk, 4 n + j] = w[16 nt + n, 64 kc + 4 kk + j]: the VNNI
//                                       layout of AMX's B operand, one 1 KiB tile per 16 columns x 64 of K
//   ->     int32 [M, N]                 N % 32 == 0
//
// Why: torch._int_mm re-blocks its weight on every call, and oneDNN's prepacked path has ~30-50 us of fixed cost a
// call; a decode step of 32 rows spent ~16 ms in the int8 copies' 120 linears, ~3x their weights' read time.
// Here each thread takes 32-column blocks of the output and, per block, every 32-row block of x: 4 C tiles
// (2 x 2), 2 A tiles (x rows, from L1/L2), 2 B tiles (1 KiB each, streamed once per row block).
// AMX needs the process's permission for its tile state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
constexpr long XFEATURE_XTILEDATA = 18;

bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-3: C (16 x 16 int32), 4-5: A (16 rows x 64 int8), 6-7: B (16 x 64 int8)
void configure() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// C[32 rows of x from xr, 32 columns of tile block nb] over all of K; xr: 32 rows (padded), stride K bytes.
// out: 32 x 32 int32 at stride ldo (elements).
inline void block(const int8_t* xr, const int8_t* b0, const int8_t* b1, int64_t K, int32_t* out, int64_t ldo) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kc = 0; kc < K / 64; ++kc) {
    _tile_loadd(4, xr + kc * 64, K);
    _tile_loadd(5, xr + 16 * K + kc * 64, K);
    _tile_loadd(6, b0 + kc * 1024, 64);
    _tile_loadd(7, b1 + kc * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, out, ldo * 4);
  _tile_stored(1, out + 16, ldo * 4);
  _tile_stored(2, out + 16 * ldo, ldo * 4);
  _tile_stored(3, out + 16 * ldo + 16, ldo * 4);
}

at::Tensor int8_amx_mm(const at::Tensor& x, const at::Tensor& tiles) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kChar && x.dim() == 2,
              "int8_amx_mm: x must be int8 [M, K] on CPU");
  TORCH_CHECK(tiles.scalar_type() == at::kChar && tiles.dim() == 4 && tiles.size(2) == 16 && tiles.size(3) == 64 &&
              tiles.is_contiguous(), "int8_amx_mm: tiles must be contiguous int8 [N/16, K/64, 16, 64]");
  const int64_t M = x.size(0), K = x.size(1), N = tiles.size(0) * 16;
  TORCH_CHECK(tiles.size(1) * 64 == K, "int8_amx_mm: x has K = ", K, ", the tiles ", tiles.size(1) * 64);
  TORCH_CHECK(N % 32 == 0, "int8_amx_mm: N must be a multiple of 32, got ", N);
  TORCH_CHECK(amx_permitted(), "int8_amx_mm: the OS does not grant this process AMX tile state");
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kInt));
  if (M == 0)
    return out;
  const int64_t M32 = (M + 31) / 32 * 32;
  at::Tensor xs = x.contiguous();
  if (M32 != M) {                                         // pad to whole 32-row blocks with zero rows
    at::Tensor padded = at::zeros({M32, K}, xs.options());
    padded.narrow(0, 0, M).copy_(xs);
    xs = padded;
  }
  const int8_t* xp = xs.data_ptr<int8_t>();
  const int8_t* tp = tiles.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t tile_stride = (K / 64) * 1024;            // bytes per 16-column tile strip
  at::parallel_for(0, N / 32, 1, [&](int64_t begin, int64_t end) {
    configure();
    alignas(64) int32_t tail[32 * 32];
    for (int64_t nb = begin; nb < end; ++nb) {
      const int8_t* b0 = tp + 2 * nb * tile_stride;
      for (int64_t m0 = 0; m0 < M32; m0 += 32) {
        if (m0 + 32 <= M) {
          block(xp + m0 * K, b0, b0 + tile_stride, K, op + m0 * N + nb * 32, N);
        } else {                                          // the last, partial row block: through a buffer
          block(xp + m0 * K, b0, b0 + tile_stride, K, tail, 32);
          for (int64_t m = m0; m < M; ++m)
            std::memcpy(op + m * N + nb * 32, tail + (m - m0) * 32, 32 * sizeof(int32_t));
        }
      }
    }
    _tile_release();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdcluster, m) {
  m.def("int8_amx_mm(Tensor x, Tensor tiles) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("int8_amx_mm", &int8_amx_mm);
}

// AOTInductor's direct call (engine/cpu_ext.py C_SHIMS), as the other ops'.
extern "C" AOTITorchError aoti_torch_cpu_int8_amx_mm(AtenTensorHandle x, AtenTensorHandle tiles, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor y = int8_amx_mm(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(tiles));
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(y));
  });
}
