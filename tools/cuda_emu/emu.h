// Host emulation of the CUDA subset used by csrc/cuda (for testing without a GPU).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstddef>
#include <cstdint>
#include <vector>
#include <functional>
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {
struct Idx { unsigned x = 0, y = 0, z = 0; };
extern thread_local Idx tidx, bidx;
extern Idx bdim, gdim;
extern unsigned char* dyn;
void syncthreads();
int shfl_up(int v, unsigned d);
float atomic_add(float* p, float v);
double atomic_add(double* p, double v);
cudaError_t run_grid(dim3 grid, int block, size_t smem, const std::function<void()>& body);
template <class K, class... A>
cudaError_t launch(dim3 grid, int block, size_t smem, cudaStream_t, K kernel, A... args) {
  return run_grid(grid, block, smem, [&]() { kernel(args...); });
}
inline unsigned char* dyn_smem() { return dyn; }
}  // namespace emu

#define threadIdx emu::tidx
#define blockIdx emu::bidx
#define blockDim emu::bdim
#define gridDim emu::gdim
inline void __syncthreads() { emu::syncthreads(); }
inline int __shfl_up_sync(unsigned, int v, unsigned d) { return emu::shfl_up(v, d); }
inline float atomicAdd(float* p, float v) { return emu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return emu::atomic_add(p, v); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
template <class R, class... A>
inline cudaError_t cudaFuncSetAttribute(R (*f)(A...), cudaFuncAttribute a, int v) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
}
