// sgmv_shrink kernel and the shrink tile shared with the fused sgmv kernel.
//
//   v[n, j] = sum_i <x[n, i*s:(i+1)*s], pool_a[idx_a[t, j, i]]>
//
// (idx[t, j, i] short for tenant t's table entry, its row base added when the
// side has a shared-table map: tenant_side in common.cuh.)
//
// Work decomposition: one block per item (a tile of at most BM tokens of one
// segment, found on the device by locate_item) x one range of rank rows. The
// reduction over h = l * s runs in chunks of BK columns: the x tile [BM, BK] and
// the gathered A tile [RA, BK] (rows of the tenant's table, shards read straight
// from the pool and converted to the accumulation type) are staged in shared
// memory; thread (nn, jj) owns v[nn, j0 + jj] and accumulates its dot products.
//
// Naive on purpose (see the CUDA issue for tuning): no tensor cores, no split-K
// (a decode item of one token keeps 1/BM of the threads busy), scalar loads,
// one integer division per staged pool element.
#pragma once

#include "sgmv_cfg.cuh"

namespace mos {
namespace gpu {

// Rank rows per block of the standalone shrink kernel (grid.y splits r).
constexpr int kShrinkRanks = 64;

template <typename AT>
struct ShrinkSmem {
  static constexpr int BM = SgmvCfg<AT>::BM, BK = SgmvCfg<AT>::BK, RA = SgmvCfg<AT>::RA;
  AT x[BM][BK + 1];  // +1: the two token rows a warp reads fall in different banks
  AT a[RA][BK + 1];  // +1: the 16 rank rows a warp reads fall in different banks
};

// vs[nn * ld + (j - jb)] = v[it.n0 + nn, j] for nn < BM, j in [jb, je) (rows
// nn >= m are zero). A is the item's tenant view (tenant_side<PT>(side, it.t)):
// A.idx is the tenant's table. Block-wide; ends with __syncthreads (vs is then
// readable by every thread and `sm` may be reused).
template <typename XT, typename PT, typename AT>
__device__ void shrink_tile(const XT* __restrict__ x, int64_t x_stride, const SideArgs& A, const ItemInfo& it,
                            int jb, int je, AT* vs, int ld, ShrinkSmem<AT>& sm) {
  constexpr int BM = SgmvCfg<AT>::BM, BK = SgmvCfg<AT>::BK, RA = SgmvCfg<AT>::RA;
  static_assert(BM * RA == kSgmvThreads, "one (token, rank) pair per thread");
  const int tid = threadIdx.x;
  const int nn = tid / RA, jj = tid % RA;
  const int m = it.n1 - it.n0;
  const int64_t s = A.s, l = A.l, h = l * s;
  const PT* pool = static_cast<const PT*>(A.pool);
  const int32_t* tab = A.idx;  // the tenant's table [r, l]

  for (int j0 = jb; j0 < je; j0 += RA)
    if (j0 + jj < je) vs[nn * ld + (j0 + jj - jb)] = AT(0);  // owned by this thread

  for (int64_t k0 = 0; k0 < h; k0 += BK) {
    __syncthreads();  // previous readers of sm.x are done
    for (int e = tid; e < BM * BK; e += kSgmvThreads) {
      const int row = e / BK, k = e % BK;
      const int64_t kg = k0 + k;
      sm.x[row][k] = (row < m && kg < h) ? to_acc<AT>(x[static_cast<int64_t>(it.n0 + row) * x_stride + kg])
                                         : AT(0);
    }
    for (int j0 = jb; j0 < je; j0 += RA) {
      __syncthreads();  // sm.x staged; previous readers of sm.a are done
      for (int e = tid; e < RA * BK; e += kSgmvThreads) {
        const int row = e / BK, k = e % BK;
        const int j = j0 + row;
        const int64_t kg = k0 + k;
        AT val = AT(0);
        if (j < je && kg < h) {
          const int64_t i = kg / s;
          const int32_t p = tab[static_cast<int64_t>(j) * l + i];
          if (valid_row(p, A.P)) val = to_acc<AT>(pool[static_cast<int64_t>(p) * s + (kg - i * s)]);
        }
        sm.a[row][k] = val;
      }
      __syncthreads();
      if (j0 + jj < je) {
        // Skipped slots hold zero shards, so the plain dot product is exact (a finite sum
        // is unchanged by the +-0 products) unless a non-finite x met one (Inf * 0 = NaN):
        // only then redo the chunk, in the same order, skipping the slots the table skips.
        AT sum = AT(0);
#pragma unroll 8
        for (int k = 0; k < BK; ++k) sum += sm.x[nn][k] * sm.a[jj][k];
        if (!isfinite(sum)) {
          const int32_t* trow = tab + static_cast<int64_t>(j0 + jj) * l;
          sum = AT(0);
          for (int k = 0; k < BK && k0 + k < h; ++k)
            if (valid_row(trow[(k0 + k) / s], A.P)) sum += sm.x[nn][k] * sm.a[jj][k];
        }
        vs[nn * ld + (j0 + jj - jb)] += sum;
      }
    }
  }
  __syncthreads();
}

// Standalone shrink: grid (item_bound(N, S, BM), ceil(r / kShrinkRanks)).
// v must be zero-initialized (rows outside valid segments are not written).
template <typename XT, typename PT>
__global__ void __launch_bounds__(kSgmvThreads)
    sgmv_shrink_kernel(typename AccOf<XT>::type* __restrict__ v, int64_t v_stride, const XT* __restrict__ x,
                       int64_t x_stride, SideArgs A, SegArgs sg) {
  using AT = typename AccOf<XT>::type;
  constexpr int BM = SgmvCfg<AT>::BM;
  __shared__ ShrinkSmem<AT> sm;
  __shared__ AT vs[BM * kShrinkRanks];
  const ItemInfo it = locate_item<kSgmvThreads>(sg, blockIdx.x, BM);
  if (it.n0 >= it.n1) return;  // uniform: no such item
  const int jb = blockIdx.y * kShrinkRanks;
  const int je = static_cast<int>(A.r < jb + kShrinkRanks ? A.r : jb + kShrinkRanks);
  shrink_tile<XT, PT, AT>(x, x_stride, tenant_side<PT>(A, it.t), it, jb, je, vs, kShrinkRanks, sm);
  const int m = it.n1 - it.n0, w = je - jb;
  for (int e = threadIdx.x; e < m * w; e += kSgmvThreads) {
    const int nn = e / w, jj = e % w;
    v[static_cast<int64_t>(it.n0 + nn) * v_stride + jb + jj] = vs[nn * kShrinkRanks + jj];
  }
}

}  // namespace gpu
}  // namespace mos
