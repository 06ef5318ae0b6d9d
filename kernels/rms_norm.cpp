// pdcluster::rms_norm: aten's rms_norm (x [M, E] float32, w [E]), behind an AOTInductor C shim.
// The eager float32 step calls F.rms_norm; the compiled decode layer (engine/cpu_compile.py) calls this, the same
// kernel, so both round alike. Through AOTI's generated code instead, rms_norm's mean would be inductor's own
// reduction (another summation order) or aten's mean through the proxy executor (~4 us a call, boxed arguments).
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

namespace {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(w.dim() == 1 && x.dim() >= 1 && x.size(-1) == w.size(0), "rms_norm: w must be [E] for x [..., E]");
  return at::rms_norm(x, {w.size(0)}, w, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdcluster, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdcluster, CPU, m) {
  m.impl("rms_norm", &rms_norm);
}

extern "C" AOTITorchError aoti_torch_cpu_rms_norm(AtenTensorHandle x, AtenTensorHandle w, double eps,
                                                  AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor y = rms_norm(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(w), eps);
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(y));
  });
}
