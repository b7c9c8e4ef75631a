// Host emulation of the CUDA subset used by csrc/cuda (for testing without a GPU).
//
// One block at a time; its threads are cooperative fibers on one OS thread
// (emu_rt.cpp), switched only at __syncthreads, warp shuffles and warp
// barriers, so shared memory (`__shared__` becomes `static`) and atomics need
// no locking. A barrier that can never complete (a thread left the kernel while
// others wait, or a warp shuffle with a missing lane) is reported as a launch
// failure, as are misaligned 16-byte accesses (MOS_EMU_CHECK_ALIGNED16).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>
#include <functional>
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict

#define MOS_CUDA_EMU 1

namespace emu {
struct Idx { unsigned x = 0, y = 0, z = 0; };
extern Idx tidx, bidx;
extern Idx bdim, gdim;
extern unsigned char* dyn;
void syncthreads();
void syncwarp();
// Raw warp exchange: every lane of the calling warp publishes `v`, gets lane `src`'s value.
uint64_t exchange(uint64_t v, int src);
void fault(const char* what, const char* file, int line);
float atomic_add(float* p, float v);
double atomic_add(double* p, double v);
cudaError_t run_grid(dim3 grid, int block, size_t smem, const std::function<void()>& body);
template <class K, class... A>
cudaError_t launch(dim3 grid, int block, size_t smem, cudaStream_t, K kernel, A... args) {
  return run_grid(grid, block, smem, [&]() { kernel(args...); });
}
inline unsigned char* dyn_smem() { return dyn; }
template <class T>
inline T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  u = exchange(u, src & 31);
  T r;
  std::memcpy(&r, &u, sizeof(T));
  return r;
}
inline void check_full_mask(unsigned mask, const char* file, int line) {
  if (mask != 0xffffffffu) fault("warp primitive with a partial mask (not emulated)", file, line);
}
}  // namespace emu

#define MOS_EMU_CHECK_ALIGNED16(p)                                                             \
  do {                                                                                         \
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fault("misaligned 16-byte access", __FILE__, __LINE__); \
  } while (0)

#define threadIdx emu::tidx
#define blockIdx emu::bidx
#define blockDim emu::bdim
#define gridDim emu::gdim
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::check_full_mask(mask, __FILE__, __LINE__); emu::syncwarp(); }
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d) {
  emu::check_full_mask(mask, __FILE__, __LINE__);
  const int lane = emu::tidx.x & 31;
  const T o = emu::shfl(v, lane >= (int)d ? lane - (int)d : lane);
  return o;
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d) {
  emu::check_full_mask(mask, __FILE__, __LINE__);
  const int lane = emu::tidx.x & 31;
  return emu::shfl(v, lane + (int)d < 32 ? lane + (int)d : lane);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int m) {
  emu::check_full_mask(mask, __FILE__, __LINE__);
  return emu::shfl(v, (int)(emu::tidx.x & 31) ^ m);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  emu::check_full_mask(mask, __FILE__, __LINE__);
  return emu::shfl(v, src);
}
template <class T>
inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline float atomicAdd(float* p, float v) { return emu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return emu::atomic_add(p, v); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
template <class R, class... A>
inline cudaError_t cudaFuncSetAttribute(R (*f)(A...), cudaFuncAttribute a, int v) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
}
