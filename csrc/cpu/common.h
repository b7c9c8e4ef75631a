// Helpers shared by the CPU op implementations (csrc/cpu/*.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace mos {
namespace cpu {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK_TYPE(false, "mos: unsupported dtype ", t);
  }
}

// Token blocks of every segment with a valid tenant, in segment order. Bounds
// are clamped to [0, N] and never overlap, so the kernels stay in bounds even
// with value checks turned off. With `whole` given, segments of at least
// `whole_min` (> 0) tokens go there as one item each instead of as blocks.
inline std::vector<Item> build_items(const at::Tensor& seg_indptr, const at::Tensor& seg_tenant,
                                     int64_t N, int64_t T, std::vector<Item>* whole = nullptr,
                                     int64_t whole_min = 0) {
  const int32_t* p = seg_indptr.data_ptr<int32_t>();
  const int32_t* t = seg_tenant.data_ptr<int32_t>();
  const int64_t S = seg_tenant.numel();
  std::vector<Item> items;
  int64_t prev_end = 0;
  for (int64_t g = 0; g < S; ++g) {
    const int64_t n0 = std::min<int64_t>(std::max<int64_t>(p[g], prev_end), N);
    const int64_t n1 = std::min<int64_t>(std::max<int64_t>(p[g + 1], n0), N);
    prev_end = std::max(prev_end, n1);
    if (t[g] < 0 || t[g] >= T) continue;
    if (whole != nullptr && whole_min > 0 && n1 - n0 >= whole_min) {
      whole->push_back(Item{static_cast<int32_t>(n0), static_cast<int32_t>(n1), t[g]});
      continue;
    }
    for (int64_t b = n0; b < n1; b += kTokBlock)
      items.push_back(Item{static_cast<int32_t>(b), static_cast<int32_t>(std::min(b + kTokBlock, n1)), t[g]});
  }
  return items;
}

// dst[k] = src[idx[k]] for n rows of row_bytes each; -1 and out-of-range
// entries (possible with value checks off) give zero rows.
inline void gather_rows(char* dst, const char* src, const int32_t* idx, int64_t n, int64_t P,
                        int64_t row_bytes) {
  for (int64_t k = 0; k < n; ++k) {
    const int32_t p = idx[k];
    if (p >= 0 && p < P)
      std::memcpy(dst + k * row_bytes, src + p * row_bytes, row_bytes);
    else
      std::memset(dst + k * row_bytes, 0, row_bytes);
  }
}

// The kernels' view of one side; `map` is the side's shared-table map (docs/OPS.md) or nullptr.
inline Side make_side(const at::Tensor& pool, const at::Tensor& idx, const SideDims& d,
                      const int32_t* map = nullptr) {
  Side s;
  s.map = map;
  s.U = d.U;
  s.pool = pool.data_ptr();
  s.pool_dtype = to_dtype(pool.scalar_type());
  s.P = d.P;
  s.s = d.s;
  s.l = d.l;
  s.idx = idx.data_ptr<int32_t>();
  s.r = d.r;
  return s;
}

}  // namespace cpu
}  // namespace mos
