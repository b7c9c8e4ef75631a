// sgmv_expand kernel and the expand tile shared with the fused sgmv kernel.
//
//   y[n, i*s:(i+1)*s] += scale[t] * sum_j v[n, j] * pool_b[idx_b[t, j, i]]
//
// (idx[t, j, i] short for tenant t's table entry, its row base added when the
// side has a shared-table map: tenant_side in common.cuh.)
//
// Work decomposition: one block per item (at most BM tokens of one segment) x
// one tile of BN output columns. The rank dimension runs in chunks of RB: the
// scaled v tile [BM, RB] and the gathered B tile [RB, BN] (B[j, c] =
// pool_b[idx_b[t, j, c / s], c % s], converted to the accumulation type) are
// staged in shared memory; each thread owns one column and BM / 2 token rows,
// accumulates in registers and rounds once into y.
#pragma once

#include "sgmv_cfg.cuh"

namespace mos {
namespace gpu {

template <typename AT>
struct ExpandSmem {
  static constexpr int BM = SgmvCfg<AT>::BM, RB = SgmvCfg<AT>::RB, BN = SgmvCfg<AT>::BN;
  AT v[BM][RB];
  AT b[RB][BN];
};

// y[it.n0 + nn, c0 + c] += sum_j (vscale * vsrc[nn * v_ld + j]) * B[j, c0 + c]
// for nn < m, c < BN, c0 + c < o. vsrc may point to global or shared memory
// (rows of the item's tokens). B is the item's tenant view (tenant_side<PT>(side,
// it.t)): B.idx is the tenant's table. Block-wide; starts with __syncthreads.
template <typename XT, typename PT, typename AT>
__device__ void expand_tile(XT* __restrict__ y, int64_t y_stride, const AT* vsrc, int64_t v_ld, AT vscale,
                            const SideArgs& B, const ItemInfo& it, int64_t c0, ExpandSmem<AT>& sm) {
  constexpr int BM = SgmvCfg<AT>::BM, RB = SgmvCfg<AT>::RB, BN = SgmvCfg<AT>::BN;
  constexpr int G = kSgmvThreads / BN;  // token-row groups
  constexpr int Q = BM / G;             // token rows per thread
  static_assert(kSgmvThreads % BN == 0 && BM % G == 0, "tile shape");
  const int tid = threadIdx.x;
  const int c = tid % BN, g = tid / BN;
  const int m = it.n1 - it.n0;
  const int64_t s = B.s, l = B.l, o = l * s, r = B.r;
  const PT* pool = static_cast<const PT*>(B.pool);
  const int32_t* tab = B.idx;  // the tenant's table [r, l]

  AT acc[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) acc[q] = AT(0);

  for (int64_t j0 = 0; j0 < r; j0 += RB) {
    __syncthreads();  // previous readers of sm are done
    for (int e = tid; e < BM * RB; e += kSgmvThreads) {
      const int row = e / RB, jj = e % RB;
      sm.v[row][jj] = (row < m && j0 + jj < r) ? vscale * vsrc[row * v_ld + j0 + jj] : AT(0);
    }
    for (int e = tid; e < RB * BN; e += kSgmvThreads) {
      const int jj = e / BN, cc = e % BN;
      const int64_t j = j0 + jj, cg = c0 + cc;
      AT val = AT(0);
      if (j < r && cg < o) {
        const int64_t i = cg / s;
        const int32_t p = tab[j * l + i];
        if (valid_row(p, B.P)) val = to_acc<AT>(pool[static_cast<int64_t>(p) * s + (cg - i * s)]);
      }
      sm.b[jj][cc] = val;
    }
    __syncthreads();
    AT prev[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) prev[q] = acc[q];
#pragma unroll 4
    for (int jj = 0; jj < RB; ++jj) {
      const AT bv = sm.b[jj][c];
#pragma unroll
      for (int q = 0; q < Q; ++q) acc[q] += sm.v[g + q * G][jj] * bv;
    }
    // Skipped slots hold zero shards, so the plain products are exact (a finite sum is
    // unchanged by the +-0 products) unless a non-finite v (or scale) met one (Inf * 0 =
    // NaN): only then redo the chunk from `prev`, in the same order, skipping the slots the
    // table skips.
    if (c0 + c < o) {
      const int64_t ic = (c0 + c) / s;
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        if (isfinite(acc[q])) continue;
        acc[q] = prev[q];
        for (int jj = 0; jj < RB && j0 + jj < r; ++jj)
          if (valid_row(tab[(j0 + jj) * l + ic], B.P)) acc[q] += sm.v[g + q * G][jj] * sm.b[jj][c];
      }
    }
  }

  const int64_t cg = c0 + c;
  if (cg < o) {
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int nn = g + q * G;
      if (nn < m) {
        XT* yp = y + static_cast<int64_t>(it.n0 + nn) * y_stride + cg;
        *yp = from_acc<XT>(to_acc<AT>(*yp) + acc[q]);
      }
    }
  }
}

// Standalone expand: grid (item_bound(N, S, BM), Z); block z expands the column
// tiles z, z + Z, ... (Z = ceil(o / BN) unless that exceeds the grid limit).
template <typename XT, typename PT>
__global__ void __launch_bounds__(kSgmvThreads)
    sgmv_expand_kernel(XT* __restrict__ y, int64_t y_stride, const typename AccOf<XT>::type* __restrict__ v,
                       int64_t v_stride, const float* __restrict__ scale, SideArgs B, SegArgs sg) {
  using AT = typename AccOf<XT>::type;
  constexpr int BM = SgmvCfg<AT>::BM, BN = SgmvCfg<AT>::BN;
  __shared__ ExpandSmem<AT> sm;
  const ItemInfo it = locate_item<kSgmvThreads>(sg, blockIdx.x, BM);
  if (it.n0 >= it.n1) return;  // uniform: no such item
  const AT sc = static_cast<AT>(scale[it.t]);
  const AT* vrows = v + static_cast<int64_t>(it.n0) * v_stride;
  const int64_t tiles = (B.l * B.s + BN - 1) / BN;
  const SideArgs Bt = tenant_side<PT>(B, it.t);
  for (int64_t ct = blockIdx.y; ct < tiles; ct += gridDim.y)
    expand_tile<XT, PT, AT>(y, y_stride, vrows, v_stride, sc, Bt, it, ct * BN, sm);
}

}  // namespace gpu
}  // namespace mos
