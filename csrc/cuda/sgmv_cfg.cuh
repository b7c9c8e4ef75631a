// Block size and tile sizes of the generic sgmv kernels (sgmv_shrink.cuh,
// sgmv_expand.cuh and the fused kernel in sgmv.cuh), shared by their
// launchers.
#pragma once

#include "common.cuh"

namespace mos {
namespace gpu {

constexpr int kSgmvThreads = 256;

// Tile sizes per accumulation type (double tiles are smaller so that the static
// shared memory stays well under 48 KiB).
template <typename AT>
struct SgmvCfg;
template <>
struct SgmvCfg<float> {
  static constexpr int BM = 16;   // tokens per item
  static constexpr int BK = 128;  // shrink: reduction columns per chunk
  static constexpr int RA = 16;   // shrink: rank rows per A tile (BM * RA == threads)
  static constexpr int RB = 32;   // expand: rank rows per B tile
  static constexpr int BN = 128;  // expand: output columns per tile
};
template <>
struct SgmvCfg<double> {
  static constexpr int BM = 16;
  static constexpr int BK = 64;
  static constexpr int RA = 16;
  static constexpr int RB = 16;
  static constexpr int BN = 128;
};

}  // namespace gpu
}  // namespace mos
