// The one TORCH_LIBRARY(mos, m) block of the package: every schema of the op
// contract (shared/design/MOS.md §3), nothing else. Kernels register themselves
// with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/register_cuda.cpp;
// `sharded_lora` (composite + autograd) and `sgmv_shrink`'s autograd are
// csrc/sharded_lora.cpp; fake (meta) impls and gather_shards' autograd live in
// mos_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(mos, m) {
  // out[..., j, i*s:(i+1)*s] = pool[idx[..., j, i]]   (idx == -1 -> zeros)
  m.def("gather_shards(Tensor pool, Tensor idx) -> Tensor");

  // Shared tables (optional map_a / map_b [T, 2] int32, row t = (table u, row base)):
  // tenant t reads table idx[u] and its entries name rows base + idx[u, j, i] of the
  // pool. Without a map, table t at base 0. docs/OPS.md has the whole contract.

  // v[n, j] = sum_i <x[n, i*s_a:(i+1)*s_a], pool_a[idx_a[t, j, i]]>   (fp32; fp64 for fp64 x)
  m.def(
      "sgmv_shrink(Tensor x, Tensor pool_a, Tensor idx_a, Tensor seg_indptr, "
      "Tensor seg_tenant, Tensor? map_a=None) -> Tensor");

  // y[n, i*s_b:(i+1)*s_b] += scale[t] * sum_j v[n, j] * pool_b[idx_b[t, j, i]]
  m.def(
      "sgmv_expand(Tensor(a!) y, Tensor v, Tensor pool_b, Tensor idx_b, Tensor scale, "
      "Tensor seg_indptr, Tensor seg_tenant, Tensor? map_b=None) -> ()");

  // y += scale[t] * B_t (A_t x) per segment, shrink and expand fused.
  m.def(
      "sgmv(Tensor(a!) y, Tensor x, Tensor pool_a, Tensor pool_b, Tensor idx_a, "
      "Tensor idx_b, Tensor scale, Tensor seg_indptr, Tensor seg_tenant, "
      "Tensor? map_a=None, Tensor? map_b=None) -> ()");

  // grad_pool[idx[t, j, i]] += scale[t] * sum_{n in segments of t} u[n, j] * x[n, i*s:(i+1)*s]
  m.def(
      "shard_grad(Tensor(a!) grad_pool, Tensor u, Tensor x, Tensor idx, Tensor scale, "
      "Tensor seg_indptr, Tensor seg_tenant, bool deterministic=False) -> ()");

  // Functional, differentiable: (delta, v) with v = sgmv_shrink(x, ...) and
  // delta = sgmv_expand(zeros, v, ...). Implemented (CompositeExplicitAutograd)
  // and differentiated in csrc/sharded_lora.cpp on top of the ops above.
  m.def(
      "sharded_lora(Tensor x, Tensor pool_a, Tensor pool_b, Tensor idx_a, Tensor idx_b, "
      "Tensor scale, Tensor seg_indptr, Tensor seg_tenant) -> (Tensor, Tensor)");
}
