// Tensor-core shard_grad (bf16 activations, non-deterministic mode):
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
// Shared memory: the scaled u tile (hi, lo) [kTcRanks][kTcTM] and the x tile
// [kTcTM][kTcCols] (16-byte loads), both with padded rows; the fp32 D tile.
#pragma once

#ifndef MOS_CUDA_EMU
#include <mma.h>
#endif

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

// Grid (items, ceil(h / kTcCols), ceil(r / kTcRanks)).
__global__ void __launch_bounds__(kTcThreads)
    shard_grad_tc_kernel(float* __restrict__ grad, const float* __restrict__ u, int64_t u_stride,
                         const __nv_bfloat16* __restrict__ x, int64_t x_stride, const float* __restrict__ scale,
                         SideArgs S, SegArgs sg, FastItems fi) {
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
    const int i = col / s;  // slot, 32-bit
    const int p = __ldg(tab + j * l + i);
    if (p < 0 || p >= P) continue;  // padded / invalid: skipped
    const float* cv = sm.c + jj * kTcLdC + cc;
    red_add4(grad + static_cast<int64_t>(p) * s + (col - i * s), cv[0], cv[1], cv[2], cv[3]);
  }
}

}  // namespace gpu
}  // namespace mos
