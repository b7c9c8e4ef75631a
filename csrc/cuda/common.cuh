// Device helpers shared by the CUDA kernels (torch-free: only CUDA headers).
//
//  * element conversions to / from the accumulation type (float, or double for
//    fp64 activations): one rounding on store;
//  * block-wide inclusive scans (sum, max) for a fixed block size;
//  * segment bounds on the device, mirroring csrc/cpu/common.h build_items:
//    segment g covers [n0, n1) with
//        n0 = min(N, max(0, seg_indptr[0..g]))   n1 = min(N, max(0, seg_indptr[0..g+1]))
//    (a running prefix max, so bounds are clamped to [0, N] and never overlap);
//    segments whose tenant is outside [0, T) are skipped;
//  * locate_item: the k-th "item" (a tile of at most BM tokens of one valid
//    segment, in segment order) found by a block-wide scan over the segments,
//    so grids are sized from shapes only (an upper bound on the item count)
//    and nothing is read back to the host.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace mos {
namespace gpu {

// Accumulation type for an activation type: double for double, else float.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename AT, typename T>
__device__ __forceinline__ AT to_acc(T v) {
  return static_cast<AT>(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ double to_acc<double, __half>(__half v) {
  return static_cast<double>(__half2float(v));
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ double to_acc<double, __nv_bfloat16>(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}

// Round an accumulator once into the storage type (round to nearest even).
template <typename T, typename AT>
__device__ __forceinline__ T from_acc(AT v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ bool valid_row(int32_t p, int64_t P) { return p >= 0 && p < P; }

// ---- block scans ---------------------------------------------------------------
// Block size NT (a multiple of 32, at most 1024); every thread of the block must
// call. `wbuf` is shared scratch of at least NT/32 + 1 ints. Returns the inclusive
// scan for this thread and the block total in *total.

struct OpSum {
  __device__ __forceinline__ static int apply(int a, int b) { return a + b; }
  static constexpr int identity = 0;
};
struct OpMax {
  __device__ __forceinline__ static int apply(int a, int b) { return a > b ? a : b; }
  static constexpr int identity = INT_MIN;
};

template <int NT, typename Op>
__device__ __forceinline__ int block_inclusive_scan(int v, int* wbuf, int* total) {
  static_assert(NT % 32 == 0 && NT <= 1024, "block size must be a multiple of 32, at most 1024");
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v = Op::apply(v, o);
  }
  __syncthreads();  // wbuf may still be read by a previous scan
  if (lane == 31) wbuf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = lane < NW ? wbuf[lane] : Op::identity;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int o = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w = Op::apply(w, o);
    }
    if (lane < NW) wbuf[lane] = w;  // inclusive scan of the warp totals
  }
  __syncthreads();
  if (warp > 0) v = Op::apply(v, wbuf[warp - 1]);
  *total = wbuf[NW - 1];
  return v;
}

// Device-side view of one side (A or B) of the adapter batch: pool [P, s]
// (element type known to the kernel), tables [U, r, l] and an optional
// shared-table map [T, 2] (launch.h Table). Kernels read a tenant's table only
// through tenant_side below.
struct SideArgs {
  const void* pool;    // [P, s] in PT
  const int32_t* idx;  // [U, r, l] (U = T without a map)
  int64_t P, s, l, r;
  const int32_t* map = nullptr;  // [T, 2]: row t = (table u, row base); nullptr: table t, base 0
  int64_t U = 0;                 // tables (idx's first dim); only read with a map
};

// Tenant t's view of side X: a copy of X with a single table, idx = the table t
// reads ([r, l]), and the pool starting at t's row base, P = the rows from
// there on. So entry p of idx names row p of the view's pool and is used iff
// 0 <= p < P (valid_row), i.e. pool row base + p of X with 0 <= p < X.P - base.
//   no map:   table t, base 0 (X itself, idx advanced);
//   map row (u, base) with 0 <= u < U and 0 <= base < P: table u, base;
//   otherwise (a bad row with value checks off, or base == P: nothing left):
//             P = 0, every slot skipped; idx (table 0) and pool stay readable
//             pointers (the host checks guarantee U >= 1 when T >= 1).
// Call once per item (two loads from the map), never per entry. The pool moves
// by whole rows (base * s elements of PT): where the fast paths need 16-byte
// aligned pools they also need s % 8 == 0 with 2- or 4-byte PT, so rows are
// 16-byte multiples and the shifted pool stays 16-byte aligned.
template <typename PT>
__device__ __forceinline__ SideArgs tenant_side(const SideArgs& X, int t) {
  SideArgs v = X;
  v.map = nullptr;
  v.U = 1;
  const int64_t per = X.r * X.l;
  if (X.map == nullptr) {
    v.idx = X.idx + static_cast<int64_t>(t) * per;
    return v;
  }
  const int u = __ldg(X.map + 2 * static_cast<int64_t>(t));
  const int base = __ldg(X.map + 2 * static_cast<int64_t>(t) + 1);
  if (u < 0 || u >= X.U || base < 0 || base >= X.P) {
    v.P = 0;
    return v;
  }
  v.idx = X.idx + static_cast<int64_t>(u) * per;
  v.pool = static_cast<const PT*>(X.pool) + static_cast<int64_t>(base) * X.s;
  v.P = X.P - base;
  return v;
}

// ---- segments ------------------------------------------------------------------

struct SegArgs {
  const int32_t* indptr;  // [S+1]
  const int32_t* tenant;  // [S]
  int64_t S;              // segments
  int32_t N;              // tokens, clamped to INT32_MAX (seg_indptr is int32)
  int64_t T;              // tenants
};

// Bounds of the NT segments [g0, g0 + NT) (one per thread, threadIdx.x = g - g0),
// given carry = max(0, indptr[0..g0-1]) (0 for g0 = 0). Threads past S get an
// empty segment with tenant -1. Updates carry to max(0, indptr[0..g0+NT-1]) in
// every thread.
template <int NT>
__device__ __forceinline__ void segment_chunk(const SegArgs& sg, int64_t g0, int& carry, int* wbuf,
                                              int& n0, int& n1, int& t) {
  const int64_t g = g0 + threadIdx.x;
  const bool in = g < sg.S;
  const int a = in ? sg.indptr[g] : INT_MIN;       // start as given
  const int b = in ? sg.indptr[g + 1] : INT_MIN;   // end as given
  int chunk_max;
  const int pm = block_inclusive_scan<NT, OpMax>(a, wbuf, &chunk_max);  // max indptr[g0..g]
  const int lo = max(carry, pm);
  n0 = min(sg.N, lo);
  n1 = min(sg.N, max(lo, b));
  if (!in) n1 = n0;
  const int tt = in ? sg.tenant[g] : -1;
  t = (tt >= 0 && tt < sg.T) ? tt : -1;
  carry = max(carry, chunk_max);
}

struct ItemInfo {
  int n0, n1, t;  // tokens [n0, n1) of tenant t; n0 >= n1 when there is no such item
};

// Upper bound on the number of items (host and device): each valid segment of
// len tokens makes ceil(len / BM) items, so at most N/BM + S, and at most N.
__host__ __device__ inline int64_t item_bound(int64_t N, int64_t S, int BM) {
  const int64_t b = (N + BM - 1) / BM + S;
  return b < N ? b : N;
}

// One chunk of segments tiled into items of at most BM tokens: this thread's
// segment (segment_chunk), its item count (0 for tenant -1 or no tokens), the
// inclusive count over the chunk up to it, and the chunk's total.
struct ChunkItems {
  int n0, n1, t, cnt, incl, total;
};
template <int NT>
__device__ __forceinline__ ChunkItems chunk_items(const SegArgs& sg, int64_t g0, int& carry, int* wbuf, int BM) {
  ChunkItems c;
  segment_chunk<NT>(sg, g0, carry, wbuf, c.n0, c.n1, c.t);
  c.cnt = (c.t >= 0 && c.n1 > c.n0) ? (c.n1 - c.n0 + BM - 1) / BM : 0;
  c.incl = block_inclusive_scan<NT, OpSum>(c.cnt, wbuf, &c.total);
  return c;
}

// The item-th item (0-based, in segment order) of tiles of at most BM tokens.
// Every thread of the block must call; all get the same answer.
template <int NT>
__device__ ItemInfo locate_item(const SegArgs& sg, int64_t item, int BM) {
  __shared__ int wbuf[NT / 32 + 1];
  __shared__ ItemInfo found;
  if (threadIdx.x == 0) found = ItemInfo{0, 0, -1};
  int carry = 0;        // max(0, indptr[0..g0-1])
  int64_t before = 0;   // items in segments [0, g0)
  for (int64_t g0 = 0; g0 < sg.S; g0 += NT) {
    const ChunkItems c = chunk_items<NT>(sg, g0, carry, wbuf, BM);
    const int64_t first = before + (c.incl - c.cnt);
    if (c.cnt > 0 && item >= first && item < first + c.cnt) {
      const int b = c.n0 + static_cast<int>(item - first) * BM;
      found = ItemInfo{b, min(b + BM, c.n1), c.t};  // exactly one thread writes
    }
    before += c.total;
    // Uniform exits: found, or no later segment has tokens (carry == N).
    if (item < before || carry >= sg.N) break;
  }
  __syncthreads();
  return found;
}

}  // namespace gpu
}  // namespace mos
