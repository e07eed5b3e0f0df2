// Internal header of csrc/lora.cpp, included inside a `#pragma GCC target("avx512f,...")`
// region and a namespace (no include guard on purpose; no system headers here).
//
// V: 16 fp32 lanes in a zmm register; loads widen f16 (vcvtph2ps) / bf16 (shift) / int8 to fp32,
// stores narrow with round-to-nearest-even.

struct V {
  static constexpr int W = 16;
  static constexpr bool kDirectTranspose = false;
  // register blocking (32 zmm registers)
  static constexpr int SH_RB = 4;  // shrink: rows per micro-tile
  static constexpr int SH_RJ = 4;  // shrink: ranks per micro-tile  (16 accumulators)
  static constexpr int LN_RB = 8;  // dense linear, <= 16 rows (fp32: <= 8): 24 accumulators + 8 x vectors
  static constexpr int LN_RJ = 3;
  static constexpr int LN_LANES_NJ = 24;  // dense linear, 9-16 rows in lanes: 24 accumulators + 4 x vectors
  static constexpr int EX_RB = 4;  // expand: rows per micro-tile
  static constexpr int EX_NV = 4;  // expand: vectors of outputs per micro-tile (16 accumulators)
  using vf = __m512;

  static inline __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
  static inline vf zero() { return _mm512_setzero_ps(); }
  static inline vf set1(float s) { return _mm512_set1_ps(s); }
  static inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
  static inline float hsum(vf a) { return _mm512_reduce_add_ps(a); }
  // out[i] = hsum of the i-th argument: each folded to 8 lanes (fold), then AVX2's hadd tree
  static inline __m256 fold(vf x) { return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1)); }
  static inline void hsum4(vf a, vf b, vf c, vf d, float* out) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
  }

  // -- loads (widen to fp32) --
  static inline vf load(const float* p) { return _mm512_loadu_ps(p); }
  static inline vf load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static inline vf load(const f16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline vf load_n(const f16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p));
  }
  static inline vf bf16_widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline vf load(const bf16_t* p) {
    return bf16_widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline vf load_n(const bf16_t* p, int n) {
    return bf16_widen(_mm256_maskz_loadu_epi16(mask(n), p));
  }
  // int8 weights (bsr_linear_w8): sign-extend 16 bytes to int32, convert (exact)
  static inline vf load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline vf load_n(const int8_t* p, int n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask(n), p)));
  }

  // -- stores (narrow with round to nearest even) --
  static inline void store(float* p, vf a) { _mm512_storeu_ps(p, a); }
  static inline void store_n(float* p, vf a, int n) { _mm512_mask_storeu_ps(p, mask(n), a); }
  static inline __m256i to_f16(vf a) {
    return _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static inline void store(f16_t* p, vf a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_f16(a));
  }
  static inline void store_n(f16_t* p, vf a, int n) { _mm256_mask_storeu_epi16(p, mask(n), to_f16(a)); }
  static inline __m256i to_bf16(vf a) {
    const __m512i u = _mm512_castps_si512(a);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i res = _mm512_mask_or_epi32(rounded, nan, hi, _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(res);
  }
  static inline void store(bf16_t* p, vf a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(a));
  }
  static inline void store_n(bf16_t* p, vf a, int n) { _mm256_mask_storeu_epi16(p, mask(n), to_bf16(a)); }

  // In-register transpose of a W x W block: r[i] lane k  ->  r[k] lane i.
  static inline void transpose(vf r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // t[2i]   lanes per 128-bit block b: r[2i][4b], r[2i+1][4b], r[2i][4b+1], r[2i+1][4b+1]
    // t[2i+1] lanes per block b:         r[2i][4b+2], r[2i+1][4b+2], r[2i][4b+3], r[2i+1][4b+3]
    for (int i = 0; i < 4; ++i) {
      const __m512 a0 = t[4 * i], a1 = t[4 * i + 1], a2 = t[4 * i + 2], a3 = t[4 * i + 3];
      r[4 * i] = _mm512_shuffle_ps(a0, a2, _MM_SHUFFLE(1, 0, 1, 0));      // column 4b
      r[4 * i + 1] = _mm512_shuffle_ps(a0, a2, _MM_SHUFFLE(3, 2, 3, 2));  // column 4b+1
      r[4 * i + 2] = _mm512_shuffle_ps(a1, a3, _MM_SHUFFLE(1, 0, 1, 0));  // column 4b+2
      r[4 * i + 3] = _mm512_shuffle_ps(a1, a3, _MM_SHUFFLE(3, 2, 3, 2));  // column 4b+3
    }
    // r[4i+c] block b = column (4b+c) of rows 4i..4i+3
    for (int c = 0; c < 4; ++c) {
      // combine row groups (0,1) and (2,3): blocks of columns
      const __m512 g0 = r[c], g1 = r[4 + c], g2 = r[8 + c], g3 = r[12 + c];
      const __m512 lo01 = _mm512_shuffle_f32x4(g0, g1, 0x88);  // g0.b0 g0.b2 g1.b0 g1.b2
      const __m512 hi01 = _mm512_shuffle_f32x4(g0, g1, 0xdd);  // g0.b1 g0.b3 g1.b1 g1.b3
      const __m512 lo23 = _mm512_shuffle_f32x4(g2, g3, 0x88);
      const __m512 hi23 = _mm512_shuffle_f32x4(g2, g3, 0xdd);
      t[c] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);       // g0.b0 g1.b0 g2.b0 g3.b0 -> column c
      t[8 + c] = _mm512_shuffle_f32x4(lo01, lo23, 0xdd);   // b2 -> column 8 + c
      t[4 + c] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);   // b1 -> column 4 + c
      t[12 + c] = _mm512_shuffle_f32x4(hi01, hi23, 0xdd);  // b3 -> column 12 + c
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
};
