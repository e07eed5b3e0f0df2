// Internal header of csrc/lora.cpp, included inside a namespace (no include guard on purpose;
// no system headers here). Portable "vector" of 4 fp32 lanes: a GCC/Clang vector extension
// (one SSE2 register on baseline x86-64, one NEON register on aarch64), or plain loops.

struct V {
  static constexpr int W = 4;
  // transpose_b copies element by element instead of through W x W register blocks
  static constexpr bool kDirectTranspose = true;
  static constexpr int SH_RB = 4;  // 8 accumulators + 4 x vectors (16 SSE registers)
  static constexpr int SH_RJ = 2;
  static constexpr int LN_RB = 4;  // dense linear: as shrink
  static constexpr int LN_RJ = 2;
  static constexpr int LN_LANES_NJ = 0;  // no rows-in-lanes linear (4 lanes)
  static constexpr int EX_RB = 4;
  static constexpr int EX_NV = 2;
#if defined(__GNUC__)
  // GCC/Clang vector extension, element access with [] as for an array.
  typedef float vf __attribute__((vector_size(16)));
#define BSR_VL(v, i) (v)[i]
#else
  struct vf {
    float l[4];
  };
#define BSR_VL(v, i) (v).l[i]
#endif

  static inline void prefetch_l2(const void* p) {
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 2);
#else
    (void)p;
#endif
  }
  static inline vf zero() { return vf{0.f, 0.f, 0.f, 0.f}; }
  static inline vf set1(float s) { return vf{s, s, s, s}; }  // a broadcast, not 4 inserts
#if defined(__GNUC__)
  static inline vf fma(vf a, vf b, vf c) { return a * b + c; }
  static inline vf mul(vf a, vf b) { return a * b; }
#else
  static inline vf fma(vf a, vf b, vf c) {
    vf r;
    for (int i = 0; i < W; ++i) r.l[i] = a.l[i] * b.l[i] + c.l[i];
    return r;
  }
  static inline vf mul(vf a, vf b) {
    vf r;
    for (int i = 0; i < W; ++i) r.l[i] = a.l[i] * b.l[i];
    return r;
  }
#endif
  static inline float hsum(vf a) {
    // fixed pairwise order
    return (BSR_VL(a, 0) + BSR_VL(a, 2)) + (BSR_VL(a, 1) + BSR_VL(a, 3));
  }
  static inline void hsum4(vf a, vf b, vf c, vf d, float* out) {
    out[0] = hsum(a), out[1] = hsum(b), out[2] = hsum(c), out[3] = hsum(d);
  }

#if defined(__GNUC__)
  typedef uint16_t vh __attribute__((vector_size(8)));
  typedef uint32_t vu __attribute__((vector_size(16)));
  static inline vf from_bits(vu u) {
    vf r;
    std::memcpy(&r, &u, sizeof r);
    return r;
  }
  static inline vu to_bits(vf f) {
    vu u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  }
  static inline vu widen16(const void* p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vu);
  }
  static inline vf load(const float* p) {
    vf r;
    std::memcpy(&r, p, sizeof r);
    return r;
  }
  static inline vf load(const bf16_t* p) { return from_bits(widen16(p) << 16); }
  static inline vf load(const int8_t* p) {  // int8 weights (bsr_linear_w8)
    typedef int8_t vb __attribute__((vector_size(4)));
    vb b;
    std::memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vf);
  }
  static inline vf load(const f16_t* p) {
    // branch-free binary16 -> binary32: shift exponent+mantissa into place and rescale by
    // 2^112 (exact for normals and subnormals); inf / NaN get the all-ones exponent, NaN quiet.
    const vu h = widen16(p);
    const vu em = h & 0x7fffu;
    const vu sign = (h & 0x8000u) << 16;
    const vu finite = to_bits(from_bits(em << 13) * 0x1p112f);
    const vu is_nan = (vu)(em > 0x7c00u);  // comparisons give all-ones / zero lanes
    const vu is_special = (vu)(em >= 0x7c00u);
    const vu special = 0x7f800000u | (em << 13) | (is_nan & 0x00400000u);
    return from_bits(sign | (special & is_special) | (finite & ~is_special));
  }
#else
  template <class T>
  static inline vf load(const T* p) {
    vf r;
    for (int i = 0; i < W; ++i) BSR_VL(r, i) = Scalar<T>::load(p + i);
    return r;
  }
#endif
  template <class T>
  static inline vf load_n(const T* p, int n) {
    vf r;
    for (int i = 0; i < W; ++i) BSR_VL(r, i) = i < n ? Scalar<T>::load(p + i) : 0.f;
    return r;
  }
  template <class T>
  static inline void store(T* p, vf a) {
#if defined(__GNUC__)
    if constexpr (sizeof(T) == sizeof(float)) {
      std::memcpy(p, &a, sizeof a);
      return;
    }
#endif
    for (int i = 0; i < W; ++i) Scalar<T>::store(p + i, BSR_VL(a, i));
  }
  template <class T>
  static inline void store_n(T* p, vf a, int n) {
    for (int i = 0; i < n; ++i) Scalar<T>::store(p + i, BSR_VL(a, i));
  }
  static inline void transpose(vf r[4]) {
    for (int i = 0; i < W; ++i)
      for (int k = i + 1; k < W; ++k) {
        const float t = BSR_VL(r[i], k);
        BSR_VL(r[i], k) = BSR_VL(r[k], i);
        BSR_VL(r[k], i) = t;
      }
  }
};
#undef BSR_VL
