// Internal header of csrc/lora.cpp: the shrink / expand kernels and the dense linear that
// computes the base output they add into, written once against a
// SIMD abstraction `V` (lora_simd_{generic,avx2,avx512}.h) and included once per ISA, each
// time inside its own namespace and `#pragma GCC target` region. No include guard on purpose;
// no system headers here (lora.cpp includes them first).
//
// Numerics: every (row, rank) dot product of the shrink is accumulated lane-wise in fp32
// over k and reduced at the end, in an order that does not depend on the tiling or on the
// number of threads, so results are deterministic for a given ISA. Expand accumulates
// sum_j v[j] * B[o, j] in fp32 and then does y = fma(s, acc, y) once, rounded once into
// y's dtype. The dense linear reuses the shrink's micro-kernel (so its dot products are
// summed the same way), adds the bias in fp32 and rounds once. f64 accumulates in f64.

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------
// shrink
// ---------------------------------------------------------------------------------------

// NR rows x NJ ranks of v, dot products of length K; A rows j are at A + j * K.
// With PF, the dense linear's W blocks stream from memory while we compute: the rows two
// blocks ahead (A + 2 NJ K) are prefetched into L2, spread over the `npass` passes (row
// blocks) made over this block, pass `phase` taking every npass-th column step, so DRAM
// reads overlap the passes that run from cache (measured best of 1-2 blocks, L1/L2).
// TW: A's type, T unless the dense linear multiplies int8 weights (bsr_linear_w8), whose
// blocks are prefetched once per 64-byte line.
template <class T, int NR, int NJ, bool PF = false, class TW = T>
BSR_ALWAYS_INLINE void shrink_micro(const T* const* xr, const TW* A, int64_t K, float* const* vo, int npass = 1,
                                    int phase = 0) {
  typename V::vf acc[NR][NJ];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j] = V::zero();
  int64_t k = 0;
  int turn = phase;
  for (; k + V::W <= K; k += V::W) {
    if constexpr (PF) {
      if (sizeof(TW) != 1 || (k & 63) == 0) {
        if (turn == 0) {
          for (int j = 0; j < NJ; ++j) V::prefetch_l2(A + (2 * NJ + j) * K + k);
        }
        if (++turn == npass) turn = 0;
      }
    }
    typename V::vf xv[NR];
    for (int i = 0; i < NR; ++i) xv[i] = V::load(xr[i] + k);
    for (int j = 0; j < NJ; ++j) {
      const typename V::vf av = V::load(A + j * K + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = V::fma(xv[i], av, acc[i][j]);
    }
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    typename V::vf xv[NR];
    for (int i = 0; i < NR; ++i) xv[i] = V::load_n(xr[i] + k, n);
    for (int j = 0; j < NJ; ++j) {
      const typename V::vf av = V::load_n(A + j * K + k, n);
      for (int i = 0; i < NR; ++i) acc[i][j] = V::fma(xv[i], av, acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NJ; ++j) vo[i][j] = V::hsum(acc[i][j]);
}

// A tile of nr <= NR rows x nj <= NJ rows of A: the shrink_micro instance of exactly that
// shape (shared by the shrink and the dense linear).
template <class T, int NR, int NJ, bool PF = false, class TW = T>
static inline void micro_tile(int nr, int nj, const T* const* xr, const TW* A, int64_t K, float* const* vo,
                              int npass = 1, int phase = 0) {
  if constexpr (NR > 1) {
    if (nr < NR) {
      micro_tile<T, NR - 1, NJ, PF, TW>(nr, nj, xr, A, K, vo, npass, phase);
      return;
    }
  }
  if constexpr (NJ > 1) {
    if (nj < NJ) {
      micro_tile<T, NR, NJ - 1, PF, TW>(nr, nj, xr, A, K, vo, npass, phase);
      return;
    }
  }
  shrink_micro<T, NR, NJ, PF, TW>(xr, A, K, vo, npass, phase);
}

template <class T>
static void shrink_tile(const ShrinkPlan& P, int64_t t) {
  const auto [a, p0, p1, j0, j1] = shrink_tile_bounds(P, t);
  const T* x = static_cast<const T*>(P.x);
  const T* A = static_cast<const T*>(P.a) + a * P.r * P.K;
  for (int64_t p = p0; p < p1; p += V::SH_RB) {
    const int nr = static_cast<int>(imin(V::SH_RB, p1 - p));
    const T* xr[V::SH_RB];
    float* vr[V::SH_RB];
    for (int i = 0; i < nr; ++i) {
      xr[i] = x + static_cast<int64_t>(P.sorted_idx[p + i]) * P.ldx;
      vr[i] = P.v + (p + i) * P.r;
    }
    float* vo[V::SH_RB];
    for (int64_t j = j0; j < j1; j += V::SH_RJ) {
      for (int i = 0; i < nr; ++i) vo[i] = vr[i] + j;
      micro_tile<T, V::SH_RB, V::SH_RJ>(nr, static_cast<int>(imin(V::SH_RJ, j1 - j)), xr, A + j * P.K, P.K, vo);
    }
  }
}

static void shrink_tile_f64(const ShrinkPlan& P, int64_t t) {
  const auto [a, p0, p1, j0, j1] = shrink_tile_bounds(P, t);
  const int64_t K = P.K;
  const double* A = static_cast<const double*>(P.a) + a * P.r * K;
  for (int64_t p = p0; p < p1; ++p) {
    const double* xr = static_cast<const double*>(P.x) + static_cast<int64_t>(P.sorted_idx[p]) * P.ldx;
    for (int64_t j = j0; j < j1; ++j) {
      const double* ar = A + j * K;
      double acc = 0.0;
BSR_OMP_SIMD_SUM_ACC
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * ar[k];
      P.v[p * P.r + j] = static_cast<float>(acc);
    }
  }
}

static void shrink_range(const ShrinkPlan& P, int64_t t0, int64_t t1) {
  switch (P.dtype) {
    case BSR_DTYPE_F32:
      for (int64_t t = t0; t < t1; ++t) shrink_tile<float>(P, t);
      break;
    case BSR_DTYPE_F16:
      for (int64_t t = t0; t < t1; ++t) shrink_tile<f16_t>(P, t);
      break;
    case BSR_DTYPE_BF16:
      for (int64_t t = t0; t < t1; ++t) shrink_tile<bf16_t>(P, t);
      break;
    case BSR_DTYPE_F64:
      for (int64_t t = t0; t < t1; ++t) shrink_tile_f64(P, t);
      break;
  }
}

// ---------------------------------------------------------------------------------------
// expand
// ---------------------------------------------------------------------------------------

// bt[j * ldbt + oo] = B[o0 + oo, j] for j < r, oo < on; zero for on <= oo < ldbt (ldbt = on
// rounded up to W). B rows have r elements. Done by W x W in-register transposes.
// One W x W block: dst[k * ldd + i] = src[i * r + k].
template <class T>
BSR_NOINLINE void transpose_block_full(const T* src, int64_t r, float* dst, int64_t ldd) {
  typename V::vf blk[V::W];
  for (int i = 0; i < V::W; ++i) blk[i] = V::load(src + i * r);
  V::transpose(blk);
  for (int k = 0; k < V::W; ++k) V::store(dst + k * ldd, blk[k]);
}

// Partial block (rows < W or cols < W): zero-filled rows, only `cols` rows of dst written.
template <class T>
BSR_NOINLINE void transpose_block_part(const T* src, int64_t r, int rows, int cols, float* dst, int64_t ldd) {
  typename V::vf blk[V::W];
  for (int i = 0; i < V::W; ++i) blk[i] = i < rows ? V::load_n(src + i * r, cols) : V::zero();
  V::transpose(blk);
  for (int k = 0; k < cols; ++k) V::store(dst + k * ldd, blk[k]);
}

template <class T>
static void transpose_b(const T* B, int64_t r, int64_t o0, int64_t on, float* bt, int64_t ldbt) {
  if constexpr (V::kDirectTranspose) {
    for (int64_t oo = 0; oo < on; ++oo) {
      const T* brow = B + (o0 + oo) * r;
      for (int64_t j = 0; j < r; ++j) bt[j * ldbt + oo] = Scalar<T>::load(brow + j);
    }
    for (int64_t j = 0; j < r; ++j)
      for (int64_t oo = on; oo < ldbt; ++oo) bt[j * ldbt + oo] = 0.f;
    return;
  }
  for (int64_t oo = 0; oo < ldbt; oo += V::W) {
    const int64_t rows = imin(V::W, on - oo);
    const T* brow = B + (o0 + oo) * r;
    for (int64_t j = 0; j < r; j += V::W) {
      const int64_t nj = imin(V::W, r - j);
      if (rows == V::W && nj == V::W) {
        transpose_block_full<T>(brow + j, r, bt + j * ldbt + oo, ldbt);
      } else {
        transpose_block_part<T>(brow + j, r, static_cast<int>(rows), static_cast<int>(nj), bt + j * ldbt + oo,
                                ldbt);
      }
    }
  }
}

// NR rows x NVV vectors of outputs starting at column o of the chunk; with MASK the last
// vector holds only `nlast` valid lanes. Accumulators stay in registers (NR * NVV of them).
template <class T, int NR, int NVV, bool MASK>
BSR_ALWAYS_INLINE void expand_micro(const float* bt, int64_t ldbt, int64_t r, const float* const* vr,
                                    typename V::vf s, T* const* yr, int64_t o, int nlast) {
  const float* vp[NR];
  T* yp[NR];
  for (int i = 0; i < NR; ++i) {
    vp[i] = vr[i];
    yp[i] = yr[i] + o;
  }
  typename V::vf acc[NR][NVV];
  const float* bcol = bt + o;
  {
    typename V::vf b[NVV];
    for (int u = 0; u < NVV; ++u) b[u] = V::load(bcol + u * V::W);
    for (int i = 0; i < NR; ++i) {
      const typename V::vf vs = V::set1(vp[i][0]);
      for (int u = 0; u < NVV; ++u) acc[i][u] = V::mul(vs, b[u]);
    }
  }
  for (int64_t j = 1; j < r; ++j) {
    typename V::vf b[NVV];
    for (int u = 0; u < NVV; ++u) b[u] = V::load(bcol + j * ldbt + u * V::W);
    for (int i = 0; i < NR; ++i) {
      const typename V::vf vs = V::set1(vp[i][j]);
      for (int u = 0; u < NVV; ++u) acc[i][u] = V::fma(vs, b[u], acc[i][u]);
    }
  }
  for (int i = 0; i < NR; ++i) {
    for (int u = 0; u < NVV; ++u) {
      T* q = yp[i] + u * V::W;
      if (MASK && u == NVV - 1) {
        V::store_n(q, V::fma(s, acc[i][u], V::load_n(q, nlast)), nlast);
      } else {
        V::store(q, V::fma(s, acc[i][u], V::load(q)));
      }
    }
  }
}

template <class T, int NR>
BSR_ALWAYS_INLINE void expand_rows(const float* bt, int64_t ldbt, int64_t r, int64_t on,
                                   const float* const* vr, typename V::vf s, T* const* yr) {
  constexpr int BLK = V::EX_NV * V::W;
  int64_t o = 0;
  for (; o + BLK <= on; o += BLK) expand_micro<T, NR, V::EX_NV, false>(bt, ldbt, r, vr, s, yr, o, V::W);
  for (; o + V::W <= on; o += V::W) expand_micro<T, NR, 1, false>(bt, ldbt, r, vr, s, yr, o, V::W);
  if (o < on) expand_micro<T, NR, 1, true>(bt, ldbt, r, vr, s, yr, o, static_cast<int>(on - o));
}

template <class T, int NR>
static inline void expand_rows_nr(int nr, const float* bt, int64_t ldbt, int64_t r, int64_t on,
                                  const float* const* vr, typename V::vf s, T* const* yr) {
  if constexpr (NR > 1) {
    if (nr < NR) {
      expand_rows_nr<T, NR - 1>(nr, bt, ldbt, r, on, vr, s, yr);
      return;
    }
  }
  expand_rows<T, NR>(bt, ldbt, r, on, vr, s, yr);
}

// Tiles are (adapter, output chunk, row chunk), row chunk fastest; a thread that runs
// consecutive tiles of one (adapter, chunk) transposes that chunk of B only once.
template <class T>
static void expand_range_t(const ExpandPlan& P, int64_t t0, int64_t t1, float* bt) {
  int64_t cached_a = -1, cached_c = -1;
  const T* Ball = static_cast<const T*>(P.b);
  T* y = static_cast<T*>(P.y);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t a = tile_adapter(P.tile_prefix, P.L, t);
    const int64_t loc = t - P.tile_prefix[a];
    const int64_t nrc = (P.counts[a] + P.rc - 1) / P.rc;
    const int64_t ci = loc / nrc, ri = loc % nrc;
    const int64_t o0 = ci * P.oc;
    const int64_t on = imin(P.oc, P.N - o0);
    const int64_t ldbt = (on + V::W - 1) / V::W * V::W;
    if (a != cached_a || ci != cached_c) {
      transpose_b<T>(Ball + a * P.N * P.r, P.r, o0, on, bt, ldbt);
      cached_a = a;
      cached_c = ci;
    }
    const typename V::vf s = V::set1(P.scaling[a]);
    const int64_t end = static_cast<int64_t>(P.starts[a]) + P.counts[a];
    const int64_t p0 = P.starts[a] + ri * P.rc;
    const int64_t p1 = imin(p0 + P.rc, end);
    for (int64_t p = p0; p < p1; p += V::EX_RB) {
      const int nr = static_cast<int>(imin(V::EX_RB, p1 - p));
      const float* vr[V::EX_RB];
      T* yr[V::EX_RB];
      for (int i = 0; i < nr; ++i) {
        vr[i] = P.v + (p + i) * P.ldv;
        yr[i] = y + static_cast<int64_t>(P.sorted_idx[p + i]) * P.ldy + o0;
      }
      expand_rows_nr<T, V::EX_RB>(nr, bt, ldbt, P.r, on, vr, s, yr);
    }
  }
}

static void expand_range_f64(const ExpandPlan& P, int64_t t0, int64_t t1) {
  const int64_t r = P.r;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t a = tile_adapter(P.tile_prefix, P.L, t);
    const int64_t loc = t - P.tile_prefix[a];
    const int64_t nrc = (P.counts[a] + P.rc - 1) / P.rc;
    const int64_t ci = loc / nrc, ri = loc % nrc;
    const int64_t o0 = ci * P.oc;
    const int64_t on = imin(P.oc, P.N - o0);
    const double* B = static_cast<const double*>(P.b) + (a * P.N + o0) * r;
    const double s = static_cast<double>(P.scaling[a]);
    const int64_t end = static_cast<int64_t>(P.starts[a]) + P.counts[a];
    const int64_t p0 = P.starts[a] + ri * P.rc;
    const int64_t p1 = imin(p0 + P.rc, end);
    for (int64_t p = p0; p < p1; ++p) {
      const float* vr = P.v + p * P.ldv;
      double* yr = static_cast<double*>(P.y) + static_cast<int64_t>(P.sorted_idx[p]) * P.ldy + o0;
      for (int64_t o = 0; o < on; ++o) {
        const double* br = B + o * r;
        double acc = 0.0;
BSR_OMP_SIMD_SUM_ACC
        for (int64_t j = 0; j < r; ++j) acc += static_cast<double>(vr[j]) * br[j];
        yr[o] += s * acc;
      }
    }
  }
}

static void expand_range(const ExpandPlan& P, int64_t t0, int64_t t1, float* bt) {
  switch (P.dtype) {
    case BSR_DTYPE_F32:
      expand_range_t<float>(P, t0, t1, bt);
      break;
    case BSR_DTYPE_F16:
      expand_range_t<f16_t>(P, t0, t1, bt);
      break;
    case BSR_DTYPE_BF16:
      expand_range_t<bf16_t>(P, t0, t1, bt);
      break;
    case BSR_DTYPE_F64:
      expand_range_f64(P, t0, t1);
      break;
  }
}

// ---------------------------------------------------------------------------------------
// linear (dense; made for the few rows of decode steps)
// ---------------------------------------------------------------------------------------

// Outputs [n0, n1) of every row, in tiles of RB rows x RJ weight rows. Each block of RJ
// weight rows is read from memory once and reused from L1/L2 by every block of RB rows of
// x (which stays in L2), so a decode step costs one pass over the weights however many
// rows it has, up to the compute bound. BLAS gemm packs W first, which doubles the memory
// traffic at these shapes.
static constexpr int64_t kLinearRowChunk = 128;  // rows of x per pass over W: its micro-tiles stay in L2

// TW = int8_t: bsr_linear_w8 (T float), each output's dot product times its scale, then + bias.
template <class T, int RB, int RJ, class TW = T>
static void linear_range_t(const LinearPlan& P, int64_t n0, int64_t n1) {
  const T* x = static_cast<const T*>(P.x);
  const TW* w = static_cast<const TW*>(P.w);
  const T* bias = static_cast<const T*>(P.bias);
  T* y = static_cast<T*>(P.y);
  for (int64_t m0 = 0; m0 < P.M; m0 += kLinearRowChunk) {
    const int64_t m1 = imin(P.M, m0 + kLinearRowChunk);
    const int npass = static_cast<int>((m1 - m0 + RB - 1) / RB);
    for (int64_t n = n0; n < n1; n += RJ) {
      const int nj = static_cast<int>(imin(RJ, n1 - n));
      const TW* wb = w + n * P.K;
      const bool fetch = nj == RJ && n + 3 * RJ <= P.N;  // a block two ahead to prefetch
      float b[RJ], sc[RJ];
      for (int j = 0; j < nj; ++j) {
        b[j] = bias != nullptr ? Scalar<T>::load(bias + n + j) : 0.f;
        sc[j] = std::is_same<TW, int8_t>::value ? P.scale[n + j] : 1.f;
      }
      for (int64_t m = m0; m < m1; m += RB) {
        const int nr = static_cast<int>(imin(RB, m1 - m));
        const int phase = static_cast<int>((m - m0) / RB);
        const T* xr[RB];
        float tile[RB][RJ];
        float* vo[RB];
        for (int i = 0; i < nr; ++i) {
          xr[i] = x + (m + i) * P.ldx;
          vo[i] = tile[i];
        }
        if (fetch) {
          micro_tile<T, RB, RJ, true, TW>(nr, nj, xr, wb, P.K, vo, npass, phase);
        } else {
          micro_tile<T, RB, RJ, false, TW>(nr, nj, xr, wb, P.K, vo, npass, phase);
        }
        for (int i = 0; i < nr; ++i) {
          T* yr = y + (m + i) * P.ldy + n;
          if constexpr (std::is_same<TW, int8_t>::value) {
            for (int jj = 0; jj < nj; ++jj) Scalar<T>::store(yr + jj, tile[i][jj] * sc[jj] + b[jj]);
          } else {
            for (int jj = 0; jj < nj; ++jj) Scalar<T>::store(yr + jj, tile[i][jj] + b[jj]);
          }
        }
      }
    }
  }
}

// Up to kLinearFewRows rows (decode steps) take the ISA's wide tile (LN_RB rows), so the
// weight stream is consumed in one or two passes, overlapping the arithmetic of more rows
// (fp32 past LN_RB rows takes linear_lanes below where the ISA has it).
static constexpr int64_t kLinearFewRows = 16;

template <class T, class TW = T>
static void linear_range_any(const LinearPlan& P, int64_t n0, int64_t n1) {
  if (P.M <= kLinearFewRows) {
    linear_range_t<T, V::LN_RB, V::LN_RJ, TW>(P, n0, n1);
  } else {
    linear_range_t<T, V::SH_RB, V::SH_RJ, TW>(P, n0, n1);
  }
}

// Rows in lanes (fp32, 1 < M <= W): lane m of acc[j] is output (m, n + j), and each
// weight W[n + j, k] is broadcast once to all M rows: acc[j] += xt[k] * W[n + j, k], with
// xt = x transposed and zero-padded to W lanes (LinearPlan::xt). The dot-product tile above
// reloads x for every weight row and ends each tile with horizontal sums; this one issues one
// FMA (with its broadcast load) per weight and no reduction, so a 16-row decode step on
// AVX-512 makes one pass over W at the FMA rate instead of two (docs/benchmarks.md, linear:
// 31.0 -> 21.8 ms for SmolLM2-135M's projections). Each output sums its products in k order.
template <int NJ>
BSR_ALWAYS_INLINE void lanes_micro(const float* xt, const float* w, int64_t K, const float* pf, float* tile) {
  typename V::vf acc[NJ];
  for (int j = 0; j < NJ; ++j) acc[j] = V::zero();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    if (pf != nullptr) {
      // the next block of NJ weight rows (NJ K floats) into L2, spread evenly over this one's k
      for (int i = 0; i < (NJ + 3) / 4; ++i) V::prefetch_l2(pf + (k / 4 * ((NJ + 3) / 4) + i) * 16);
    }
    const typename V::vf x0 = V::load(xt + k * V::W), x1 = V::load(xt + (k + 1) * V::W);
    const typename V::vf x2 = V::load(xt + (k + 2) * V::W), x3 = V::load(xt + (k + 3) * V::W);
BSR_UNROLL
    for (int j = 0; j < NJ; ++j) {
      const float* wj = w + j * K + k;
      acc[j] = V::fma(x0, V::set1(wj[0]), acc[j]);
      acc[j] = V::fma(x1, V::set1(wj[1]), acc[j]);
      acc[j] = V::fma(x2, V::set1(wj[2]), acc[j]);
      acc[j] = V::fma(x3, V::set1(wj[3]), acc[j]);
    }
  }
  for (; k < K; ++k) {
    const typename V::vf xv = V::load(xt + k * V::W);
    for (int j = 0; j < NJ; ++j) acc[j] = V::fma(xv, V::set1(w[j * K + k]), acc[j]);
  }
  for (int j = 0; j < NJ; ++j) V::store(tile + j * V::W, acc[j]);
}

template <int NJ>
static inline void lanes_tile(int nj, const float* xt, const float* w, int64_t K, const float* pf, float* tile) {
  if constexpr (NJ > 1) {
    if (nj < NJ) {
      lanes_tile<NJ - 1>(nj, xt, w, K, pf, tile);
      return;
    }
  }
  lanes_micro<NJ>(xt, w, K, pf, tile);
}

template <int NJ>
static void linear_lanes(const LinearPlan& P, int64_t n0, int64_t n1) {
  const float* w = static_cast<const float*>(P.w);
  const float* bias = static_cast<const float*>(P.bias);
  float* y = static_cast<float*>(P.y);
  alignas(64) float tile[NJ * V::W];
  for (int64_t n = n0; n < n1; n += NJ) {
    const int nj = static_cast<int>(imin(NJ, n1 - n));
    const float* pf = n + 2 * NJ <= n1 ? w + (n + NJ) * P.K : nullptr;
    lanes_tile<NJ>(nj, P.xt, w + n * P.K, P.K, pf, tile);
    for (int64_t m = 0; m < P.M; ++m) {
      float* yr = y + m * P.ldy + n;
      for (int j = 0; j < nj; ++j) yr[j] = tile[j * V::W + m] + (bias != nullptr ? bias[n + j] : 0.f);
    }
  }
}

static void linear_range_f64(const LinearPlan& P, int64_t n0, int64_t n1) {
  const double* x = static_cast<const double*>(P.x);
  const double* w = static_cast<const double*>(P.w);
  const double* bias = static_cast<const double*>(P.bias);
  double* y = static_cast<double*>(P.y);
  for (int64_t n = n0; n < n1; ++n) {
    const double* wr = w + n * P.K;
    for (int64_t m = 0; m < P.M; ++m) {
      const double* xr = x + m * P.ldx;
      double acc = 0.0;
BSR_OMP_SIMD_SUM_ACC
      for (int64_t k = 0; k < P.K; ++k) acc += xr[k] * wr[k];
      y[m * P.ldy + n] = acc + (bias != nullptr ? bias[n] : 0.0);
    }
  }
}

static void linear_range(const LinearPlan& P, int64_t n0, int64_t n1) {
  if (P.scale != nullptr) {  // bsr_linear_w8: f32 rows, int8 weights, the dot-product tile at every row count
    linear_range_any<float, int8_t>(P, n0, n1);
    return;
  }
  switch (P.dtype) {
    case BSR_DTYPE_F32:
      if constexpr (V::LN_LANES_NJ > 0) {
        if (P.xt != nullptr) {
          linear_lanes<V::LN_LANES_NJ>(P, n0, n1);
          break;
        }
      }
      linear_range_any<float>(P, n0, n1);
      break;
    case BSR_DTYPE_F16:
      linear_range_any<f16_t>(P, n0, n1);
      break;
    case BSR_DTYPE_BF16:
      linear_range_any<bf16_t>(P, n0, n1);
      break;
    case BSR_DTYPE_F64:
      linear_range_f64(P, n0, n1);
      break;
  }
}
