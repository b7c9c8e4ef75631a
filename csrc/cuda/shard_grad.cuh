// shard_grad kernels: the fused pool-gradient accumulation
//
//   grad[idx[t, j, i], c] += scale[t] * sum_{n in t's segments} u[n, j] * x[n, i*s + c]
//
// Pool rows are shared (by tenants, and by slots of one table: MiSS repeats a
// row across slots), so several (t, j, i) may hit the same destination row.
//
// * shard_grad_atomic_kernel (deterministic = false): one block per item (at
//   most kGradBM tokens of one segment) x one tile of 256 columns of h = l * s.
//   Each thread keeps its column of the item's x tile in registers, the scaled
//   u tile is staged in shared memory in chunks of rank rows, and every
//   (rank row, column) partial sum goes to the pool row with one atomicAdd
//   (float, or double for fp64 activations). Fast; the order of the additions
//   varies from run to run.
//
// * shard_grad_owner_kernel (deterministic = true): no atomics. A block owns a
//   range of destination pool rows x 32 columns; inside it, warp w owns the
//   rows p with (p - p0) % 8 == w and lane c column c, so every grad element
//   has exactly one writer. The block scans the table in chunks for entries
//   that hit its rows (a block-wide compaction, so the match list keeps table
//   order) and computes segment bounds in chunks; the owner adds each entry's
//   sum over its tenant's tokens in the fixed order (table chunk, segment
//   chunk, entry, segment, token). Bitwise reproducible. Slower: every block
//   scans the whole table (at most kGradMaxRowBlocks row blocks per column
//   tile) and the token loop is serial per lane.
#pragma once

#include "common.cuh"

namespace mos {
namespace gpu {

constexpr int kGradThreads = 256;
constexpr int kGradBM = 32;   // atomic kernel: tokens per item
constexpr int kGradRC = 32;   // atomic kernel: rank rows per staged u chunk
constexpr int kGradDC = 32;   // owner kernel: columns per block (one per lane)
constexpr int kGradWarps = kGradThreads / kGradDC;  // owner kernel: row owners per block
constexpr int64_t kGradMaxRowBlocks = 1024;  // owner kernel: row blocks (each scans the whole table)

// Grid (item_bound(N, S, kGradBM), ceil(l * s / kGradThreads)).
template <typename XT>
__global__ void __launch_bounds__(kGradThreads)
    shard_grad_atomic_kernel(typename AccOf<XT>::type* __restrict__ grad, const typename AccOf<XT>::type* __restrict__ u,
                             int64_t u_stride, const XT* __restrict__ x, int64_t x_stride,
                             const float* __restrict__ scale, SideArgs S, SegArgs sg) {
  using AT = typename AccOf<XT>::type;
  __shared__ AT us[kGradBM][kGradRC];
  const ItemInfo it = locate_item<kGradThreads>(sg, blockIdx.x, kGradBM);
  if (it.n0 >= it.n1) return;  // uniform: no such item
  const int tid = threadIdx.x;
  const int m = it.n1 - it.n0;
  const int64_t s = S.s, l = S.l, r = S.r, h = l * s;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kGradThreads + tid;
  const bool col_ok = col < h;
  const int64_t i = col_ok ? col / s : 0;
  const int64_t cc = col - i * s;
  const int32_t* tab = S.idx + static_cast<int64_t>(it.t) * r * l;
  const AT sc = static_cast<AT>(scale[it.t]);

  AT xr[kGradBM];
#pragma unroll
  for (int nn = 0; nn < kGradBM; ++nn)
    xr[nn] = (col_ok && nn < m) ? to_acc<AT>(x[static_cast<int64_t>(it.n0 + nn) * x_stride + col]) : AT(0);

  for (int64_t j0 = 0; j0 < r; j0 += kGradRC) {
    __syncthreads();  // previous readers of us are done
    for (int e = tid; e < kGradBM * kGradRC; e += kGradThreads) {
      const int nn = e / kGradRC, jj = e % kGradRC;
      us[nn][jj] = (nn < m && j0 + jj < r) ? sc * u[static_cast<int64_t>(it.n0 + nn) * u_stride + j0 + jj] : AT(0);
    }
    __syncthreads();
    if (!col_ok) continue;
    const int jn = static_cast<int>(r - j0 < kGradRC ? r - j0 : kGradRC);
    for (int jj = 0; jj < jn; ++jj) {
      const int32_t p = tab[(j0 + jj) * l + i];
      if (!valid_row(p, S.P)) continue;
      AT acc = AT(0);
#pragma unroll
      for (int nn = 0; nn < kGradBM; ++nn) acc += us[nn][jj] * xr[nn];
      atomicAdd(grad + static_cast<int64_t>(p) * s + cc, acc);
    }
  }
}

// Grid (row_blocks, ceil(s / kGradDC)); block b owns pool rows
// [b * rows_per_block, (b + 1) * rows_per_block) and kGradDC columns; inside it,
// warp w owns the rows p with (p - p0) % kGradWarps == w, lane c one column.
template <typename XT>
__global__ void __launch_bounds__(kGradThreads)
    shard_grad_owner_kernel(typename AccOf<XT>::type* __restrict__ grad, const typename AccOf<XT>::type* __restrict__ u,
                            int64_t u_stride, const XT* __restrict__ x, int64_t x_stride,
                            const float* __restrict__ scale, SideArgs S, SegArgs sg, int64_t rows_per_block) {
  using AT = typename AccOf<XT>::type;
  __shared__ int wbuf[kGradThreads / 32 + 1];
  __shared__ int64_t match[kGradThreads];  // table entries hitting this block's rows, in table order
  __shared__ int seg_n0[kGradThreads], seg_n1[kGradThreads], seg_t[kGradThreads];
  const int tid = threadIdx.x;
  const int warp = tid / kGradDC, c = tid % kGradDC;
  const int64_t s = S.s, l = S.l, r = S.r, rl = r * l;
  const int64_t E = sg.T * rl;  // table entries
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t p_hi = p0 + rows_per_block < S.P ? p0 + rows_per_block : S.P;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kGradDC + c;
  const bool col_ok = col < s;

  for (int64_t e0 = 0; e0 < E; e0 += kGradThreads) {
    const int64_t e = e0 + tid;
    const int32_t q = e < E ? S.idx[e] : -1;
    const int hit = (q >= p0 && q < p_hi) ? 1 : 0;
    int n_match;
    const int pos = block_inclusive_scan<kGradThreads, OpSum>(hit, wbuf, &n_match);
    if (hit) match[pos - 1] = e;
    __syncthreads();
    if (n_match == 0) continue;  // uniform
    int carry = 0;
    for (int64_t g0 = 0; g0 < sg.S; g0 += kGradThreads) {
      int n0, n1, t;
      segment_chunk<kGradThreads>(sg, g0, carry, wbuf, n0, n1, t);  // syncs before touching shared memory
      seg_n0[tid] = n0;
      seg_n1[tid] = n1;
      seg_t[tid] = t;
      __syncthreads();
      const int n_seg = static_cast<int>(sg.S - g0 < kGradThreads ? sg.S - g0 : kGradThreads);
      for (int mi = 0; mi < n_match; ++mi) {
        const int64_t me = match[mi];
        const int64_t p = S.idx[me];
        if ((p - p0) % kGradWarps != warp) continue;  // warp-uniform: another warp owns row p
        const int tt = static_cast<int>(me / rl);
        const int64_t rem = me - static_cast<int64_t>(tt) * rl;
        const int64_t j = rem / l, i = rem - j * l;
        const AT sc = static_cast<AT>(scale[tt]);
        const XT* xc = x + i * s + (col_ok ? col : 0);
        const AT* uj = u + j;
        AT acc = AT(0);
        bool any = false;
        for (int gg = 0; gg < n_seg; ++gg) {
          if (seg_t[gg] != tt || seg_n0[gg] >= seg_n1[gg]) continue;
          any = true;  // as on the CPU: a row is written only when it receives tokens
          if (!col_ok) continue;
          for (int n = seg_n0[gg]; n < seg_n1[gg]; ++n)
            acc += (sc * uj[static_cast<int64_t>(n) * u_stride]) * to_acc<AT>(xc[static_cast<int64_t>(n) * x_stride]);
        }
        if (any && col_ok) {
          AT* gp = grad + p * s + col;  // owned by this lane: no other thread writes it
          *gp = *gp + acc;
        }
      }
      if (carry >= sg.N) break;  // uniform: no later segment has tokens
    }
    // The next table chunk's scan syncs before `match` and the segment arrays
    // are overwritten.
  }
}

}  // namespace gpu
}  // namespace mos
