// Launcher of the shard_grad kernels (see shard_grad.cuh).
#include "dispatch.cuh"
#include "shard_grad.cuh"

namespace mos {
namespace gpu {

#define MOS_SHARD_GRAD_INSTANTIATE(XT)                                                                        \
  template __global__ void shard_grad_atomic_kernel<XT>(AccOf<XT>::type*, const AccOf<XT>::type*, int64_t,   \
                                                        const XT*, int64_t, const float*, SideArgs, SegArgs); \
  template __global__ void shard_grad_owner_kernel<XT>(AccOf<XT>::type*, const AccOf<XT>::type*, int64_t,    \
                                                       const XT*, int64_t, const float*, SideArgs, SegArgs,   \
                                                       int64_t);
MOS_SHARD_GRAD_INSTANTIATE(float)
MOS_SHARD_GRAD_INSTANTIATE(double)
MOS_SHARD_GRAD_INSTANTIATE(__half)
MOS_SHARD_GRAD_INSTANTIATE(__nv_bfloat16)
#undef MOS_SHARD_GRAD_INSTANTIATE

cudaError_t launch_shard_grad(void* grad, const void* u, int64_t u_stride, const void* x, int64_t x_stride, DType act,
                              const Table& table, const float* scale, const Segments& seg, bool deterministic,
                              cudaStream_t stream) {
  const SegArgs sg = seg_args(seg);
  const SideArgs S = side_args(table);
  return dispatch_act(act, [&](auto xt) -> cudaError_t {
    using XT = typename decltype(xt)::type;
    using AT = typename AccOf<XT>::type;
    if (S.r <= 0 || S.s <= 0 || S.l <= 0 || S.P <= 0 || sg.N <= 0 || sg.S <= 0) return cudaSuccess;
    AT* g = static_cast<AT*>(grad);
    const AT* uu = static_cast<const AT*>(u);
    const XT* xx = static_cast<const XT*>(x);
    if (deterministic) {
      // Row blocks from the shape only: at most kGradMaxRowBlocks, at least 8 rows each.
      int64_t rows = ceil_div(S.P, kGradMaxRowBlocks);
      rows = rows < kGradWarps ? kGradWarps : rows;
      const dim3 grid(cap_grid_x(ceil_div(S.P, rows)), cap_grid_yz(ceil_div(S.s, kGradDC)));
      if (static_cast<int64_t>(grid.y) * kGradDC < S.s)
        return cudaErrorInvalidConfiguration;  // shard length beyond the grid limit (> 2^21)
      shard_grad_owner_kernel<XT><<<grid, kGradThreads, 0, stream>>>(g, uu, u_stride, xx, x_stride, scale, S, sg,
                                                                      rows);
    } else {
      const int64_t items = item_bound(sg.N, sg.S, kGradBM);
      const dim3 grid(cap_grid_x(items), cap_grid_yz(ceil_div(S.l * S.s, kGradThreads)));
      if (static_cast<int64_t>(grid.y) * kGradThreads < S.l * S.s)
        return cudaErrorInvalidConfiguration;  // h beyond the grid limit (> 2^24)
      shard_grad_atomic_kernel<XT><<<grid, kGradThreads, 0, stream>>>(g, uu, u_stride, xx, x_stride, scale, S, sg);
    }
    return cudaGetLastError();
  });
}

}  // namespace gpu
}  // namespace mos
