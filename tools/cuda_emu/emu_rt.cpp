#include "emu.h"
#include <barrier>
#include <memory>
#include <mutex>
#include <thread>
#include <cstdlib>
namespace emu {
thread_local Idx tidx, bidx;
Idx bdim, gdim;
unsigned char* dyn = nullptr;
static std::unique_ptr<std::barrier<>> block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
static int wbuf[32][32];
static std::mutex amu;
static cudaError_t last = cudaSuccess;
void syncthreads() { block_bar->arrive_and_wait(); }
int shfl_up(int v, unsigned d) {
  const unsigned lane = tidx.x & 31, w = tidx.x >> 5;
  wbuf[w][lane] = v;
  warp_bar[w]->arrive_and_wait();
  const int r = lane >= d ? wbuf[w][lane - d] : v;
  warp_bar[w]->arrive_and_wait();
  return r;
}
float atomic_add(float* p, float v) { std::lock_guard<std::mutex> g(amu); float o = *p; *p = o + v; return o; }
double atomic_add(double* p, double v) { std::lock_guard<std::mutex> g(amu); double o = *p; *p = o + v; return o; }
cudaError_t run_grid(dim3 grid, int block, size_t smem, const std::function<void()>& body) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block <= 0 || block > 1024 || grid.y > 65535 || grid.z > 65535) {
    last = cudaErrorInvalidConfiguration; return last;
  }
  if (smem > 227 * 1024) { last = cudaErrorInvalidValue; return last; }
  bdim = Idx{(unsigned)block, 1, 1};
  gdim = Idx{grid.x, grid.y, grid.z};
  std::vector<unsigned char> dbuf(smem + 64);
  // poison dynamic shared memory
  for (auto& c : dbuf) c = 0xA5;
  dyn = dbuf.data();
  block_bar = std::make_unique<std::barrier<>>(block);
  warp_bar.clear();
  for (int w = 0; w < (block + 31) / 32; ++w) warp_bar.push_back(std::make_unique<std::barrier<>>(32));
  std::vector<std::thread> th;
  for (int t = 0; t < block; ++t)
    th.emplace_back([&, t]() {
      tidx = Idx{(unsigned)t, 0, 0};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            bidx = Idx{x, y, z};
            body();
            block_bar->arrive_and_wait();
          }
    });
  for (auto& t : th) t.join();
  return cudaSuccess;
}
}  // namespace emu
extern "C" {
cudaError_t cudaGetLastError(void) { cudaError_t e = emu::last; emu::last = cudaSuccess; return e; }
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr, int) { *v = 227 * 1024; return cudaSuccess; }
}
extern "C" const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : e == cudaErrorInvalidValue ? "cudaErrorInvalidValue" : e == cudaErrorInvalidConfiguration ? "cudaErrorInvalidConfiguration" : "cudaError(other)"; }
