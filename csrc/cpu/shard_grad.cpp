// CPU implementation of shard_grad, the fused pool-gradient accumulation
// (MOS.md §3). The register-tiled kernel lets threads own disjoint column
// ranges of every pool row, so its result is bitwise independent of the thread
// count. With deterministic=false, long fp32/fp64 segments take the BLAS path
// (dense.h): reproducible for a given thread count, faster for many tokens.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "dense.h"

namespace mos {
namespace cpu {
namespace {

void shard_grad_cpu(const at::Tensor& grad_pool, const at::Tensor& u, const at::Tensor& x,
                    const at::Tensor& idx, const at::Tensor& scale, const at::Tensor& seg_indptr,
                    const at::Tensor& seg_tenant, bool deterministic) {
  const SideDims d = check_shard_grad(grad_pool, u, x, idx, scale, seg_indptr, seg_tenant);
  if (d.r == 0 || d.s == 0 || x.size(0) == 0) return;
  const Plan plan =
      plan_items(seg_indptr, seg_tenant, x.size(0), d.T, !deterministic && dense_dtype(x.scalar_type()));
  dense_shard_grad(grad_pool, u, x, idx, scale, d, plan.dense);
  const std::vector<Item>& items = plan.blocks;
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
