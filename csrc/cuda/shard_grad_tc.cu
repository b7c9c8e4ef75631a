// Host side of the tensor-core shard_grad (see shard_grad_tc.cuh): the path
// choice (host facts only) and the launcher.
#include "dispatch.cuh"
#include "shard_grad_tc.cuh"

namespace mos {
namespace gpu {
template __global__ void shard_grad_tc_kernel<false>(float*, const float*, int64_t, const __nv_bfloat16*, int64_t,
                                                    const float*, SideArgs, SegArgs, FastItems, float*);
template __global__ void shard_grad_tc_kernel<true>(float*, const float*, int64_t, const __nv_bfloat16*, int64_t,
                                                   const float*, SideArgs, SegArgs, FastItems, float*);
}  // namespace gpu
}  // namespace mos

namespace mos {
namespace gpu {

namespace {
constexpr int64_t kInt32Max = 0x7fffffff;
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
// Deterministic mode: per-item partials [items, r, h] fp32, at most this many bytes (256 MiB).
constexpr int64_t kDetMaxPartBytes = int64_t{1} << 28;
int64_t det_part_bytes(int64_t bound, const Table& t) {
  if (bound <= 0) return 0;
  const int64_t per_item = t.r * t.l * t.s * 4;
  return per_item > 0 && bound > kDetMaxPartBytes / per_item ? kDetMaxPartBytes + 1 : bound * per_item;
}
}  // namespace

SgmvPlan plan_shard_grad(CudaPath mode, DType act, const void* x, int64_t x_stride, const void* grad,
                         const Table& t, const Segments& seg, bool deterministic) {
  SgmvPlan plan;
  const char* why = nullptr;
  if (mode == CudaPath::Generic) why = "MOS_EXT_CUDA_PATH=generic";
  else if (act != DType::BF16) why = "activations are not bf16";
  else if (t.s <= 0 || t.s % 8 != 0) why = "shard length is not a multiple of 8";
  else if (!aligned16(x) || x_stride % 8 != 0) why = "activation rows are not 16-byte aligned (offset view or odd stride)";
  else if (!aligned16(grad)) why = "grad is not 16-byte aligned";
  else if (t.l * t.s > kInt32Max || t.r * t.l > kInt32Max || t.P > kInt32Max) why = "dimensions beyond 32-bit indexing";
  else if (t.r <= 0) why = "rank 0";
  else if (ceil_div(t.l * t.s, kTcCols) > 0x7fffffff || ceil_div(t.r, kTcRanks) > 65535) why = "grid limits";
  const int64_t bound = item_bound(seg.N < kInt32Max ? seg.N : kInt32Max, seg.S, kTcTM);
  if (!why && deterministic && det_part_bytes(bound, t) > kDetMaxPartBytes)
    why = "deterministic mode with per-item partials above the workspace cap (fixed-order owner kernel)";
  plan.fast = why == nullptr;
  plan.reason = why ? why : deterministic ? "fast (deterministic two-pass)" : "fast";
  if (plan.fast && (deterministic || seg.S > kFastInlineSegments))
    plan.workspace_bytes = static_cast<size_t>(16 * seg.S + 4 * (bound > 0 ? bound : 0));
  if (plan.fast && deterministic) {
    plan.workspace_bytes = (plan.workspace_bytes + 15) / 16 * 16;
    plan.workspace_bytes += det_part_bytes(bound, t);
  }
  return plan;
}

cudaError_t launch_shard_grad_fast(void* grad, const void* u, int64_t u_stride, const void* x, int64_t x_stride,
                                   const Table& table, const float* scale, const Segments& seg, bool deterministic,
                                   void* workspace, cudaStream_t stream) {
  const SegArgs sg = seg_args(seg);
  const SideArgs S = side_args(table);
  const int64_t bound = item_bound(sg.N, sg.S, kTcTM);
  if (bound <= 0 || sg.S <= 0 || S.r <= 0 || S.s <= 0 || S.l <= 0 || S.P <= 0) return cudaSuccess;
  FastItems fi;
  float* part = nullptr;
  if (deterministic || sg.S > kFastInlineSegments) {
    if (workspace == nullptr || !aligned16(workspace)) return cudaErrorInvalidValue;
    int4* meta = static_cast<int4*>(workspace);
    int32_t* item_seg = reinterpret_cast<int32_t*>(meta + sg.S);
    fast_items_kernel<kItemsBlock><<<1, kItemsBlock, 0, stream>>>(meta, item_seg, bound, sg, kTcTM);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    fi.meta = meta;
    fi.item_seg = item_seg;
    const size_t head = (static_cast<size_t>(16 * sg.S + 4 * bound) + 15) / 16 * 16;
    part = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + head);
  }
  const dim3 grid(cap_grid_x(bound), static_cast<unsigned>(ceil_div(S.l * S.s, kTcCols)),
                  cap_grid_yz(ceil_div(S.r, kTcRanks)));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;  // h beyond 65535 * 64 columns
  float* g = static_cast<float*>(grad);
  const float* uu = static_cast<const float*>(u);
  const __nv_bfloat16* xx = static_cast<const __nv_bfloat16*>(x);
  if (!deterministic) {
    shard_grad_tc_kernel<false><<<grid, kTcThreads, 0, stream>>>(g, uu, u_stride, xx, x_stride, scale, S, sg, fi,
                                                                 nullptr);
    return cudaGetLastError();
  }
  shard_grad_tc_kernel<true><<<grid, kTcThreads, 0, stream>>>(g, uu, u_stride, xx, x_stride, scale, S, sg, fi, part);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  // Row blocks from the shape only: at most kGradMaxRowBlocks, at least kGradWarps rows each.
  int64_t rows = ceil_div(S.P, kGradMaxRowBlocks);
  rows = rows < kGradWarps ? kGradWarps : rows;
  const dim3 grid2(cap_grid_x(ceil_div(S.P, rows)), cap_grid_yz(ceil_div(S.s, kGradDC)));
  if (static_cast<int64_t>(grid2.y) * kGradDC < S.s) return cudaErrorInvalidConfiguration;
  shard_grad_det_reduce_kernel<<<grid2, kGradThreads, 0, stream>>>(g, part, S, sg, fi, bound, rows);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace mos
