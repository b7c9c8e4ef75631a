// Launcher of the standalone sgmv_expand kernel (see sgmv_expand.cuh).
#include "dispatch.cuh"
#include "sgmv_expand.cuh"

namespace mos {
namespace gpu {

// The (activation, pool) pairs the op accepts.
template __global__ void sgmv_expand_kernel<float, float>(float*, int64_t, const float*, int64_t, const float*,
                                                          SideArgs, SegArgs);
template __global__ void sgmv_expand_kernel<double, double>(double*, int64_t, const double*, int64_t, const float*,
                                                            SideArgs, SegArgs);
template __global__ void sgmv_expand_kernel<double, float>(double*, int64_t, const double*, int64_t, const float*,
                                                           SideArgs, SegArgs);
template __global__ void sgmv_expand_kernel<__half, __half>(__half*, int64_t, const float*, int64_t, const float*,
                                                            SideArgs, SegArgs);
template __global__ void sgmv_expand_kernel<__half, float>(__half*, int64_t, const float*, int64_t, const float*,
                                                           SideArgs, SegArgs);
template __global__ void sgmv_expand_kernel<__nv_bfloat16, __nv_bfloat16>(__nv_bfloat16*, int64_t, const float*,
                                                                          int64_t, const float*, SideArgs, SegArgs);
template __global__ void sgmv_expand_kernel<__nv_bfloat16, float>(__nv_bfloat16*, int64_t, const float*, int64_t,
                                                                  const float*, SideArgs, SegArgs);

cudaError_t launch_sgmv_expand(void* y, int64_t y_stride, DType act, const void* v, int64_t v_stride,
                               const Table& b, const float* scale, const Segments& seg, cudaStream_t stream) {
  const SegArgs sg = seg_args(seg);
  const SideArgs B = side_args(b);
  return dispatch_act_pool(act, b.pool_dtype, [&](auto xt, auto pt) -> cudaError_t {
    using XT = typename decltype(xt)::type;
    using PT = typename decltype(pt)::type;
    using AT = typename AccOf<XT>::type;
    const int64_t items = item_bound(sg.N, sg.S, SgmvCfg<AT>::BM);
    const int64_t tiles = ceil_div(B.l * B.s, SgmvCfg<AT>::BN);
    if (items <= 0 || tiles <= 0 || B.r <= 0 || sg.S <= 0) return cudaSuccess;
    const dim3 grid(cap_grid_x(items), cap_grid_yz(tiles));
    sgmv_expand_kernel<XT, PT><<<grid, kSgmvThreads, 0, stream>>>(
        static_cast<XT*>(y), y_stride, static_cast<const AT*>(v), v_stride, scale, B, sg);
    return cudaGetLastError();
  });
}

}  // namespace gpu
}  // namespace mos
