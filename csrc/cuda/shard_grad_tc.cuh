// Tensor-core shard_grad (bf16 activations; both modes):
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
// u is fp32; it is scaled in fp32 and split into bf16 hi + lo (hi = bf16(u),
// lo = bf16(u - hi)) so that D = hi^T x + lo^T x (two MMAs) keeps ~16
// significant bits of u: per product the relative error is at most 2^-16
// (|u - hi - lo| <= 2^-8 |u - hi| <= 2^-16 |u|); x is exact (bf16) and the
// products and sums are fp32. fp16 activations do not take this path (fp16 hi/lo
// of an fp32 u could overflow).
//
// Deterministic mode (two passes, bitwise reproducible): pass 1 is the same
// kernel writing each item's D tile to a workspace of per-item partials
// [items, r, h] (plain 16-byte stores); pass 2 (shard_grad_det_reduce_kernel)
// adds them into the pool rows in a fixed order with one owner per element.
//
// Shared memory: the scaled u tile (hi, lo) [kTcRanks][kTcTM] and the x tile
// [kTcTM][kTcCols] (16-byte loads), both with padded rows; the fp32 D tile.
#pragma once

#ifndef MOS_CUDA_EMU
#include <mma.h>
#endif

#include "shard_grad.cuh"
#include "sgmv_fast.cuh"

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

struct TcSmem {
  __nv_bfloat16 u_hi[kTcRanks * kTcLdU];
  __nv_bfloat16 u_lo[kTcRanks * kTcLdU];
  __nv_bfloat16 x[kTcTM * kTcLdX];
  float c[kTcRanks * kTcLdC];
};

// Grid (items, ceil(h / kTcCols), ceil(r / kTcRanks)). DET = false: vector
// atomics into grad. DET = true (pass 1 of the deterministic mode): the item's
// D tile goes to part[item][j][col] (plain stores, every j < r, col < h of every
// existing item), reduced in a fixed order by shard_grad_det_reduce_kernel.
template <bool DET>
__global__ void __launch_bounds__(kTcThreads)
    shard_grad_tc_kernel(float* __restrict__ grad, const float* __restrict__ u, int64_t u_stride,
                         const __nv_bfloat16* __restrict__ x, int64_t x_stride, const float* __restrict__ scale,
                         SideArgs S, SegArgs sg, FastItems fi, float* __restrict__ part) {
  using namespace nvcuda;
  __shared__ __align__(128) TcSmem sm;
  const ItemInfo it = fast_item<kTcThreads, kTcTM>(sg, fi, blockIdx.x);
  if (it.n0 >= it.n1) return;  // uniform: no such item
  const int tid = threadIdx.x, warp = tid >> 5;
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
  // x tile [nn][cc], 8 columns per 16-byte load (h is a multiple of 8).
  for (int e = tid; e < kTcTM * (kTcCols / 8); e += kTcThreads) {
    const int nn = e / (kTcCols / 8), cc = (e % (kTcCols / 8)) * 8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (nn < m && c0 + cc < h) v = ld16_nc(x + static_cast<int64_t>(it.n0 + nn) * x_stride + c0 + cc);
    *reinterpret_cast<uint4*>(&sm.x[nn * kTcLdX + cc]) = v;
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

// Pass 2 of the deterministic mode: grad[p, c] += sum over the table entries
// (t, j, i) with idx[t, j, i] == p, in table order, of sum over the items of
// tenant t, in item order, of part[item][j][i * s + c]. No atomics: block
// (row block, column tile) owns pool rows [p0, p0 + rows) x kGradDC columns,
// warp w the rows p with (p - p0) % kGradWarps == w, lane c one column. The
// block compacts the table entries hitting its rows chunk by chunk (table
// order kept). Bitwise reproducible run to run. Needs the item pre-pass
// (fi.meta, fi.item_seg). Grid (row blocks, ceil(s / kGradDC)), kGradThreads.
__global__ void __launch_bounds__(kGradThreads)
    shard_grad_det_reduce_kernel(float* __restrict__ grad, const float* __restrict__ part, SideArgs S, SegArgs sg,
                                 FastItems fi, int64_t bound, int64_t rows_per_block) {
  __shared__ int wbuf[kGradThreads / 32 + 1];
  __shared__ int64_t match[kGradThreads];
  const int tid = threadIdx.x;
  const int warp = tid / kGradDC, c = tid % kGradDC;
  const int64_t s = S.s, l = S.l, r = S.r, rl = r * l, h = l * s;
  const int64_t E = sg.T * rl;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t p_hi = p0 + rows_per_block < S.P ? p0 + rows_per_block : S.P;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kGradDC + c;
  const bool col_ok = col < s;
  for (int64_t e0 = 0; e0 < E; e0 += kGradThreads) {
    const int64_t e = e0 + tid;
    const int32_t q = e < E ? S.idx[e] : -1;
    const int hit = (q >= p0 && q < p_hi) ? 1 : 0;
    int n_match;
    const int pos = block_inclusive_scan<kGradThreads, OpSum>(hit, wbuf, &n_match);
    if (hit) match[pos - 1] = e;
    __syncthreads();
    for (int mi = 0; mi < n_match; ++mi) {
      const int64_t me = match[mi];
      const int64_t p = S.idx[me];
      if ((p - p0) % kGradWarps != warp) continue;  // warp-uniform: another warp owns row p
      const int tt = static_cast<int>(me / rl);
      const int64_t rem = me - static_cast<int64_t>(tt) * rl;
      const int64_t j = rem / l, i = rem - j * l;
      float acc = 0.f;
      bool any = false;
      for (int64_t b = 0; b < bound; ++b) {
        const int g = fi.item_seg[b];
        if (g < 0) break;  // items are numbered densely; the rest are -1
        if (fi.meta[g].z != tt) continue;
        any = true;
        if (col_ok) acc += part[(b * r + j) * h + i * s + col];
      }
      if (any && col_ok) grad[p * s + col] += acc;  // owned by this lane
    }
    // the next chunk's scan syncs before `match` is overwritten
  }
}

}  // namespace gpu
}  // namespace mos
