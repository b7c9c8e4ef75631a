// CPU implementation of gather_shards: out[..., j, i*s:(i+1)*s] = pool[idx[..., j, i]].
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace mos {
namespace cpu {
namespace {

at::Tensor gather_shards_cpu(const at::Tensor& pool, const at::Tensor& idx) {
  const SideDims d = check_gather_shards(pool, idx);
  std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end() - 1);
  shape.push_back(d.l * d.s);
  at::Tensor out = at::empty(shape, pool.options());
  const int64_t n = idx.numel();
  if (n == 0 || d.s == 0) return out;
  const int64_t row_bytes = d.s * pool.element_size();
  const char* src = static_cast<const char*>(pool.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int32_t* ip = idx.data_ptr<int32_t>();
  at::parallel_for(0, n, 1024, [&](int64_t b, int64_t e) {
    gather_rows(dst + b * row_bytes, src, ip + b, e - b, d.P, row_bytes);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mos, CPU, m) { m.impl("gather_shards", &gather_shards_cpu); }

}  // namespace cpu
}  // namespace mos
