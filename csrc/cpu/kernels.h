// Torch-free interface of the CPU kernels (sgmv shrink / expand / fused, and the
// fused pool-gradient accumulation). The bodies live in kernels_impl.h and are
// compiled once per instruction set (isa_base.cpp, isa_avx2.cpp, isa_avx512.cpp);
// kernels() picks the best one this CPU runs, once.
//
// Parallelism is the caller's (at::parallel_for over work items); a kernel call
// processes items [begin, end) of a list of token blocks.
#pragma once

#include <cstdint>

namespace mos {
namespace cpu {

// Element types the kernels see. The accumulation type is double for F64
// activations and float otherwise.
enum class DType : int32_t { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Tokens per work item. Items never straddle a segment.
constexpr int64_t kTokBlock = 16;

// A block of at most kTokBlock tokens [n0, n1) of one segment whose tenant t is
// a valid tenant (segments with tenant -1 produce no items).
struct Item {
  int32_t n0, n1, t;
};

// One side of a sharded adapter: pool [P, s] and tables idx [U, r, l] (rank-major).
// Without a map, table t is tenant t's (U = T) and names pool rows directly. With a
// shared-table map [T, 2] (row t = table u, row base), tenant t reads table u and
// its entry p names pool row base + p (docs/OPS.md "Shared tables").
struct Side {
  const void* pool = nullptr;
  DType pool_dtype = DType::F32;
  int64_t P = 0, s = 0, l = 0;
  const int32_t* idx = nullptr;
  int64_t r = 0;
  const int32_t* map = nullptr;  // [T, 2] or nullptr
  int64_t U = 0;                 // tables (idx's first dim)
};

// Tenant t's table in a side: entry p (of tab [r, l]) is used iff 0 <= p < P, and
// then names pool row base + p. A map row naming no table or a base outside
// [0, P] (possible with value checks off) leaves the tenant nothing (P = 0).
struct TenantTable {
  const int32_t* tab;
  int64_t base, P;
};
inline TenantTable tenant_table(const Side& s, int64_t t) {
  const int64_t per = s.r * s.l;
  if (s.map == nullptr) return TenantTable{s.idx + t * per, 0, s.P};
  const int64_t u = s.map[2 * t], base = s.map[2 * t + 1];
  if (u < 0 || u >= s.U || base < 0 || base > s.P) return TenantTable{s.idx, 0, 0};
  return TenantTable{s.idx + u * per, base, s.P - base};
}

// v[n, :] = shrink(x[n, :])                          (v: accumulation dtype)
// y[n, :] += expand(v[n, :] * scale[t])
// sgmv: both, with v kept in a per-thread buffer.
struct SgmvArgs {
  const void* x = nullptr;  // [N, h] act dtype, row stride x_stride
  int64_t x_stride = 0;
  void* y = nullptr;  // [N, o] act dtype, row stride y_stride
  int64_t y_stride = 0;
  DType act = DType::F32;
  void* v = nullptr;  // [N, r] accumulation dtype, row stride v_stride (shrink out / expand in)
  int64_t v_stride = 0;
  const float* scale = nullptr;  // [T]
  Side a, b;
};

// grad[idx[t, j, i], c] += scale[t] * sum_n u[n, j] * x[n, i*s + c]   for c in [c0, c1)
struct ShardGradArgs {
  void* grad = nullptr;  // [P, s] accumulation dtype
  const void* u = nullptr;  // [N, r] accumulation dtype
  int64_t u_stride = 0;
  const void* x = nullptr;  // [N, l*s] act dtype
  int64_t x_stride = 0;
  DType act = DType::F32;
  const float* scale = nullptr;
  Side side;  // side.pool unused; P, s, l, idx, r used
};

struct KernelTable {
  const char* isa;
  // Each writes only the rows of its items.
  void (*shrink)(const SgmvArgs&, const Item*, int64_t begin, int64_t end);
  void (*expand)(const SgmvArgs&, const Item*, int64_t begin, int64_t end);
  void (*sgmv)(const SgmvArgs&, const Item*, int64_t begin, int64_t end);
  // Processes all items, columns [c0, c1) of every shard (c0 a multiple of
  // vec_width), so threads that own disjoint column ranges never race and the
  // result is bitwise independent of how columns are split.
  void (*shard_grad)(const ShardGradArgs&, const Item*, int64_t n_items, int64_t c0, int64_t c1);
  // Vector width in elements of float (double: half of it).
  int64_t vec_width_f32;
};

const KernelTable& kernels_base();
#if defined(__x86_64__) || defined(_M_X64)
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
#endif

// The table in use: the best this CPU supports, or the one named by
// MOS_EXT_CPU_ISA / set_isa ("base", "avx2", "avx512").
const KernelTable& kernels();
// Selects a table by name; returns false (and changes nothing) when this CPU or
// build cannot run it.
bool set_isa(const char* name);
// Names this CPU and build can run, best last.
const char* const* available_isas(int* count);

}  // namespace cpu
}  // namespace mos
