// Segment -> item on the device for the kernels that tile segments into items
// of at most BM tokens (sgmv_fast_kernel, sgmv_prefill_kernel,
// shard_grad_tc_kernel): block b asks fast_item for its item b.
//
// For S <= kItemsInlineSegments each block runs locate_item (common.cuh)
// itself; beyond that a single-block pre-pass (fast_items_kernel, launched by
// items_prepass in items_prepass.cuh) writes each segment's bounds and first
// item and the segment of every item to a workspace (FastItems), so each
// block reads two words (linear in S + items, no host sync).
#pragma once

#include "common.cuh"

namespace mos {
namespace gpu {

constexpr int kItemsInlineSegments = 256;  // up to this many segments, locate inline
constexpr int kItemsBlock = 1024;          // pre-pass block size

// Workspace of the item pre-pass: meta[S] = {n0, n1, tenant, first item},
// item_seg[bound] = segment of each item (-1 past the last one).
struct FastItems {
  const int4* meta = nullptr;      // null: locate inline
  const int32_t* item_seg = nullptr;
};

// Grid 1 block of NT = kItemsBlock. Linear in S + bound. (A template so that
// every translation unit that launches it may define it.)
template <int NT>
__global__ void __launch_bounds__(NT)
    fast_items_kernel(int4* __restrict__ meta, int32_t* __restrict__ item_seg, int64_t bound, SegArgs sg, int BM) {
  constexpr int kItemsThreads = NT;
  __shared__ int wbuf[kItemsThreads / 32 + 1];
  __shared__ int incl_s[kItemsThreads];
  const int tid = threadIdx.x;
  int carry = 0;
  int before = 0;  // items in earlier chunks (at most N, fits int32)
  for (int64_t g0 = 0; g0 < sg.S; g0 += kItemsThreads) {
    const ChunkItems c = chunk_items<kItemsThreads>(sg, g0, carry, wbuf, BM);
    const int64_t g = g0 + tid;
    if (g < sg.S) meta[g] = make_int4(c.n0, c.n1, c.t, before + c.incl - c.cnt);
    incl_s[tid] = c.incl;
    __syncthreads();
    // Item e of this chunk belongs to the first segment whose inclusive count exceeds e.
    for (int e = tid; e < c.total; e += kItemsThreads) {
      int lo = 0, hi = kItemsThreads - 1;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (incl_s[mid] > e) hi = mid; else lo = mid + 1;
      }
      item_seg[before + e] = static_cast<int32_t>(g0 + lo);
    }
    before += c.total;
    // The next chunk's scans start with __syncthreads before incl_s is rewritten.
  }
  for (int64_t e = before + tid; e < bound; e += kItemsThreads) item_seg[e] = -1;
}

// Item b (tiles of at most BM tokens) of a block of NT threads: from the
// pre-pass workspace, or found inline.
template <int NT, int BM>
__device__ __forceinline__ ItemInfo fast_item(const SegArgs& sg, const FastItems& fi, int64_t b) {
  if (fi.meta == nullptr) return locate_item<NT>(sg, b, BM);  // uniform branch
  const int g = fi.item_seg[b];
  if (g < 0) return ItemInfo{0, 0, -1};
  const int4 mt = fi.meta[g];
  const int n0 = mt.x + static_cast<int>(b - mt.w) * BM;
  return ItemInfo{n0, min(n0 + BM, mt.y), mt.z};
}

}  // namespace gpu
}  // namespace mos
