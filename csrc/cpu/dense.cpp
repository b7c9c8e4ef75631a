// The BLAS path of the CPU ops (see dense.h).
#include "dense.h"

#include <ATen/Parallel.h>

#include <atomic>
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
                bool dense_ok) {
  Plan plan;
  plan.blocks = build_items(seg_indptr, seg_tenant, N, T, &plan.dense, dense_ok ? dense_min_tokens() : 0);
  return plan;
}

at::Tensor gather_tenant(const at::Tensor& pool, const at::Tensor& idx, const SideDims& d, int64_t t,
                         at::ScalarType dtype) {
  at::Tensor out = at::empty({d.r, d.l * d.s}, pool.options());
  gather_rows(static_cast<char*>(out.data_ptr()), static_cast<const char*>(pool.data_ptr()),
              idx.data_ptr<int32_t>() + t * d.r * d.l, d.r * d.l, d.P, d.s * pool.element_size());
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

void dense_shrink(const at::Tensor& v, const at::Tensor& x, const at::Tensor& pool_a,
                  const at::Tensor& idx_a, const SideDims& a, const std::vector<Item>& segs) {
  for (const Item& g : segs) {
    const at::Tensor A = gather_tenant(pool_a, idx_a, a, g.t, x.scalar_type());
    at::Tensor vs = v.narrow(0, g.n0, g.n1 - g.n0);
    at::mm_out(vs, x.narrow(0, g.n0, g.n1 - g.n0), A.t());
  }
}

void dense_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b,
                  const at::Tensor& idx_b, const at::Tensor& scale, const SideDims& b,
                  const std::vector<Item>& segs) {
  const float* sc = scale.data_ptr<float>();
  for (const Item& g : segs) {
    const at::Tensor B = gather_tenant(pool_b, idx_b, b, g.t, y.scalar_type());
    at::Tensor ys = y.narrow(0, g.n0, g.n1 - g.n0);
    // v is in the accumulation dtype, which is y's for the fp32/fp64 problems this path takes
    ys.addmm_(v.narrow(0, g.n0, g.n1 - g.n0), B, 1.0, static_cast<double>(sc[g.t]));
  }
}

void dense_sgmv(const at::Tensor& y, const at::Tensor& x, const at::Tensor& pool_a,
                const at::Tensor& pool_b, const at::Tensor& idx_a, const at::Tensor& idx_b,
                const at::Tensor& scale, const SideDims& a, const SideDims& b,
                const std::vector<Item>& segs) {
  const float* sc = scale.data_ptr<float>();
  for (const Item& g : segs) {
    const at::Tensor A = gather_tenant(pool_a, idx_a, a, g.t, x.scalar_type());
    const at::Tensor B = gather_tenant(pool_b, idx_b, b, g.t, x.scalar_type());
    const at::Tensor vs = at::mm(x.narrow(0, g.n0, g.n1 - g.n0), A.t());
    at::Tensor ys = y.narrow(0, g.n0, g.n1 - g.n0);
    ys.addmm_(vs, B, 1.0, static_cast<double>(sc[g.t]));
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
