// Prefill path of the fused sgmv on tensor cores (bf16 or fp16 activations,
// pools in the activation dtype or fp32, rank <= 64; chosen on the host by
// plan_sgmv when segments are long on average, see sgmv_fast.cu):
//
//   y[n] += scale[t] * B_t (A_t x[n])   for the tokens n of item (<= 64 tokens of one segment)
//
// Block = 4 warps, one item; warp w owns token rows [16w, 16w + 16).
//
// Every MMA is bf16 x bf16 with fp32 accumulation (WMMA 16x16x16, HMMA on
// sm_80 / sm_90). Operands that are not bf16 are split into bf16 hi + lo
// (split_bf16x8): fp16 values exactly (11 significant bits fit in two bf16,
// and bf16 has fp32's exponent range, so unlike an fp16 hi / lo split nothing
// overflows or underflows), fp32 values to ~16 significant bits. A product
// a * b with both split is computed as a_hi b_hi + a_hi b_lo + a_lo b_hi (the
// lo * lo term is dropped); one that needs no split takes one MMA.
//
// Shrink (pf_shrink): h in chunks of kPfK = 32 columns, double-buffered: chunk k + 1 is
// copied global -> shared with 16-byte cp.async (cp.async.cg; zero-filled
// past the item's tokens, past h and for padded / invalid table entries)
// while the tensor cores work on chunk k. The gathered A chunk [r16 x 32] is
// A[j, c] = pool_a[idx_a[t, j, c / s_a], c % s_a], the slot computed once per
// 16-byte group in 32-bit. Chunks that need a split (fp16 x, fp32 or fp16
// A) are converted shared -> shared into bf16 hi / lo after they land.
// v [64 x r] accumulates in fp32 fragments.
//
// v stays on chip: scaled by scale[t] in fp32 and split into bf16 hi + lo
// (rank rows whose A entries are all padded / invalid are set to 0 exactly, so
// Inf / NaN in x never reaches y through them).
//
// Expand (pf_expand): o in tiles of kPfN = 64 columns, double-buffered the same way (the
// first B tile's copies are issued as soon as the shrink's last MMAs are done,
// before v is staged); y_tile = v B in fp32 fragments, staged through shared
// memory and added to y with one 16-byte read-modify-write per 8 columns and
// one rounding.
//
// Error bound (per output element c, before the final rounding of y to the
// activation dtype), with u = 2^-16:
//   |err| <= 3u sum_j |scale v_j| |B_jc| + e_A scale sum_j |B_jc| sum_k |A_jk| |x_k|
// where e_A = 0 (bf16 x, bf16 A), u (bf16 x with fp32 A, or fp16 x with fp16
// A), 2u (fp16 x with fp32 A); plus fp32 accumulation error. The first term
// covers v carried as hi + lo and B split (fp32 or fp16 B). This is ~2^-15
// relative, far below the output rounding (bf16 2^-9, fp16 2^-12).
//
// Shared memory (dynamic, PfLayout below): two stages per side plus split
// buffers; with fp32 pools on both sides 87 KiB (opt-in above 48 KiB, 2
// blocks per SM on sm_90), bf16 everywhere 53 KiB. Launch bounds (128, 2):
// with ptxas's default choice (80 registers) the fp16 + fp32-pool variants
// spilled; with room for 2 blocks per SM they take 114-166 registers and spill
// nothing (the SASS gate in tools/check_cuda.sh forbids local memory).
#pragma once

#ifndef MOS_CUDA_EMU
#include <mma.h>
#endif
#include <type_traits>

#include "items.cuh"
#include "vec.cuh"

namespace mos {
namespace gpu {

constexpr int kPfThreads = 128;  // 4 warps
constexpr int kPfM = 64;         // tokens per item
constexpr int kPfK = 32;         // shrink: h columns per stage
constexpr int kPfN = 64;         // expand: output columns per tile
constexpr int kPfMaxRank = 64;
constexpr int kPfLdK = kPfK + 8;        // 2-byte rows of 80 bytes (16-byte multiple, spreads banks)
constexpr int kPfLdN = kPfN + 8;        // 2-byte rows of 144 bytes
constexpr int kPfLdR = kPfMaxRank + 8;  // v hi / lo rows
constexpr int kPfLdF = kPfN + 4;        // fp32 rows (v staging, the y tile, fp32 pool stages)

template <typename T>
constexpr bool kIsBf16 = std::is_same<T, __nv_bfloat16>::value;

// Byte offsets into the dynamic shared memory of sgmv_prefill_kernel<XT, PA, PB>.
// A union of the shrink buffers and the expand buffers, then v hi / lo and the
// rank-row mask. The y tile (and, before it, the v staging) sits at the end of
// the expand part, after both B stages, so the first B tile can be in flight
// while v is staged.
template <typename XT, typename PA, typename PB>
struct PfLayout {
  static constexpr bool kCvtX = !kIsBf16<XT>, kCvtA = !kIsBf16<PA>, kCvtB = !kIsBf16<PB>;
  static constexpr int kLdA = sizeof(PA) == 4 ? kPfK + 4 : kPfLdK;   // A stage row (elements)
  static constexpr int kLdB = sizeof(PB) == 4 ? kPfN + 4 : kPfLdN;   // B stage row
  static constexpr int kSplitK = kPfMaxRank * kPfLdK * 2;            // one bf16 [64 x kPfLdK] buffer
  static constexpr int kSplitN = kPfMaxRank * kPfLdN * 2;
  // shrink
  static constexpr int kStageX = kPfM * kPfLdK * 2;
  static constexpr int kStageA = kPfMaxRank * kLdA * static_cast<int>(sizeof(PA));
  static constexpr int xs = 0;                       // [2] x stages (XT)
  static constexpr int as = 2 * kStageX;             // [2] A stages (PA)
  static constexpr int xc = as + 2 * kStageA;        // x hi, lo (bf16) when kCvtX
  static constexpr int ac = xc + (kCvtX ? 2 * kSplitK : 0);  // A hi, lo when kCvtA
  static constexpr int shrink_end = ac + (kCvtA ? 2 * kSplitK : 0);
  // expand
  static constexpr int kStageB = kPfMaxRank * kLdB * static_cast<int>(sizeof(PB));
  static constexpr int bs = 0;                       // [2] B stages (PB)
  static constexpr int bc = 2 * kStageB;             // B hi, lo when kCvtB
  static constexpr int f = bc + (kCvtB ? 2 * kSplitN : 0);  // fp32 [64 x kPfLdF]: v staging, then the y tile
  static constexpr int expand_end = f + kPfM * kPfLdF * 4;
  static constexpr int u_end = shrink_end > expand_end ? shrink_end : expand_end;
  static constexpr int v_hi = u_end;
  static constexpr int v_lo = v_hi + kPfM * kPfLdR * 2;
  static constexpr int row_ok = v_lo + kPfM * kPfLdR * 2;
  static constexpr int bytes = row_ok + kPfMaxRank * 4;
  static_assert(kStageX % 128 == 0 && kStageA % 128 == 0 && kStageB % 128 == 0 && kSplitK % 128 == 0 &&
                    kSplitN % 128 == 0 && u_end % 128 == 0,
                "every buffer starts 128-byte aligned (WMMA needs 32)");
};

// The buffers of PfLayout<XT, PA, PB> in the kernel's dynamic shared memory.
template <typename XT, typename PA, typename PB>
struct PfBufs {
  using L = PfLayout<XT, PA, PB>;
  using BF = __nv_bfloat16;
  XT* xs;      // [2] x stages
  PA* as;      // [2] A stages
  BF* xc;      // x hi, lo
  BF* ac;      // A hi, lo
  PB* bs;      // [2] B stages
  BF* bc;      // B hi, lo
  float* f;    // v staging, then the y tile
  BF* v_hi;
  BF* v_lo;
  int* row_ok;  // [kPfMaxRank] rank rows with at least one usable A entry
  __device__ __forceinline__ explicit PfBufs(unsigned char* smem)
      : xs(reinterpret_cast<XT*>(smem + L::xs)),
        as(reinterpret_cast<PA*>(smem + L::as)),
        xc(reinterpret_cast<BF*>(smem + L::xc)),
        ac(reinterpret_cast<BF*>(smem + L::ac)),
        bs(reinterpret_cast<PB*>(smem + L::bs)),
        bc(reinterpret_cast<BF*>(smem + L::bc)),
        f(reinterpret_cast<float*>(smem + L::f)),
        v_hi(reinterpret_cast<BF*>(smem + L::v_hi)),
        v_lo(reinterpret_cast<BF*>(smem + L::v_lo)),
        row_ok(reinterpret_cast<int*>(smem + L::row_ok)) {}
};

// What both phases know of the block's item.
struct PfItem {
  int n0, m, t;    // tokens [n0, n0 + m) of tenant t
  int r, r16;      // the rank (A.r) and its 16-row tiles (rows_a = 16 * r16 rows are staged)
  bool warp_busy;  // warp-uniform: this warp's token rows [16 warp, 16 warp + 16) exist
};

// One side (A or B) as the item's tenant t gathers it: the matrix
// G[j, col] = pool[tab[j * l + col / s], col % s] of `width` = l * s columns,
// from the tenant's view of the side (tenant_side: its table, the pool from
// its row base on, P the rows from there).
template <typename PT>
struct PfSide {
  const PT* pool;
  const int32_t* tab;  // the tenant's table [r, l]
  int s, l, P, width;
  __device__ __forceinline__ explicit PfSide(const SideArgs& V)
      : pool(static_cast<const PT*>(V.pool)),
        tab(V.idx),
        s(static_cast<int>(V.s)),
        l(static_cast<int>(V.l)),
        P(static_cast<int>(V.P)),
        width(s * l) {}
  __device__ __forceinline__ PfSide(const SideArgs& S, int t) : PfSide(tenant_side<PT>(S, t)) {}
};

// 16-byte groups of 8 columns of a gathered row, as cp.async copies:
// G[j, col .. col + 8) into dst (8 elements of PT: one copy for 2-byte pools,
// two for fp32), zero-filled when j >= r, col >= width or the entry is
// padded / invalid.
template <typename PT>
__device__ __forceinline__ void gather8_async(PT* dst, const PfSide<PT>& g, int j, int r, int col) {
  bool ok = j < r && col < g.width;
  const PT* src = g.pool;
  if (ok) {
    const int i = col / g.s;  // slot, 32-bit
    const int p = __ldg(g.tab + j * g.l + i);
    ok = p >= 0 && p < g.P;
    if (ok) src = g.pool + static_cast<int64_t>(p) * g.s + (col - i * g.s);
  }
  cp_async16(dst, src, ok);
  if (sizeof(PT) == 4) cp_async16(dst + 4, src + 4, ok);
}

// Converts rows [0, rows) x cols of a landed stage (T, row stride ld_src) into
// bf16 hi / lo buffers (row stride ld_dst), 8 columns per thread step.
template <typename T>
__device__ __forceinline__ void split_stage(const T* src, int ld_src, __nv_bfloat16* hi, __nv_bfloat16* lo,
                                            int ld_dst, int rows, int cols) {
  const int groups = cols / 8;
  for (int e = threadIdx.x; e < rows * groups; e += kPfThreads) {
    const int row = e / groups, cc = (e % groups) * 8;
    float f[8];
    load8<T, false>(src + row * ld_src + cc, f);  // shared memory
    split_bf16x8(f, hi + row * ld_dst + cc, lo + row * ld_dst + cc, true);
  }
}

// v of one item in fp32 fragments: vacc[jt] holds v[16w .. 16w + 16, 16jt .. 16jt + 16)
// in warp w (token rows of the warp, rank tile jt).
using PfAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// Shrink phase of sgmv_prefill_kernel: vacc[jt] = x A_t^T for the item's tokens
// and the rank tiles jt < pi.r16 (the others 0), and sm.row_ok[j] (j <
// kPfMaxRank) = 1 for the rank rows j < r with at least one usable A entry.
// Block-wide; uses the shrink buffers of sm; ends with this warp's last MMAs
// issued (pf_expand synchronizes before the shrink buffers are reused).
template <typename XT, typename PA, typename PB>
__device__ __forceinline__ void pf_shrink(const XT* __restrict__ x, int64_t x_stride, const SideArgs& A,
                                          const PfItem& pi, const PfBufs<XT, PA, PB>& sm,
                                          PfAcc (&vacc)[kPfMaxRank / 16]) {
  using namespace nvcuda;
  using BF = __nv_bfloat16;
  using L = PfLayout<XT, PA, PB>;
  constexpr bool kCvtX = L::kCvtX, kCvtA = L::kCvtA;
  constexpr int kSX = kPfM * kPfLdK, kSA = kPfMaxRank * L::kLdA;  // stage sizes (elements)
  constexpr int kSplitK = kPfMaxRank * kPfLdK;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int m = pi.m, r = pi.r, r16 = pi.r16, rows_a = r16 * 16;
  const PfSide<PA> ga(A, pi.t);
  const int h = ga.width;
  const XT* xrow = x + static_cast<int64_t>(pi.n0) * x_stride;
  XT* const xs = sm.xs;
  PA* const as = sm.as;
  BF* const xc = sm.xc;
  BF* const ac = sm.ac;
  int* const row_ok = sm.row_ok;

  auto issue_shrink = [&](int k0, int st) {
    XT* xd = xs + st * kSX;
    for (int e = tid; e < kPfM * (kPfK / 8); e += kPfThreads) {
      const int row = e / (kPfK / 8), cc = (e % (kPfK / 8)) * 8;
      const bool ok = row < m && k0 + cc < h;
      cp_async16(xd + row * kPfLdK + cc, ok ? xrow + row * x_stride + k0 + cc : x, ok);
    }
    PA* ad = as + st * kSA;
    for (int e = tid; e < rows_a * (kPfK / 8); e += kPfThreads) {
      const int j = e / (kPfK / 8), cc = (e % (kPfK / 8)) * 8;
      gather8_async<PA>(ad + j * L::kLdA + cc, ga, j, r, k0 + cc);
    }
  };

  issue_shrink(0, 0);
  cp_async_commit();
  if (tid < kPfMaxRank) {  // rank rows with at least one usable A entry (overlaps the first copies)
    int ok = 0;
    if (tid < r)
      for (int i = 0; i < ga.l && !ok; ++i) {
        const int p = __ldg(ga.tab + tid * ga.l + i);
        ok = p >= 0 && p < ga.P;
      }
    row_ok[tid] = ok;
  }

#pragma unroll
  for (int jt = 0; jt < kPfMaxRank / 16; ++jt) wmma::fill_fragment(vacc[jt], 0.f);
  const int nk = (h + kPfK - 1) / kPfK;
  for (int c = 0; c < nk; ++c) {
    const int st = c & 1;
    __syncthreads();  // readers of stage st ^ 1 (chunk c - 1) and of the split buffers are done
    if (c + 1 < nk) issue_shrink((c + 1) * kPfK, st ^ 1);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    cp_async_wait<1>();  // this thread's copies of chunk c have landed
    __syncthreads();     // ... and everyone's
    if (kCvtX) split_stage<XT>(xs + st * kSX, kPfLdK, xc, xc + kSplitK, kPfLdK, kPfM, kPfK);
    if (kCvtA) split_stage<PA>(as + st * kSA, L::kLdA, ac, ac + kSplitK, kPfLdK, rows_a, kPfK);
    if (kCvtX || kCvtA) __syncthreads();
    const BF* x_hi = kCvtX ? xc : reinterpret_cast<const BF*>(xs + st * kSX);
    const BF* a_hi = kCvtA ? ac : reinterpret_cast<const BF*>(as + st * kSA);
    if (pi.warp_busy) {
#pragma unroll
      for (int kk = 0; kk < kPfK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, BF, wmma::row_major> xh, xl;
        wmma::load_matrix_sync(xh, x_hi + warp * 16 * kPfLdK + kk, kPfLdK);
        if (kCvtX) wmma::load_matrix_sync(xl, xc + kSplitK + warp * 16 * kPfLdK + kk, kPfLdK);
#pragma unroll
        for (int jt = 0; jt < kPfMaxRank / 16; ++jt) {
          if (jt < r16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, BF, wmma::col_major> ah;
            wmma::load_matrix_sync(ah, a_hi + jt * 16 * kPfLdK + kk, kPfLdK);
            if (kCvtA) {  // small terms first
              wmma::fragment<wmma::matrix_b, 16, 16, 16, BF, wmma::col_major> al;
              wmma::load_matrix_sync(al, ac + kSplitK + jt * 16 * kPfLdK + kk, kPfLdK);
              wmma::mma_sync(vacc[jt], xh, al, vacc[jt]);
            }
            if (kCvtX) wmma::mma_sync(vacc[jt], xl, ah, vacc[jt]);
            wmma::mma_sync(vacc[jt], xh, ah, vacc[jt]);
          }
        }
      }
    }
  }
}

// Expand phase of sgmv_prefill_kernel: y[pi.n0 + row, :] += scale[pi.t] * v[row, :] B_t
// for the item's tokens, with v from pf_shrink (vacc, sm.row_ok). Block-wide;
// starts with __syncthreads (the shrink buffers are dead: the B stages and
// sm.f alias them), then stages v scaled in fp32 and split into bf16 hi + lo,
// rank rows without a usable A entry exactly 0.
template <typename XT, typename PA, typename PB>
__device__ __forceinline__ void pf_expand(XT* __restrict__ y, int64_t y_stride, const float* __restrict__ scale,
                                          const SideArgs& B, const PfItem& pi, const PfBufs<XT, PA, PB>& sm,
                                          const PfAcc (&vacc)[kPfMaxRank / 16]) {
  using namespace nvcuda;
  using BF = __nv_bfloat16;
  using L = PfLayout<XT, PA, PB>;
  constexpr bool kCvtB = L::kCvtB;
  constexpr int kSB = kPfMaxRank * L::kLdB;  // stage size (elements)
  constexpr int kSplitN = kPfMaxRank * kPfLdN;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int m = pi.m, r = pi.r, r16 = pi.r16, rows_a = r16 * 16;
  const PfSide<PB> gb(B, pi.t);
  const int o = gb.width;
  XT* yrow = y + static_cast<int64_t>(pi.n0) * y_stride;
  PB* const bs = sm.bs;
  BF* const bc = sm.bc;
  float* const f = sm.f;
  BF* const v_hi = sm.v_hi;
  BF* const v_lo = sm.v_lo;
  const int* const row_ok = sm.row_ok;

  auto issue_expand = [&](int c0, int st) {
    PB* bd = bs + st * kSB;
    for (int e = tid; e < rows_a * (kPfN / 8); e += kPfThreads) {
      const int j = e / (kPfN / 8), cc = (e % (kPfN / 8)) * 8;
      gather8_async<PB>(bd + j * L::kLdB + cc, gb, j, r, c0 + cc);
    }
  };
  __syncthreads();  // shrink buffers dead: the B stages and f alias them
  issue_expand(0, 0);
  cp_async_commit();
  // v (fp32) -> f, scaled, padded rank rows exactly 0 -> bf16 hi + lo.
#pragma unroll
  for (int jt = 0; jt < kPfMaxRank / 16; ++jt)
    if (jt < r16) wmma::store_matrix_sync(f + warp * 16 * kPfLdF + jt * 16, vacc[jt], kPfLdF, wmma::mem_row_major);
  __syncthreads();
  const float sc = scale[pi.t];
  for (int e = tid; e < kPfM * (kPfMaxRank / 8); e += kPfThreads) {
    const int row = e / (kPfMaxRank / 8), jc = (e % (kPfMaxRank / 8)) * 8;
    float fv[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) fv[q] = (jc + q < rows_a && row_ok[jc + q]) ? sc * f[row * kPfLdF + jc + q] : 0.f;
    split_bf16x8(fv, v_hi + row * kPfLdR + jc, v_lo + row * kPfLdR + jc, true);
  }

  const int nt = (o + kPfN - 1) / kPfN;
  for (int c = 0; c < nt; ++c) {
    const int st = c & 1, c0 = c * kPfN;
    __syncthreads();  // v hi / lo written; readers of stage st ^ 1, the split buffers and f are done
    if (c + 1 < nt) issue_expand(c0 + kPfN, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (kCvtB) {
      split_stage<PB>(bs + st * kSB, L::kLdB, bc, bc + kSplitN, kPfLdN, rows_a, kPfN);
      __syncthreads();
    }
    const BF* b_hi = kCvtB ? bc : reinterpret_cast<const BF*>(bs + st * kSB);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> yacc[kPfN / 16];
#pragma unroll
    for (int ct = 0; ct < kPfN / 16; ++ct) wmma::fill_fragment(yacc[ct], 0.f);
    if (pi.warp_busy) {
#pragma unroll
      for (int kt = 0; kt < kPfMaxRank / 16; ++kt) {
        if (kt < r16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, BF, wmma::row_major> vh, vl;
          wmma::load_matrix_sync(vh, v_hi + warp * 16 * kPfLdR + kt * 16, kPfLdR);
          wmma::load_matrix_sync(vl, v_lo + warp * 16 * kPfLdR + kt * 16, kPfLdR);
#pragma unroll
          for (int ct = 0; ct < kPfN / 16; ++ct) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, BF, wmma::row_major> bh;
            if (kCvtB) {
              wmma::fragment<wmma::matrix_b, 16, 16, 16, BF, wmma::row_major> bl;
              wmma::load_matrix_sync(bl, bc + kSplitN + kt * 16 * kPfLdN + ct * 16, kPfLdN);
              wmma::mma_sync(yacc[ct], vh, bl, yacc[ct]);
            }
            wmma::load_matrix_sync(bh, b_hi + kt * 16 * kPfLdN + ct * 16, kPfLdN);
            wmma::mma_sync(yacc[ct], vl, bh, yacc[ct]);
            wmma::mma_sync(yacc[ct], vh, bh, yacc[ct]);
          }
        }
      }
      // f is this warp's own 16 rows; nobody else reads them before the barrier below.
#pragma unroll
      for (int ct = 0; ct < kPfN / 16; ++ct)
        wmma::store_matrix_sync(f + warp * 16 * kPfLdF + ct * 16, yacc[ct], kPfLdF, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < kPfM * (kPfN / 8); e += kPfThreads) {
      const int row = e / (kPfN / 8), cc = (e % (kPfN / 8)) * 8;
      if (row < m && c0 + cc < o) {
        XT* yp = yrow + row * y_stride + c0 + cc;
        float fv[8];
        unpack8<XT>(ld16(yp), fv);
#pragma unroll
        for (int q = 0; q < 8; ++q) fv[q] += f[row * kPfLdF + cc + q];
        st16(yp, pack8<XT>(fv));
      }
    }
  }
}

// Grid (items, 1); dynamic shared memory PfLayout<XT, PA, PB>::bytes.
template <typename XT, typename PA, typename PB>
__global__ void __launch_bounds__(kPfThreads, 2)
    sgmv_prefill_kernel(XT* __restrict__ y, int64_t y_stride, const XT* __restrict__ x, int64_t x_stride,
                        const float* __restrict__ scale, SideArgs A, SideArgs B, SegArgs sg, FastItems fi) {
  extern __shared__ __align__(128) unsigned char pf_smem[];
  const ItemInfo it = fast_item<kPfThreads, kPfM>(sg, fi, blockIdx.x);
  if (it.n0 >= it.n1) return;  // uniform: no such item
  const PfBufs<XT, PA, PB> sm(pf_smem);
  const int m = it.n1 - it.n0, r = static_cast<int>(A.r);
  const PfItem pi{it.n0, m, it.t, r, (r + 15) >> 4, (threadIdx.x >> 5) * 16 < m};
  PfAcc vacc[kPfMaxRank / 16];
  pf_shrink<XT, PA, PB>(x, x_stride, A, pi, sm, vacc);
  pf_expand<XT, PA, PB>(y, y_stride, scale, B, pi, sm, vacc);
}

}  // namespace gpu
}  // namespace mos
