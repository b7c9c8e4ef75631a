// Launcher of the standalone sgmv_shrink kernel (see sgmv_shrink.cuh).
#include "dispatch.cuh"
#include "sgmv_shrink.cuh"

namespace mos {
namespace gpu {

// The (activation, pool) pairs the op accepts.
template __global__ void sgmv_shrink_kernel<float, float>(float*, int64_t, const float*, int64_t, SideArgs, SegArgs);
template __global__ void sgmv_shrink_kernel<double, double>(double*, int64_t, const double*, int64_t, SideArgs,
                                                            SegArgs);
template __global__ void sgmv_shrink_kernel<double, float>(double*, int64_t, const double*, int64_t, SideArgs,
                                                           SegArgs);
template __global__ void sgmv_shrink_kernel<__half, __half>(float*, int64_t, const __half*, int64_t, SideArgs,
                                                            SegArgs);
template __global__ void sgmv_shrink_kernel<__half, float>(float*, int64_t, const __half*, int64_t, SideArgs,
                                                           SegArgs);
template __global__ void sgmv_shrink_kernel<__nv_bfloat16, __nv_bfloat16>(float*, int64_t, const __nv_bfloat16*,
                                                                          int64_t, SideArgs, SegArgs);
template __global__ void sgmv_shrink_kernel<__nv_bfloat16, float>(float*, int64_t, const __nv_bfloat16*, int64_t,
                                                                  SideArgs, SegArgs);

cudaError_t launch_sgmv_shrink(void* v, int64_t v_stride, const void* x, int64_t x_stride, DType act,
                               const Table& a, const Segments& seg, cudaStream_t stream) {
  const SegArgs sg = seg_args(seg);
  const SideArgs A = side_args(a);
  return dispatch_act_pool(act, a.pool_dtype, [&](auto xt, auto pt) -> cudaError_t {
    using XT = typename decltype(xt)::type;
    using PT = typename decltype(pt)::type;
    using AT = typename AccOf<XT>::type;
    const int64_t items = item_bound(sg.N, sg.S, SgmvCfg<AT>::BM);
    if (items <= 0 || A.r <= 0 || sg.S <= 0) return cudaSuccess;
    const dim3 grid(cap_grid_x(items), cap_grid_yz(ceil_div(A.r, kShrinkRanks)));
    sgmv_shrink_kernel<XT, PT><<<grid, kSgmvThreads, 0, stream>>>(static_cast<AT*>(v), v_stride,
                                                                   static_cast<const XT*>(x), x_stride, A, sg);
    return cudaGetLastError();
  });
}

}  // namespace gpu
}  // namespace mos
