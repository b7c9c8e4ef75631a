// Picks the CPU kernel table once: the best instruction set this CPU runs,
// unless MOS_EXT_CPU_ISA (or mos_ext.set_cpu_isa) names another.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace mos {
namespace cpu {
namespace {

struct Entry {
  const char* name;
  const KernelTable& (*table)();
  bool (*supported)();
};

bool yes() { return true; }
#if defined(__x86_64__) || defined(_M_X64)
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"); }
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
const Entry kEntries[] = {{"base", &kernels_base, &yes},
                          {"avx2", &kernels_avx2, &has_avx2},
                          {"avx512", &kernels_avx512, &has_avx512}};
#else
const Entry kEntries[] = {{"base", &kernels_base, &yes}};
#endif
constexpr int kNumEntries = sizeof(kEntries) / sizeof(kEntries[0]);

const Entry* find(const char* name) {
  for (const Entry& e : kEntries)
    if (std::strcmp(e.name, name) == 0 && e.supported()) return &e;
  return nullptr;
}

const KernelTable* initial() {
  if (const char* env = std::getenv("MOS_EXT_CPU_ISA")) {
    if (const Entry* e = find(env)) return &e->table();
  }
  for (int k = kNumEntries - 1; k >= 0; --k)
    if (kEntries[k].supported()) return &kEntries[k].table();
  return &kernels_base();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> t{initial()};
  return t;
}

}  // namespace

const KernelTable& kernels() { return *current().load(std::memory_order_acquire); }

bool set_isa(const char* name) {
  const Entry* e = find(name);
  if (e == nullptr) return false;
  current().store(&e->table(), std::memory_order_release);
  return true;
}

const char* const* available_isas(int* count) {
  static const char* names[kNumEntries];
  static int n = [] {
    int k = 0;
    for (const Entry& e : kEntries)
      if (e.supported()) names[k++] = e.name;
    return k;
  }();
  *count = n;
  return names;
}

}  // namespace cpu
}  // namespace mos
