// The Python module mos_ext._C: loading it registers the `mos` ops (schemas in
// mos_ops.cpp, kernels in cpu/ and cuda/). It also exposes a few runtime
// switches; mos_ext/__init__.py wraps them.
#include <torch/extension.h>

#include "checks.h"
#include "sharded_lora.h"
#include "cpu/dense.h"
#include "cpu/kernels.h"

namespace {

std::vector<std::string> available_cpu_isas() {
  int n = 0;
  const char* const* names = mos::cpu::available_isas(&n);
  return std::vector<std::string>(names, names + n);
}

bool set_cpu_isa(const std::string& name) {
  if (!mos::cpu::set_isa(name.c_str())) {
    std::string avail;
    for (const auto& s : available_cpu_isas()) avail += (avail.empty() ? "" : ", ") + s;
    throw std::invalid_argument("cpu isa '" + name + "' is not available here; available: " + avail);
  }
  return true;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mos_ext native library: the torch.ops.mos operators";
  m.def("set_index_checks", &mos::set_index_checks, py::arg("enabled"),
        "Turn value checks of index tables and segments on/off; returns the previous setting.");
  m.def("index_checks_enabled", &mos::index_checks_enabled);
  m.def("set_device_index_checks", &mos::set_device_index_checks, py::arg("enabled"),
        "Per-call value checks of index tensors on GPUs (off by default); returns the previous setting.");
  m.def("device_index_checks_enabled", &mos::device_index_checks_enabled);
  m.def("set_deterministic_grads", &mos::set_deterministic_grads, py::arg("enabled"),
        "Deterministic pool gradients in the backward of sharded_lora and sgmv_shrink; returns the previous setting.");
  m.def("deterministic_grads_enabled", &mos::deterministic_grads_enabled);
  m.def("validate_index_values", &mos::validate_index_values, py::arg("idx"), py::arg("pool_rows"),
        py::arg("name"));
  m.def("validate_map_values", &mos::validate_map_values, py::arg("map"), py::arg("idx"), py::arg("pool_rows"),
        py::arg("name"));
  m.def("validate_segment_values", &mos::validate_segment_values, py::arg("seg_indptr"), py::arg("seg_tenant"),
        py::arg("num_tokens"), py::arg("num_tenants"));
  m.def("pool_grad_tap", &mos::pool_grad_tap, py::arg("pool"));
  m.def("cpu_isa", [] { return std::string(mos::cpu::kernels().isa); });
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"));
  m.def("available_cpu_isas", &available_cpu_isas);
  m.def("cpu_dense_min_tokens", &mos::cpu::dense_min_tokens);
  m.def("set_cpu_dense_min_tokens", &mos::cpu::set_dense_min_tokens, py::arg("n"),
        "Segments of at least n tokens (fp32/fp64) take the BLAS path on CPU; 0 turns it off. "
        "Returns the previous value.");
  m.def("cuda_built", [] {
#ifdef MOS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
