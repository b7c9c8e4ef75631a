#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef MOS_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace mos {
namespace {

bool env_flag(const char* name, bool dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  if (std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "False") == 0 ||
      std::strcmp(v, "off") == 0 || std::strcmp(v, "no") == 0)
    return false;
  return true;
}

std::atomic<bool>& checks_flag() {
  static std::atomic<bool> flag{env_flag("MOS_EXT_CHECK_INDICES", true)};
  return flag;
}

std::atomic<bool>& device_checks_flag() {
  static std::atomic<bool> flag{env_flag("MOS_EXT_CHECK_INDICES_DEVICE", false)};
  return flag;
}

std::atomic<bool>& deterministic_flag() {
  static std::atomic<bool> flag{env_flag("MOS_EXT_DETERMINISTIC_GRADS", false)};
  return flag;
}

// Whether t's device's current stream is capturing a CUDA graph (a device
// read or a sync is then illegal). Host-side query, no sync.
bool stream_capturing(const at::Tensor& t) {
#ifdef MOS_WITH_CUDA
  if (t.is_cuda()) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    const cudaError_t e = cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.get_device()).stream(), &st);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // e.g. the legacy stream during a global capture: treat as capturing
      return true;
    }
    return st != cudaStreamCaptureStatusNone;
  }
#endif
  (void)t;
  return false;
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

// "i, j, k" of flat position k in a tensor of these sizes.
std::string position(at::IntArrayRef sizes, int64_t k) {
  std::vector<int64_t> pos(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    pos[d] = k % sizes[d];
    k /= sizes[d];
  }
  std::string where;
  for (size_t d = 0; d < pos.size(); ++d) where += (d ? ", " : "") + std::to_string(pos[d]);
  return where;
}

// Message for the first entry of idx outside [-1, P), or "" when all are in range.
// CPU: one pass. Other devices: one reduction and a scalar sync; the offending
// entry is located (a second sync) only when there is one.
std::string index_error(const at::Tensor& idx, int64_t P, const std::string& name) {
  if (idx.numel() == 0) return "";
  int64_t k = -1;
  int32_t value = 0;
  if (idx.is_cpu()) {
    const at::Tensor h = idx.contiguous();
    const int32_t* p = h.data_ptr<int32_t>();
    const int64_t n = h.numel();
    for (int64_t q = 0; q < n; ++q) {
      if (p[q] < -1 || p[q] >= P) {
        k = q;
        value = p[q];
        break;
      }
    }
  } else {
    const at::Tensor flat = idx.reshape(-1);
    const at::Tensor bad = at::logical_or(flat.lt(-1), flat.ge(P));
    if (!bad.any().item<bool>()) return "";
    k = bad.nonzero().view(-1)[0].item<int64_t>();
    value = flat[k].item<int32_t>();
  }
  if (k < 0) return "";
  return name + "[" + position(idx.sizes(), k) + "] = " + std::to_string(value) +
         " is out of range: entries must be -1 or in [0, " + std::to_string(P) + ") (the pool has " +
         std::to_string(P) + " rows)";
}

bool has_map(const OptMap& map) { return map.has_value() && map->defined(); }

// Message for the first row of a shared-table map that is out of range (see
// validate_map_values), or "". CPU: one pass; other devices: one reduction and
// a scalar sync, the row located on the host only when there is one.
std::string map_error(const at::Tensor& map, const at::Tensor& idx, int64_t P, const std::string& name) {
  const int64_t T = map.size(0), U = idx.size(0);
  if (T == 0) return "";
  const int64_t per = U == 0 ? 0 : idx.numel() / U;
  // largest entry of every table (-1: no valid entry)
  const at::Tensor top = per == 0 ? at::full({U}, -1, idx.options()) : idx.reshape({U, per}).amax(1);
  if (!map.is_cpu()) {
    const at::Tensor u = map.select(1, 0), base = map.select(1, 1);
    const at::Tensor bad_u = at::logical_or(u.lt(0), u.ge(U));
    const at::Tensor t_top = top.index_select(0, u.clamp(0, std::max<int64_t>(U - 1, 0)).to(at::kLong));
    const at::Tensor bad = at::logical_or(at::logical_or(bad_u, base.lt(0)),
                                          at::logical_or(base.gt(P), (base.to(at::kLong) + t_top.to(at::kLong)).ge(P)));
    if (!bad.any().item<bool>()) return "";
    return map_error(map.cpu(), idx.cpu(), P, name);
  }
  const at::Tensor m = map.contiguous(), tp = top.contiguous();
  const int32_t* mp = m.data_ptr<int32_t>();
  const int32_t* tq = tp.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t u = mp[2 * t], base = mp[2 * t + 1];
    const std::string at_t = name + "[" + std::to_string(t) + "]";
    if (u < 0 || u >= U)
      return at_t + " names table " + std::to_string(u) + ", outside [0, " + std::to_string(U) +
             ") (the tables' first dim)";
    if (base < 0 || base > P)
      return at_t + " has row base " + std::to_string(base) + ", outside [0, " + std::to_string(P) +
             "] (the pool has " + std::to_string(P) + " rows)";
    if (tq[u] >= 0 && base + tq[u] >= P)
      return at_t + " has row base " + std::to_string(base) + " and table " + std::to_string(u) +
             " names row " + std::to_string(tq[u]) + ": row " + std::to_string(base + tq[u]) +
             " is outside the pool's " + std::to_string(P) + " rows";
  }
  return "";
}

// Per-call value check of an index table (see value_checks_apply).
void check_index_values(const at::Tensor& idx, int64_t P, const char* name) {
  if (idx.numel() == 0 || !value_checks_apply(idx)) return;
  const std::string msg = index_error(idx, P, name);
  TORCH_CHECK_INDEX(msg.empty(), msg);
}

// Message for the first problem of the segment metadata, or "".
std::string segment_error(const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, int64_t N, int64_t T) {
  const int64_t S = seg_tenant.numel();
  if (!seg_indptr.is_cpu()) {
    // One fused pass on the device; the host loop below only runs to word the error.
    at::Tensor bad = at::logical_or(seg_tenant.lt(-1), seg_tenant.ge(T)).any();
    bad = at::logical_or(bad, seg_indptr.narrow(0, 0, 1).lt(0).any());
    bad = at::logical_or(bad, seg_indptr.narrow(0, S, 1).gt(N).any());
    if (S > 0) bad = at::logical_or(bad, seg_indptr.narrow(0, 1, S).lt(seg_indptr.narrow(0, 0, S)).any());
    if (!bad.item<bool>()) return "";
  }
  const at::Tensor ip = seg_indptr.to(at::kCPU).contiguous();
  const at::Tensor tn = seg_tenant.to(at::kCPU).contiguous();
  const int32_t* p = ip.data_ptr<int32_t>();
  const int32_t* t = tn.data_ptr<int32_t>();
  if (p[0] < 0) return "seg_indptr[0] = " + std::to_string(p[0]) + " must be >= 0";
  for (int64_t g = 0; g < S; ++g) {
    if (p[g + 1] < p[g])
      return "seg_indptr must be non-decreasing, but seg_indptr[" + std::to_string(g) + "] = " +
             std::to_string(p[g]) + " > seg_indptr[" + std::to_string(g + 1) + "] = " + std::to_string(p[g + 1]);
    if (t[g] < -1 || t[g] >= T)
      return "seg_tenant[" + std::to_string(g) + "] = " + std::to_string(t[g]) +
             " is out of range: must be -1 or in [0, " + std::to_string(T) + ") (" + std::to_string(T) +
             " tenants)";
  }
  if (p[S] > N)
    return "seg_indptr[" + std::to_string(S) + "] = " + std::to_string(p[S]) +
           " exceeds the number of tokens N = " + std::to_string(N);
  return "";
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
  if (!value_checks_apply(seg_indptr)) return d;
  const std::string msg = segment_error(seg_indptr, seg_tenant, N, T);
  TORCH_CHECK_INDEX(msg.empty(), msg);
  return d;
}

// ---- memory overlap (host-side pointer arithmetic only) ----------------------

// The bytes a 2-D tensor with unit column stride (or <= 1 column) covers, as
// `count` intervals [base + k*pitch, base + k*pitch + len). Rows that touch or
// overlap are merged into one interval, so intervals are disjoint and sorted.
struct Comb {
  uintptr_t base = 0;
  int64_t count = 0, pitch = 0, len = 0;
};

Comb comb_of(const at::Tensor& t) {
  Comb c;
  if (t.numel() == 0) return c;
  const int64_t e = t.element_size();
  c.base = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.dim() != 2 || (t.size(1) > 1 && t.stride(1) != 1)) {
    // Any other layout: the hull of its elements (conservative).
    int64_t span = 1;
    for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * std::abs(t.stride(d));
    c.count = 1;
    c.len = span * e;
    return c;
  }
  const int64_t rows = t.size(0), w = t.size(1), rs = t.stride(0);
  if (rows == 1 || rs <= w) {
    c.count = 1;
    c.len = ((rows - 1) * rs + w) * e;
  } else {
    c.count = rows;
    c.pitch = rs * e;
    c.len = w * e;
  }
  return c;
}

bool combs_overlap(const Comb& a, const Comb& b) {
  if (a.count == 0 || b.count == 0) return false;
  const auto hull_end = [](const Comb& c) { return c.base + (c.count - 1) * c.pitch + c.len; };
  if (hull_end(a) <= b.base || hull_end(b) <= a.base) return false;
  const Comb& small = a.count <= b.count ? a : b;
  const Comb& big = a.count <= b.count ? b : a;
  for (int64_t k = 0; k < small.count; ++k) {
    const uintptr_t s = small.base + k * small.pitch, e = s + small.len;
    // first interval of `big` that ends after s
    int64_t q = 0;
    if (s >= big.base + big.len) q = big.pitch == 0 ? big.count : (s - big.base - big.len) / big.pitch + 1;
    if (q < big.count && big.base + q * big.pitch < e) return true;
  }
  return false;
}

// `out` (written by the op) must not overlap itself.
void check_no_self_overlap(const at::Tensor& out, const char* name) {
  if (out.dim() != 2 || out.size(0) < 2 || out.size(1) < 1) return;
  TORCH_CHECK_VALUE(out.stride(0) >= out.size(1), name,
                    " overlaps itself in memory: its rows share elements (shape ", out.sizes(), ", strides ",
                    out.strides(), "); the op writes every row, so pass an output whose row stride is at least "
                    "its row length");
}

// `out` (written by the op) must not share memory with `in` (read by it).
void check_no_alias(const at::Tensor& out, const char* out_name, const at::Tensor& in, const char* in_name) {
  if (!out.defined() || !in.defined() || out.device() != in.device()) return;
  TORCH_CHECK_VALUE(!combs_overlap(comb_of(out), comb_of(in)), out_name, " shares memory with ", in_name,
                    ": the op writes ", out_name, " while it reads ", in_name, "; pass an ", out_name,
                    " that does not overlap ", in_name, " (e.g. a clone)");
}

// idx [U, r, l] against a feature dim `feat` = l * s of an activation and a pool [P, s],
// with an optional shared-table map [T, 2] (without one, T = U: table t is tenant t's).
SideDims check_table(const at::Tensor& idx, const char* idx_name, const at::Tensor& pool,
                     const char* pool_name, int64_t feat, const char* feat_name, const OptMap& map,
                     const char* map_name) {
  check_int32(idx, idx_name, 3);
  SideDims d;
  d.U = idx.size(0);
  d.T = d.U;
  if (has_map(map)) {
    const at::Tensor& m = *map;
    check_int32(m, map_name, 2);
    TORCH_CHECK_VALUE(m.size(1) == 2, map_name, " must be [T, 2] (table, row base per tenant), got shape ",
                      m.sizes());
    same_device(m, map_name, idx, idx_name);
    d.T = m.size(0);
    TORCH_CHECK_VALUE(d.T == 0 || d.U >= 1, idx_name, " must hold at least one table when ", map_name,
                      " names tenants, got shape ", idx.sizes());
  }
  d.r = idx.size(1);
  d.l = idx.size(2);
  d.P = pool.size(0);
  d.s = pool.size(1);
  TORCH_CHECK_VALUE(d.l >= 1, idx_name, " must have at least one slot per rank row (last dim), got shape ",
                    idx.sizes());
  TORCH_CHECK_VALUE(d.l * d.s == feat, feat_name, " = ", feat, " must equal ", idx_name,
                    ".size(2) * ", pool_name, ".size(1) = ", d.l, " * ", d.s, " (slots x shard length)");
  check_index_values(idx, d.P, idx_name);
  if (has_map(map) && map->numel() > 0 && value_checks_apply(*map)) {
    const std::string msg = map_error(*map, idx, d.P, map_name);
    TORCH_CHECK_INDEX(msg.empty(), msg);
  }
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

bool device_index_checks_enabled() { return device_checks_flag().load(std::memory_order_relaxed); }

bool set_device_index_checks(bool enabled) { return device_checks_flag().exchange(enabled); }

bool value_checks_apply(const at::Tensor& t) {
  if (!index_checks_enabled()) return false;
  if (t.is_cpu()) return true;
  return device_index_checks_enabled() && !stream_capturing(t);
}

bool deterministic_grads_flag() { return deterministic_flag().load(std::memory_order_relaxed); }

bool set_deterministic_grads(bool enabled) { return deterministic_flag().exchange(enabled); }

bool deterministic_grads_enabled() {
  return deterministic_grads_flag() || at::globalContext().deterministicAlgorithms();
}

void validate_index_values(const at::Tensor& idx, int64_t P, const std::string& name) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt, name, " must be int32, got ", dt(idx.scalar_type()));
  TORCH_CHECK_VALUE(P >= 0, "pool_rows must be >= 0, got ", P);
  const std::string msg = index_error(idx, P, name);
  TORCH_CHECK_VALUE(msg.empty(), msg);
}

void validate_segment_values(const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, int64_t N,
                             int64_t T) {
  check_int32(seg_indptr, "seg_indptr", 1);
  check_int32(seg_tenant, "seg_tenant", 1);
  same_device(seg_tenant, "seg_tenant", seg_indptr, "seg_indptr");
  TORCH_CHECK_VALUE(seg_indptr.size(0) == seg_tenant.size(0) + 1,
                    "seg_indptr must have one more entry than seg_tenant (S+1 vs S), got ",
                    seg_indptr.size(0), " and ", seg_tenant.size(0));
  const std::string msg = segment_error(seg_indptr, seg_tenant, N, T);
  TORCH_CHECK_VALUE(msg.empty(), msg);
}

void validate_map_values(const at::Tensor& map, const at::Tensor& idx, int64_t P, const std::string& name) {
  check_int32(map, name.c_str(), 2);
  TORCH_CHECK_VALUE(map.size(1) == 2, name, " must be [T, 2] (table, row base per tenant), got shape ", map.sizes());
  check_int32(idx, "idx", 3);
  same_device(map, name.c_str(), idx, "idx");
  TORCH_CHECK_VALUE(P >= 0, "pool_rows must be >= 0, got ", P);
  const std::string msg = map_error(map, idx, P, name);
  TORCH_CHECK_VALUE(msg.empty(), msg);
}

const int32_t* map_ptr(const OptMap& map) { return has_map(map) ? map->data_ptr<int32_t>() : nullptr; }

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
                      const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, const OptMap& map_a) {
  check_act(x, "x");
  check_pool(pool_a, "pool_a", x.scalar_type());
  same_device(pool_a, "pool_a", x, "x");
  same_device(idx_a, "idx_a", x, "x");
  SideDims a = check_table(idx_a, "idx_a", pool_a, "pool_a", x.size(1), "x.size(1) (h)", map_a, "map_a");
  check_segments(seg_indptr, seg_tenant, x.size(0), a.T, x, "x");
  return a;
}

SideDims check_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b,
                      const at::Tensor& idx_b, const at::Tensor& scale,
                      const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, const OptMap& map_b) {
  check_act(y, "y");
  check_pool(pool_b, "pool_b", y.scalar_type());
  same_device(pool_b, "pool_b", y, "y");
  same_device(idx_b, "idx_b", y, "y");
  same_device(v, "v", y, "y");
  SideDims b = check_table(idx_b, "idx_b", pool_b, "pool_b", y.size(1), "y.size(1) (o)", map_b, "map_b");
  check_rank_space(v, "v", y.scalar_type(), "y", y.size(0), b.r);
  check_scale(scale, b.T, y, "y");
  check_no_self_overlap(y, "y");
  check_no_alias(y, "y", v, "v");
  check_no_alias(y, "y", pool_b, "pool_b");
  check_segments(seg_indptr, seg_tenant, y.size(0), b.T, y, "y");
  return b;
}

std::pair<SideDims, SideDims> check_sgmv(const at::Tensor& y, const at::Tensor& x,
                                         const at::Tensor& pool_a, const at::Tensor& pool_b,
                                         const at::Tensor& idx_a, const at::Tensor& idx_b,
                                         const at::Tensor& scale, const at::Tensor& seg_indptr,
                                         const at::Tensor& seg_tenant, const OptMap& map_a,
                                         const OptMap& map_b) {
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
  SideDims a = check_table(idx_a, "idx_a", pool_a, "pool_a", x.size(1), "x.size(1) (h)", map_a, "map_a");
  SideDims b = check_table(idx_b, "idx_b", pool_b, "pool_b", y.size(1), "y.size(1) (o)", map_b, "map_b");
  TORCH_CHECK_VALUE(has_map(map_a) == has_map(map_b), "map_a and map_b must be given together (shared tables on "
                    "both sides) or not at all");
  TORCH_CHECK_VALUE(a.T == b.T && a.r == b.r,
                    "idx_a and idx_b must agree on tenants and rank ([T, r, *]), got shapes ",
                    idx_a.sizes(), " and ", idx_b.sizes(), has_map(map_a) ? " with maps of " : "",
                    has_map(map_a) ? std::to_string(a.T) + " and " + std::to_string(b.T) + " tenants" : "");
  check_scale(scale, a.T, x, "x");
  check_no_self_overlap(y, "y");
  check_no_alias(y, "y", x, "x");
  check_no_alias(y, "y", pool_a, "pool_a");
  check_no_alias(y, "y", pool_b, "pool_b");
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
  SideDims d = check_table(idx, "idx", grad_pool, "grad_pool", x.size(1), "x.size(1)", std::nullopt, "");
  check_rank_space(u, "u", x.scalar_type(), "x", x.size(0), d.r);
  check_scale(scale, d.T, x, "x");
  check_no_alias(grad_pool, "grad_pool", u, "u");
  check_no_alias(grad_pool, "grad_pool", x, "x");
  check_segments(seg_indptr, seg_tenant, x.size(0), d.T, x, "x");
  return d;
}

}  // namespace mos
