// Host side of the tensor-core shard_grad (see shard_grad_tc.cuh): the path
// choice (host facts only) and the launcher.
#include "dispatch.cuh"
#include "items_prepass.cuh"
#include "shard_grad_tc.cuh"

namespace mos {
namespace gpu {

namespace {
constexpr int64_t kInt32Max = 0x7fffffff;
size_t round16(int64_t b) { return static_cast<size_t>((b + 15) / 16 * 16); }

// Deterministic mode: per-item partials of one chunk of items, at most this
// many bytes by default (256 MiB); a chunk holds at least one item.
constexpr int64_t kDetMaxPartBytes = int64_t{1} << 28;

// Items per chunk of the deterministic mode: as many as fit in `cap` bytes of
// partials (cap <= 0: the default), at least one, at most `bound`, and few
// enough that chunk * r * h stays within 32-bit indexing (pass 2).
int64_t det_chunk_items(const Table& t, int64_t bound, int64_t cap) {
  if (cap <= 0) cap = kDetMaxPartBytes;
  const int64_t per_item = t.r * t.l * t.s;  // floats; the plan ensures per_item <= INT32_MAX
  if (per_item <= 0) return bound < 1 ? 1 : bound;  // l == 0: nothing to add (the launch returns early)
  int64_t chunk = cap / (per_item * 4);
  if (chunk > kInt32Max / per_item) chunk = kInt32Max / per_item;
  if (chunk > bound) chunk = bound;
  return chunk < 1 ? 1 : chunk;
}

// Workspace layout: [item pre-pass (if it runs)] [deterministic: item_tenant
// of a chunk, then the chunk's partials], each part 16-byte aligned.
struct DetLayout {
  size_t prepass = 0, tenants = 0, part = 0;
  size_t total() const { return prepass + tenants + part; }
};
DetLayout layout(const Table& t, int64_t S, int64_t N, bool deterministic, int64_t chunk) {
  DetLayout w;
  w.prepass = items_prepass_bytes(S, N, kTcTM);
  if (deterministic) {
    w.tenants = round16(4 * chunk);
    w.part = static_cast<size_t>(chunk * t.r * t.l * t.s * 4);
  }
  return w;
}
}  // namespace

SgmvPlan plan_shard_grad(CudaPath mode, DType act, const void* x, int64_t x_stride, const void* grad,
                         const Table& t, const Segments& seg, bool deterministic, int64_t det_part_bytes) {
  SgmvPlan plan;
  const char* why = nullptr;
  if (mode == CudaPath::Generic) why = "MOS_EXT_CUDA_PATH=generic";
  else if (act != DType::BF16 && act != DType::F16) why = "activations are not fp16/bf16";
  else if (t.s <= 0 || t.s % 8 != 0) why = "shard length is not a multiple of 8";
  else if (!aligned16(x) || x_stride % 8 != 0) why = "activation rows are not 16-byte aligned (offset view or odd stride)";
  else if (!aligned16(grad)) why = "grad is not 16-byte aligned";
  else if (t.l * t.s > kInt32Max || t.r * t.l > kInt32Max || t.P > kInt32Max) why = "dimensions beyond 32-bit indexing";
  else if (t.r <= 0) why = "rank 0";
  else if (ceil_div(t.l * t.s, kTcCols) > 65535 || ceil_div(t.r, kTcRanks) > 65535) why = "grid limits";
  else if (deterministic && (t.r * t.l * t.s > kInt32Max || seg.T * t.r * t.l > kInt32Max - kGradThreads))
    why = "dimensions beyond 32-bit indexing (deterministic reduction: r * l * s or T * r * l)";
  else if (deterministic && ceil_div(t.s, kGradDC) > 65535) why = "grid limits (deterministic reduction: shard length)";
  plan.fast = why == nullptr;
  if (!plan.fast) {
    plan.reason = why;
    return plan;
  }
  const int64_t bound = item_bound(seg.N < kInt32Max ? seg.N : kInt32Max, seg.S, kTcTM);
  plan.reason = "fast";
  int64_t chunk = 0;
  if (deterministic && bound > 0) {
    chunk = det_chunk_items(t, bound, det_part_bytes);
    plan.reason = chunk < bound ? "fast (deterministic two-pass in item chunks)" : "fast (deterministic two-pass)";
  } else if (deterministic) {
    plan.reason = "fast (deterministic two-pass)";
  }
  plan.workspace_bytes = layout(t, seg.S, seg.N, deterministic, chunk).total();
  return plan;
}

cudaError_t launch_shard_grad_fast(void* grad, const void* u, int64_t u_stride, const void* x, int64_t x_stride,
                                   DType act, const Table& table, const float* scale, const Segments& seg,
                                   bool deterministic, int64_t det_part_bytes, void* workspace,
                                   cudaStream_t stream) {
  const SegArgs sg = seg_args(seg);
  const SideArgs S = side_args(table);
  const int64_t bound = item_bound(sg.N, sg.S, kTcTM);
  if (bound <= 0 || sg.S <= 0 || S.r <= 0 || S.s <= 0 || S.l <= 0 || S.P <= 0) return cudaSuccess;
  if (act != DType::BF16 && act != DType::F16) return cudaErrorInvalidValue;
  const int64_t chunk = deterministic ? det_chunk_items(table, bound, det_part_bytes) : 0;
  const DetLayout w = layout(table, sg.S, sg.N, deterministic, chunk);
  if (w.total() > 0 && (workspace == nullptr || !aligned16(workspace))) return cudaErrorInvalidValue;
  FastItems fi;
  cudaError_t e = items_prepass(sg, kTcTM, workspace, fi, stream);
  if (e != cudaSuccess) return e;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  int32_t* item_tenant = deterministic ? reinterpret_cast<int32_t*>(ws + w.prepass) : nullptr;
  float* part = deterministic ? reinterpret_cast<float*>(ws + w.prepass + w.tenants) : nullptr;

  const unsigned gy = static_cast<unsigned>(ceil_div(S.l * S.s, kTcCols));
  const unsigned gz = static_cast<unsigned>(ceil_div(S.r, kTcRanks));
  if (gy > 65535 || gz > 65535) return cudaErrorInvalidConfiguration;  // the plan refuses these shapes
  float* g = static_cast<float*>(grad);
  const float* uu = static_cast<const float*>(u);
  // Pass 1 over items [b0, b0 + n) (DET = false: all items, atomics).
  auto pass1 = [&](auto xt, auto det, int64_t b0, int64_t n) {
    using XT = typename decltype(xt)::type;
    constexpr bool DET = decltype(det)::value;
    const dim3 grid(cap_grid_x(n), gy, gz);
    shard_grad_tc_kernel<XT, DET><<<grid, kTcThreads, 0, stream>>>(
        g, uu, u_stride, static_cast<const XT*>(x), x_stride, scale, S, sg, fi, static_cast<int>(b0), part,
        item_tenant);
    return cudaGetLastError();
  };
  auto run = [&](auto xt) -> cudaError_t {
    if (!deterministic) return pass1(xt, std::false_type{}, 0, bound);
    // Row blocks from the shape only: at most kGradMaxRowBlocks, at least kGradWarps rows each.
    int64_t rows = ceil_div(S.P, kGradMaxRowBlocks);
    rows = rows < kGradWarps ? kGradWarps : rows;
    const dim3 grid2(cap_grid_x(ceil_div(S.P, rows)), cap_grid_yz(ceil_div(S.s, kGradDC)));
    if (static_cast<int64_t>(grid2.y) * kGradDC < S.s) return cudaErrorInvalidConfiguration;
    // Chunks in item order: pass 2 of chunk k adds into grad before chunk k + 1 starts
    // (same stream), so the order of additions is fixed.
    for (int64_t b0 = 0; b0 < bound; b0 += chunk) {
      const int64_t n = bound - b0 < chunk ? bound - b0 : chunk;
      cudaError_t err = pass1(xt, std::true_type{}, b0, n);
      if (err != cudaSuccess) return err;
      shard_grad_det_reduce_kernel<<<grid2, kGradThreads, 0, stream>>>(
          g, part, item_tenant, static_cast<int>(n), S, static_cast<int>(sg.T), static_cast<int>(rows));
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  };
  return act == DType::F16 ? run(Tag<__half>{}) : run(Tag<__nv_bfloat16>{});
}

}  // namespace gpu
}  // namespace mos
