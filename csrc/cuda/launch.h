// Torch-free entry points of the CUDA kernels (csrc/cuda/*.cu), called by the
// launcher csrc/cuda/register_cuda.cpp after it has validated the tensors with
// csrc/checks.h. Plain C++ (includes only the CUDA runtime API), so it compiles
// under both g++ and nvcc.
//
// Every launch_* function enqueues its kernel(s) on `stream` and returns
// cudaGetLastError() (cudaSuccess when there was nothing to do). None of them
// synchronizes, allocates, or reads device memory on the host: grids are sized
// from the arguments' shapes only, so the calls are CUDA-graph capturable.
//
// Semantics are those of the CPU kernels (csrc/cpu/kernels_impl.h, MOS.md §3):
// activations F32 / F64 / F16 / BF16; pools in the activation dtype or F32;
// accumulation in float (double for F64 activations); outputs rounded once.
// Index entries outside [0, P) are zero shards, segment tenants outside [0, T)
// skip the segment, segment bounds are clamped to [0, N] and never overlap.
// Shared tables (Table::map): tenant t reads table map[t, 0] and its entry p
// names pool row map[t, 1] + p, used iff 0 <= p < P - map[t, 1]; a map row
// naming no table or a base outside [0, P] (value checks off) skips all of the
// tenant's slots.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mos {
namespace gpu {

// Element types (same numbering as mos::cpu::DType).
enum class DType : int32_t { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Segment metadata, device pointers. N must be at most INT32_MAX.
struct Segments {
  const int32_t* indptr = nullptr;  // [S+1]
  const int32_t* tenant = nullptr;  // [S]
  int64_t S = 0;                    // segments
  int64_t N = 0;                    // tokens
  int64_t T = 0;                    // tenants (the tables' first dim; the map's rows with shared tables)
};

// One side (A or B) of a sharded adapter batch: pool [P, s] (contiguous) and
// tables idx [U, r, l] (contiguous, rank-major). Without a map, table t is
// tenant t's (U = T) and names pool rows directly. With a shared-table map
// [T, 2] (int32, contiguous, device memory; row t = (table u, row base)),
// tenant t reads table idx[u] and its entry p names pool row base + p.
struct Table {
  const void* pool = nullptr;
  DType pool_dtype = DType::F32;
  const int32_t* idx = nullptr;
  int64_t P = 0, s = 0, l = 0, r = 0;
  const int32_t* map = nullptr;  // [T, 2] shared-table map, or nullptr (table t, base 0)
  int64_t U = 0;                 // tables (idx's first dim); only read with a map
};

// out [n, s] = pool[idx[k]] rows (zeros for idx outside [0, P)); elem_size is
// the pool element size in bytes (2, 4 or 8).
cudaError_t launch_gather_shards(void* out, const void* pool, int elem_size, const int32_t* idx,
                                 int64_t n, int64_t P, int64_t s, cudaStream_t stream);

// v[n, j] = sum_i <x[n, i*s:(i+1)*s], pool_a[idx_a[t, j, i]]> for the tokens of
// valid segments. v [N, r] (accumulation dtype, row stride v_stride) must be
// zero-initialized by the caller: rows outside valid segments are not written.
cudaError_t launch_sgmv_shrink(void* v, int64_t v_stride, const void* x, int64_t x_stride, DType act,
                               const Table& a, const Segments& seg, cudaStream_t stream);

// y[n, i*s:(i+1)*s] += scale[t] * sum_j v[n, j] * pool_b[idx_b[t, j, i]].
cudaError_t launch_sgmv_expand(void* y, int64_t y_stride, DType act, const void* v, int64_t v_stride,
                               const Table& b, const float* scale, const Segments& seg,
                               cudaStream_t stream);

// Fused shrink + expand (v stays in shared memory). Needs a.r == b.r and
// a.r <= sgmv_max_rank(act, device).
cudaError_t launch_sgmv(void* y, int64_t y_stride, const void* x, int64_t x_stride, DType act,
                        const Table& a, const Table& b, const float* scale, const Segments& seg,
                        cudaStream_t stream);

// The largest rank the fused sgmv kernel supports on `device` (its per-token
// rank-space vector lives in shared memory).
int64_t sgmv_max_rank(DType act, int device);

// grad[idx[t, j, i], c] += scale[t] * sum_n u[n, j] * x[n, i*s + c].
// grad [P, s] and u [N, r] in the accumulation dtype; table.pool is unused.
// deterministic = false: float/double atomicAdd (order varies run to run);
// deterministic = true: each grad element is owned by one thread that adds its
// contributions in a fixed order (bitwise reproducible, no atomics; slower).
cudaError_t launch_shard_grad(void* grad, const void* u, int64_t u_stride, const void* x, int64_t x_stride,
                              DType act, const Table& table, const float* scale, const Segments& seg,
                              bool deterministic, cudaStream_t stream);

// ---- path choice (generic kernels above vs the fast path) ----------------------

// MOS_EXT_CUDA_PATH: auto (fast wherever its preconditions hold), generic (the
// kernels above always), fast (same as auto today: the fast path wherever it
// can run, the generic kernels elsewhere; kept distinct so that a later shape
// heuristic in auto cannot hide the fast path from a benchmark).
enum class CudaPath : int32_t { Auto = 0, Generic = 1, Fast = 2 };

enum class SgmvKind : int32_t { Fused = 0, Shrink = 1, Expand = 2 };

struct SgmvPlan {
  bool fast = false;
  bool prefill = false;        // fused only: the tensor-core prefill kernel (sgmv_prefill.cuh)
  const char* reason = "";     // "fast...", or why the generic kernels run
  size_t workspace_bytes = 0;  // device scratch the fast launch needs (16-byte aligned), 0 if none
};

// Host-only decision from dtypes, shapes, strides and pointer alignment (never
// a device read: capture-safe). The fast path needs fp16 / bf16 activations,
// pools in that dtype or fp32, shard lengths that are multiples of 8, 16-byte
// aligned pools and activation rows (pointer and row stride), 32-bit
// dimensions, and (fused, expand) rank <= 1024. The fused op with rank
// <= 64 and long segments on average (N >= 64 and N >= 32 * S) takes the
// tensor-core prefill kernel (prefill = true). `a` is used unless kind is
// Expand, `b` unless kind is Shrink; x / y likewise.
SgmvPlan plan_sgmv(CudaPath mode, SgmvKind kind, DType act, const void* x, int64_t x_stride, const void* y,
                   int64_t y_stride, const Table* a, const Table* b, const Segments& seg);

// The fast kernels (sgmv_fast.cuh), for a plan with fast = true: Fused is
// launch_sgmv, Shrink launch_sgmv_shrink (v fp32, zero-initialized by the
// caller), Expand launch_sgmv_expand (v fp32). `workspace` holds
// plan.workspace_bytes (may be null when that is 0).
cudaError_t launch_sgmv_fast(SgmvKind kind, void* y, int64_t y_stride, const void* x, int64_t x_stride, void* v,
                             int64_t v_stride, DType act, const Table* a, const Table* b, const float* scale,
                             const Segments& seg, void* workspace, cudaStream_t stream);

// The tensor-core prefill kernel (sgmv_prefill.cuh), for a Fused plan with
// prefill = true (bf16 / fp16 activations; pools in that dtype or fp32).
cudaError_t launch_sgmv_prefill(void* y, int64_t y_stride, const void* x, int64_t x_stride, DType act, const Table& a,
                                const Table& b, const float* scale, const Segments& seg, void* workspace,
                                cudaStream_t stream);

// shard_grad: the tensor-core kernels (shard_grad_tc.cuh) for fp16 / bf16
// activations, shard lengths multiple of 8, 16-byte aligned x rows and grad,
// 32-bit dimensions; otherwise launch_shard_grad. deterministic = true: two
// passes (per-item partials in the workspace, then a fixed-order reduction;
// bitwise reproducible), run over consecutive chunks of items whose partials
// fit in det_part_bytes (<= 0: 256 MiB; at least one item per chunk). The
// workspace holds one chunk. Same plan type as sgmv; launch_shard_grad_fast
// must get the plan's arguments (the chunk size is recomputed from them).
SgmvPlan plan_shard_grad(CudaPath mode, DType act, const void* x, int64_t x_stride, const void* grad,
                         const Table& t, const Segments& seg, bool deterministic, int64_t det_part_bytes);
cudaError_t launch_shard_grad_fast(void* grad, const void* u, int64_t u_stride, const void* x, int64_t x_stride,
                                   DType act, const Table& table, const float* scale, const Segments& seg,
                                   bool deterministic, int64_t det_part_bytes, void* workspace,
                                   cudaStream_t stream);

}  // namespace gpu
}  // namespace mos
