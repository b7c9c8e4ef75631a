#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace mos {
namespace {

bool env_default() {
  const char* v = std::getenv("MOS_EXT_CHECK_INDICES");
  if (v == nullptr) return true;
  return !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 ||
           std::strcmp(v, "False") == 0 || std::strcmp(v, "off") == 0);
}

std::atomic<bool>& checks_flag() {
  static std::atomic<bool> flag{env_default()};
  return flag;
}

// torch's Python spelling of a dtype, for messages.
const char* dt(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

bool is_act_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_act(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_act_dtype(t.scalar_type()), name,
                   " must be float32, float64, float16 or bfloat16, got ", dt(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [tokens, features], got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name,
                    " must have unit stride in its last dimension (rows may be strided), got "
                    "strides ",
                    t.strides());
}

void same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                 const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

// A pool [P, s] in the activation dtype or float32, contiguous.
void check_pool(const at::Tensor& pool, const char* name, at::ScalarType act) {
  TORCH_CHECK_TYPE(pool.scalar_type() == act || pool.scalar_type() == at::kFloat, name,
                   " must be ", dt(act), " (the activation dtype) or float32, got ",
                   dt(pool.scalar_type()));
  TORCH_CHECK_VALUE(pool.dim() == 2, name, " must be 2-D [pool rows, shard length], got shape ",
                    pool.sizes());
  TORCH_CHECK_VALUE(pool.is_contiguous(), name, " must be contiguous");
}

void check_int32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", dt(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// Host copy of a small int32 tensor for value checks.
at::Tensor host(const at::Tensor& t) { return t.is_cpu() ? t : t.to(at::kCPU); }

// Every entry of idx in [-1, P).
void check_index_values(const at::Tensor& idx, int64_t P, const char* name) {
  if (!index_checks_enabled() || idx.numel() == 0) return;
  at::Tensor h = host(idx);
  const int32_t* p = h.data_ptr<int32_t>();
  const int64_t n = h.numel();
  for (int64_t k = 0; k < n; ++k) {
    if (p[k] < -1 || p[k] >= P) {
      // Report the multi-index of the first bad entry.
      std::string where;
      int64_t rem = k;
      std::vector<int64_t> pos(h.dim());
      for (int64_t d = h.dim() - 1; d >= 0; --d) {
        pos[d] = rem % h.size(d);
        rem /= h.size(d);
      }
      for (int64_t d = 0; d < h.dim(); ++d) where += (d ? ", " : "") + std::to_string(pos[d]);
      TORCH_CHECK_INDEX(false, name, "[", where, "] = ", p[k],
                        " is out of range: entries must be -1 or in [0, ", P,
                        ") (the pool has ", P, " rows)");
    }
  }
}

SegDims check_segments(const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, int64_t N,
                       int64_t T, const at::Tensor& ref, const char* ref_name) {
  check_int32(seg_indptr, "seg_indptr", 1);
  check_int32(seg_tenant, "seg_tenant", 1);
  same_device(seg_indptr, "seg_indptr", ref, ref_name);
  same_device(seg_tenant, "seg_tenant", ref, ref_name);
  TORCH_CHECK_VALUE(seg_indptr.size(0) == seg_tenant.size(0) + 1,
                    "seg_indptr must have one more entry than seg_tenant (S+1 vs S), got ",
                    seg_indptr.size(0), " and ", seg_tenant.size(0));
  SegDims d{seg_tenant.size(0), N};
  if (!index_checks_enabled()) return d;
  at::Tensor ip = host(seg_indptr);
  at::Tensor tn = host(seg_tenant);
  const int32_t* p = ip.data_ptr<int32_t>();
  const int32_t* t = tn.data_ptr<int32_t>();
  TORCH_CHECK_INDEX(p[0] >= 0, "seg_indptr[0] = ", p[0], " must be >= 0");
  for (int64_t g = 0; g < d.S; ++g) {
    TORCH_CHECK_INDEX(p[g + 1] >= p[g], "seg_indptr must be non-decreasing, but seg_indptr[", g,
                      "] = ", p[g], " > seg_indptr[", g + 1, "] = ", p[g + 1]);
    TORCH_CHECK_INDEX(t[g] >= -1 && t[g] < T, "seg_tenant[", g, "] = ", t[g],
                      " is out of range: must be -1 or in [0, ", T, ") (", T, " tenants)");
  }
  TORCH_CHECK_INDEX(p[d.S] <= N, "seg_indptr[", d.S, "] = ", p[d.S],
                    " exceeds the number of tokens N = ", N);
  return d;
}

// idx [T, r, l] against a feature dim `feat` = l * s of an activation and a pool [P, s].
SideDims check_table(const at::Tensor& idx, const char* idx_name, const at::Tensor& pool,
                     const char* pool_name, int64_t feat, const char* feat_name) {
  check_int32(idx, idx_name, 3);
  SideDims d;
  d.T = idx.size(0);
  d.r = idx.size(1);
  d.l = idx.size(2);
  d.P = pool.size(0);
  d.s = pool.size(1);
  TORCH_CHECK_VALUE(d.l >= 1, idx_name, " must have at least one slot per rank row (last dim), got shape ",
                    idx.sizes());
  TORCH_CHECK_VALUE(d.l * d.s == feat, feat_name, " = ", feat, " must equal ", idx_name,
                    ".size(2) * ", pool_name, ".size(1) = ", d.l, " * ", d.s, " (slots x shard length)");
  check_index_values(idx, d.P, idx_name);
  return d;
}

void check_scale(const at::Tensor& scale, int64_t T, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "scale must be float32, got ",
                   dt(scale.scalar_type()));
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == T,
                    "scale must be 1-D with one entry per tenant (", T, "), got shape ",
                    scale.sizes());
  TORCH_CHECK_VALUE(scale.is_contiguous(), "scale must be contiguous");
  same_device(scale, "scale", ref, ref_name);
}

// A rank-space tensor t [N, r] (v, u) in the accumulation dtype of activations `act`.
void check_rank_space(const at::Tensor& t, const char* name, at::ScalarType act, const char* act_name,
                      int64_t N, int64_t r) {
  const at::ScalarType acc = acc_dtype(act);
  TORCH_CHECK_TYPE(t.scalar_type() == acc, name, " must be ", dt(acc), " (the accumulation dtype for ", act_name,
                   " of ", dt(act), "), got ", dt(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == r, name, " must be [N, r] = [", N, ", ", r,
                    "], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name,
                    " must have unit stride in its last dimension, got strides ", t.strides());
}

}  // namespace

bool index_checks_enabled() { return checks_flag().load(std::memory_order_relaxed); }

bool set_index_checks(bool enabled) { return checks_flag().exchange(enabled); }

at::ScalarType acc_dtype(at::ScalarType act) { return act == at::kDouble ? at::kDouble : at::kFloat; }

SideDims check_gather_shards(const at::Tensor& pool, const at::Tensor& idx) {
  TORCH_CHECK_TYPE(is_act_dtype(pool.scalar_type()),
                   "pool must be float32, float64, float16 or bfloat16, got ", dt(pool.scalar_type()));
  TORCH_CHECK_VALUE(pool.dim() == 2, "pool must be 2-D [pool rows, shard length], got shape ",
                    pool.sizes());
  TORCH_CHECK_VALUE(pool.is_contiguous(), "pool must be contiguous");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt, "idx must be int32, got ", dt(idx.scalar_type()));
  TORCH_CHECK_VALUE(idx.dim() >= 2, "idx must be [..., r, l] (at least 2-D), got shape ",
                    idx.sizes());
  TORCH_CHECK_VALUE(idx.is_contiguous(), "idx must be contiguous");
  same_device(idx, "idx", pool, "pool");
  SideDims d;
  d.r = idx.size(-2);
  d.l = idx.size(-1);
  d.P = pool.size(0);
  d.s = pool.size(1);
  d.T = d.r == 0 ? 0 : idx.numel() / (d.r * std::max<int64_t>(d.l, 1));
  check_index_values(idx, d.P, "idx");
  return d;
}

SideDims check_shrink(const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& idx_a,
                      const at::Tensor& seg_indptr, const at::Tensor& seg_tenant) {
  check_act(x, "x");
  check_pool(pool_a, "pool_a", x.scalar_type());
  same_device(pool_a, "pool_a", x, "x");
  same_device(idx_a, "idx_a", x, "x");
  SideDims a = check_table(idx_a, "idx_a", pool_a, "pool_a", x.size(1), "x.size(1) (h)");
  check_segments(seg_indptr, seg_tenant, x.size(0), a.T, x, "x");
  return a;
}

SideDims check_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b,
                      const at::Tensor& idx_b, const at::Tensor& scale,
                      const at::Tensor& seg_indptr, const at::Tensor& seg_tenant) {
  check_act(y, "y");
  check_pool(pool_b, "pool_b", y.scalar_type());
  same_device(pool_b, "pool_b", y, "y");
  same_device(idx_b, "idx_b", y, "y");
  same_device(v, "v", y, "y");
  SideDims b = check_table(idx_b, "idx_b", pool_b, "pool_b", y.size(1), "y.size(1) (o)");
  check_rank_space(v, "v", y.scalar_type(), "y", y.size(0), b.r);
  check_scale(scale, b.T, y, "y");
  check_segments(seg_indptr, seg_tenant, y.size(0), b.T, y, "y");
  return b;
}

std::pair<SideDims, SideDims> check_sgmv(const at::Tensor& y, const at::Tensor& x,
                                         const at::Tensor& pool_a, const at::Tensor& pool_b,
                                         const at::Tensor& idx_a, const at::Tensor& idx_b,
                                         const at::Tensor& scale, const at::Tensor& seg_indptr,
                                         const at::Tensor& seg_tenant) {
  check_act(x, "x");
  check_act(y, "y");
  TORCH_CHECK_TYPE(y.scalar_type() == x.scalar_type(), "y must have the dtype of x (",
                   dt(x.scalar_type()), "), got ", dt(y.scalar_type()));
  same_device(y, "y", x, "x");
  TORCH_CHECK_VALUE(y.size(0) == x.size(0), "y and x must have the same number of tokens, got ",
                    y.size(0), " and ", x.size(0));
  check_pool(pool_a, "pool_a", x.scalar_type());
  check_pool(pool_b, "pool_b", x.scalar_type());
  same_device(pool_a, "pool_a", x, "x");
  same_device(pool_b, "pool_b", x, "x");
  same_device(idx_a, "idx_a", x, "x");
  same_device(idx_b, "idx_b", x, "x");
  SideDims a = check_table(idx_a, "idx_a", pool_a, "pool_a", x.size(1), "x.size(1) (h)");
  SideDims b = check_table(idx_b, "idx_b", pool_b, "pool_b", y.size(1), "y.size(1) (o)");
  TORCH_CHECK_VALUE(a.T == b.T && a.r == b.r,
                    "idx_a and idx_b must agree on tenants and rank ([T, r, *]), got shapes ",
                    idx_a.sizes(), " and ", idx_b.sizes());
  check_scale(scale, a.T, x, "x");
  check_segments(seg_indptr, seg_tenant, x.size(0), a.T, x, "x");
  return {a, b};
}

SideDims check_shard_grad(const at::Tensor& grad_pool, const at::Tensor& u, const at::Tensor& x,
                          const at::Tensor& idx, const at::Tensor& scale,
                          const at::Tensor& seg_indptr, const at::Tensor& seg_tenant) {
  check_act(x, "x");
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  TORCH_CHECK_TYPE(grad_pool.scalar_type() == acc, "grad_pool must be ", dt(acc),
                   " (the accumulation dtype for x of ", dt(x.scalar_type()), "), got ",
                   dt(grad_pool.scalar_type()));
  TORCH_CHECK_VALUE(grad_pool.dim() == 2, "grad_pool must be 2-D [pool rows, shard length], got shape ",
                    grad_pool.sizes());
  TORCH_CHECK_VALUE(grad_pool.is_contiguous(), "grad_pool must be contiguous");
  same_device(grad_pool, "grad_pool", x, "x");
  same_device(u, "u", x, "x");
  same_device(idx, "idx", x, "x");
  SideDims d = check_table(idx, "idx", grad_pool, "grad_pool", x.size(1), "x.size(1)");
  check_rank_space(u, "u", x.scalar_type(), "x", x.size(0), d.r);
  check_scale(scale, d.T, x, "x");
  check_segments(seg_indptr, seg_tenant, x.size(0), d.T, x, "x");
  return d;
}

}  // namespace mos
