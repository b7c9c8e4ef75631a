// Fused sgmv kernel: y[n] += scale[t] * B_t (A_t x[n]) for the tokens of every
// valid segment, with v = A_t x never leaving shared memory (no extra
// allocation, one rounding into y).
//
// Work decomposition: one block per item (at most BM tokens of one segment) x
// one of Z column splits. Each block computes the item's full v [BM, r] with
// the shrink tile into dynamic shared memory, then expands it into the output
// column tiles z, z + Z, z + 2Z, ... Z > 1 (chosen from shapes by the launcher
// when there are few items, e.g. decode) recomputes the shrink in each split
// in exchange for parallelism over the output columns.
#pragma once

#include "sgmv_expand.cuh"
#include "sgmv_shrink.cuh"

namespace mos {
namespace gpu {

template <typename AT>
union SgmvSmem {
  ShrinkSmem<AT> shrink;
  ExpandSmem<AT> expand;
};

// Grid (item_bound(N, S, BM), Z); dynamic shared memory BM * r * sizeof(AT).
template <typename XT, typename PA, typename PB>
__global__ void __launch_bounds__(kSgmvThreads)
    sgmv_fused_kernel(XT* __restrict__ y, int64_t y_stride, const XT* __restrict__ x, int64_t x_stride,
                      const float* __restrict__ scale, SideArgs A, SideArgs B, SegArgs sg) {
  using AT = typename AccOf<XT>::type;
  constexpr int BM = SgmvCfg<AT>::BM, BN = SgmvCfg<AT>::BN;
  __shared__ SgmvSmem<AT> sm;
  extern __shared__ __align__(16) unsigned char sgmv_dyn_smem[];
  AT* vs = reinterpret_cast<AT*>(sgmv_dyn_smem);  // [BM, r]
  const ItemInfo it = locate_item<kSgmvThreads>(sg, blockIdx.x, BM);
  if (it.n0 >= it.n1) return;  // uniform: no such item
  const int r = static_cast<int>(A.r);
  shrink_tile<XT, PA, AT>(x, x_stride, tenant_side<PA>(A, it.t), it, 0, r, vs, r, sm.shrink);
  const AT sc = static_cast<AT>(scale[it.t]);
  const int64_t o = B.l * B.s;
  const int64_t tiles = (o + BN - 1) / BN;
  const SideArgs Bt = tenant_side<PB>(B, it.t);
  for (int64_t ct = blockIdx.y; ct < tiles; ct += gridDim.y)
    expand_tile<XT, PB, AT>(y, y_stride, vs, r, sc, Bt, it, ct * BN, sm.expand);
}

}  // namespace gpu
}  // namespace mos
