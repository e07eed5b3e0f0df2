// Internal header of csrc/lora.cpp, included inside a `#pragma GCC target("avx2,fma,f16c")`
// region and a namespace (no include guard on purpose; no system headers here).
//
// V: 8 fp32 lanes in a ymm register (AVX2 + FMA + F16C).

struct V {
  static constexpr int W = 8;
  static constexpr bool kDirectTranspose = false;
  // register blocking (16 ymm registers)
  static constexpr int SH_RB = 4;
  static constexpr int SH_RJ = 2;  // 8 accumulators + 4 x vectors
  // dense linear, <= 16 rows: 12 accumulators + 3 x vectors + 1 weight vector. Measured
  // against the shrink's 4 x 2 (8 accumulators: too few to cover the FMA latency of two
  // pipes), SmolLM2-135M's 121 weights per step at 16 rows, 2 threads: 39-42 vs 56-87 ms;
  // equal at 1-8 rows, where the weight stream bounds both (benchmarks.md, linear).
  static constexpr int LN_RB = 3;
  static constexpr int LN_RJ = 4;
  static constexpr int LN_LANES_NJ = 0;  // no rows-in-lanes linear: slower than the 3 x 4 tile at 4-8 rows
  static constexpr int EX_RB = 4;
  static constexpr int EX_NV = 2;  // 8 accumulators
  using vf = __m256;

  static inline __m256i mask(int n) {
    alignas(32) static const int32_t tbl[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tbl + 8 - n));
  }
  static inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
  static inline vf zero() { return _mm256_setzero_ps(); }
  static inline vf set1(float s) { return _mm256_set1_ps(s); }
  static inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
  static inline float hsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[i] = hsum of the i-th argument
  static inline void hsum4(vf a, vf b, vf c, vf d, float* out) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
  }

  // -- loads (widen to fp32); tails of 16-bit types go through a small zeroed buffer --
  static inline vf load(const float* p) { return _mm256_loadu_ps(p); }
  static inline vf load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static inline __m128i load8(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static inline __m128i load8_n(const void* p, int n) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, static_cast<size_t>(n) * 2);
    return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  static inline vf load(const f16_t* p) { return _mm256_cvtph_ps(load8(p)); }
  static inline vf load_n(const f16_t* p, int n) { return _mm256_cvtph_ps(load8_n(p, n)); }
  static inline vf bf16_widen(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline vf load(const bf16_t* p) { return bf16_widen(load8(p)); }
  static inline vf load_n(const bf16_t* p, int n) { return bf16_widen(load8_n(p, n)); }
  // int8 weights (bsr_linear_w8): sign-extend 8 bytes to int32, convert (exact)
  static inline vf load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline vf load_n(const int8_t* p, int n) {
    alignas(16) int8_t buf[16] = {0};
    std::memcpy(buf, p, static_cast<size_t>(n));
    return load(buf);
  }

  // -- stores (narrow with round to nearest even) --
  static inline void store(float* p, vf a) { _mm256_storeu_ps(p, a); }
  static inline void store_n(float* p, vf a, int n) { _mm256_maskstore_ps(p, mask(n), a); }
  static inline void store8_n(void* p, __m128i h, int n) {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
    std::memcpy(p, buf, static_cast<size_t>(n) * 2);
  }
  static inline __m128i to_f16(vf a) { return _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline void store(f16_t* p, vf a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_f16(a)); }
  static inline void store_n(f16_t* p, vf a, int n) { store8_n(p, to_f16(a), n); }
  static inline __m128i to_bf16(vf a) {
    const __m256i u = _mm256_castps_si256(a);
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    const __m256i res = _mm256_blendv_epi8(rounded, quiet, nan);  // all values <= 0xffff
    const __m256i packed = _mm256_packus_epi32(res, res);          // per 128-bit lane
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  static inline void store(bf16_t* p, vf a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(a)); }
  static inline void store_n(bf16_t* p, vf a, int n) { store8_n(p, to_bf16(a), n); }

  // In-register transpose of an 8 x 8 block.
  static inline void transpose(vf r[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      const __m256 a0 = t[4 * i], a1 = t[4 * i + 1], a2 = t[4 * i + 2], a3 = t[4 * i + 3];
      s[4 * i] = _mm256_shuffle_ps(a0, a2, _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * i + 1] = _mm256_shuffle_ps(a0, a2, _MM_SHUFFLE(3, 2, 3, 2));
      s[4 * i + 2] = _mm256_shuffle_ps(a1, a3, _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * i + 3] = _mm256_shuffle_ps(a1, a3, _MM_SHUFFLE(3, 2, 3, 2));
    }
    // s[4i+c] 128-bit block b = column (4b+c) of rows 4i..4i+3
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);      // blocks 0 -> column c
      r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);  // blocks 1 -> column 4 + c
    }
  }
};
