// The BLAS path of the CPU ops (see dense.h).
#include "dense.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace mos {
namespace cpu {
namespace {

// Measured on a 2-core AVX-512 Xeon (benchmarks/RESULTS.md): below ~32 tokens
// the fused kernels win or tie; above, GEMM on the gathered tenant matrices.
constexpr int64_t kDefaultDenseMin = 32;

int64_t initial_dense_min() {
  if (const char* env = std::getenv("MOS_EXT_CPU_DENSE_MIN_TOKENS")) {
    char* end = nullptr;
    const long long n = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && n >= 0) return n;
  }
  return kDefaultDenseMin;
}

std::atomic<int64_t>& dense_min_ref() {
  static std::atomic<int64_t> n{initial_dense_min()};
  return n;
}

template <typename T>
void add_rows(T* grad, const T* G, const int32_t* idx_t, const SideDims& d, T sc) {
  // Threads own disjoint column ranges; rows are visited in a fixed (j, i) order.
  const int64_t cols = d.s;
  at::parallel_for(0, cols, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t j = 0; j < d.r; ++j) {
      for (int64_t i = 0; i < d.l; ++i) {
        const int32_t p = idx_t[j * d.l + i];
        if (p < 0 || p >= d.P) continue;
        T* dst = grad + p * cols;
        const T* src = G + j * (d.l * cols) + i * cols;
        for (int64_t c = c0; c < c1; ++c) dst[c] += sc * src[c];
      }
    }
  });
}

}  // namespace

int64_t dense_min_tokens() { return dense_min_ref().load(std::memory_order_relaxed); }

int64_t set_dense_min_tokens(int64_t n) {
  if (n < 0) throw std::invalid_argument("dense_min_tokens must be >= 0 (0 turns the BLAS path off), got " +
                                         std::to_string(n));
  return dense_min_ref().exchange(n);
}

Plan plan_items(const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, int64_t N, int64_t T,
                bool dense_ok, std::initializer_list<const Side*> sides) {
  Plan plan;
  plan.blocks = build_items(seg_indptr, seg_tenant, N, T, &plan.dense, dense_ok ? dense_min_tokens() : 0);
  if (plan.dense.empty() || sides.size() == 0) return plan;
  std::vector<int8_t> mixed(T, -1);  // per tenant: -1 unknown, 0 / 1
  std::vector<Item> keep;
  for (const Item& g : plan.dense) {
    if (mixed[g.t] < 0) {
      mixed[g.t] = 0;
      for (const Side* sd : sides) {
        const TenantTable tt = tenant_table(*sd, g.t);
        const int64_t r = sd->r, l = sd->l;
        for (int64_t j = 0; j < r && !mixed[g.t]; ++j) {
          int64_t ok = 0;
          for (int64_t i = 0; i < l; ++i) ok += (tt.tab[j * l + i] >= 0 && tt.tab[j * l + i] < tt.P);
          if (ok != 0 && ok != l) mixed[g.t] = 1;
        }
      }
    }
    if (!mixed[g.t]) {
      keep.push_back(g);
      continue;
    }
    for (int64_t b = g.n0; b < g.n1; b += kTokBlock)
      plan.blocks.push_back(Item{static_cast<int32_t>(b), static_cast<int32_t>(std::min<int64_t>(b + kTokBlock, g.n1)), g.t});
  }
  plan.dense.swap(keep);
  return plan;
}

namespace {

// Rank rows of tenant t whose entries are all valid (others are fully padded:
// the plan sent tenants with mixed rows to the fused kernels).
std::vector<int64_t> valid_rows(const Side& d, int64_t t) {
  const TenantTable tt = tenant_table(d, t);
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < d.r; ++j) {
    bool ok = true;
    for (int64_t i = 0; i < d.l && ok; ++i) ok = tt.tab[j * d.l + i] >= 0 && tt.tab[j * d.l + i] < tt.P;
    if (ok) rows.push_back(j);
  }
  return rows;
}

// Rows [n, row_bytes] of tenant t's pool window (rows base + p for its entries p).
void gather_window(char* dst, const at::Tensor& pool, const TenantTable& tt, const int32_t* ids, int64_t n,
                   int64_t s) {
  const int64_t row_bytes = s * pool.element_size();
  gather_rows(dst, static_cast<const char*>(pool.data_ptr()) + tt.base * row_bytes, ids, n, tt.P, row_bytes);
}

// The given rank rows of tenant t's [r, l*s] matrix, in `dtype`.
at::Tensor gather_some(const at::Tensor& pool, const Side& d, int64_t t, const std::vector<int64_t>& rows,
                       at::ScalarType dtype) {
  const TenantTable tt = tenant_table(d, t);
  std::vector<int32_t> ids;
  ids.reserve(rows.size() * d.l);
  for (int64_t j : rows)
    for (int64_t i = 0; i < d.l; ++i) ids.push_back(tt.tab[j * d.l + i]);
  at::Tensor out = at::empty({static_cast<int64_t>(rows.size()), d.l * d.s}, pool.options());
  gather_window(static_cast<char*>(out.data_ptr()), pool, tt, ids.data(), static_cast<int64_t>(ids.size()), d.s);
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

at::Tensor as_index(const std::vector<int64_t>& rows) {
  return at::tensor(at::ArrayRef<int64_t>(rows), at::kLong);
}

// ys += sc * (vs @ B), through addmm_'s alpha while sc is finite. ATen's CPU fp32 addmm_ takes a
// NaN alpha as 1 for some shapes (torch 2.13: a 20x3 @ 3x20 product comes out unscaled), which
// would serve a tenant with a NaN scale as if its scale were 1: a non-finite scale takes mm + add_.
void add_scaled_mm(at::Tensor& ys, const at::Tensor& vs, const at::Tensor& B, float sc) {
  if (std::isfinite(sc))
    ys.addmm_(vs, B, 1.0, static_cast<double>(sc));
  else
    ys.add_(at::mm(vs, B), static_cast<double>(sc));
}

}  // namespace

at::Tensor gather_tenant(const at::Tensor& pool, const Side& d, int64_t t, at::ScalarType dtype) {
  at::Tensor out = at::empty({d.r, d.l * d.s}, pool.options());
  const TenantTable tt = tenant_table(d, t);
  gather_window(static_cast<char*>(out.data_ptr()), pool, tt, tt.tab, d.r * d.l, d.s);
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

void dense_shrink(const at::Tensor& v, const at::Tensor& x, const at::Tensor& pool_a, const Side& a,
                  const std::vector<Item>& segs) {
  for (const Item& g : segs) {
    const std::vector<int64_t> rows = valid_rows(a, g.t);
    if (rows.empty()) continue;  // v stays zero
    at::Tensor vs = v.narrow(0, g.n0, g.n1 - g.n0);
    const at::Tensor xs = x.narrow(0, g.n0, g.n1 - g.n0);
    if (static_cast<int64_t>(rows.size()) == a.r) {
      at::mm_out(vs, xs, gather_tenant(pool_a, a, g.t, x.scalar_type()).t());
    } else {  // padded rank rows: their columns of v stay zero, never x * 0
      vs.index_copy_(1, as_index(rows), at::mm(xs, gather_some(pool_a, a, g.t, rows, x.scalar_type()).t()));
    }
  }
}

void dense_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b, const Side& b,
                  const at::Tensor& scale, const std::vector<Item>& segs) {
  const float* sc = scale.data_ptr<float>();
  for (const Item& g : segs) {
    const std::vector<int64_t> rows = valid_rows(b, g.t);
    if (rows.empty()) continue;
    at::Tensor ys = y.narrow(0, g.n0, g.n1 - g.n0);
    const at::Tensor vs = v.narrow(0, g.n0, g.n1 - g.n0);
    // v is in the accumulation dtype, which is y's for the fp32/fp64 problems this path takes
    if (static_cast<int64_t>(rows.size()) == b.r)
      add_scaled_mm(ys, vs, gather_tenant(pool_b, b, g.t, y.scalar_type()), sc[g.t]);
    else  // padded rank rows skipped: Inf/NaN in their columns of v never reach y
      add_scaled_mm(ys, vs.index_select(1, as_index(rows)), gather_some(pool_b, b, g.t, rows, y.scalar_type()),
                    sc[g.t]);
  }
}

void dense_sgmv(const at::Tensor& y, const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& pool_b,
                const Side& a, const Side& b, const at::Tensor& scale, const std::vector<Item>& segs) {
  const float* sc = scale.data_ptr<float>();
  for (const Item& g : segs) {
    const std::vector<int64_t> ra = valid_rows(a, g.t), rb = valid_rows(b, g.t);
    if (rb.empty()) continue;
    const at::Tensor xs = x.narrow(0, g.n0, g.n1 - g.n0);
    at::Tensor vs;
    if (static_cast<int64_t>(ra.size()) == a.r) {
      vs = at::mm(xs, gather_tenant(pool_a, a, g.t, x.scalar_type()).t());
    } else {
      vs = at::zeros({g.n1 - g.n0, a.r}, x.options());
      if (!ra.empty())
        vs.index_copy_(1, as_index(ra), at::mm(xs, gather_some(pool_a, a, g.t, ra, x.scalar_type()).t()));
    }
    at::Tensor ys = y.narrow(0, g.n0, g.n1 - g.n0);
    if (static_cast<int64_t>(rb.size()) == b.r)
      add_scaled_mm(ys, vs, gather_tenant(pool_b, b, g.t, x.scalar_type()), sc[g.t]);
    else
      add_scaled_mm(ys, vs.index_select(1, as_index(rb)), gather_some(pool_b, b, g.t, rb, x.scalar_type()), sc[g.t]);
  }
}

void dense_shard_grad(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& x,
                      const at::Tensor& idx, const at::Tensor& scale, const SideDims& d,
                      const std::vector<Item>& segs) {
  const float* sc = scale.data_ptr<float>();
  const int32_t* ip = idx.data_ptr<int32_t>();
  for (const Item& g : segs) {
    // [r, l*s] = u_seg^T @ x_seg in the accumulation dtype (== x's for fp32/fp64)
    const at::Tensor G = at::mm(u.narrow(0, g.n0, g.n1 - g.n0).t(), x.narrow(0, g.n0, g.n1 - g.n0))
                             .to(grad.scalar_type())
                             .contiguous();
    const int32_t* idx_t = ip + g.t * d.r * d.l;
    if (grad.scalar_type() == at::kDouble)
      add_rows<double>(grad.data_ptr<double>(), G.data_ptr<double>(), idx_t, d, static_cast<double>(sc[g.t]));
    else
      add_rows<float>(grad.data_ptr<float>(), G.data_ptr<float>(), idx_t, d, sc[g.t]);
  }
}

}  // namespace cpu
}  // namespace mos
