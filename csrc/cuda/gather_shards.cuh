// gather_shards kernel: out[k, c] = pool[idx[k], c] for k < n (flattened
// [..., r, l] table), c < s; an index outside [0, P) gives zeros.
//
// The copy is dtype-agnostic: E is an unsigned integer of the element size
// (2, 4 or 8 bytes), so one kernel serves every pool dtype.
#pragma once

#include "common.cuh"

namespace mos {
namespace gpu {

constexpr int kGatherThreads = 256;

// Grid-stride over the n * s output elements.
template <typename E>
__global__ void __launch_bounds__(kGatherThreads)
    gather_shards_kernel(E* __restrict__ out, const E* __restrict__ pool, const int32_t* __restrict__ idx,
                         int64_t n, int64_t P, int64_t s) {
  const int64_t total = n * s;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t k = e / s;
    const int64_t c = e - k * s;
    const int32_t p = idx[k];
    out[e] = valid_row(p, P) ? pool[static_cast<int64_t>(p) * s + c] : E(0);
  }
}

}  // namespace gpu
}  // namespace mos
