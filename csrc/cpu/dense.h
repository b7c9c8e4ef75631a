// The BLAS path of the CPU ops: per-shape dispatch for long segments.
//
// A segment of many tokens of one tenant is a small dense problem: gather the
// tenant's A_t [r, h] / B_t [r, o] (a few hundred KB at most) and let ATen's
// GEMM (MKL / oneDNN) do x_seg @ A_t^T, v_seg @ B_t and u_seg^T @ x_seg, which
// beats the register-tiled fused kernels once a segment has enough rows. The
// pool gradient still accumulates inside shard_grad (dense [r, l*s] scratch per
// segment, then row adds into the pool), never as an autograd scatter.
//
// Used for fp32/fp64 activations, segments of at least dense_min_tokens()
// tokens (MOS_EXT_CPU_DENSE_MIN_TOKENS at load, set_dense_min_tokens; 0 turns
// the path off). Results agree with the fused kernels to rounding; they are
// reproducible for a given thread count, but only the fused kernels are bitwise
// independent of it, so shard_grad(deterministic=True) never takes this path.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>
#include <vector>

#include "common.h"

namespace mos {
namespace cpu {

int64_t dense_min_tokens();
// Returns the previous value; n < 0 is rejected with std::invalid_argument.
int64_t set_dense_min_tokens(int64_t n);

// Work split: whole segments for the BLAS path, token blocks for the kernels.
struct Plan {
  std::vector<Item> dense;   // one Item per segment, [n0, n1) the whole segment
  std::vector<Item> blocks;  // kTokBlock-token items of the other segments
};

// As build_items, sending segments of >= dense_min_tokens() tokens to `dense`
// when `dense_ok` (an fp32/fp64 problem that may take the BLAS path). A tenant
// with a rank row that mixes valid and skipped (-1) entries in one of `tables`
// (index table, pool rows) stays on the fused kernels: a GEMM on its gathered
// matrix would multiply x by the zero shard of the skipped slot, and Inf/NaN
// in x would leak through it. Fully padded rank rows are simply left out of
// the GEMMs.
Plan plan_items(const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, int64_t N, int64_t T,
                bool dense_ok, std::initializer_list<const Side*> sides = {});

// Whether activations of this dtype may take the BLAS path.
inline bool dense_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

// Tenant t's [r, l*s] matrix gathered from `pool` (the tensor behind d.pool) through its
// table (tenant_table: shared tables included), in `dtype`; -1 and (with checks off)
// out-of-range entries give zero shards.
at::Tensor gather_tenant(const at::Tensor& pool, const Side& d, int64_t t, at::ScalarType dtype);

// v[n0:n1] = x[n0:n1] @ A_t^T for every dense segment.
void dense_shrink(const at::Tensor& v, const at::Tensor& x, const at::Tensor& pool_a, const Side& a,
                  const std::vector<Item>& segs);
// y[n0:n1] += scale[t] * v[n0:n1] @ B_t for every dense segment.
void dense_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b, const Side& b,
                  const at::Tensor& scale, const std::vector<Item>& segs);
// y[n0:n1] += scale[t] * (x[n0:n1] @ A_t^T) @ B_t.
void dense_sgmv(const at::Tensor& y, const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& pool_b,
                const Side& a, const Side& b, const at::Tensor& scale, const std::vector<Item>& segs);
// grad[idx[t, j, i], :] += scale[t] * (u[n0:n1]^T @ x[n0:n1])[j, i*s:(i+1)*s].
void dense_shard_grad(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& x,
                      const at::Tensor& idx, const at::Tensor& scale, const SideDims& d,
                      const std::vector<Item>& segs);

}  // namespace cpu
}  // namespace mos
