// Tensor-core shard_grad (bf16 or fp16 activations; both modes):
//
//   grad[idx[t, j, i], c] += scale[t] * sum_{n in item} u[n, j] * x[n, i*s + c]
//
// Block (item, column tile, rank tile): item = at most kTcTM tokens of one
// segment, kTcCols columns of h, kTcRanks rank rows. The block computes
// D = (scale * u)^T x for its tile with WMMA 16x16x16 (bf16 in, fp32
// accumulation), warp w owning columns [16w, 16w + 16), and adds each
// 4-column group of D to its pool row with one vector reduction
// (red.global.add.v4.f32 on sm_90; four scalar atomics elsewhere). Padded (-1)
// and out-of-range table entries add nothing.
//
// Operands. Every MMA is bf16 x bf16 -> fp32. u is fp32: it is scaled in fp32
// and split into bf16 hi + lo (hi = bf16(u), lo = bf16(u - hi)), which keeps
// ~16 significant bits: |u - hi - lo| <= 2^-16 |u|. x is bf16 (used as is) or
// fp16; an fp16 value splits EXACTLY into bf16 hi + lo (11 significant bits
// fit in 8 + 8, and bf16 has fp32's exponent range, so fp16 subnormals and
// 65504 are both representable). fp16 is deliberately not split into fp16
// hi / lo: a scaled u can exceed fp16's range and its lo part can fall below
// it, while bf16 covers every fp32 exponent. So
//
//   bf16 x:  D = u_lo^T x + u_hi^T x                     (2 MMAs)
//   fp16 x:  D = u_lo^T x_hi + u_hi^T x_lo + u_hi^T x_hi  (3 MMAs; u_lo^T x_lo dropped)
//
// (small terms first). Error per product, before the fp32 sums: bf16 x at
// most 2^-16 |u x| (the lost tail of u; x exact); fp16 x at most about
// (2^-16 + 2^-16) |u x| = 2^-15 |u x| (the tail of u plus the dropped
// u_lo x_lo, with |u_lo| and |x_lo| at most about 2^-8 |u| and 2^-8 |x|).
//
// Cost (a prediction, not measured): at the ranks this op sees (r <= 64) the
// kernel is memory-bound (it streams x and u once and scatters D), and the
// tensor cores run far below their peak, so the third MMA of the fp16 route
// should not show in the run time; the fp16 -> bf16 split adds a few ALU
// instructions per 8 loaded values.
//
// Deterministic mode (two passes, bitwise reproducible): pass 1 is the same
// kernel writing each item's D tile to a workspace of per-item partials
// [items, r, h] (plain 16-byte stores) and each item's tenant (-1: no such
// item) to a compact int array; pass 2 (shard_grad_det_reduce_kernel) adds
// the partials into the pool rows in a fixed order with one owner per
// element. The host runs the two passes over consecutive chunks of items, as
// many per chunk as fit in the partials cap (plan_shard_grad), in order, so
// the result is a fixed function of the inputs and the chunk size.
//
// Shared memory: the scaled u tile (hi, lo) [kTcRanks][kTcTM] and the x tile
// [kTcTM][kTcCols] (hi, and lo for fp16), all with padded rows; the fp32 D tile.
#pragma once

#ifndef MOS_CUDA_EMU
#include <mma.h>
#endif

#include <type_traits>

#include "items.cuh"
#include "shard_grad.cuh"
#include "vec.cuh"

namespace mos {
namespace gpu {

constexpr int kTcThreads = 128;  // 4 warps
constexpr int kTcTM = 64;        // tokens per item (the MMA's K, in steps of 16)
constexpr int kTcCols = 64;      // columns per block (16 per warp)
constexpr int kTcRanks = 16;     // rank rows per block (the MMA's M)
constexpr int kTcLdU = kTcTM + 8;     // padded rows (multiple of 8 elements, 16-byte rows)
constexpr int kTcLdX = kTcCols + 8;
constexpr int kTcLdC = kTcCols + 4;

__device__ __forceinline__ void red_add4(float* p, float a, float b, float c, float d) {
  MOS_ASSERT_ALIGNED16(p);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(a, b, c, d));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
  atomicAdd(p + 2, c);
  atomicAdd(p + 3, d);
#endif
}

// X_LO: the activations need a bf16 lo part (fp16 x); otherwise x_lo is a stub.
template <bool X_LO>
struct TcSmem {
  __nv_bfloat16 u_hi[kTcRanks * kTcLdU];
  __nv_bfloat16 u_lo[kTcRanks * kTcLdU];
  __nv_bfloat16 x[kTcTM * kTcLdX];
  __nv_bfloat16 x_lo[X_LO ? kTcTM * kTcLdX : 16];
  float c[kTcRanks * kTcLdC];
};

// Grid (items, ceil(h / kTcCols), ceil(r / kTcRanks)); block b handles item
// item0 + b. XT: __nv_bfloat16 or __half. DET = false: vector atomics into
// grad (item0 = 0, part / item_tenant unused). DET = true (pass 1 of the
// deterministic mode, one chunk of items): the item's D tile goes to
// part[b][j][col] (plain stores, every j < r, col < h of every existing item)
// and its tenant to item_tenant[b] (-1 when there is no such item), reduced in a
// fixed order by shard_grad_det_reduce_kernel.
template <typename XT, bool DET>
__global__ void __launch_bounds__(kTcThreads)
    shard_grad_tc_kernel(float* __restrict__ grad, const float* __restrict__ u, int64_t u_stride,
                         const XT* __restrict__ x, int64_t x_stride, const float* __restrict__ scale, SideArgs S,
                         SegArgs sg, FastItems fi, int item0, float* __restrict__ part,
                         int32_t* __restrict__ item_tenant) {
  using namespace nvcuda;
  constexpr bool kXLo = !std::is_same<XT, __nv_bfloat16>::value;  // fp16: x split into bf16 hi + lo
  __shared__ __align__(128) TcSmem<kXLo> sm;
  const ItemInfo it = fast_item<kTcThreads, kTcTM>(sg, fi, static_cast<int64_t>(item0) + blockIdx.x);
  const int tid = threadIdx.x, warp = tid >> 5;
  if (DET && blockIdx.y == 0 && blockIdx.z == 0 && tid == 0) item_tenant[blockIdx.x] = it.n0 < it.n1 ? it.t : -1;
  if (it.n0 >= it.n1) return;  // uniform: no such item
  const int m = it.n1 - it.n0;
  const int s = static_cast<int>(S.s), l = static_cast<int>(S.l), r = static_cast<int>(S.r);
  const int h = l * s;
  const int c0 = blockIdx.y * kTcCols, j0 = blockIdx.z * kTcRanks;
  const float sc = scale[it.t];

  // u tile, scaled and split: u_hi/u_lo[jj][nn] (rank-major: the MMA's A, row-major).
  for (int e = tid; e < kTcRanks * kTcTM; e += kTcThreads) {
    const int nn = e / kTcRanks, jj = e % kTcRanks;
    const float v = (nn < m && j0 + jj < r) ? sc * u[static_cast<int64_t>(it.n0 + nn) * u_stride + j0 + jj] : 0.f;
    const __nv_bfloat16 hi = __float2bfloat16_rn(v);
    sm.u_hi[jj * kTcLdU + nn] = hi;
    sm.u_lo[jj * kTcLdU + nn] = __float2bfloat16_rn(v - __bfloat162float(hi));
  }
  // x tile [nn][cc], 8 columns per 16-byte load (h is a multiple of 8); fp16
  // values are split exactly into bf16 hi + lo. Unrolled: all loads in flight.
  static_assert(kTcTM * (kTcCols / 8) % kTcThreads == 0, "whole x-tile groups per thread");
#pragma unroll
  for (int g = 0; g < kTcTM * (kTcCols / 8) / kTcThreads; ++g) {
    const int e = tid + g * kTcThreads;
    const int nn = e / (kTcCols / 8), cc = (e % (kTcCols / 8)) * 8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (nn < m && c0 + cc < h) v = ld16_nc(x + static_cast<int64_t>(it.n0 + nn) * x_stride + c0 + cc);
    if constexpr (kXLo) {
      float f[8];
      unpack8<XT>(v, f);
      split_bf16x8(f, &sm.x[nn * kTcLdX + cc], &sm.x_lo[nn * kTcLdX + cc], true);
    } else {
      st16(&sm.x[nn * kTcLdX + cc], v);
    }
  }
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int k = 0; k < m; k += 16) {  // uniform; tokens past m are zero in both tiles
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_hi, a_lo;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
    wmma::load_matrix_sync(a_hi, sm.u_hi + k, kTcLdU);
    wmma::load_matrix_sync(a_lo, sm.u_lo + k, kTcLdU);
    wmma::load_matrix_sync(b, sm.x + k * kTcLdX + warp * 16, kTcLdX);
    wmma::mma_sync(acc, a_lo, b, acc);
    if constexpr (kXLo) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b_lo;
      wmma::load_matrix_sync(b_lo, sm.x_lo + k * kTcLdX + warp * 16, kTcLdX);
      wmma::mma_sync(acc, a_hi, b_lo, acc);
    }
    wmma::mma_sync(acc, a_hi, b, acc);
  }
  wmma::store_matrix_sync(sm.c + warp * 16, acc, kTcLdC, wmma::mem_row_major);
  __syncthreads();

  // Scatter: each 4-column group of a rank row to its pool row (s % 8 == 0, so
  // a group never crosses a shard).
  const int32_t* __restrict__ tab = S.idx + static_cast<int64_t>(it.t) * r * l;
  const int P = static_cast<int>(S.P);
  for (int e = tid; e < kTcRanks * (kTcCols / 4); e += kTcThreads) {
    const int jj = e / (kTcCols / 4), cc = (e % (kTcCols / 4)) * 4;
    const int j = j0 + jj, col = c0 + cc;
    if (j >= r || col >= h) continue;
    const float* cv = sm.c + jj * kTcLdC + cc;
    if (DET) {
      float* dst = part + (static_cast<int64_t>(blockIdx.x) * r + j) * h + col;
      MOS_ASSERT_ALIGNED16(dst);
      *reinterpret_cast<float4*>(dst) = make_float4(cv[0], cv[1], cv[2], cv[3]);
      continue;
    }
    const int i = col / s;  // slot, 32-bit
    const int p = __ldg(tab + j * l + i);
    if (p < 0 || p >= P) continue;  // padded / invalid: skipped
    red_add4(grad + static_cast<int64_t>(p) * s + (col - i * s), cv[0], cv[1], cv[2], cv[3]);
  }
}

// Pass 2 of the deterministic mode, for one chunk of `items` items (pass 1's
// part and item_tenant): grad[p, c] += sum over the table entries (t, j, i)
// with idx[t, j, i] == p, in table order, of sum over the chunk's items of
// tenant t, in item order, of part[item][j][i * s + c]. No atomics: block
// (row block, column tile) owns pool rows [p0, p0 + rows) x kGradDC columns,
// warp w the rows p with (p - p0) % kGradWarps == w, lane c one column. The
// block compacts the table entries hitting its rows chunk by chunk (table
// order kept). Bitwise reproducible run to run. 32-bit index math (the host
// plan guarantees T * r * l <= INT32_MAX - kGradThreads, items * r * h <=
// INT32_MAX and P <= INT32_MAX); only the grad offset p * s is 64-bit (a
// widening multiply). Grid (row blocks, ceil(s / kGradDC)), kGradThreads.
__global__ void __launch_bounds__(kGradThreads)
    shard_grad_det_reduce_kernel(float* __restrict__ grad, const float* __restrict__ part,
                                 const int32_t* __restrict__ item_tenant, int items, SideArgs S, int T,
                                 int rows_per_block) {
  __shared__ int wbuf[kGradThreads / 32 + 1];
  __shared__ int match[kGradThreads];
  // Items are numbered densely, so a chunk whose first item does not exist is empty.
  if (items <= 0 || __ldg(item_tenant) < 0) return;  // uniform
  const int tid = threadIdx.x;
  const int warp = tid / kGradDC, c = tid % kGradDC;
  const int s = static_cast<int>(S.s), l = static_cast<int>(S.l), r = static_cast<int>(S.r), P = static_cast<int>(S.P);
  const int rl = r * l, h = l * s;
  const int E = T * rl;
  const int p0 = static_cast<int>(blockIdx.x) * rows_per_block;
  const int p_hi = rows_per_block < P - p0 ? p0 + rows_per_block : P;
  const int col = static_cast<int>(blockIdx.y) * kGradDC + c;
  const bool col_ok = col < s;
  for (int e0 = 0; e0 < E; e0 += kGradThreads) {
    const int e = e0 + tid;
    const int32_t q = e < E ? __ldg(S.idx + e) : -1;
    const int hit = (q >= p0 && q < p_hi) ? 1 : 0;
    int n_match;
    const int pos = block_inclusive_scan<kGradThreads, OpSum>(hit, wbuf, &n_match);
    if (hit) match[pos - 1] = e;
    __syncthreads();
    for (int mi = 0; mi < n_match; ++mi) {
      const int me = match[mi];
      const int p = __ldg(S.idx + me);
      if ((p - p0) % kGradWarps != warp) continue;  // warp-uniform: another warp owns row p
      const int tt = me / rl;
      const int rem = me - tt * rl;
      const int j = rem / l, i = rem - j * l;
      const float* src = part + j * h + i * s + col;  // item 0 of the chunk
      float acc = 0.f;
      bool any = false;
      for (int b = 0; b < items; ++b) {
        const int tb = __ldg(item_tenant + b);
        if (tb < 0) break;  // no later item exists either
        if (tb != tt) continue;
        any = true;
        if (col_ok) acc += src[b * r * h];
      }
      if (any && col_ok) grad[static_cast<int64_t>(p) * s + col] += acc;  // owned by this lane
    }
    // the next chunk's scan syncs before `match` is overwritten
  }
}

}  // namespace gpu
}  // namespace mos
