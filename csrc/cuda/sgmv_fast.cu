// Host side of the fast sgmv path (see sgmv_fast.cuh): the path choice, made
// from dtypes, shapes, strides and pointer alignment only (no device reads, so
// capture-safe), and the launchers.
#include "dispatch.cuh"
#include "items_prepass.cuh"
#include "sgmv_fast.cuh"
#include "sgmv_prefill.cuh"

namespace mos {
namespace gpu {

namespace {

constexpr int64_t kInt32Max = 0x7fffffff;
constexpr int64_t kFastTargetBlocks = 256;  // fused: split output columns below this many items


// Why a side cannot take the fast path (nullptr: it can).
const char* side_blocker(DType act, const Table& t, bool needs_smem_rank) {
  if (t.pool_dtype != act && t.pool_dtype != DType::F32) return "pool dtype is neither the activation dtype nor fp32";
  // s % 8 == 0 with 2- or 4-byte pool elements also makes every pool row a
  // 16-byte multiple, so the kernels' tenant views (the pool advanced by a
  // shared-table map's row base, tenant_side in common.cuh) keep the pool's
  // 16-byte alignment.
  if (t.s <= 0 || t.s % 8 != 0) return "shard length is not a multiple of 8";
  if (!aligned16(t.pool)) return "pool is not 16-byte aligned";
  if (t.l * t.s > kInt32Max || t.r * t.l > kInt32Max || t.P > kInt32Max) return "dimensions beyond 32-bit indexing";
  if (t.r <= 0) return "rank 0";
  if (needs_smem_rank && t.r > kFastMaxRank) return "rank above the fast path's limit";
  return nullptr;
}

const char* rows_blocker(const void* p, int64_t stride) {
  if (!aligned16(p) || stride % 8 != 0) return "activation rows are not 16-byte aligned (offset view or odd stride)";
  return nullptr;
}

template <typename XT, typename PA, typename PB, int MODE>
cudaError_t run_fast(void* y, int64_t y_stride, const void* x, int64_t x_stride, void* v, int64_t v_stride,
                     const SideArgs& A, const SideArgs& B, const float* scale, const SegArgs& sg, void* workspace,
                     cudaStream_t stream) {
  const int64_t bound = item_bound(sg.N, sg.S, kFastBM);
  if (bound <= 0 || sg.S <= 0) return cudaSuccess;
  FastItems fi;
  const cudaError_t e = items_prepass(sg, kFastBM, workspace, fi, stream);
  if (e != cudaSuccess) return e;
  int64_t z = 1;
  size_t dyn = 0;
  if (MODE == kFastShrink) {
    z = ceil_div(A.r, kFastPassRows);
  } else {
    const int64_t blocks_per_col = ceil_div((B.l * B.s) >> 3, kFastThreads);
    z = MODE == kFastExpand ? blocks_per_col : ceil_div(kFastTargetBlocks, bound);
    z = z < 1 ? 1 : (z > blocks_per_col ? blocks_per_col : z);
    dyn = static_cast<size_t>(kFastBM) * static_cast<size_t>(B.r) * sizeof(float);
  }
  const dim3 grid(cap_grid_x(bound), cap_grid_yz(z));
  sgmv_fast_kernel<XT, PA, PB, MODE><<<grid, kFastThreads, dyn, stream>>>(
      static_cast<XT*>(y), y_stride, static_cast<const XT*>(x), x_stride, static_cast<float*>(v), v_stride, scale, A,
      B, sg, fi);
  return cudaGetLastError();
}

template <typename XT, typename PA, typename PB>
cudaError_t run_prefill(void* y, int64_t y_stride, const void* x, int64_t x_stride, const SideArgs& A,
                        const SideArgs& B, const float* scale, const SegArgs& sg, void* workspace,
                        cudaStream_t stream) {
  const int64_t bound = item_bound(sg.N, sg.S, kPfM);
  if (bound <= 0 || sg.S <= 0) return cudaSuccess;
  FastItems fi;
  cudaError_t e = items_prepass(sg, kPfM, workspace, fi, stream);
  if (e != cudaSuccess) return e;
  auto kernel = sgmv_prefill_kernel<XT, PA, PB>;
  constexpr size_t dyn = PfLayout<XT, PA, PB>::bytes;
  e = opt_in_smem(kernel, dyn);
  if (e != cudaSuccess) return e;
  kernel<<<cap_grid_x(bound), kPfThreads, dyn, stream>>>(static_cast<XT*>(y), y_stride, static_cast<const XT*>(x),
                                                         x_stride, scale, A, B, sg, fi);
  return cudaGetLastError();
}

template <typename F>
cudaError_t dispatch_half(DType act, F&& f) {
  if (act == DType::F16) return f(Tag<__half>{});
  if (act == DType::BF16) return f(Tag<__nv_bfloat16>{});
  return cudaErrorInvalidValue;
}

}  // namespace

SgmvPlan plan_sgmv(CudaPath mode, SgmvKind kind, DType act, const void* x, int64_t x_stride, const void* y,
                   int64_t y_stride, const Table* a, const Table* b, const Segments& seg) {
  SgmvPlan plan;
  const char* why = nullptr;
  if (mode == CudaPath::Generic) {
    why = "MOS_EXT_CUDA_PATH=generic";
  } else if (act != DType::F16 && act != DType::BF16) {
    why = "activations are not fp16/bf16";
  } else {
    const bool shrink = kind != SgmvKind::Expand, expand = kind != SgmvKind::Shrink;
    if (!why && shrink) why = side_blocker(act, *a, false);
    if (!why && expand) why = side_blocker(act, *b, true);
    if (!why && shrink) why = rows_blocker(x, x_stride);
    if (!why && expand) why = rows_blocker(y, y_stride);
    if (!why && kind == SgmvKind::Fused && a->r != b->r) why = "ranks differ";
  }
  plan.fast = why == nullptr;
  plan.reason = why ? why : "fast";
  // Tensor-core prefill: rank <= 64, long segments on average (host facts only).
  plan.prefill = plan.fast && kind == SgmvKind::Fused && a->r <= kPfMaxRank &&
                 seg.N >= kPfM && seg.N >= 32 * seg.S;
  if (plan.prefill) plan.reason = "fast (tensor-core prefill)";
  if (plan.fast) plan.workspace_bytes = items_prepass_bytes(seg.S, seg.N, plan.prefill ? kPfM : kFastBM);
  return plan;
}

cudaError_t launch_sgmv_prefill(void* y, int64_t y_stride, const void* x, int64_t x_stride, DType act, const Table& a,
                                const Table& b, const float* scale, const Segments& seg, void* workspace,
                                cudaStream_t stream) {
  const SegArgs sg = seg_args(seg);
  const SideArgs A = side_args(a), B = side_args(b);
  return dispatch_half(act, [&](auto xt) -> cudaError_t {
    using XT = typename decltype(xt)::type;
    return dispatch_pool<XT>(act, a.pool_dtype, [&](auto pa) -> cudaError_t {
      using PA = typename decltype(pa)::type;
      return dispatch_pool<XT>(act, b.pool_dtype, [&](auto pb) -> cudaError_t {
        using PB = typename decltype(pb)::type;
        return run_prefill<XT, PA, PB>(y, y_stride, x, x_stride, A, B, scale, sg, workspace, stream);
      });
    });
  });
}

cudaError_t launch_sgmv_fast(SgmvKind kind, void* y, int64_t y_stride, const void* x, int64_t x_stride, void* v,
                             int64_t v_stride, DType act, const Table* a, const Table* b, const float* scale,
                             const Segments& seg, void* workspace, cudaStream_t stream) {
  const SegArgs sg = seg_args(seg);
  const SideArgs A = a ? side_args(*a) : SideArgs{};
  const SideArgs B = b ? side_args(*b) : SideArgs{};
  return dispatch_half(act, [&](auto xt) -> cudaError_t {
    using XT = typename decltype(xt)::type;
    switch (kind) {
      case SgmvKind::Fused:
        return dispatch_pool<XT>(act, a->pool_dtype, [&](auto pa) -> cudaError_t {
          using PA = typename decltype(pa)::type;
          return dispatch_pool<XT>(act, b->pool_dtype, [&](auto pb) -> cudaError_t {
            using PB = typename decltype(pb)::type;
            return run_fast<XT, PA, PB, kFastFused>(y, y_stride, x, x_stride, v, v_stride, A, B, scale, sg,
                                                    workspace, stream);
          });
        });
      case SgmvKind::Shrink:
        return dispatch_pool<XT>(act, a->pool_dtype, [&](auto pa) -> cudaError_t {
          using PA = typename decltype(pa)::type;
          return run_fast<XT, PA, XT, kFastShrink>(y, y_stride, x, x_stride, v, v_stride, A, B, scale, sg, workspace,
                                                   stream);
        });
      case SgmvKind::Expand:
        return dispatch_pool<XT>(act, b->pool_dtype, [&](auto pb) -> cudaError_t {
          using PB = typename decltype(pb)::type;
          return run_fast<XT, XT, PB, kFastExpand>(y, y_stride, x, x_stride, v, v_stride, A, B, scale, sg, workspace,
                                                   stream);
        });
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace gpu
}  // namespace mos
