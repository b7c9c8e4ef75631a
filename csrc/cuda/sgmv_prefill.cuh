// Prefill path of the fused sgmv on tensor cores (bf16 activations, pools in
// bf16 or fp32, rank <= 64; chosen on the host by plan_sgmv when segments are
// long on average, see sgmv_fast.cu):
//
//   y[n] += scale[t] * B_t (A_t x[n])   for the tokens n of item (<= 64 tokens of one segment)
//
// Block = 4 warps, one item; warp w owns token rows [16w, 16w + 16).
//
// Shrink: h in chunks of kPfK = 32 columns. The x chunk [64 x 32] and the
// gathered A chunk [r16 x 32] (A[j, k] = pool_a[idx_a[t, j, k / s_a], k % s_a],
// slot computed once per 8-column group in 32-bit) are read with 16-byte loads
// into registers one chunk ahead (the next chunk's loads are in flight while
// the tensor cores work on the current one) and stored to shared memory as
// bf16; an fp32 pool is split there into hi = bf16(a) and lo = bf16(a - hi).
// v [64 x r] accumulates in fp32 WMMA fragments (x * A_hi + x * A_lo).
//
// v stays on chip: scaled by scale[t] in fp32 and split into bf16 hi + lo
// (rank rows whose A entries are all padded / invalid are set to 0 exactly, so
// Inf / NaN in x never reaches y through them).
//
// Expand: o in tiles of kPfN = 64 columns; the gathered B tile [r16 x 64]
// (hi / lo as above) is prefetched the same way; y_tile = v_hi B_hi + v_lo
// B_hi (+ v_hi B_lo for fp32 pools) in fp32 fragments, staged through shared
// memory and added to y with one 16-byte read-modify-write per 8 columns and
// one rounding.
//
// Error bound (per output element, before the final bf16 rounding of y):
//   |err| <= 3 * 2^-16 * sum_j |scale v_j| |B_jc| + 2^-16 * scale * sum_j |B_jc| sum_k |A_jk x_k|
// plus fp32 accumulation error: v and fp32 pool values are carried to ~16
// significant bits (hi + lo), bf16 x and bf16 pools exactly. With bf16 pools
// this is ~2^-16 relative, far below bf16's 2^-9 output rounding.
#pragma once

#ifndef MOS_CUDA_EMU
#include <mma.h>
#endif

#include "sgmv_fast.cuh"

namespace mos {
namespace gpu {

constexpr int kPfThreads = 128;  // 4 warps
constexpr int kPfM = 64;         // tokens per item
constexpr int kPfK = 32;         // shrink: h columns per stage
constexpr int kPfN = 64;         // expand: output columns per tile
constexpr int kPfMaxRank = 64;
constexpr int kPfLdK = kPfK + 8;        // bf16 rows of 80 bytes (16-byte multiple, spreads banks)
constexpr int kPfLdN = kPfN + 8;        // bf16 rows of 144 bytes
constexpr int kPfLdR = kPfMaxRank + 8;  // v hi / lo rows
constexpr int kPfLdF = kPfN + 4;        // fp32 staging rows (v and the y tile)

struct PfSmem {
  union {
    struct {
      __nv_bfloat16 x[kPfM * kPfLdK];
      __nv_bfloat16 a_hi[kPfMaxRank * kPfLdK];
      __nv_bfloat16 a_lo[kPfMaxRank * kPfLdK];
    } s;                                 // shrink stage
    float f[kPfM * kPfLdF];              // v (fp32), then the y tile
    struct {
      __nv_bfloat16 b_hi[kPfMaxRank * kPfLdN];
      __nv_bfloat16 b_lo[kPfMaxRank * kPfLdN];
    } e;                                 // expand stage
  } u;
  __nv_bfloat16 v_hi[kPfM * kPfLdR];
  __nv_bfloat16 v_lo[kPfM * kPfLdR];
  int row_ok[kPfMaxRank];
};
// f (the y tile) aliases the B tile: every tile's loop syncs between them.
static_assert(kPfMaxRank <= kPfM, "v staging reuses the y-tile rows");

template <typename PT>
struct IsF32 {
  static constexpr bool value = false;
};
template <>
struct IsF32<float> {
  static constexpr bool value = true;
};

// One 8-column group of a gathered table row: pool[idx[t, j, col / s], col % s .. +8],
// zeros when j >= r, col >= width or the entry is padded / invalid.
template <typename PT>
__device__ __forceinline__ void gather8(const PT* __restrict__ pool, const int32_t* __restrict__ tab, int j, int r,
                                        int col, int width, int s, int l, int P, float* f) {
  bool ok = j < r && col < width;
  int p = -1, i = 0;
  if (ok) {
    i = col / s;  // slot, 32-bit
    p = __ldg(tab + j * l + i);
    ok = p >= 0 && p < P;
  }
  if (ok) {
    load8<PT>(pool + static_cast<int64_t>(p) * s + (col - i * s), f);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = 0.f;
  }
}

// Grid (items, 1); static shared memory sizeof(PfSmem).
template <typename PA, typename PB>
__global__ void __launch_bounds__(kPfThreads)
    sgmv_prefill_kernel(__nv_bfloat16* __restrict__ y, int64_t y_stride, const __nv_bfloat16* __restrict__ x,
                        int64_t x_stride, const float* __restrict__ scale, SideArgs A, SideArgs B, SegArgs sg,
                        FastItems fi) {
  using namespace nvcuda;
  using XT = __nv_bfloat16;
  constexpr bool kLoA = IsF32<PA>::value, kLoB = IsF32<PB>::value;
  __shared__ __align__(128) PfSmem sm;
  const ItemInfo it = fast_item<kPfThreads, kPfM>(sg, fi, blockIdx.x);
  if (it.n0 >= it.n1) return;  // uniform: no such item
  const int tid = threadIdx.x, warp = tid >> 5;
  const int m = it.n1 - it.n0;
  const int r = static_cast<int>(A.r);
  const int r16 = (r + 15) >> 4;
  const int sa = static_cast<int>(A.s), la = static_cast<int>(A.l), h = sa * la, Pa = static_cast<int>(A.P);
  const int sb = static_cast<int>(B.s), lb = static_cast<int>(B.l), o = sb * lb, Pb = static_cast<int>(B.P);
  const PA* __restrict__ pool_a = static_cast<const PA*>(A.pool);
  const PB* __restrict__ pool_b = static_cast<const PB*>(B.pool);
  const int32_t* __restrict__ tab_a = A.idx + static_cast<int64_t>(it.t) * r * la;
  const int32_t* __restrict__ tab_b = B.idx + static_cast<int64_t>(it.t) * r * lb;
  const XT* xrow = x + static_cast<int64_t>(it.n0) * x_stride;
  XT* yrow = y + static_cast<int64_t>(it.n0) * y_stride;
  const bool warp_busy = warp * 16 < m;  // warp-uniform: token rows of this warp exist

  if (tid < kPfMaxRank) {  // rank rows with at least one usable A entry
    int ok = 0;
    if (tid < r)
      for (int i = 0; i < la && !ok; ++i) {
        const int p = tab_a[tid * la + i];
        ok = p >= 0 && p < Pa;
      }
    sm.row_ok[tid] = ok;
  }

  // ---- shrink: v = x A^T ------------------------------------------------------
  // Per stage each thread moves 2 x groups (64 rows x 4 groups) and up to 2 A
  // groups (r16*16 rows x 4 groups) of 8 columns.
  constexpr int kXG = kPfM * (kPfK / 8) / kPfThreads;        // 2
  constexpr int kAG = kPfMaxRank * (kPfK / 8) / kPfThreads;  // 2
  uint4 xr[kXG];
  float ar[kAG][8];
  auto load_stage = [&](int k0) {
#pragma unroll
    for (int g = 0; g < kXG; ++g) {
      const int e = tid + g * kPfThreads, row = e / (kPfK / 8), cc = (e % (kPfK / 8)) * 8;
      xr[g] = (row < m && k0 + cc < h) ? ld16_nc(xrow + row * x_stride + k0 + cc) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int g = 0; g < kAG; ++g) {
      const int e = tid + g * kPfThreads, j = e / (kPfK / 8), cc = (e % (kPfK / 8)) * 8;
      gather8<PA>(pool_a, tab_a, j, r, k0 + cc, h, sa, la, Pa, ar[g]);
    }
  };
  auto store_stage = [&]() {
#pragma unroll
    for (int g = 0; g < kXG; ++g) {
      const int e = tid + g * kPfThreads, row = e / (kPfK / 8), cc = (e % (kPfK / 8)) * 8;
      *reinterpret_cast<uint4*>(&sm.u.s.x[row * kPfLdK + cc]) = xr[g];
    }
#pragma unroll
    for (int g = 0; g < kAG; ++g) {
      const int e = tid + g * kPfThreads, j = e / (kPfK / 8), cc = (e % (kPfK / 8)) * 8;
      split_bf16x8(ar[g], &sm.u.s.a_hi[j * kPfLdK + cc], &sm.u.s.a_lo[j * kPfLdK + cc], kLoA);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> vacc[kPfMaxRank / 16];
#pragma unroll
  for (int jt = 0; jt < kPfMaxRank / 16; ++jt) wmma::fill_fragment(vacc[jt], 0.f);
  load_stage(0);
  for (int k0 = 0; k0 < h; k0 += kPfK) {
    __syncthreads();  // previous readers of the stage buffers are done
    store_stage();
    __syncthreads();
    if (k0 + kPfK < h) load_stage(k0 + kPfK);  // next chunk in flight during the MMAs
    if (warp_busy) {
#pragma unroll
      for (int kk = 0; kk < kPfK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, XT, wmma::row_major> xa;
        wmma::load_matrix_sync(xa, &sm.u.s.x[warp * 16 * kPfLdK + kk], kPfLdK);
#pragma unroll
        for (int jt = 0; jt < kPfMaxRank / 16; ++jt) {
          if (jt < r16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, XT, wmma::col_major> ab;
            if (kLoA) {
              wmma::load_matrix_sync(ab, &sm.u.s.a_lo[jt * 16 * kPfLdK + kk], kPfLdK);
              wmma::mma_sync(vacc[jt], xa, ab, vacc[jt]);
            }
            wmma::load_matrix_sync(ab, &sm.u.s.a_hi[jt * 16 * kPfLdK + kk], kPfLdK);
            wmma::mma_sync(vacc[jt], xa, ab, vacc[jt]);
          }
        }
      }
    }
  }
  __syncthreads();  // stage buffers dead: f (v staging) aliases them
#pragma unroll
  for (int jt = 0; jt < kPfMaxRank / 16; ++jt)
    if (jt < r16) wmma::store_matrix_sync(&sm.u.f[warp * 16 * kPfLdF + jt * 16], vacc[jt], kPfLdF, wmma::mem_row_major);
  __syncthreads();
  // v (scaled) -> bf16 hi + lo; padded rank rows exactly 0.
  const float sc = scale[it.t];
  for (int e = tid; e < kPfM * (kPfMaxRank / 8); e += kPfThreads) {
    const int row = e / (kPfMaxRank / 8), jc = (e % (kPfMaxRank / 8)) * 8;
    float f[8];
#pragma unroll
    for (int q = 0; q < 8; ++q)
      f[q] = (jc + q < r16 * 16 && sm.row_ok[jc + q]) ? sc * sm.u.f[row * kPfLdF + jc + q] : 0.f;
    split_bf16x8(f, &sm.v_hi[row * kPfLdR + jc], &sm.v_lo[row * kPfLdR + jc], true);
  }

  // ---- expand: y += v B ---------------------------------------------------------
  constexpr int kBG = kPfMaxRank * (kPfN / 8) / kPfThreads;  // 4
  float br[kBG][8];
  auto load_b = [&](int c0) {
#pragma unroll
    for (int g = 0; g < kBG; ++g) {
      const int e = tid + g * kPfThreads, j = e / (kPfN / 8), cc = (e % (kPfN / 8)) * 8;
      if (j < r16 * 16) gather8<PB>(pool_b, tab_b, j, r, c0 + cc, o, sb, lb, Pb, br[g]);
    }
  };
  load_b(0);
  for (int c0 = 0; c0 < o; c0 += kPfN) {
    __syncthreads();  // v staging / previous y tile reads done (both alias the B tile)
#pragma unroll
    for (int g = 0; g < kBG; ++g) {
      const int e = tid + g * kPfThreads, j = e / (kPfN / 8), cc = (e % (kPfN / 8)) * 8;
      if (j < r16 * 16) split_bf16x8(br[g], &sm.u.e.b_hi[j * kPfLdN + cc], &sm.u.e.b_lo[j * kPfLdN + cc], kLoB);
    }
    __syncthreads();
    if (c0 + kPfN < o) load_b(c0 + kPfN);  // next tile in flight during the MMAs
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> yacc[kPfN / 16];
#pragma unroll
    for (int ct = 0; ct < kPfN / 16; ++ct) wmma::fill_fragment(yacc[ct], 0.f);
    if (warp_busy) {
#pragma unroll
      for (int kt = 0; kt < kPfMaxRank / 16; ++kt) {
        if (kt < r16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, XT, wmma::row_major> vh, vl;
          wmma::load_matrix_sync(vh, &sm.v_hi[warp * 16 * kPfLdR + kt * 16], kPfLdR);
          wmma::load_matrix_sync(vl, &sm.v_lo[warp * 16 * kPfLdR + kt * 16], kPfLdR);
#pragma unroll
          for (int ct = 0; ct < kPfN / 16; ++ct) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, XT, wmma::row_major> bb;
            if (kLoB) {
              wmma::load_matrix_sync(bb, &sm.u.e.b_lo[kt * 16 * kPfLdN + ct * 16], kPfLdN);
              wmma::mma_sync(yacc[ct], vh, bb, yacc[ct]);
            }
            wmma::load_matrix_sync(bb, &sm.u.e.b_hi[kt * 16 * kPfLdN + ct * 16], kPfLdN);
            wmma::mma_sync(yacc[ct], vl, bb, yacc[ct]);
            wmma::mma_sync(yacc[ct], vh, bb, yacc[ct]);
          }
        }
      }
    }
    __syncthreads();  // B tile dead: the y tile aliases it
    if (warp_busy) {
#pragma unroll
      for (int ct = 0; ct < kPfN / 16; ++ct)
        wmma::store_matrix_sync(&sm.u.f[warp * 16 * kPfLdF + ct * 16], yacc[ct], kPfLdF, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < kPfM * (kPfN / 8); e += kPfThreads) {
      const int row = e / (kPfN / 8), cc = (e % (kPfN / 8)) * 8;
      if (row < m && c0 + cc < o) {
        XT* yp = yrow + row * y_stride + c0 + cc;
        float f[8];
        unpack8<XT>(ld16(yp), f);
#pragma unroll
        for (int q = 0; q < 8; ++q) f[q] += sm.u.f[row * kPfLdF + cc + q];
        st16(yp, pack8<XT>(f));
      }
    }
  }
}

}  // namespace gpu
}  // namespace mos
