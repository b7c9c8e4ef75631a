// Argument validation shared by the CPU and CUDA implementations of every op.
//
// Two kinds of checks:
//  * metadata (dtype, device, rank, shape, strides): always on, free;
//  * values of the small int tensors (index tables within the pool or -1,
//    seg_tenant in [-1, T), seg_indptr non-decreasing within [0, N]): one pass
//    over small tensors, on by default. For CUDA tensors they copy to the host
//    (a sync), so serving under CUDA-graph capture turns them off with
//    mos_ext.set_index_checks(False) or MOS_EXT_CHECK_INDICES=0. With checks
//    off, kernels still never read out of bounds: an out-of-range index or
//    tenant is skipped like -1 and segment bounds are clamped to [0, N].
//
// Errors name the argument and say what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mos {

bool index_checks_enabled();
// Returns the previous setting.
bool set_index_checks(bool enabled);

// The accumulation dtype for activations of dtype `act`: fp64 for fp64, else fp32.
at::ScalarType acc_dtype(at::ScalarType act);

// Sizes of one side (A or B) of a sharded adapter batch.
struct SideDims {
  int64_t T = 0;  // tenants
  int64_t r = 0;  // (padded) rank
  int64_t l = 0;  // slots per rank row
  int64_t s = 0;  // shard length
  int64_t P = 0;  // pool rows
};

// Dims of the segment metadata.
struct SegDims {
  int64_t S = 0;  // segments
  int64_t N = 0;  // tokens
};

// gather_shards(pool [P, s], idx [..., r, l]).
SideDims check_gather_shards(const at::Tensor& pool, const at::Tensor& idx);

// sgmv_shrink(x [N, h], pool_a, idx_a, seg_indptr, seg_tenant); h == l_a * s_a.
SideDims check_shrink(const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& idx_a,
                      const at::Tensor& seg_indptr, const at::Tensor& seg_tenant);

// sgmv_expand(y [N, o], v [N, r], pool_b, idx_b, scale [T], ...); o == l_b * s_b.
SideDims check_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b,
                      const at::Tensor& idx_b, const at::Tensor& scale,
                      const at::Tensor& seg_indptr, const at::Tensor& seg_tenant);

// sgmv(y, x, pool_a, pool_b, idx_a, idx_b, scale, ...). Returns {A side, B side}.
std::pair<SideDims, SideDims> check_sgmv(const at::Tensor& y, const at::Tensor& x,
                                         const at::Tensor& pool_a, const at::Tensor& pool_b,
                                         const at::Tensor& idx_a, const at::Tensor& idx_b,
                                         const at::Tensor& scale, const at::Tensor& seg_indptr,
                                         const at::Tensor& seg_tenant);

// shard_grad(grad_pool [P, s] acc dtype, u [N, r] acc dtype, x [N, l*s], idx [T, r, l],
//            scale [T], ...).
SideDims check_shard_grad(const at::Tensor& grad_pool, const at::Tensor& u, const at::Tensor& x,
                          const at::Tensor& idx, const at::Tensor& scale,
                          const at::Tensor& seg_indptr, const at::Tensor& seg_tenant);

}  // namespace mos
