// CUDA implementations of the mos ops: argument checks (csrc/checks.h, shared
// with the CPU kernels), device guard, dtype mapping, then the torch-free
// launchers of csrc/cuda/launch.h on the current stream. Host C++ only (built
// by the C++ compiler, not nvcc); the kernels live in csrc/cuda/*.cu.
//
// Path choice: sgmv / sgmv_shrink / sgmv_expand ask gpu::plan_sgmv (host facts
// only: dtypes, shapes, strides, alignment) whether the fast kernels
// (sgmv_fast.cuh) can run, honouring MOS_EXT_CUDA_PATH; otherwise the generic
// kernels run; shard_grad asks gpu::plan_shard_grad likewise (tensor cores for
// fp16 / bf16). With more than 256 segments the fast paths take a small
// workspace (16 * S + 4 * items bytes) from the caching allocator;
// deterministic shard_grad on tensor cores also takes the per-item partials of
// one chunk of items (chunk * r * h fp32, at most MOS_EXT_DET_PART_BYTES,
// default 256 MiB, or one item's if that is larger) and runs chunk by chunk.
//
// Nothing here synchronizes or allocates beyond the op's own output (v of
// sgmv_shrink, out of gather_shards) and that workspace when index checks are off, so a serving
// step can be captured in a CUDA graph (mos_ext.set_index_checks(False): the
// value checks copy the small index tensors to the host). The one exception:
// sgmv with a rank above gpu::sgmv_max_rank (thousands) falls back to shrink +
// expand through a temporary v.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "launch.h"

namespace mos {
namespace gpu {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK_TYPE(false, "mos (CUDA): unsupported dtype ", t);
  }
}

Segments make_segments(const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, int64_t N, int64_t T) {
  Segments s;
  s.indptr = seg_indptr.data_ptr<int32_t>();
  s.tenant = seg_tenant.data_ptr<int32_t>();
  s.S = seg_tenant.numel();
  s.N = N;
  s.T = T;
  return s;
}

// One side; with a shared-table map (checked by csrc/checks.h), its rows and
// U = idx.size(0) tables.
Table make_table(const at::Tensor& pool, const at::Tensor& idx, const SideDims& d, const OptMap& map) {
  Table t;
  t.pool = pool.data_ptr();
  t.pool_dtype = to_dtype(pool.scalar_type());
  t.idx = idx.data_ptr<int32_t>();
  t.P = d.P;
  t.s = d.s;
  t.l = d.l;
  t.r = d.r;
  t.map = map_ptr(map);
  t.U = d.U;
  return t;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// MOS_EXT_CUDA_PATH (auto | generic | fast; unset or empty = auto), read on
// every call so that mos_ext.ops.set_cuda_path takes effect at once.
CudaPath cuda_path() {
  const char* e = std::getenv("MOS_EXT_CUDA_PATH");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return CudaPath::Auto;
  if (std::strcmp(e, "generic") == 0) return CudaPath::Generic;
  if (std::strcmp(e, "fast") == 0) return CudaPath::Fast;
  TORCH_CHECK_VALUE(false, "MOS_EXT_CUDA_PATH must be auto, generic or fast, got '", e, "'");
}

// MOS_EXT_DET_PART_BYTES (bytes; unset or empty = the default, 256 MiB): the
// cap on the per-item partials deterministic tensor-core shard_grad keeps per
// chunk of items. Read on every call. Smaller caps mean more, smaller chunks
// (the result is bitwise reproducible for a given cap, but depends on it).
int64_t det_part_bytes() {
  const char* e = std::getenv("MOS_EXT_DET_PART_BYTES");
  if (e == nullptr || *e == '\0') return 0;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(e, &end, 10);
  TORCH_CHECK_VALUE(end != e && *end == '\0' && errno == 0 && v > 0,
                    "MOS_EXT_DET_PART_BYTES must be a positive number of bytes, got '", e, "'");
  return static_cast<int64_t>(v);
}

// Device scratch of a fast launch (the segment -> item map), from the caching
// allocator on the current stream (capture-safe); undefined when none is needed.
at::Tensor fast_workspace(const SgmvPlan& plan, const at::Tensor& like) {
  if (plan.workspace_bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(plan.workspace_bytes)}, like.options().dtype(at::kByte));
}

void* ws_ptr(const at::Tensor& ws) { return ws.defined() ? ws.data_ptr() : nullptr; }

// The plan of this thread's latest sgmv-family or shard_grad call ("fast" or why not), for tests.
thread_local const char* g_last_path = "";

SgmvPlan plan_call(SgmvKind kind, DType act, const void* x, int64_t x_stride, const void* y, int64_t y_stride,
                   const Table* a, const Table* b, const Segments& seg) {
  const SgmvPlan p = plan_sgmv(cuda_path(), kind, act, x, x_stride, y, y_stride, a, b, seg);
  g_last_path = p.reason;
  return p;
}

at::Tensor gather_shards_cuda(const at::Tensor& pool, const at::Tensor& idx) {
  const SideDims d = check_gather_shards(pool, idx);
  const c10::cuda::CUDAGuard guard(pool.device());
  std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end() - 1);
  shape.push_back(d.l * d.s);
  at::Tensor out = at::empty(shape, pool.options());
  const int64_t n = idx.numel();
  if (n == 0 || d.s == 0) return out;
  C10_CUDA_CHECK(launch_gather_shards(out.data_ptr(), pool.data_ptr(), static_cast<int>(pool.element_size()),
                                      idx.data_ptr<int32_t>(), n, d.P, d.s, current_stream()));
  return out;
}

// Unchecked halves (arguments validated by the caller, guard set).
void shrink_into(const at::Tensor& v, const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& idx_a,
                 const SideDims& a, const OptMap& map_a, const Segments& seg) {
  const Table ta = make_table(pool_a, idx_a, a, map_a);
  const DType act = to_dtype(x.scalar_type());
  const SgmvPlan plan =
      plan_call(SgmvKind::Shrink, act, x.data_ptr(), x.stride(0), nullptr, 0, &ta, nullptr, seg);
  if (plan.fast) {
    const at::Tensor ws = fast_workspace(plan, x);
    C10_CUDA_CHECK(launch_sgmv_fast(SgmvKind::Shrink, nullptr, 0, x.data_ptr(), x.stride(0), v.data_ptr(),
                                    v.stride(0), act, &ta, nullptr, nullptr, seg, ws_ptr(ws), current_stream()));
    return;
  }
  C10_CUDA_CHECK(launch_sgmv_shrink(v.data_ptr(), v.stride(0), x.data_ptr(), x.stride(0), act, ta, seg,
                                    current_stream()));
}

void expand_from(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b, const at::Tensor& idx_b,
                 const at::Tensor& scale, const SideDims& b, const OptMap& map_b, const Segments& seg) {
  const Table tb = make_table(pool_b, idx_b, b, map_b);
  const DType act = to_dtype(y.scalar_type());
  const SgmvPlan plan =
      plan_call(SgmvKind::Expand, act, nullptr, 0, y.data_ptr(), y.stride(0), nullptr, &tb, seg);
  if (plan.fast) {
    const at::Tensor ws = fast_workspace(plan, y);
    C10_CUDA_CHECK(launch_sgmv_fast(SgmvKind::Expand, y.data_ptr(), y.stride(0), nullptr, 0, v.data_ptr(),
                                    v.stride(0), act, nullptr, &tb, scale.data_ptr<float>(), seg, ws_ptr(ws),
                                    current_stream()));
    return;
  }
  C10_CUDA_CHECK(launch_sgmv_expand(y.data_ptr(), y.stride(0), act, v.data_ptr(), v.stride(0), tb,
                                    scale.data_ptr<float>(), seg, current_stream()));
}

at::Tensor sgmv_shrink_cuda(const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& idx_a,
                            const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, const OptMap& map_a) {
  const SideDims a = check_shrink(x, pool_a, idx_a, seg_indptr, seg_tenant, map_a);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor v = at::zeros({x.size(0), a.r}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (a.r == 0 || x.size(0) == 0) return v;
  shrink_into(v, x, pool_a, idx_a, a, map_a, make_segments(seg_indptr, seg_tenant, x.size(0), a.T));
  return v;
}

void sgmv_expand_cuda(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b, const at::Tensor& idx_b,
                      const at::Tensor& scale, const at::Tensor& seg_indptr, const at::Tensor& seg_tenant,
                      const OptMap& map_b) {
  const SideDims b = check_expand(y, v, pool_b, idx_b, scale, seg_indptr, seg_tenant, map_b);
  if (b.r == 0 || y.size(0) == 0 || y.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  expand_from(y, v, pool_b, idx_b, scale, b, map_b, make_segments(seg_indptr, seg_tenant, y.size(0), b.T));
}

void sgmv_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& pool_b,
               const at::Tensor& idx_a, const at::Tensor& idx_b, const at::Tensor& scale,
               const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, const OptMap& map_a,
               const OptMap& map_b) {
  const auto dims = check_sgmv(y, x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant, map_a, map_b);
  const SideDims& a = dims.first;
  const SideDims& b = dims.second;
  if (a.r == 0 || x.size(0) == 0 || y.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Segments seg = make_segments(seg_indptr, seg_tenant, x.size(0), a.T);
  const DType act = to_dtype(x.scalar_type());
  const Table ta = make_table(pool_a, idx_a, a, map_a), tb = make_table(pool_b, idx_b, b, map_b);
  const SgmvPlan plan =
      plan_call(SgmvKind::Fused, act, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), &ta, &tb, seg);
  if (plan.fast) {
    const at::Tensor ws = fast_workspace(plan, x);
    if (plan.prefill) {
      C10_CUDA_CHECK(launch_sgmv_prefill(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), act, ta, tb,
                                         scale.data_ptr<float>(), seg, ws_ptr(ws), current_stream()));
      return;
    }
    C10_CUDA_CHECK(launch_sgmv_fast(SgmvKind::Fused, y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), nullptr, 0,
                                    act, &ta, &tb, scale.data_ptr<float>(), seg, ws_ptr(ws), current_stream()));
    return;
  }
  if (a.r > sgmv_max_rank(act, x.get_device())) {
    // The fused kernel keeps v [tokens, r] in shared memory; beyond its limit
    // go through a temporary v (same result, one allocation).
    at::Tensor v = at::zeros({x.size(0), a.r}, x.options().dtype(acc_dtype(x.scalar_type())));
    shrink_into(v, x, pool_a, idx_a, a, map_a, seg);
    expand_from(y, v, pool_b, idx_b, scale, b, map_b, seg);
    return;
  }
  C10_CUDA_CHECK(launch_sgmv(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), act, ta, tb,
                             scale.data_ptr<float>(), seg, current_stream()));
}

void shard_grad_cuda(const at::Tensor& grad_pool, const at::Tensor& u, const at::Tensor& x, const at::Tensor& idx,
                     const at::Tensor& scale, const at::Tensor& seg_indptr, const at::Tensor& seg_tenant,
                     bool deterministic) {
  const SideDims d = check_shard_grad(grad_pool, u, x, idx, scale, seg_indptr, seg_tenant);
  if (d.r == 0 || d.s == 0 || x.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  Table t;
  t.idx = idx.data_ptr<int32_t>();
  t.P = d.P;
  t.s = d.s;
  t.l = d.l;
  t.r = d.r;
  const Segments seg = make_segments(seg_indptr, seg_tenant, x.size(0), d.T);
  const DType act = to_dtype(x.scalar_type());
  const int64_t cap = deterministic ? det_part_bytes() : 0;
  const SgmvPlan plan = plan_shard_grad(cuda_path(), act, x.data_ptr(), x.stride(0), grad_pool.data_ptr(), t, seg,
                                        deterministic, cap);
  g_last_path = plan.reason;
  if (plan.fast) {
    const at::Tensor ws = fast_workspace(plan, x);
    C10_CUDA_CHECK(launch_shard_grad_fast(grad_pool.data_ptr(), u.data_ptr(), u.stride(0), x.data_ptr(), x.stride(0),
                                          act, t, scale.data_ptr<float>(), seg, deterministic, cap, ws_ptr(ws),
                                          current_stream()));
    return;
  }
  C10_CUDA_CHECK(launch_shard_grad(grad_pool.data_ptr(), u.data_ptr(), u.stride(0), x.data_ptr(), x.stride(0), act, t,
                                   scale.data_ptr<float>(), seg, deterministic, current_stream()));
}

}  // namespace

const char* last_sgmv_path() { return g_last_path; }

TORCH_LIBRARY_IMPL(mos, CUDA, m) {
  m.impl("gather_shards", &gather_shards_cuda);
  m.impl("sgmv_shrink", &sgmv_shrink_cuda);
  m.impl("sgmv_expand", &sgmv_expand_cuda);
  m.impl("sgmv", &sgmv_cuda);
  m.impl("shard_grad", &shard_grad_cuda);
}

}  // namespace gpu
}  // namespace mos
