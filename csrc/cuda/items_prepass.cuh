// Host side of the segment -> item pre-pass (fast_items_kernel, items.cuh)
// shared by the launchers that tile segments into items of BM tokens: how many
// workspace bytes it needs, and the launch that fills FastItems.
//
// The pre-pass runs only for more than kItemsInlineSegments segments; below
// that every block finds its item inline (locate_item) and FastItems stays
// empty. Its workspace is meta[S] (int4) followed by item_seg[bound] (int32),
// rounded up to 16 bytes so that a caller may carve further buffers after it.
#pragma once

#include "dispatch.cuh"
#include "items.cuh"

namespace mos {
namespace gpu {

// Workspace bytes of the pre-pass for S segments, N tokens (clamped to
// INT32_MAX like seg_args does) and items of BM tokens; 0 when it does not run.
inline size_t items_prepass_bytes(int64_t S, int64_t N, int BM) {
  if (S <= kItemsInlineSegments) return 0;
  const int64_t bound = item_bound(N < 0x7fffffff ? N : 0x7fffffff, S, BM);
  const int64_t bytes = 16 * S + 4 * (bound > 0 ? bound : 0);
  return static_cast<size_t>((bytes + 15) / 16 * 16);
}

// Enqueues the pre-pass when sg.S > kItemsInlineSegments and points `fi` at its
// output in `workspace` (16-byte aligned, items_prepass_bytes(sg.S, sg.N, BM)
// bytes); otherwise leaves `fi` empty. cudaErrorInvalidValue for a missing or
// misaligned workspace.
inline cudaError_t items_prepass(const SegArgs& sg, int BM, void* workspace, FastItems& fi, cudaStream_t stream) {
  if (sg.S <= kItemsInlineSegments) return cudaSuccess;
  if (workspace == nullptr || !aligned16(workspace)) return cudaErrorInvalidValue;
  int4* meta = static_cast<int4*>(workspace);
  int32_t* item_seg = reinterpret_cast<int32_t*>(meta + sg.S);
  fast_items_kernel<kItemsBlock><<<1, kItemsBlock, 0, stream>>>(meta, item_seg, item_bound(sg.N, sg.S, BM), sg, BM);
  fi.meta = meta;
  fi.item_seg = item_seg;
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace mos
