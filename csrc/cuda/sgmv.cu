// Launcher of the fused sgmv kernel (see sgmv.cuh).
#include "dispatch.cuh"
#include "sgmv.cuh"

namespace mos {
namespace gpu {

// Every (activation, pool_a, pool_b) combination the op accepts (pools in the
// activation dtype or float32, independently per side) is instantiated by the
// dtype dispatch in launch_sgmv; the fast kernels (sgmv_fast.cu) likewise.

namespace {

// Blocks the launcher aims for before it splits the output columns of an item
// across blocks (each split recomputes the item's shrink).
constexpr int64_t kTargetBlocks = 256;

// Static shared memory of the fused kernel, plus slack for locate_item's.
template <typename AT>
constexpr size_t fused_static_smem() {
  return sizeof(SgmvSmem<AT>) + 256;
}

template <typename AT>
int64_t max_rank_for(int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the (non-sticky) error so the launch does not report it
    optin = 48 * 1024;
  }
  const int64_t avail = static_cast<int64_t>(optin) - static_cast<int64_t>(fused_static_smem<AT>());
  return avail > 0 ? avail / (SgmvCfg<AT>::BM * static_cast<int64_t>(sizeof(AT))) : 0;
}

template <typename XT, typename PA, typename PB>
cudaError_t run_fused(void* y, int64_t y_stride, const void* x, int64_t x_stride, const SideArgs& A,
                      const SideArgs& B, const float* scale, const SegArgs& sg, cudaStream_t stream) {
  using AT = typename AccOf<XT>::type;
  constexpr int BM = SgmvCfg<AT>::BM, BN = SgmvCfg<AT>::BN;
  const int64_t items = item_bound(sg.N, sg.S, BM);
  const int64_t tiles = ceil_div(B.l * B.s, BN);
  if (items <= 0 || tiles <= 0 || A.r <= 0 || sg.S <= 0) return cudaSuccess;
  // Few items (decode): split the output columns so that ~kTargetBlocks run.
  int64_t z = ceil_div(kTargetBlocks, items);
  z = z < 1 ? 1 : (z > tiles ? tiles : z);
  const size_t dyn = static_cast<size_t>(BM) * static_cast<size_t>(A.r) * sizeof(AT);
  auto kernel = sgmv_fused_kernel<XT, PA, PB>;
  const cudaError_t e = opt_in_smem(kernel, dyn, fused_static_smem<AT>());  // large ranks
  if (e != cudaSuccess) return e;
  const dim3 grid(cap_grid_x(items), cap_grid_yz(z));
  kernel<<<grid, kSgmvThreads, dyn, stream>>>(static_cast<XT*>(y), y_stride, static_cast<const XT*>(x), x_stride,
                                              scale, A, B, sg);
  return cudaGetLastError();
}

}  // namespace

int64_t sgmv_max_rank(DType act, int device) {
  return act == DType::F64 ? max_rank_for<double>(device) : max_rank_for<float>(device);
}

cudaError_t launch_sgmv(void* y, int64_t y_stride, const void* x, int64_t x_stride, DType act, const Table& a,
                        const Table& b, const float* scale, const Segments& seg, cudaStream_t stream) {
  if (a.r != b.r) return cudaErrorInvalidValue;
  const SegArgs sg = seg_args(seg);
  const SideArgs A = side_args(a), B = side_args(b);
  // Every (activation, pool_a, pool_b) combination is instantiated, so mixed
  // pool storage (one side fp32, the other in the activation dtype) stays fused.
  return dispatch_act_pool(act, a.pool_dtype, [&](auto xt, auto pa) -> cudaError_t {
    using XT = typename decltype(xt)::type;
    using PA = typename decltype(pa)::type;
    return dispatch_pool<XT>(act, b.pool_dtype, [&](auto pb) -> cudaError_t {
      using PB = typename decltype(pb)::type;
      return run_fused<XT, PA, PB>(y, y_stride, x, x_stride, A, B, scale, sg, stream);
    });
  });
}

}  // namespace gpu
}  // namespace mos
