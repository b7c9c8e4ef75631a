// 16-byte vector access and warp reductions for the fast kernels (torch-free).
//
//  * ld16_nc / ld16 / st16: one 16-byte global access (LDG.E.128 / STG.E.128);
//    the pointer must be 16-byte aligned (the host dispatch guarantees it; the
//    emulator asserts it);
//  * load8<T, NC>: 8 consecutive elements of T (bf16 / fp16: one 16-byte load;
//    fp32: two) converted to float; NC = false for shared memory;
//  * pack8 / unpack8: 8 bf16 / fp16 values <-> uint4, rounding once (RNE);
//  * warp_sum: butterfly reduction over the 32 lanes (every lane gets the sum);
//  * split_bf16x8: 8 floats -> bf16 hi = bf16(f) and lo = bf16(f - hi) (the
//    tensor-core kernels' operand split; exact for fp16 and bf16 inputs);
//  * cp_async16 / cp_async_commit / cp_async_wait<N>: 16-byte asynchronous
//    global -> shared copies (sm_80+ cp.async.cg; zero-fill when !valid), in
//    commit groups; wait<N> returns when at most N of this thread's groups are
//    still in flight. The emulator defers each copy until the wait that
//    covers it, so a missing wait reads stale shared memory there as well.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace mos {
namespace gpu {

#ifdef MOS_EMU_CHECK_ALIGNED16
#define MOS_ASSERT_ALIGNED16(p) MOS_EMU_CHECK_ALIGNED16(p)
#else
#define MOS_ASSERT_ALIGNED16(p) ((void)0)
#endif

// Read-only data (x, pools): the non-coherent path.
__device__ __forceinline__ uint4 ld16_nc(const void* p) {
  MOS_ASSERT_ALIGNED16(p);
  return __ldg(reinterpret_cast<const uint4*>(p));
}
// Data this kernel also writes (y).
__device__ __forceinline__ uint4 ld16(const void* p) {
  MOS_ASSERT_ALIGNED16(p);
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ void st16(void* p, uint4 v) {
  MOS_ASSERT_ALIGNED16(p);
  *reinterpret_cast<uint4*>(p) = v;
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ float half_bits_to_float(uint32_t bits16) {
  __half_raw r;
  r.x = static_cast<unsigned short>(bits16);
  return __half2float(__half(r));
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float* f);
template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& u, float* f) {
  f[0] = bf16_lo(u.x); f[1] = bf16_hi(u.x);
  f[2] = bf16_lo(u.y); f[3] = bf16_hi(u.y);
  f[4] = bf16_lo(u.z); f[5] = bf16_hi(u.z);
  f[6] = bf16_lo(u.w); f[7] = bf16_hi(u.w);
}
template <>
__device__ __forceinline__ void unpack8<__half>(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    f[2 * e] = half_bits_to_float(w[e] & 0xffffu);
    f[2 * e + 1] = half_bits_to_float(w[e] >> 16);
  }
}

__device__ __forceinline__ uint32_t raw_bits(__nv_bfloat16 v) { return static_cast<__nv_bfloat16_raw>(v).x; }
__device__ __forceinline__ uint32_t raw_bits(__half v) { return static_cast<__half_raw>(v).x; }

template <typename T>
__device__ __forceinline__ uint4 pack8(const float* f) {
  uint32_t w[4];
#pragma unroll
  for (int e = 0; e < 4; ++e)
    w[e] = raw_bits(from_acc<T, float>(f[2 * e])) | (raw_bits(from_acc<T, float>(f[2 * e + 1])) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// NC = true: read-only global data through the non-coherent path (x, pools);
// NC = false: a plain load (shared memory).
template <typename T, bool NC = true>
__device__ __forceinline__ void load8(const T* p, float* f) {
  auto ld = [](const void* q) { if constexpr (NC) return ld16_nc(q); else return ld16(q); };
  if constexpr (std::is_same<T, float>::value) {
    const uint4 a = ld(p), b = ld(p + 4);
    f[0] = __uint_as_float(a.x); f[1] = __uint_as_float(a.y);
    f[2] = __uint_as_float(a.z); f[3] = __uint_as_float(a.w);
    f[4] = __uint_as_float(b.x); f[5] = __uint_as_float(b.y);
    f[6] = __uint_as_float(b.z); f[7] = __uint_as_float(b.w);
  } else {
    unpack8<T>(ld(p), f);
  }
}

// hi = bf16(f) (RNE), lo = bf16(f - hi): |f - hi - lo| <= 2^-8 |f - hi| <= 2^-16 |f|
// for normal values; exact (f == hi + lo) when f is an fp16 or bf16 value (at
// most 11 significant bits, and bf16 has fp32's exponent range). `lo` is not
// written when want_lo is false. hi / lo: 16-byte aligned.
__device__ __forceinline__ void split_bf16x8(const float* f, __nv_bfloat16* hi, __nv_bfloat16* lo, bool want_lo) {
  float h[8], l[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const __nv_bfloat16 b = __float2bfloat16_rn(f[e]);
    h[e] = __bfloat162float(b);
    l[e] = f[e] - h[e];
  }
  st16(hi, pack8<__nv_bfloat16>(h));  // exact: h holds bf16 values
  if (want_lo) st16(lo, pack8<__nv_bfloat16>(l));
}

#ifdef MOS_CUDA_EMU
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  MOS_ASSERT_ALIGNED16(smem);
  if (valid) MOS_ASSERT_ALIGNED16(gmem);
  emu::cp_async(smem, gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { emu::cp_async_wait(N); }
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

}  // namespace gpu
}  // namespace mos
