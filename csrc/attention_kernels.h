// Internal header of csrc/attention.cpp, included once per ISA inside a namespace (and a
// `#pragma GCC target` region) after that ISA's vector type V (lora_simd_*.h). No include
// guard on purpose. The score and output blocks are written with V's intrinsics: left to
// the auto-vectorizer they came out as 128-bit shuffles and stack spills, 6x slower.

#include "simd_math.h"  // exp_nonpos

constexpr int64_t kW = V::W;
constexpr int64_t kR = 2 * kW;  // query rows (scores) / value columns (output) per register block
constexpr int64_t kKeys = 4;    // keys per score block
constexpr int64_t kRows = 4;    // query rows per output block

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread scratch (floats), sized for the largest tile seen.
struct Scratch {
  std::vector<float> buf;
  float *q, *acc, *s, *m, *l, *mref, *alpha, *k, *v;
  void size(int64_t Mp, int64_t dp) {
    const size_t need = static_cast<size_t>(2 * Mp * dp + kChunk * Mp + 4 * Mp + 2 * kChunk * dp);
    if (buf.size() < need) buf.assign(need, 0.f);
    q = buf.data();                   // [Mp, dp] (dot path) or transposed [d, Mp], pre-scaled
    acc = q + Mp * dp;                // [Mp, dp] weighted values
    s = acc + Mp * dp;                // [kChunk, Mp] scores, then probabilities
    m = s + kChunk * Mp;              // [Mp] running max
    l = m + Mp;                       // [Mp] running sum
    mref = l + Mp;                    // [Mp] the max exp() subtracts (0 for rows that see nothing)
    alpha = mref + Mp;                // [Mp] rescale of what was summed before this chunk
    k = alpha + Mp;                   // [kChunk, dp] key rows, fp32, zero-padded to dp
    v = k + kChunk * dp;              // [kChunk, dp] value rows, the same
  }
};

// q . k over dp (a multiple of kR) zero-padded columns.
static inline float dot(const float* a, const float* b, int64_t dp) {
  typename V::vf s0 = V::zero(), s1 = V::zero();
  for (int64_t c = 0; c < dp; c += kR) {
    s0 = V::fma(V::load(a + c), V::load(b + c), s0);
    s1 = V::fma(V::load(a + c + kW), V::load(b + c + kW), s1);
  }
  return V::hsum(s0) + V::hsum(s1);
}

// Scores s[j, r] = q_r . k_j for j < nk (a multiple of kKeys), queries transposed [d, Mp]
// (Mp a multiple of kR), key rows dp apart: kKeys x 2 vector accumulators.
static inline void scores_transposed(const float* qt, int64_t Mp, const float* k, int64_t d, int64_t dp, int64_t nk,
                                     float* s) {
  for (int64_t r0 = 0; r0 < Mp; r0 += kR)
    for (int64_t j0 = 0; j0 < nk; j0 += kKeys) {
      typename V::vf a[kKeys][2];
      for (int64_t jj = 0; jj < kKeys; ++jj) a[jj][0] = a[jj][1] = V::zero();
      const float* kr = k + j0 * dp;
      for (int64_t c = 0; c < d; ++c) {
        const typename V::vf q0 = V::load(qt + c * Mp + r0), q1 = V::load(qt + c * Mp + r0 + kW);
        for (int64_t jj = 0; jj < kKeys; ++jj) {
          const typename V::vf kv = V::set1(kr[jj * dp + c]);
          a[jj][0] = V::fma(q0, kv, a[jj][0]);
          a[jj][1] = V::fma(q1, kv, a[jj][1]);
        }
      }
      for (int64_t jj = 0; jj < kKeys; ++jj) {
        V::store(s + (j0 + jj) * Mp + r0, a[jj][0]);
        V::store(s + (j0 + jj) * Mp + r0 + kW, a[jj][1]);
      }
    }
}

// acc[r, :] += sum_j p[j, r] v[j, :] for r < Mp (a multiple of kRows), columns dp (a
// multiple of kR): kRows x 2 vector accumulators over all nk keys.
static inline void weighted_values(const float* p, int64_t Mp, const float* v, int64_t dp, int64_t nk, float* acc) {
  for (int64_t r0 = 0; r0 < Mp; r0 += kRows)
    for (int64_t c0 = 0; c0 < dp; c0 += kR) {
      typename V::vf o[kRows][2];
      for (int64_t rr = 0; rr < kRows; ++rr) {
        o[rr][0] = V::load(acc + (r0 + rr) * dp + c0);
        o[rr][1] = V::load(acc + (r0 + rr) * dp + c0 + kW);
      }
      for (int64_t j = 0; j < nk; ++j) {
        const typename V::vf v0 = V::load(v + j * dp + c0), v1 = V::load(v + j * dp + c0 + kW);
        for (int64_t rr = 0; rr < kRows; ++rr) {
          const typename V::vf pj = V::set1(p[j * Mp + r0 + rr]);
          o[rr][0] = V::fma(pj, v0, o[rr][0]);
          o[rr][1] = V::fma(pj, v1, o[rr][1]);
        }
      }
      for (int64_t rr = 0; rr < kRows; ++rr) {
        V::store(acc + (r0 + rr) * dp + c0, o[rr][0]);
        V::store(acc + (r0 + rr) * dp + c0 + kW, o[rr][1]);
      }
    }
}

// s[r] = exp(s[r] - mref[r]), summed into l[r] (restrict: the scratch arrays never overlap).
static inline void probabilities(float* __restrict s, const float* __restrict mref, float* __restrict l, int64_t n) {
#pragma omp simd
  for (int64_t r = 0; r < n; ++r) {
    const float p = exp_nonpos(s[r] - mref[r]);
    s[r] = p;
    l[r] += p;
  }
}

// One tile of sequence t.b on KV head g. Query vector r = (position t.i0 + r / G, head g * G + r % G).
template <class T>
void attend_tile(const AttentionArgs& A, const AttentionTile& t, int64_t g, Scratch& S) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t d = A.head_dim, G = A.num_heads / A.num_kv_heads, dp = round_up(d, kR);
  const int64_t n_new = A.cu_seqlens_q[t.b + 1] - A.cu_seqlens_q[t.b];
  const int64_t past = A.context_lens[t.b] - n_new;  // keys cached before this step's rows
  const int64_t M = (t.i1 - t.i0) * G;
  const bool transposed = M > kW / 2;  // few query vectors (decode): one dot product per score
  const int64_t Mp = round_up(M, transposed ? kR : kRows);
  S.size(Mp, dp);
  const T* q = static_cast<const T*>(A.q) + (A.cu_seqlens_q[t.b] + t.i0) * A.q_row_stride + g * G * A.q_head_stride;
  for (int64_t r = 0; r < M; ++r) {
    float* row = S.k;  // free until the keys are loaded
    load_row(q + (r / G) * A.q_row_stride + (r % G) * A.q_head_stride, d, row);
    for (int64_t c = 0; c < dp; ++c) {
      const float x = c < d ? row[c] * A.scale : 0.f;
      if (transposed && c < d) S.q[c * Mp + r] = x;
      else if (!transposed) S.q[r * dp + c] = x;
    }
  }
  if (transposed)  // padding query rows score 0 (then masked below)
    for (int64_t c = 0; c < d; ++c) std::fill(S.q + c * Mp + M, S.q + (c + 1) * Mp, 0.f);
  std::fill(S.acc, S.acc + Mp * dp, 0.f);
  std::fill(S.m, S.m + Mp, kNegInf);
  std::fill(S.l, S.l + Mp, 0.f);
  // position p = past + i sees keys k with k <= p and (no window or p - k < window)
  const int64_t p_lo = past + t.i0, p_hi = past + t.i1 - 1;
  const int64_t k_lo = A.window > 0 ? std::max<int64_t>(0, p_lo - A.window + 1) : 0;
  const int32_t* table = A.block_tables + t.b * A.table_stride;
  auto row_ptr = [&](const void* cache, int64_t token_stride, int64_t pos) {
    const int64_t blk = table[pos / A.block_size];
    return static_cast<const T*>(cache) + (blk * A.block_size + pos % A.block_size) * token_stride + g * d;
  };
  for (int64_t k0 = k_lo; k0 <= p_hi; k0 += kChunk) {
    const int64_t nk = std::min(kChunk, p_hi + 1 - k0);
    for (int64_t j = 0; j < nk; ++j) {  // fp32 rows, zero-padded to dp (the buffer moves with Mp)
      load_row(row_ptr(A.k_cache, A.k_token_stride, k0 + j), d, S.k + j * dp);
      load_row(row_ptr(A.v_cache, A.v_token_stride, k0 + j), d, S.v + j * dp);
      std::fill(S.k + j * dp + d, S.k + (j + 1) * dp, 0.f);
      std::fill(S.v + j * dp + d, S.v + (j + 1) * dp, 0.f);
    }
    if (transposed) {
      scores_transposed(S.q, Mp, S.k, d, dp, round_up(nk, kKeys), S.s);
    } else {
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t r = 0; r < M; ++r) S.s[j * Mp + r] = dot(S.q + r * dp, S.k + j * dp, dp);
    }
    // mask what a row may not see (padding rows see nothing); only chunks at the diagonal or the window edge
    const bool masked = k0 + nk - 1 > p_lo || (A.window > 0 && p_hi - k0 >= A.window);
    for (int64_t j = 0; j < nk; ++j) {
      float* sj = S.s + j * Mp;
      std::fill(sj + M, sj + Mp, kNegInf);
      const int64_t kpos = k0 + j;
      for (int64_t i = 0; masked && i < t.i1 - t.i0; ++i) {
        const int64_t p = p_lo + i;
        if (kpos > p || (A.window > 0 && p - kpos >= A.window)) std::fill(sj + i * G, sj + (i + 1) * G, kNegInf);
      }
    }
    // online softmax, every loop over the rows: new running max, rescale, probabilities
    std::copy(S.m, S.m + Mp, S.mref);
    for (int64_t j = 0; j < nk; ++j) {
      const float* sj = S.s + j * Mp;
#pragma omp simd
      for (int64_t r = 0; r < Mp; ++r) S.mref[r] = sj[r] > S.mref[r] ? sj[r] : S.mref[r];
    }
#pragma omp simd
    for (int64_t r = 0; r < Mp; ++r) {
      const float mx = S.mref[r];
      S.mref[r] = mx == kNegInf ? 0.f : mx;  // a row that sees nothing yet gets zeros below
      S.alpha[r] = exp_nonpos(S.m[r] - S.mref[r]);
      S.m[r] = mx;
      S.l[r] *= S.alpha[r];
    }
    for (int64_t r = 0; r < M; ++r) {
      if (S.alpha[r] == 1.f) continue;
      float* a = S.acc + r * dp;
#pragma omp simd
      for (int64_t c = 0; c < dp; ++c) a[c] *= S.alpha[r];
    }
    for (int64_t j = 0; j < nk; ++j) probabilities(S.s + j * Mp, S.mref, S.l, Mp);
    weighted_values(S.s, Mp, S.v, dp, nk, S.acc);
  }
  T* out = static_cast<T*>(A.out) + (A.cu_seqlens_q[t.b] + t.i0) * A.out_row_stride + g * G * A.out_head_stride;
  for (int64_t r = 0; r < M; ++r) {
    const float inv = 1.f / S.l[r];  // every query sees at least its own key: l > 0
    T* o = out + (r / G) * A.out_row_stride + (r % G) * A.out_head_stride;
    for (int64_t c = 0; c < d; ++c) Scalar<T>::store(o + c, S.acc[r * dp + c] * inv);
  }
}

// A vector of row p's columns [c, c + W), zeros past its d columns.
template <class T>
static inline typename V::vf load_cols(const T* p, int64_t c, int64_t d) {
  return c + kW <= d ? V::load(p + c) : c < d ? V::load_n(p + c, static_cast<int>(d - c)) : V::zero();
}

// Cache rows attend_one asks for ahead of use: a head's slice of each token (strided, a new
// block every block_size tokens), cold when read (a step's weights have streamed through the
// caches since): 1.88 -> 1.47 ms of smollm2-135m's decode step at 150-280 keys (2-vCPU EPYC).
constexpr int64_t kAhead = 8;

static inline void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) V::prefetch_l2(static_cast<const char*>(p) + o);
}

// Per-thread scratch of attend_one (floats and row pointers), growth-only.
struct OneScratch {
  std::vector<float> buf;
  std::vector<const void*> rows;
  float *q, *acc, *m, *l, *s;
  const void **krows, **vrows;
  void size(int64_t G, int64_t dp, int64_t n) {
    const int64_t Gp = round_up(G, kRows);
    const size_t need = static_cast<size_t>(G * dp + Gp * dp + 2 * G + G * n);
    if (buf.size() < need) buf.resize(need);
    if (rows.size() < static_cast<size_t>(2 * n)) rows.resize(2 * n);
    q = buf.data();       // [G, dp] queries, pre-scaled, zero-padded
    acc = q + G * dp;     // [Gp, dp] weighted values (rows past G: scratch of the last output block)
    m = acc + Gp * dp;    // [G] the max scores
    l = m + G;            // [G] the softmax sums, sum_j exp(s_j - m)
    s = l + G;            // [G, n] scores, then probabilities
    krows = rows.data();  // [n] the keys' cache rows
    vrows = krows + n;    // [n] the values'
  }
};

// Where a decode row's output goes: out (normalized), or with its keys split into parts, one
// part's partial result, per head [m, l, acc[dp]] (see merge_parts).
constexpr int64_t partial_stride(int64_t dp) { return dp + 2; }

// One query position (a decode row) of sequence t.b on KV head g: its G heads against every
// key it sees, read in place from the cache (V::load widens 16-bit rows; no copies). All n
// scores are kept, so the softmax is exact in two passes with no running rescale; dot products
// go 4 keys at a time into one hsum4. The tiled kernel above, built for many query vectors,
// spends most of a decode row's time on per-chunk copies, masks and 4-row softmax loops:
// this is 4x faster at 16 rows of 170 keys (smollm2's 9 / 3 heads). With parts > 1 it sees
// only part `part` of the keys (a contiguous share) and writes that part's partial result,
// [G, partial_stride(dp)], to `partial` for merge_parts.
template <class T>
void attend_one(const AttentionArgs& A, const AttentionTile& t, int64_t g, OneScratch& S, int64_t part = 0,
                int64_t parts = 1, float* partial = nullptr) {
  const int64_t d = A.head_dim, G = A.num_heads / A.num_kv_heads, dp = round_up(d, kR);
  const int64_t n_new = A.cu_seqlens_q[t.b + 1] - A.cu_seqlens_q[t.b];
  const int64_t pos = A.context_lens[t.b] - n_new + t.i0;  // the query's position: keys [k_first, pos]
  const int64_t k_first = A.window > 0 ? std::max<int64_t>(0, pos - A.window + 1) : 0, n_all = pos + 1 - k_first;
  const int64_t k_lo = k_first + n_all * part / parts, n = k_first + n_all * (part + 1) / parts - k_lo;
  if (n == 0) {  // (a part of none of the keys, when there are fewer than parts: merge_parts skips it)
    for (int64_t r = 0; r < G; ++r) partial[r * partial_stride(dp) + 1] = 0.f;
    return;
  }
  S.size(G, dp, n);
  const T* q = static_cast<const T*>(A.q) + (A.cu_seqlens_q[t.b] + t.i0) * A.q_row_stride + g * G * A.q_head_stride;
  for (int64_t r = 0; r < G; ++r) {
    float* qr = S.q + r * dp;
    load_row(q + r * A.q_head_stride, d, qr);
    for (int64_t c = 0; c < dp; ++c) qr[c] = c < d ? qr[c] * A.scale : 0.f;
  }
  const int32_t* table = A.block_tables + t.b * A.table_stride;
  for (int64_t j = 0, bi = k_lo / A.block_size, off = k_lo % A.block_size; j < n; ++j) {  // (one division)
    const int64_t slot = table[bi] * A.block_size + off;
    S.krows[j] = static_cast<const T*>(A.k_cache) + slot * A.k_token_stride + g * d;
    S.vrows[j] = static_cast<const T*>(A.v_cache) + slot * A.v_token_stride + g * d;
    if (++off == A.block_size) off = 0, ++bi;
  }
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j < std::min(n, kAhead); ++j) prefetch_row(S.krows[j], row_bytes);
  for (int64_t j0 = 0; j0 < n; j0 += 4) {  // scores s[r, j] = q_r . k_j
    for (int64_t j = j0 + kAhead; j < std::min(n, j0 + kAhead + 4); ++j) prefetch_row(S.krows[j], row_bytes);
    for (int64_t j = j0; j < std::min(n, j0 + 4); ++j) prefetch_row(S.vrows[j], row_bytes);  // in L2 for every pass
    const T* k[4];
    for (int64_t jj = 0; jj < 4; ++jj) k[jj] = static_cast<const T*>(S.krows[std::min(j0 + jj, n - 1)]);
    for (int64_t r = 0; r < G; ++r) {
      const float* qr = S.q + r * dp;
      typename V::vf a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
      for (int64_t c = 0; c < d; c += kW) {
        const typename V::vf qv = V::load(qr + c);
        a0 = V::fma(qv, load_cols(k[0], c, d), a0);
        a1 = V::fma(qv, load_cols(k[1], c, d), a1);
        a2 = V::fma(qv, load_cols(k[2], c, d), a2);
        a3 = V::fma(qv, load_cols(k[3], c, d), a3);
      }
      float sums[4];
      V::hsum4(a0, a1, a2, a3, sums);
      for (int64_t jj = 0; jj < 4 && j0 + jj < n; ++jj) S.s[r * n + j0 + jj] = sums[jj];
    }
  }
  for (int64_t r = 0; r < G; ++r) {
    float* __restrict s = S.s + r * n;
    float mx = s[0], sum = 0.f;
    for (int64_t j = 1; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = exp_nonpos(s[j] - mx);
      sum += s[j];
    }
    S.m[r] = mx;
    S.l[r] = sum;  // >= 1: the max key gives exp(0)
  }
  for (int64_t r0 = 0; r0 < G; r0 += kRows) {  // acc[r, :] = sum_j p[r, j] v_j, kRows x 2 vectors at a time
    const float* p[kRows];  // (rows past G repeat the last: their sums land in acc's scratch rows)
    for (int64_t rr = 0; rr < kRows; ++rr) p[rr] = S.s + std::min(r0 + rr, G - 1) * n;
    for (int64_t c0 = 0; c0 < d; c0 += kR) {
      typename V::vf o[kRows][2];
      for (int64_t rr = 0; rr < kRows; ++rr) o[rr][0] = o[rr][1] = V::zero();
      for (int64_t j = 0; j < n; ++j) {
        const T* v = static_cast<const T*>(S.vrows[j]);
        const typename V::vf v0 = load_cols(v, c0, d), v1 = load_cols(v, c0 + kW, d);
        for (int64_t rr = 0; rr < kRows; ++rr) {
          const typename V::vf pj = V::set1(p[rr][j]);
          o[rr][0] = V::fma(pj, v0, o[rr][0]);
          o[rr][1] = V::fma(pj, v1, o[rr][1]);
        }
      }
      for (int64_t rr = 0; rr < kRows; ++rr) {  // a fixed count keeps o in registers
        V::store(S.acc + (r0 + rr) * dp + c0, o[rr][0]);
        V::store(S.acc + (r0 + rr) * dp + c0 + kW, o[rr][1]);
      }
    }
  }
  if (partial != nullptr) {
    for (int64_t r = 0; r < G; ++r) {
      float* pr = partial + r * partial_stride(dp);
      pr[0] = S.m[r];
      pr[1] = S.l[r];
      std::copy(S.acc + r * dp, S.acc + (r + 1) * dp, pr + 2);
    }
    return;
  }
  T* out = static_cast<T*>(A.out) + (A.cu_seqlens_q[t.b] + t.i0) * A.out_row_stride + g * G * A.out_head_stride;
  for (int64_t r = 0; r < G; ++r) {
    T* o = out + r * A.out_head_stride;
    const float inv = 1.f / S.l[r];
    for (int64_t c = 0; c < d; ++c) Scalar<T>::store(o + c, S.acc[r * dp + c] * inv);
  }
}

// A decode row's output from the partial results of its `parts` key parts (flash-decoding's
// merge): out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p, M the largest m_p.
template <class T>
void merge_parts(const AttentionArgs& A, const AttentionTile& t, int64_t g, const float* partials, int64_t parts,
                 OneScratch& S) {
  const int64_t d = A.head_dim, G = A.num_heads / A.num_kv_heads, dp = round_up(d, kR), ps = partial_stride(dp);
  S.size(G, dp, 1);
  T* out = static_cast<T*>(A.out) + (A.cu_seqlens_q[t.b] + t.i0) * A.out_row_stride + g * G * A.out_head_stride;
  for (int64_t r = 0; r < G; ++r) {
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t p = 0; p < parts; ++p) {
      const float* pr = partials + (p * G + r) * ps;
      if (pr[1] > 0.f) mx = std::max(mx, pr[0]);
    }
    float* acc = S.acc;
    std::fill(acc, acc + dp, 0.f);
    for (int64_t p = 0; p < parts; ++p) {
      const float* pr = partials + (p * G + r) * ps;
      if (pr[1] == 0.f) continue;  // an empty part
      const float w = exp_nonpos(pr[0] - mx);
      sum += w * pr[1];
#pragma omp simd
      for (int64_t c = 0; c < dp; ++c) acc[c] += w * pr[2 + c];
    }
    T* o = out + r * A.out_head_stride;
    const float inv = 1.f / sum;  // >= 1: the part holding the max gives e^0 times its l >= 1
    for (int64_t c = 0; c < d; ++c) Scalar<T>::store(o + c, acc[c] * inv);
  }
}

// Work items are (tile, KV head); with parts > 1 (decode rows only, see attend_all) each
// item's keys are split into parts, attended separately and merged.
template <class T>
void attend_items(const AttentionArgs& A, const std::vector<AttentionTile>& tiles, int nt, int64_t parts) {
  const int64_t KV = A.num_kv_heads, items = static_cast<int64_t>(tiles.size()) * KV, units = items * parts;
  const int64_t pstride = A.num_heads / KV * partial_stride(round_up(A.head_dim, kR));
  std::vector<float> partials(parts > 1 ? units * pstride : 0);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
    Scratch S;
    OneScratch S1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t u = units - 1; u >= 0; --u) {  // the last tiles of a sequence see the most keys: first
      const int64_t w = u / parts;
      const AttentionTile& t = tiles[w / KV];
      if (parts > 1) attend_one<T>(A, t, w % KV, S1, u % parts, parts, partials.data() + u * pstride);
      else if (t.i1 - t.i0 == 1) attend_one<T>(A, t, w % KV, S1);
      else attend_tile<T>(A, t, w % KV, S);
    }
    if (parts > 1) {  // (after the loop's barrier: every part is written)
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t w = 0; w < items; ++w)
        merge_parts<T>(A, tiles[w / KV], w % KV, partials.data() + w * parts * pstride, parts, S1);
    }
  }
}

static void attend(const AttentionArgs& A, bsr_dtype dtype, const std::vector<AttentionTile>& tiles, int nt,
                   int64_t parts) {
  if (dtype == BSR_DTYPE_F32) attend_items<float>(A, tiles, nt, parts);
  else if (dtype == BSR_DTYPE_F16) attend_items<f16_t>(A, tiles, nt, parts);
  else attend_items<bf16_t>(A, tiles, nt, parts);
}
