// CPU implementation of shard_grad, the fused pool-gradient accumulation
// (MOS.md §3). Threads own disjoint column ranges of every pool row, so the
// result is deterministic (bitwise independent of the thread count) whatever
// `deterministic` says.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace mos {
namespace cpu {
namespace {

void shard_grad_cpu(const at::Tensor& grad_pool, const at::Tensor& u, const at::Tensor& x,
                    const at::Tensor& idx, const at::Tensor& scale, const at::Tensor& seg_indptr,
                    const at::Tensor& seg_tenant, bool /*deterministic: always on CPU*/) {
  const SideDims d = check_shard_grad(grad_pool, u, x, idx, scale, seg_indptr, seg_tenant);
  if (d.r == 0 || d.s == 0 || x.size(0) == 0) return;
  const std::vector<Item> items = build_items(seg_indptr, seg_tenant, x.size(0), d.T);
  if (items.empty()) return;
  ShardGradArgs g;
  g.grad = grad_pool.data_ptr();
  g.u = u.data_ptr();
  g.u_stride = u.stride(0);
  g.x = x.data_ptr();
  g.x_stride = x.stride(0);
  g.act = to_dtype(x.scalar_type());
  g.scale = scale.data_ptr<float>();
  g.side.P = d.P;
  g.side.s = d.s;
  g.side.l = d.l;
  g.side.r = d.r;
  g.side.idx = idx.data_ptr<int32_t>();
  const KernelTable& k = kernels();
  // Column units of one SIMD vector of the accumulation type.
  const int64_t w = x.scalar_type() == at::kDouble ? k.vec_width_f32 / 2 : k.vec_width_f32;
  const int64_t units = (d.s + w - 1) / w;
  at::parallel_for(0, units, 1, [&](int64_t b, int64_t e) {
    k.shard_grad(g, items.data(), static_cast<int64_t>(items.size()), b * w, std::min(e * w, d.s));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mos, CPU, m) { m.impl("shard_grad", &shard_grad_cpu); }

}  // namespace cpu
}  // namespace mos
