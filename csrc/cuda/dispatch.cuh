// Host-side dtype dispatch for the launchers in csrc/cuda/*.cu: maps the
// runtime (activation, pool) dtypes onto the template arguments of a kernel.
// Pools are in the activation dtype or float32 (enforced by csrc/checks.h);
// any other combination returns cudaErrorInvalidValue.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "launch.h"

namespace mos {
namespace gpu {

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<PT>) for PT in {XT, float} as `pool` says.
template <typename XT, typename F>
cudaError_t dispatch_pool(DType act, DType pool, F&& f) {
  if (pool == DType::F32) return f(Tag<float>{});
  if (pool == act) return f(Tag<XT>{});
  return cudaErrorInvalidValue;
}

// f(Tag<XT>) for the activation dtype.
template <typename F>
cudaError_t dispatch_act(DType act, F&& f) {
  switch (act) {
    case DType::F32: return f(Tag<float>{});
    case DType::F64: return f(Tag<double>{});
    case DType::F16: return f(Tag<__half>{});
    case DType::BF16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// f(Tag<XT>, Tag<PT>).
template <typename F>
cudaError_t dispatch_act_pool(DType act, DType pool, F&& f) {
  return dispatch_act(act, [&](auto xt) {
    using XT = typename decltype(xt)::type;
    return dispatch_pool<XT>(act, pool, [&](auto pt) { return f(xt, pt); });
  });
}

// A kernel with more than 48 KiB of shared memory in all (dynamic + static)
// must opt in for its dynamic part (a host-side function attribute; allowed
// while a stream is capturing).
template <typename K>
cudaError_t opt_in_smem(K kernel, size_t dyn, size_t static_bytes = 0) {
  if (dyn + static_bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Ceil division and grid-dimension caps (grids depend on shapes only).
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline unsigned cap_grid_x(int64_t v) { return static_cast<unsigned>(v < 0x7fffffff ? v : 0x7fffffff); }
inline unsigned cap_grid_yz(int64_t v) { return static_cast<unsigned>(v < 65535 ? v : 65535); }

// Device-side segment view; N is clamped to INT32_MAX (seg_indptr is int32, so
// no segment reaches past it and the clamp changes nothing).
inline SegArgs seg_args(const Segments& s) {
  SegArgs a;
  a.indptr = s.indptr;
  a.tenant = s.tenant;
  a.S = s.S;
  a.N = static_cast<int32_t>(s.N < 0x7fffffff ? s.N : 0x7fffffff);
  a.T = s.T;
  return a;
}

inline SideArgs side_args(const Table& t) {
  SideArgs a;
  a.pool = t.pool;
  a.idx = t.idx;
  a.P = t.P;
  a.s = t.s;
  a.l = t.l;
  a.r = t.r;
  a.map = t.map;
  a.U = t.U;
  return a;
}

}  // namespace gpu
}  // namespace mos
