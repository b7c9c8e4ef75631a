// Bodies of the CPU kernels declared in kernels.h. Included by isa_*.cpp, each
// of which sets the target instruction set with #pragma GCC target and defines
//   MOS_VEC_BYTES  bytes per SIMD vector (16, 32, 64)
//   MOS_RB         rank rows per shrink tile (register budget)
//   MOS_ISA_NAME   a string
// and includes every outside header *before* the pragma (so that inline
// functions shared with other translation units keep the baseline target).
//
// All arithmetic is in the accumulation type AT (float, or double for fp64
// activations) with GCC vector extensions; inputs of other dtypes are
// converted into per-thread buffers once per token block, outputs are rounded
// once on store.
#ifndef MOS_VEC_BYTES
#error "define MOS_VEC_BYTES before including kernels_impl.h"
#endif

template <typename AT>
struct VecOf {
  typedef AT type __attribute__((vector_size(MOS_VEC_BYTES)));
  static constexpr int64_t W = MOS_VEC_BYTES / sizeof(AT);
};

template <typename AT>
inline typename VecOf<AT>::type vload(const AT* p) {
  typename VecOf<AT>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename AT>
inline void vstore(AT* p, const typename VecOf<AT>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename AT>
inline AT hsum(const typename VecOf<AT>::type& v) {
  AT s = 0;
  for (int64_t q = 0; q < VecOf<AT>::W; ++q) s += v[q];
  return s;
}

template <typename T, typename AT>
inline void to_acc(AT* dst, const T* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<AT>(src[k]);
}

// bf16 -> fp32 is a 16-bit shift; written out so that it vectorizes.
template <typename AT>
inline void to_acc(AT* dst, const c10::BFloat16* src, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = static_cast<uint32_t>(s[k]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[k] = static_cast<AT>(f);
  }
}

#ifdef MOS_HAVE_F16C
// fp16 -> fp32 with the F16C conversion instruction.
template <typename AT>
inline void to_acc(AT* dst, const c10::Half* src, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t k = 0; k < n; ++k) {
    _Float16 hv;
    std::memcpy(&hv, s + k, sizeof(hv));
    dst[k] = static_cast<AT>(static_cast<float>(hv));
  }
}
#endif

// Pointer to pool row p as AT values: the row itself when the pool is stored
// in AT, else its conversion into buf.
template <typename PT, typename AT>
inline const AT* shard_row(const void* pool, int64_t p, int64_t s, AT* buf) {
  const PT* row = static_cast<const PT*>(pool) + p * s;
  if constexpr (std::is_same<PT, AT>::value) {
    (void)buf;
    return row;
  } else {
    to_acc(buf, row, s);
    return buf;
  }
}

inline bool valid_row(int32_t p, int64_t P) { return p >= 0 && p < P; }

constexpr int64_t kTB = 4;  // tokens per register tile
constexpr int64_t kRB = MOS_RB;  // rank rows per shrink register tile

// out[nn][jj] = <x[nn, 0:s], a[jj][0:s]> for a kTB x kRB tile; x rows xs apart.
template <typename AT>
inline void dot_tile(const AT* x, int64_t xs, const AT* const* a, int64_t s, AT out[kTB][kRB]) {
  using V = typename VecOf<AT>::type;
  constexpr int64_t W = VecOf<AT>::W;
  V acc[kTB][kRB] = {};
  int64_t k = 0;
  for (; k + W <= s; k += W) {
    V av[kRB];
    for (int64_t jj = 0; jj < kRB; ++jj) av[jj] = vload(a[jj] + k);
    for (int64_t nn = 0; nn < kTB; ++nn) {
      const V xv = vload(x + nn * xs + k);
      for (int64_t jj = 0; jj < kRB; ++jj) acc[nn][jj] += xv * av[jj];
    }
  }
  for (int64_t nn = 0; nn < kTB; ++nn) {
    for (int64_t jj = 0; jj < kRB; ++jj) {
      AT sum = hsum<AT>(acc[nn][jj]);
      for (int64_t kk = k; kk < s; ++kk) sum += x[nn * xs + kk] * a[jj][kk];
      out[nn][jj] = sum;
    }
  }
}

// Per-thread scratch of the sgmv kernels, sized for one token block.
template <typename AT>
struct SgmvScratch {
  std::vector<AT> xbuf, abuf, bbuf, vblk, zero;
  std::vector<const AT*> bptr;
  std::vector<int64_t> jlist;
  SgmvScratch(const SgmvArgs& g, bool need_x, bool need_b) {
    const int64_t r = std::max(g.a.r, g.b.r);
    if (need_x) {
      xbuf.assign(kTokBlock * g.a.l * g.a.s, AT(0));
      abuf.assign(kRB * g.a.s, AT(0));
      zero.assign(g.a.s, AT(0));
    }
    if (need_b) {
      bbuf.assign(r * g.b.s, AT(0));
      bptr.assign(r, nullptr);
      jlist.assign(r, 0);
    }
    vblk.assign(kTokBlock * r, AT(0));
  }
};

// vblk[nn * r + j] = v for the item's tokens (rows >= m are zero).
template <typename XT, typename PT, typename AT>
void shrink_block(const SgmvArgs& g, const Item& it, SgmvScratch<AT>& w) {
  const Side& A = g.a;
  const int64_t h = A.l * A.s, r = A.r, m = it.n1 - it.n0;
  const int64_t mp = (m + kTB - 1) / kTB * kTB;
  AT* xbuf = w.xbuf.data();
  AT* vblk = w.vblk.data();
  for (int64_t nn = 0; nn < m; ++nn)
    to_acc(xbuf + nn * h, static_cast<const XT*>(g.x) + (it.n0 + nn) * g.x_stride, h);
  std::fill(xbuf + m * h, xbuf + mp * h, AT(0));
  std::fill(vblk, vblk + kTokBlock * r, AT(0));
  const TenantTable tt = tenant_table(A, it.t);
  const int32_t* tab = tt.tab;
  for (int64_t i = 0; i < A.l; ++i) {
    for (int64_t j0 = 0; j0 < r; j0 += kRB) {
      const AT* rows[kRB];
      bool valid[kRB];
      bool any = false;
      for (int64_t jj = 0; jj < kRB; ++jj) {
        const int64_t j = j0 + jj;
        const int32_t p = j < r ? tab[j * A.l + i] : -1;
        valid[jj] = valid_row(p, tt.P);
        if (valid[jj]) {
          rows[jj] = shard_row<PT, AT>(A.pool, tt.base + p, A.s, w.abuf.data() + jj * A.s);
          any = true;
        } else {
          rows[jj] = w.zero.data();
        }
      }
      if (!any) continue;
      for (int64_t n0 = 0; n0 < mp; n0 += kTB) {
        AT out[kTB][kRB];
        dot_tile<AT>(xbuf + n0 * h + i * A.s, h, rows, A.s, out);
        // A -1 (or, checks off, out-of-range) slot is skipped, not multiplied
        // by a zero shard: Inf/NaN in x never leak through it (the CUDA kernels agree).
        for (int64_t nn = 0; nn < kTB; ++nn)
          for (int64_t jj = 0; jj < kRB && j0 + jj < r; ++jj)
            if (valid[jj]) vblk[(n0 + nn) * r + j0 + jj] += out[nn][jj];
      }
    }
  }
}

// y[item tokens] += vblk @ B_t^T, where vblk already carries scale[t].
template <typename XT, typename PT, typename AT>
void expand_block(const SgmvArgs& g, const Item& it, SgmvScratch<AT>& w) {
  using V = typename VecOf<AT>::type;
  constexpr int64_t W = VecOf<AT>::W;
  const Side& B = g.b;
  const int64_t r = B.r, s = B.s, m = it.n1 - it.n0;
  const int64_t mp = (m + kTB - 1) / kTB * kTB;
  const AT* vblk = w.vblk.data();
  const TenantTable tt = tenant_table(B, it.t);
  const int32_t* tab = tt.tab;
  XT* y = static_cast<XT*>(g.y);
  for (int64_t i = 0; i < B.l; ++i) {
    int64_t nj = 0;
    for (int64_t j = 0; j < r; ++j) {
      const int32_t p = tab[j * B.l + i];
      if (!valid_row(p, tt.P)) continue;
      w.bptr[nj] = shard_row<PT, AT>(B.pool, tt.base + p, s, w.bbuf.data() + j * s);
      w.jlist[nj++] = j;
    }
    if (nj == 0) continue;
    const AT* const* bptr = w.bptr.data();
    const int64_t* jl = w.jlist.data();
    int64_t c = 0;
    for (; c + 2 * W <= s; c += 2 * W) {
      for (int64_t n0 = 0; n0 < mp; n0 += kTB) {
        V acc[kTB][2] = {};
        for (int64_t q = 0; q < nj; ++q) {
          const V b0 = vload(bptr[q] + c), b1 = vload(bptr[q] + c + W);
          const int64_t j = jl[q];
          for (int64_t nn = 0; nn < kTB; ++nn) {
            const AT wv = vblk[(n0 + nn) * r + j];
            acc[nn][0] += wv * b0;
            acc[nn][1] += wv * b1;
          }
        }
        for (int64_t nn = 0; nn < kTB && n0 + nn < m; ++nn) {
          AT tmp[2 * W];
          vstore(tmp, acc[nn][0]);
          vstore(tmp + W, acc[nn][1]);
          XT* yrow = y + (it.n0 + n0 + nn) * g.y_stride + i * s + c;
          for (int64_t q = 0; q < 2 * W; ++q) yrow[q] = static_cast<XT>(static_cast<AT>(yrow[q]) + tmp[q]);
        }
      }
    }
    for (int64_t nn = 0; nn < m && c < s; ++nn) {
      XT* yrow = y + (it.n0 + nn) * g.y_stride + i * s;
      for (int64_t cc = c; cc < s; ++cc) {
        AT sum = 0;
        for (int64_t q = 0; q < nj; ++q) sum += vblk[nn * r + jl[q]] * bptr[q][cc];
        yrow[cc] = static_cast<XT>(static_cast<AT>(yrow[cc]) + sum);
      }
    }
  }
}

template <typename AT>
inline void scale_vblk(AT* vblk, int64_t m, int64_t r, AT sc) {
  for (int64_t k = 0; k < m * r; ++k) vblk[k] *= sc;
}

template <typename XT, typename PT, typename AT>
void shrink_items(const SgmvArgs& g, const Item* items, int64_t b, int64_t e) {
  SgmvScratch<AT> w(g, true, false);
  AT* v = static_cast<AT*>(g.v);
  const int64_t r = g.a.r;
  for (int64_t k = b; k < e; ++k) {
    const Item& it = items[k];
    shrink_block<XT, PT, AT>(g, it, w);
    for (int64_t nn = 0; nn < it.n1 - it.n0; ++nn)
      std::copy(w.vblk.data() + nn * r, w.vblk.data() + (nn + 1) * r, v + (it.n0 + nn) * g.v_stride);
  }
}

template <typename XT, typename PT, typename AT>
void expand_items(const SgmvArgs& g, const Item* items, int64_t b, int64_t e) {
  SgmvScratch<AT> w(g, false, true);
  const AT* v = static_cast<const AT*>(g.v);
  const int64_t r = g.b.r;
  for (int64_t k = b; k < e; ++k) {
    const Item& it = items[k];
    const int64_t m = it.n1 - it.n0;
    const AT sc = static_cast<AT>(g.scale[it.t]);
    std::fill(w.vblk.begin(), w.vblk.end(), AT(0));
    for (int64_t nn = 0; nn < m; ++nn)
      for (int64_t j = 0; j < r; ++j) w.vblk[nn * r + j] = sc * v[(it.n0 + nn) * g.v_stride + j];
    expand_block<XT, PT, AT>(g, it, w);
  }
}

template <typename XT, typename PT, typename AT>
void sgmv_items(const SgmvArgs& g, const Item* items, int64_t b, int64_t e) {
  SgmvScratch<AT> w(g, true, true);
  for (int64_t k = b; k < e; ++k) {
    const Item& it = items[k];
    shrink_block<XT, PT, AT>(g, it, w);
    scale_vblk(w.vblk.data(), it.n1 - it.n0, g.a.r, static_cast<AT>(g.scale[it.t]));
    expand_block<XT, PT, AT>(g, it, w);
  }
}

// Columns [c0, c1) of every touched pool row; every element receives its
// contributions in the fixed order (item, slot i, rank j), each a sequential
// sum over the item's tokens started from zero, whatever the column split
// (c0 is a multiple of the vector width, so the scalar tail columns are fixed).
template <typename XT, typename AT>
void shard_grad_cols(const ShardGradArgs& g, const Item* items, int64_t n_items, int64_t c0, int64_t c1) {
  using V = typename VecOf<AT>::type;
  constexpr int64_t W = VecOf<AT>::W;
  constexpr int64_t JB = 4;  // rank rows per register tile (each x load feeds JB FMAs)
  const Side& S = g.side;
  const int64_t s = S.s, l = S.l, r = S.r, cw = c1 - c0;
  if (cw <= 0 || r == 0) return;
  const int64_t vec_end = std::max(c0, std::min(c1, s / W * W));
  const int64_t rs = (r + JB - 1) / JB * JB;  // wbuf row stride, zero padded
  std::vector<AT> xbuf(kTokBlock * cw), wbuf(kTokBlock * rs, AT(0));
  AT* grad = static_cast<AT*>(g.grad);
  const AT* u = static_cast<const AT*>(g.u);
  const XT* x = static_cast<const XT*>(g.x);
  for (int64_t k = 0; k < n_items; ++k) {
    const Item& it = items[k];
    const int64_t m = it.n1 - it.n0;
    const AT sc = static_cast<AT>(g.scale[it.t]);
    for (int64_t nn = 0; nn < m; ++nn)
      for (int64_t j = 0; j < r; ++j) wbuf[nn * rs + j] = sc * u[(it.n0 + nn) * g.u_stride + j];
    const int32_t* tab = S.idx + static_cast<int64_t>(it.t) * r * l;
    for (int64_t i = 0; i < l; ++i) {
      for (int64_t nn = 0; nn < m; ++nn) to_acc(xbuf.data() + nn * cw, x + (it.n0 + nn) * g.x_stride + i * s + c0, cw);
      for (int64_t j0 = 0; j0 < r; j0 += JB) {
        AT* rows[JB];
        bool any = false;
        for (int64_t jj = 0; jj < JB; ++jj) {
          const int32_t p = j0 + jj < r ? tab[(j0 + jj) * l + i] : -1;
          rows[jj] = valid_row(p, S.P) ? grad + p * s : nullptr;
          any = any || rows[jj] != nullptr;
        }
        if (!any) continue;
        int64_t c = c0;
        for (; c + 2 * W <= vec_end; c += 2 * W) {
          V acc[JB][2] = {};
          for (int64_t nn = 0; nn < m; ++nn) {
            const AT* xr = xbuf.data() + nn * cw + (c - c0);
            const V x0 = vload(xr), x1 = vload(xr + W);
            const AT* wr = wbuf.data() + nn * rs + j0;
            for (int64_t jj = 0; jj < JB; ++jj) {
              acc[jj][0] += wr[jj] * x0;
              acc[jj][1] += wr[jj] * x1;
            }
          }
          for (int64_t jj = 0; jj < JB; ++jj) {
            if (rows[jj] == nullptr) continue;
            vstore(rows[jj] + c, vload(rows[jj] + c) + acc[jj][0]);
            vstore(rows[jj] + c + W, vload(rows[jj] + c + W) + acc[jj][1]);
          }
        }
        for (; c + W <= vec_end; c += W) {
          V acc[JB] = {};
          for (int64_t nn = 0; nn < m; ++nn) {
            const V xv = vload(xbuf.data() + nn * cw + (c - c0));
            for (int64_t jj = 0; jj < JB; ++jj) acc[jj] += wbuf[nn * rs + j0 + jj] * xv;
          }
          for (int64_t jj = 0; jj < JB; ++jj)
            if (rows[jj] != nullptr) vstore(rows[jj] + c, vload(rows[jj] + c) + acc[jj]);
        }
        for (; c < c1; ++c) {
          for (int64_t jj = 0; jj < JB; ++jj) {
            if (rows[jj] == nullptr) continue;
            AT acc = 0;
            for (int64_t nn = 0; nn < m; ++nn) acc += wbuf[nn * rs + j0 + jj] * xbuf[nn * cw + (c - c0)];
            rows[jj][c] += acc;
          }
        }
      }
    }
  }
}

// ---- dtype dispatch ----------------------------------------------------------

template <template <typename, typename, typename> class F, typename... Args>
void dispatch3(DType act, DType pool, Args&&... args) {
  const bool pf = pool == DType::F32;
  switch (act) {
    case DType::F32:
      return F<float, float, float>::run(args...);
    case DType::F64:
      return pf ? F<double, float, double>::run(args...) : F<double, double, double>::run(args...);
    case DType::F16:
      return pf ? F<c10::Half, float, float>::run(args...) : F<c10::Half, c10::Half, float>::run(args...);
    case DType::BF16:
      return pf ? F<c10::BFloat16, float, float>::run(args...)
                : F<c10::BFloat16, c10::BFloat16, float>::run(args...);
  }
}

template <typename XT, typename PT, typename AT>
struct ShrinkF {
  static void run(const SgmvArgs& g, const Item* it, int64_t b, int64_t e) { shrink_items<XT, PT, AT>(g, it, b, e); }
};
template <typename XT, typename PT, typename AT>
struct ExpandF {
  static void run(const SgmvArgs& g, const Item* it, int64_t b, int64_t e) { expand_items<XT, PT, AT>(g, it, b, e); }
};
template <typename XT, typename PT, typename AT>
struct SgmvF {
  static void run(const SgmvArgs& g, const Item* it, int64_t b, int64_t e) { sgmv_items<XT, PT, AT>(g, it, b, e); }
};
template <typename XT, typename PT, typename AT>
struct ShardGradF {
  static void run(const ShardGradArgs& g, const Item* it, int64_t n, int64_t c0, int64_t c1) {
    shard_grad_cols<XT, AT>(g, it, n, c0, c1);
  }
};

void k_shrink(const SgmvArgs& g, const Item* it, int64_t b, int64_t e) {
  dispatch3<ShrinkF>(g.act, g.a.pool_dtype, g, it, b, e);
}
void k_expand(const SgmvArgs& g, const Item* it, int64_t b, int64_t e) {
  dispatch3<ExpandF>(g.act, g.b.pool_dtype, g, it, b, e);
}
void k_sgmv(const SgmvArgs& g, const Item* it, int64_t b, int64_t e) {
  // Mixed pool dtypes (A in fp32, B in the activation dtype or vice versa) go
  // through shrink + expand separately in the caller; here both match.
  dispatch3<SgmvF>(g.act, g.a.pool_dtype, g, it, b, e);
}
void k_shard_grad(const ShardGradArgs& g, const Item* it, int64_t n, int64_t c0, int64_t c1) {
  // The pool dtype does not matter (grad is in the accumulation dtype).
  dispatch3<ShardGradF>(g.act, DType::F32, g, it, n, c0, c1);
}

const KernelTable& make_table() {
  static const KernelTable t{MOS_ISA_NAME, &k_shrink, &k_expand, &k_sgmv, &k_shard_grad, MOS_VEC_BYTES / 4};
  return t;
}
