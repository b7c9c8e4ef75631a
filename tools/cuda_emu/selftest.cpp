// Self-tests of the emulator's own checks (built into the emulator module as
// `selftest(name)`, which returns the launch's error name): a misaligned
// 16-byte load, a barrier some threads skip, warp_sum over shuffles, and the
// cp.async model (a copy is visible only after the wait that retires its
// group; copies still in flight at the end of a block fail the launch).
#include <string>

#include "../../csrc/cuda/vec.cuh"

namespace {

using namespace mos::gpu;

void k_misaligned(const unsigned char* buf, float* out) {
  float f[8];
  load8<__nv_bfloat16>(reinterpret_cast<const __nv_bfloat16*>(buf + 2), f);  // 2 bytes past a 16-byte boundary
  if (threadIdx.x == 0) out[0] = f[0];
}

void k_divergent_barrier(float* out) {
  if (threadIdx.x == 5) return;  // non-uniform exit
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

void k_warp_sum(float* out) {
  const float s = warp_sum(static_cast<float>(threadIdx.x));
  out[threadIdx.x] = s;
}

// Thread t copies src[t] (16 bytes) into shared memory in two groups (even
// threads' second copy is zero-filled), reads before and after waiting.
void k_cp_async(const float4* src, float* out, int wait_mode) {
  __shared__ __align__(16) float4 sm[2][64];
  const int t = threadIdx.x;
  sm[0][t] = make_float4(-1.f, -1.f, -1.f, -1.f);
  sm[1][t] = make_float4(-1.f, -1.f, -1.f, -1.f);
  cp_async16(&sm[0][t], &src[t], true);
  cp_async_commit();
  cp_async16(&sm[1][t], &src[t], t % 2 == 1);
  cp_async_commit();
  out[4 * t] = sm[0][t].x;  // before any wait: still the old value
  if (wait_mode == 0) return;  // leaves both groups in flight
  cp_async_wait<1>();
  out[4 * t + 1] = sm[0][t].x;  // group 0 landed
  out[4 * t + 2] = sm[1][t].x;  // group 1 not yet
  cp_async_wait<0>();
  out[4 * t + 3] = sm[1][t].x;  // landed, or zero-filled
}

}  // namespace

std::string emu_selftest(const std::string& which) {
  alignas(16) static unsigned char buf[64] = {};
  static float out[256];  // 4 per thread for cp_async
  cudaError_t e = cudaSuccess;
  if (which == "misaligned") {
    emu::launch(dim3(1), 32, 0, nullptr, k_misaligned, static_cast<const unsigned char*>(buf), out);
  } else if (which == "divergent_barrier") {
    emu::launch(dim3(1), 64, 0, nullptr, k_divergent_barrier, out);
  } else if (which == "warp_sum") {
    emu::launch(dim3(1), 64, 0, nullptr, k_warp_sum, out);
    e = cudaGetLastError();
    if (e != cudaSuccess) return cudaGetErrorName(e);
    for (int t = 0; t < 64; ++t) {
      const int w = t / 32;
      const float want = static_cast<float>(32 * 31 / 2 + 32 * 32 * w);
      if (out[t] != want) return "wrong warp_sum";
    }
    return "ok";
  } else if (which == "cp_async" || which == "cp_async_no_wait") {
    alignas(16) static float4 src[64];
    for (int t = 0; t < 64; ++t) src[t] = make_float4(t + 1.f, 0.f, 0.f, 0.f);
    emu::launch(dim3(1), 64, 0, nullptr, k_cp_async, static_cast<const float4*>(src), out, which == "cp_async" ? 1 : 0);
    e = cudaGetLastError();
    if (e != cudaSuccess || which != "cp_async") return cudaGetErrorName(e);
    for (int t = 0; t < 64; ++t) {
      const float want[4] = {-1.f, t + 1.f, -1.f, t % 2 ? t + 1.f : 0.f};
      for (int q = 0; q < 4; ++q)
        if (out[4 * t + q] != want[q]) return "wrong cp.async order at thread " + std::to_string(t);
    }
    return "ok";
  } else {
    return "unknown self-test";
  }
  e = cudaGetLastError();
  return cudaGetErrorName(e);
}
