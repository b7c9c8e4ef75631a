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
#include <type_traits>
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
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

#define MOS_CUDA_EMU 1

using std::isfinite;  // the CUDA math function, float and double overloads

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
// cp.async: per thread, copies are queued in commit groups and performed by the
// wait that retires their group (or never: a block that ends with copies in
// flight fails the launch). Copies are 16 bytes; !valid zero-fills.
void cp_async(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int n_in_flight);
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
inline float4 atomicAdd(float4* p, float4 v) {  // sm_90's vector reduction (not used by the emulated path)
  float4 o = *p;
  p->x += v.x; p->y += v.y; p->z += v.z; p->w += v.w;
  return o;
}

// WMMA at the fragment API level (16x16x16 only): each lane's fragment holds the
// whole tile as floats (bf16 / fp16 values are exact in float), so the element
// layout inside a real fragment is not modelled; code must not index frag.x.
// Every collective starts with a warp barrier (a lane that skips it deadlocks,
// which the emulator reports) and checks the pointer (32-byte) and ldm rules.
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_emu: only 16x16x16 WMMA is emulated");
  float v[16][16];
};
inline float emu_to_float(float f) { return f; }
inline float emu_to_float(__half h) { return __half2float(h); }
inline float emu_to_float(__nv_bfloat16 b) { return __bfloat162float(b); }
inline void emu_check(const void* p, unsigned ldm, size_t esize) {
  emu::syncwarp();
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fault("WMMA pointer not 32-byte aligned", __FILE__, __LINE__);
  if ((ldm * esize) % 16 != 0) emu::fault("WMMA ldm not a multiple of 16 bytes", __FILE__, __LINE__);
}
template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  emu_check(p, ldm, sizeof(T));
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.v[i][j] = emu_to_float(std::is_same<L, col_major>::value ? p[j * ldm + i] : p[i * ldm + j]);
  emu::syncwarp();
}
template <class T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T val) {
  for (auto& row : f.v)
    for (auto& e : row) e = static_cast<float>(val);
}
template <class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(std::is_same<TA, TB>::value, "WMMA: A and B element types differ");
  emu::syncwarp();
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.v[i][j];
      for (int k = 0; k < 16; ++k) acc += a.v[i][k] * b.v[k][j];
      out[i][j] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  emu_check(p, ldm, sizeof(float));
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (l == mem_col_major ? p[j * ldm + i] : p[i * ldm + j]) = f.v[i][j];
  emu::syncwarp();
}
}  // namespace wmma
}  // namespace nvcuda

template <class R, class... A>
inline cudaError_t cudaFuncSetAttribute(R (*f)(A...), cudaFuncAttribute a, int v) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
}
