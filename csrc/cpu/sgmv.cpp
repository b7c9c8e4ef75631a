// CPU implementations of sgmv_shrink, sgmv_expand and sgmv (MOS.md §3).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "dense.h"

namespace mos {
namespace cpu {
namespace {

void run_items(const std::vector<Item>& items,
               void (*fn)(const SgmvArgs&, const Item*, int64_t, int64_t), const SgmvArgs& g) {
  if (items.empty()) return;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1,
                   [&](int64_t b, int64_t e) { fn(g, items.data(), b, e); });
}

// Unchecked halves over prepared items (arguments validated by the caller).
void shrink_into(const at::Tensor& v, const at::Tensor& x, const Side& a, const std::vector<Item>& items) {
  SgmvArgs g;
  g.x = x.data_ptr();
  g.x_stride = x.stride(0);
  g.act = to_dtype(x.scalar_type());
  g.v = v.data_ptr();
  g.v_stride = v.stride(0);
  g.a = a;
  run_items(items, kernels().shrink, g);
}

void expand_from(const at::Tensor& y, const at::Tensor& v, const Side& b, const at::Tensor& scale,
                 const std::vector<Item>& items) {
  SgmvArgs g;
  g.y = y.data_ptr();
  g.y_stride = y.stride(0);
  g.act = to_dtype(y.scalar_type());
  g.v = const_cast<void*>(v.data_ptr());
  g.v_stride = v.stride(0);
  g.scale = scale.data_ptr<float>();
  g.b = b;
  run_items(items, kernels().expand, g);
}

at::Tensor sgmv_shrink_cpu(const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& idx_a,
                           const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, const OptMap& map_a) {
  const SideDims d = check_shrink(x, pool_a, idx_a, seg_indptr, seg_tenant, map_a);
  at::Tensor v = at::zeros({x.size(0), d.r}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (d.r == 0 || x.size(0) == 0) return v;
  const Side a = make_side(pool_a, idx_a, d, map_ptr(map_a));
  const Plan plan = plan_items(seg_indptr, seg_tenant, x.size(0), d.T, dense_dtype(x.scalar_type()), {&a});
  dense_shrink(v, x, pool_a, a, plan.dense);
  shrink_into(v, x, a, plan.blocks);
  return v;
}

void sgmv_expand_cpu(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b,
                     const at::Tensor& idx_b, const at::Tensor& scale, const at::Tensor& seg_indptr,
                     const at::Tensor& seg_tenant, const OptMap& map_b) {
  const SideDims d = check_expand(y, v, pool_b, idx_b, scale, seg_indptr, seg_tenant, map_b);
  if (d.r == 0 || y.size(0) == 0 || y.size(1) == 0) return;
  const Side b = make_side(pool_b, idx_b, d, map_ptr(map_b));
  const Plan plan = plan_items(seg_indptr, seg_tenant, y.size(0), d.T, dense_dtype(y.scalar_type()), {&b});
  dense_expand(y, v, pool_b, b, scale, plan.dense);
  expand_from(y, v, b, scale, plan.blocks);
}

void sgmv_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& pool_a,
              const at::Tensor& pool_b, const at::Tensor& idx_a, const at::Tensor& idx_b,
              const at::Tensor& scale, const at::Tensor& seg_indptr, const at::Tensor& seg_tenant,
              const OptMap& map_a, const OptMap& map_b) {
  const auto dims = check_sgmv(y, x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant, map_a, map_b);
  if (dims.first.r == 0 || x.size(0) == 0 || y.size(1) == 0) return;
  const Side a = make_side(pool_a, idx_a, dims.first, map_ptr(map_a));
  const Side b = make_side(pool_b, idx_b, dims.second, map_ptr(map_b));
  const Plan plan = plan_items(seg_indptr, seg_tenant, x.size(0), dims.first.T, dense_dtype(x.scalar_type()), {&a, &b});
  dense_sgmv(y, x, pool_a, pool_b, a, b, scale, plan.dense);
  const std::vector<Item>& items = plan.blocks;
  if (items.empty()) return;
  if (pool_a.scalar_type() != pool_b.scalar_type()) {
    // Mixed storage (one pool fp32, the other in the activation dtype): the
    // fused kernel is instantiated for one pool dtype, so go through v [N, r].
    at::Tensor v = at::zeros({x.size(0), dims.first.r}, x.options().dtype(acc_dtype(x.scalar_type())));
    shrink_into(v, x, a, items);
    expand_from(y, v, b, scale, items);
    return;
  }
  SgmvArgs g;
  g.x = x.data_ptr();
  g.x_stride = x.stride(0);
  g.y = y.data_ptr();
  g.y_stride = y.stride(0);
  g.act = to_dtype(x.scalar_type());
  g.scale = scale.data_ptr<float>();
  g.a = a;
  g.b = b;
  run_items(items, kernels().sgmv, g);
}

}  // namespace

TORCH_LIBRARY_IMPL(mos, CPU, m) {
  m.impl("sgmv_shrink", &sgmv_shrink_cpu);
  m.impl("sgmv_expand", &sgmv_expand_cpu);
  m.impl("sgmv", &sgmv_cpu);
}

}  // namespace cpu
}  // namespace mos
