// Launcher of the gather_shards kernel (see gather_shards.cuh).
#include "gather_shards.cuh"
#include "launch.h"

namespace mos {
namespace gpu {

template __global__ void gather_shards_kernel<uint16_t>(uint16_t*, const uint16_t*, const int32_t*, int64_t,
                                                        int64_t, int64_t);
template __global__ void gather_shards_kernel<uint32_t>(uint32_t*, const uint32_t*, const int32_t*, int64_t,
                                                        int64_t, int64_t);
template __global__ void gather_shards_kernel<uint64_t>(uint64_t*, const uint64_t*, const int32_t*, int64_t,
                                                        int64_t, int64_t);

namespace {

template <typename E>
cudaError_t run(void* out, const void* pool, const int32_t* idx, int64_t n, int64_t P, int64_t s,
                cudaStream_t stream) {
  const int64_t total = n * s;
  // Grid-stride loop: cap the grid (a function of the shape only).
  const int64_t blocks = (total + kGatherThreads - 1) / kGatherThreads;
  const unsigned grid = static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
  gather_shards_kernel<E><<<grid, kGatherThreads, 0, stream>>>(static_cast<E*>(out), static_cast<const E*>(pool),
                                                               idx, n, P, s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_shards(void* out, const void* pool, int elem_size, const int32_t* idx, int64_t n,
                                 int64_t P, int64_t s, cudaStream_t stream) {
  if (n <= 0 || s <= 0) return cudaSuccess;
  switch (elem_size) {
    case 2: return run<uint16_t>(out, pool, idx, n, P, s, stream);
    case 4: return run<uint32_t>(out, pool, idx, n, P, s, stream);
    case 8: return run<uint64_t>(out, pool, idx, n, P, s, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gpu
}  // namespace mos
