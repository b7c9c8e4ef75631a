// Runtime of the CUDA emulator (see emu.h): a block's threads are fibers with
// their own stacks, switched by a small x86-64 context switch; the scheduler
// resumes them round-robin. Barriers are counters with generations; a round in
// which every live thread waits and no barrier completes is a deadlock.
#include "emu.h"
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <sys/mman.h>

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is x86-64 only"
#endif

extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
)");

namespace emu {
Idx tidx, bidx;
Idx bdim, gdim;
unsigned char* dyn = nullptr;

namespace {
constexpr size_t kStack = 256 * 1024;
struct Fiber {
  void* sp = nullptr;
  unsigned char* stack = nullptr;
  unsigned tid = 0;
  bool done = false;
  bool waiting = false;
  int xphase = 0;  // this thread's exchange count mod 2 (the warp's buffer it uses next)
  // cp.async: copies not yet performed, tagged with their commit group
  struct Copy {
    void* dst;
    const void* src;
    bool valid;
    int group;
  };
  std::vector<Copy> copies;
  int group = 0;  // the open (uncommitted) group's number
};
std::vector<Fiber> fibers;
Fiber* cur = nullptr;
void* sched_sp = nullptr;
const std::function<void()>* body_fn = nullptr;
int nthreads = 0;
uint64_t epoch = 0;  // bumps whenever a barrier completes or a thread finishes
// block barrier
int bar_count = 0;
uint64_t bar_gen = 0;
// warp barriers and exchange buffers
struct Warp {
  int count = 0;
  uint64_t gen = 0;
  uint64_t buf[2][32];
};
std::vector<Warp> warps;
std::string fault_msg;
cudaError_t last = cudaSuccess;

void yield() { emu_switch(&cur->sp, sched_sp); }

void fiber_main() {
  (*body_fn)();
  cur->done = true;
  ++epoch;
  emu_switch(&cur->sp, sched_sp);
  std::abort();  // never resumed
}

void init_fiber(Fiber& f) {
  if (!f.stack) {
    void* m = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) std::abort();
    f.stack = static_cast<unsigned char*>(m);
  }
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStack) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                       // fake return address of fiber_main
  *--sp = reinterpret_cast<void*>(&fiber_main);          // emu_switch's ret target
  for (int i = 0; i < 6; ++i) *--sp = nullptr;           // rbp rbx r12 r13 r14 r15
  f.sp = sp;
  f.done = false;
  f.waiting = false;
  f.xphase = 0;
  f.copies.clear();
  f.group = 0;
}

// Runs one block; false on deadlock.
bool run_block() {
  for (int t = 0; t < nthreads; ++t) init_fiber(fibers[t]);
  bar_count = 0;
  for (auto& w : warps) w.count = 0;
  int live = nthreads;
  while (live > 0) {
    const uint64_t e0 = epoch;
    bool all_wait = true;
    live = 0;
    for (int t = 0; t < nthreads; ++t) {
      Fiber& f = fibers[t];
      if (f.done) continue;
      cur = &f;
      tidx = Idx{f.tid, 0, 0};
      emu_switch(&sched_sp, f.sp);
      if (!f.done) {
        ++live;
        if (!f.waiting) all_wait = false;
      }
    }
    if (live > 0 && all_wait && epoch == e0) return false;
  }
  for (int t = 0; t < nthreads; ++t)
    if (!fibers[t].copies.empty()) {
      fault("cp.async copies still in flight when the block ended (no cp_async_wait covers them)", __FILE__, __LINE__);
      break;
    }
  return true;
}
}  // namespace

void syncthreads() {
  const uint64_t g = bar_gen;
  if (++bar_count == nthreads) {
    bar_count = 0;
    ++bar_gen;
    ++epoch;
    return;
  }
  cur->waiting = true;
  while (bar_gen == g) yield();
  cur->waiting = false;
}

void syncwarp() {
  Warp& w = warps[cur->tid >> 5];
  const uint64_t g = w.gen;
  if (++w.count == 32) {
    w.count = 0;
    ++w.gen;
    ++epoch;
    return;
  }
  cur->waiting = true;
  while (w.gen == g) yield();
  cur->waiting = false;
}

uint64_t exchange(uint64_t v, int src) {
  // Double buffer, one barrier per exchange: exchange k uses buffer k % 2. A
  // lane can write buffer k % 2 again (exchange k + 2) only after every lane
  // has reached exchange k + 1's barrier, i.e. has read exchange k.
  Warp& w = warps[cur->tid >> 5];
  const int ph = cur->xphase;
  cur->xphase ^= 1;
  w.buf[ph][cur->tid & 31] = v;
  syncwarp();
  return w.buf[ph][src];
}

void fault(const char* what, const char* file, int line) {
  if (fault_msg.empty()) fault_msg = std::string(what) + " at " + file + ":" + std::to_string(line);
}

void cp_async(void* smem, const void* gmem, bool valid) { cur->copies.push_back({smem, gmem, valid, cur->group}); }
void cp_async_commit() { ++cur->group; }
void cp_async_wait(int n_in_flight) {
  // Groups < group - n are complete; uncommitted copies are never waited for.
  const int done_below = cur->group - n_in_flight;
  std::vector<Fiber::Copy> keep;
  for (const auto& c : cur->copies) {
    if (c.group < done_below) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    } else {
      keep.push_back(c);
    }
  }
  cur->copies.swap(keep);
}

float atomic_add(float* p, float v) { float o = *p; *p = o + v; return o; }
double atomic_add(double* p, double v) { double o = *p; *p = o + v; return o; }

cudaError_t run_grid(dim3 grid, int block, size_t smem, const std::function<void()>& body) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block <= 0 || block > 1024 || grid.y > 65535 || grid.z > 65535) {
    last = cudaErrorInvalidConfiguration;
    return last;
  }
  if (block % 32 != 0) { last = cudaErrorInvalidConfiguration; return last; }  // kernels here use full warps
  if (smem > 227 * 1024) { last = cudaErrorInvalidValue; return last; }
  bdim = Idx{(unsigned)block, 1, 1};
  gdim = Idx{grid.x, grid.y, grid.z};
  std::vector<unsigned char> dbuf(smem + 256);  // 128-byte aligned, like the device's dynamic shared memory
  dyn = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(dbuf.data()) + 127) & ~uintptr_t(127));
  if ((int)fibers.size() < block) fibers.resize(block);
  nthreads = block;
  for (int t = 0; t < block; ++t) fibers[t].tid = t;
  warps.assign(block / 32, Warp{});
  body_fn = &body;
  fault_msg.clear();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        bidx = Idx{x, y, z};
        for (size_t i = 0; i < smem; ++i) dyn[i] = 0xA5;  // poison dynamic shared memory
        if (!run_block()) {
          std::fprintf(stderr, "cuda_emu: deadlock in block (%u,%u,%u): a barrier or warp primitive some threads never reach\n", x, y, z);
          last = cudaErrorLaunchFailure;
          return last;
        }
        if (!fault_msg.empty()) {
          std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u)\n", fault_msg.c_str(), x, y, z);
          last = cudaErrorMisalignedAddress;
          return last;
        }
      }
  return cudaSuccess;
}
}  // namespace emu

extern "C" {
cudaError_t cudaGetLastError(void) { cudaError_t e = emu::last; emu::last = cudaSuccess; return e; }
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr, int) { *v = 227 * 1024; return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    default: return "cudaError(other)";
  }
}
}
