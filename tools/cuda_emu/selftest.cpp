// Self-tests of the emulator's own checks (built into the emulator module as
// `selftest(name)`, which returns the launch's error name): a misaligned
// 16-byte load, a barrier some threads skip, and warp_sum over shuffles.
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

}  // namespace

std::string emu_selftest(const std::string& which) {
  alignas(16) static unsigned char buf[64] = {};
  static float out[256];
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
  } else {
    return "unknown self-test";
  }
  e = cudaGetLastError();
  return cudaGetErrorName(e);
}
