// Argument validation shared by the CPU and CUDA implementations of every op.
//
// What is checked when:
//  * metadata (dtype, device, rank, shape, strides) and memory overlap (an
//    output overlapping itself, or sharing memory with an input it reads):
//    every call, every device; host-side only (sizes, strides, pointers), so
//    never a sync and safe under CUDA-graph capture;
//  * values of the small int tensors (index tables within the pool or -1,
//    seg_tenant in [-1, T), seg_indptr non-decreasing within [0, N]):
//      - CPU tensors: every call, while index checks are on (the default;
//        mos_ext.set_index_checks(False) or MOS_EXT_CHECK_INDICES=0 turn them off);
//      - other devices (CUDA): only when also opted in with
//        mos_ext.set_device_index_checks(True) or MOS_EXT_CHECK_INDICES_DEVICE=1
//        (a reduction on the device and one scalar sync per tensor), and never
//        while the current stream is capturing a CUDA graph. Tables are meant to
//        be validated once where they are created or loaded (validate_index_values,
//        mos_ext.validate_tables), not per call.
//    With value checks skipped, kernels still never read out of bounds: an
//    out-of-range index or tenant is skipped like -1 and segment bounds are
//    clamped to [0, N].
//
// Errors name the argument and say what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

namespace mos {

bool index_checks_enabled();
// Returns the previous setting.
bool set_index_checks(bool enabled);

// Per-call value checks of tensors on a non-CPU device (default off).
bool device_index_checks_enabled();
// Returns the previous setting.
bool set_device_index_checks(bool enabled);

// Whether per-call value checks run for tensors on t's device right now.
bool value_checks_apply(const at::Tensor& t);

// Deterministic pool gradients in the training backward (sharded_lora):
// mos_ext.set_deterministic_grads / MOS_EXT_DETERMINISTIC_GRADS, or
// torch.use_deterministic_algorithms(True).
bool deterministic_grads_flag();
// Returns the previous setting of the flag.
bool set_deterministic_grads(bool enabled);
// The flag or torch's deterministic-algorithms mode.
bool deterministic_grads_enabled();

// One-off validation (where tables are created or loaded), whatever the
// settings above and on any device (one reduction and one scalar sync on a
// GPU): every entry of idx in [-1, P). Raises ValueError naming `name` and the
// first bad entry.
void validate_index_values(const at::Tensor& idx, int64_t P, const std::string& name);
// A shared-table map [T, 2] int32 (docs/OPS.md "Shared tables"): for every row
// t, map[t, 0] in [0, U) names a table of idx [U, r, l] and map[t, 1] >= 0 is a
// row base with base + (largest entry of that table) < P. Raises ValueError
// naming `name`, the tenant and the problem.
void validate_map_values(const at::Tensor& map, const at::Tensor& idx, int64_t P, const std::string& name);
// seg_indptr [S+1] non-decreasing within [0, N], seg_tenant [S] in [-1, T).
// Raises ValueError.
void validate_segment_values(const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, int64_t N,
                             int64_t T);

// The accumulation dtype for activations of dtype `act`: fp64 for fp64, else fp32.
at::ScalarType acc_dtype(at::ScalarType act);

// Sizes of one side (A or B) of a sharded adapter batch.
struct SideDims {
  int64_t T = 0;  // tenants (map.size(0) with a shared-table map, else idx.size(0))
  int64_t U = 0;  // tables (idx.size(0))
  int64_t r = 0;  // (padded) rank
  int64_t l = 0;  // slots per rank row
  int64_t s = 0;  // shard length
  int64_t P = 0;  // pool rows
};

// Dims of the segment metadata.
struct SegDims {
  int64_t S = 0;  // segments
  int64_t N = 0;  // tokens
};

// gather_shards(pool [P, s], idx [..., r, l]).
SideDims check_gather_shards(const at::Tensor& pool, const at::Tensor& idx);

// An optional shared-table map of one side (std::nullopt or an undefined tensor: none).
using OptMap = std::optional<at::Tensor>;
// The map's data (nullptr without one), after the check_* below accepted it.
const int32_t* map_ptr(const OptMap& map);

// sgmv_shrink(x [N, h], pool_a, idx_a, seg_indptr, seg_tenant, map_a); h == l_a * s_a.
SideDims check_shrink(const at::Tensor& x, const at::Tensor& pool_a, const at::Tensor& idx_a,
                      const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, const OptMap& map_a = {});

// sgmv_expand(y [N, o], v [N, r], pool_b, idx_b, scale [T], ..., map_b); o == l_b * s_b.
SideDims check_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& pool_b,
                      const at::Tensor& idx_b, const at::Tensor& scale,
                      const at::Tensor& seg_indptr, const at::Tensor& seg_tenant, const OptMap& map_b = {});

// sgmv(y, x, pool_a, pool_b, idx_a, idx_b, scale, ..., map_a, map_b). Returns {A side, B side}.
std::pair<SideDims, SideDims> check_sgmv(const at::Tensor& y, const at::Tensor& x,
                                         const at::Tensor& pool_a, const at::Tensor& pool_b,
                                         const at::Tensor& idx_a, const at::Tensor& idx_b,
                                         const at::Tensor& scale, const at::Tensor& seg_indptr,
                                         const at::Tensor& seg_tenant, const OptMap& map_a = {},
                                         const OptMap& map_b = {});

// shard_grad(grad_pool [P, s] acc dtype, u [N, r] acc dtype, x [N, l*s], idx [T, r, l],
//            scale [T], ...).
SideDims check_shard_grad(const at::Tensor& grad_pool, const at::Tensor& u, const at::Tensor& x,
                          const at::Tensor& idx, const at::Tensor& scale,
                          const at::Tensor& seg_indptr, const at::Tensor& seg_tenant);

}  // namespace mos
