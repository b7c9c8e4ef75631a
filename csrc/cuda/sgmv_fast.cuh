// Fast path of sgmv / sgmv_shrink / sgmv_expand for bf16 / fp16 activations
// with pools in the activation dtype or fp32 (chosen on the host by
// select_sgmv_path, launch.h). One kernel template, three modes:
//
//   kFastFused   y[n] += scale[t] * B_t (A_t x[n])   (v never leaves shared memory)
//   kFastShrink  v[n]  = A_t x[n]                     (fp32, rows of the item only)
//   kFastExpand  y[n] += scale[t] * B_t v[n]
//
// Work decomposition: block b handles item b (at most kFastBM tokens of one
// segment) and, with grid.y = Z > 1, every Z-th group of output chunks.
//
// Shrink: warp w owns the rank rows j = w + 8 * jj (jj < kFastJR) of a pass of
// 8 * kFastJR rows. Lane c walks the 8-element chunks c, c + 32, ... of
// h = l_a * s_a: the chunk's slot i = k / s_a is computed once (32-bit), the
// kFastJR table entries and kFastBM x chunks are loaded, then the kFastJR
// shard chunks (16-byte loads, all independent); padded (-1) or out-of-range
// entries load nothing and add nothing. Partial dot products are reduced with
// warp shuffles; lane 0 writes v.
//
// Expand: thread c owns 8 consecutive output columns (slot computed once);
// it walks the rank rows four at a time (4 table loads, then 4 shard chunk
// loads in flight), skipping padded entries, accumulates fp32 for each token
// and finally does one 16-byte read-modify-write of y per token with one
// rounding.
//
// Segment -> item: fast_item (items.cuh), inline for few segments, else from
// the pre-pass workspace.
#pragma once

#include "items.cuh"
#include "vec.cuh"

namespace mos {
namespace gpu {

constexpr int kFastThreads = 256;
constexpr int kFastWarps = kFastThreads / 32;
constexpr int kFastBM = 4;                          // tokens per item
constexpr int kFastJR = 4;                          // rank rows per warp per shrink pass
constexpr int kFastPassRows = kFastWarps * kFastJR; // rank rows per shrink pass
constexpr int kFastMaxRank = 1024;                  // v tile kFastBM x r fp32 in shared memory (16 KiB)

enum FastMode : int { kFastFused = 0, kFastShrink = 1, kFastExpand = 2 };

// v rows of the item for rank passes [pass0, pass1): out[q * out_ld + j]. A is
// the item's tenant view (tenant_side<PA>(side, it.t)).
template <typename XT, typename PA>
__device__ __forceinline__ void fast_shrink(const XT* __restrict__ x, int64_t x_stride, const SideArgs& A,
                                            const ItemInfo& it, int pass0, int pass1, float* out, int64_t out_ld) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int m = it.n1 - it.n0;
  const int s = static_cast<int>(A.s), l = static_cast<int>(A.l), r = static_cast<int>(A.r);
  const int nchunks = (l * s) >> 3;
  const PA* __restrict__ pool = static_cast<const PA*>(A.pool);
  const int32_t* __restrict__ tab = A.idx;  // the tenant's table [r, l]
  const XT* xrow = x + static_cast<int64_t>(it.n0) * x_stride;
  const int P = static_cast<int>(A.P);  // the view's rows; host: P <= INT32_MAX
  for (int pass = pass0; pass < pass1; ++pass) {
    const int jb = pass * kFastPassRows + warp;
    if (jb >= r) break;  // warp-uniform; no block barrier below
    float acc[kFastBM][kFastJR];
#pragma unroll
    for (int q = 0; q < kFastBM; ++q)
#pragma unroll
      for (int jj = 0; jj < kFastJR; ++jj) acc[q][jj] = 0.f;
#pragma unroll 1
    for (int c = lane; c < nchunks; c += 32) {
      const int k = c << 3;
      const int i = k / s;  // the slot, once per chunk, 32-bit
      const int off = k - i * s;
      int p[kFastJR];
#pragma unroll
      for (int jj = 0; jj < kFastJR; ++jj) {
        const int j = jb + jj * kFastWarps;
        p[jj] = j < r ? __ldg(tab + j * l + i) : -1;
      }
      float xv[kFastBM][8];
#pragma unroll
      for (int q = 0; q < kFastBM; ++q) {
        if (q < m) {
          load8<XT>(xrow + q * x_stride + k, xv[q]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) xv[q][e] = 0.f;
        }
      }
      float a[kFastJR][8];
#pragma unroll
      for (int jj = 0; jj < kFastJR; ++jj)
        if (p[jj] >= 0 && p[jj] < P) load8<PA>(pool + static_cast<int64_t>(p[jj]) * s + off, a[jj]);
#pragma unroll
      for (int jj = 0; jj < kFastJR; ++jj) {
        if (p[jj] >= 0 && p[jj] < P) {  // padded / invalid entries: skipped, not multiplied by zero
#pragma unroll
          for (int q = 0; q < kFastBM; ++q)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[q][jj] = fmaf(xv[q][e], a[jj][e], acc[q][jj]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kFastBM; ++q)
#pragma unroll
      for (int jj = 0; jj < kFastJR; ++jj) acc[q][jj] = warp_sum(acc[q][jj]);
    if (lane == 0) {
#pragma unroll
      for (int q = 0; q < kFastBM; ++q)
#pragma unroll
        for (int jj = 0; jj < kFastJR; ++jj) {
          const int j = jb + jj * kFastWarps;
          if (q < m && j < r) out[q * out_ld + j] = acc[q][jj];
        }
    }
  }
}

// y[it.n0 + q, 8c .. 8c+8) += sc * sum_j vs[q * r + j] * B[j, 8c .. 8c+8) for this
// block's chunks c. B is the item's tenant view (tenant_side<PB>(side, it.t)).
template <typename XT, typename PB>
__device__ __forceinline__ void fast_expand(XT* __restrict__ y, int64_t y_stride, const float* vs, int r, float sc,
                                            const SideArgs& B, const ItemInfo& it) {
  const int m = it.n1 - it.n0;
  const int s = static_cast<int>(B.s), l = static_cast<int>(B.l);
  const int ochunks = (l * s) >> 3;
  const PB* __restrict__ pool = static_cast<const PB*>(B.pool);
  const int32_t* __restrict__ tab = B.idx;  // the tenant's table [r, l]
  const int P = static_cast<int>(B.P);
  XT* yrow = y + static_cast<int64_t>(it.n0) * y_stride;
  for (int c = blockIdx.y * kFastThreads + threadIdx.x; c < ochunks; c += gridDim.y * kFastThreads) {
    const int k = c << 3;
    const int i = k / s;  // the slot, once per chunk, 32-bit
    const int off = k - i * s;
    float acc[kFastBM][8];
#pragma unroll
    for (int q = 0; q < kFastBM; ++q)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[q][e] = 0.f;
    for (int j0 = 0; j0 < r; j0 += 4) {
      int p[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) p[u] = j0 + u < r ? __ldg(tab + (j0 + u) * l + i) : -1;
      float b[4][8];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (p[u] >= 0 && p[u] < P) load8<PB>(pool + static_cast<int64_t>(p[u]) * s + off, b[u]);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (p[u] >= 0 && p[u] < P) {  // padded / invalid entries: skipped
#pragma unroll
          for (int q = 0; q < kFastBM; ++q) {
            const float vq = vs[q * r + j0 + u];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[q][e] = fmaf(vq, b[u][e], acc[q][e]);
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kFastBM; ++q) {
      if (q < m) {
        XT* yp = yrow + q * y_stride + k;
        float f[8];
        unpack8<XT>(ld16(yp), f);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = fmaf(sc, acc[q][e], f[e]);
        st16(yp, pack8<XT>(f));
      }
    }
  }
}

// Grid (items, Z); dynamic shared memory kFastBM * r * 4 bytes (fused, expand).
template <typename XT, typename PA, typename PB, int MODE>
__global__ void __launch_bounds__(kFastThreads)
    sgmv_fast_kernel(XT* __restrict__ y, int64_t y_stride, const XT* __restrict__ x, int64_t x_stride,
                     float* __restrict__ v, int64_t v_stride, const float* __restrict__ scale, SideArgs A, SideArgs B,
                     SegArgs sg, FastItems fi) {
  extern __shared__ __align__(16) unsigned char fast_dyn_smem[];
  float* vs = reinterpret_cast<float*>(fast_dyn_smem);  // [kFastBM][r]
  const ItemInfo it = fast_item<kFastThreads, kFastBM>(sg, fi, blockIdx.x);
  if (it.n0 >= it.n1) return;  // uniform: no such item
  if (MODE == kFastShrink) {
    // grid.y splits the rank passes
    const int passes = static_cast<int>((A.r + kFastPassRows - 1) / kFastPassRows);
    const SideArgs At = tenant_side<PA>(A, it.t);
    for (int ps = blockIdx.y; ps < passes; ps += gridDim.y)
      fast_shrink<XT, PA>(x, x_stride, At, it, ps, ps + 1, v + static_cast<int64_t>(it.n0) * v_stride, v_stride);
    return;
  }
  const int r = static_cast<int>(B.r);
  const int m = it.n1 - it.n0;
  if (MODE == kFastFused) {
    // rows q >= m of vs stay unwritten and are never read with a nonzero weight: zero them
    for (int e = threadIdx.x; e < kFastBM * r; e += kFastThreads) vs[e] = 0.f;
    __syncthreads();
    fast_shrink<XT, PA>(x, x_stride, tenant_side<PA>(A, it.t), it, 0, (r + kFastPassRows - 1) / kFastPassRows, vs,
                        r);
  } else {
    for (int e = threadIdx.x; e < kFastBM * r; e += kFastThreads) {
      const int q = e / r, j = e - q * r;
      vs[e] = q < m ? v[static_cast<int64_t>(it.n0 + q) * v_stride + j] : 0.f;
    }
  }
  __syncthreads();
  fast_expand<XT, PB>(y, y_stride, vs, r, scale[it.t], tenant_side<PB>(B, it.t), it);
}

}  // namespace gpu
}  // namespace mos
