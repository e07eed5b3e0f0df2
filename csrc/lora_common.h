// Internal header of csrc/lora.cpp: storage types, scalar conversions, and the
// work descriptions ("plans") that the per-ISA kernels consume.
#ifndef BSHAREDRAG_LORA_COMMON_H
#define BSHAREDRAG_LORA_COMMON_H

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bsharedrag.h"

namespace bsr {

// 16-bit storage types: distinct C++ types so kernels can be templated on them.
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
static_assert(sizeof(f16_t) == 2 && sizeof(bf16_t) == 2, "16-bit storage types");

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- IEEE binary16 <-> binary32, portable bit routines ------------------------------
// Exact for every half (normals, subnormals, +-0, +-inf; NaN stays NaN with its payload).
// The SIMD paths use the hardware F16C / AVX-512 conversions, which give identical results;
// these are for the portable path and for tails.
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu)  // inf, or NaN made quiet (as vcvtph2ps does) with its payload
    return f32_from_bits(sign | 0x7f800000u | (mant != 0 ? 0x00400000u : 0u) | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return f32_from_bits(sign);
    // subnormal half: mant * 2^-24, exact in binary32 (a normal float)
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return f32_from_bits(sign | f32_bits(mag));
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest, ties to even; overflow -> inf; NaN -> quiet NaN (payload kept where it fits).
static inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: rounds to inf
  if (ax < 0x38800000u) {
    // result is a half subnormal (or zero): let the FPU round |f| + 0.5 to a multiple of 2^-24
    const float t = f32_from_bits(ax) + 0.5f;
    return static_cast<uint16_t>(sign | (f32_bits(t) - 0x3f000000u));
  }
  const uint32_t odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + odd;  // rebias exponent (127 -> 15) and round to nearest even
  return static_cast<uint16_t>(sign | (ax >> 13));
}

static inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// Round to nearest, ties to even; NaN stays (quiet) NaN.
static inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

template <class T>
struct Scalar;
template <>
struct Scalar<float> {
  static inline float load(const float* p) { return *p; }
  static inline void store(float* p, float v) { *p = v; }
};
template <>
struct Scalar<f16_t> {
  static inline float load(const f16_t* p) { return f16_to_f32(p->bits); }
  static inline void store(f16_t* p, float v) { p->bits = f32_to_f16(v); }
};
template <>
struct Scalar<int8_t> {  // int8 weights (bsr_linear_w8): read only
  static inline float load(const int8_t* p) { return static_cast<float>(*p); }
};
template <>
struct Scalar<bf16_t> {
  static inline float load(const bf16_t* p) { return bf16_to_f32(p->bits); }
  static inline void store(bf16_t* p, float v) { p->bits = f32_to_bf16(v); }
};

// d elements of a row in any storage type, as fp32 (the pooled-embedding and attention kernels)
template <class T>
inline void load_row(const T* src, int64_t d, float* dst) {
  if constexpr (std::is_same<T, float>::value) {
    std::copy(src, src + d, dst);
  } else {
    for (int64_t i = 0; i < d; ++i) dst[i] = Scalar<T>::load(src + i);
  }
}

// ---- work descriptions ------------------------------------------------------------------
// Tiles are numbered adapter by adapter: tile_prefix[a] = first tile of adapter a,
// tile_prefix[L] = total.

struct ShrinkPlan {
  bsr_dtype dtype;
  const void* x;
  int64_t ldx;  // x row stride (elements)
  int64_t K;    // in_features
  const void* a;
  int64_t r;
  const int32_t* sorted_idx;
  const int32_t* counts;
  const int32_t* starts;
  float* v;  // [num_lora, r]
  int64_t L;
  // tiling: a tile = (adapter, block of rb rows, block of jb ranks)
  int64_t rb;
  int64_t jb;
  int64_t njb;
  const int64_t* tile_prefix;
};

struct ExpandPlan {
  bsr_dtype dtype;
  const float* v;  // [num_lora, ldv]: row p's r inputs are v[p * ldv .. + r)
  int64_t r;
  int64_t ldv;
  const void* b;  // [L, N, r]
  int64_t N;      // out_features
  const float* scaling;
  const int32_t* sorted_idx;
  const int32_t* counts;
  const int32_t* starts;
  void* y;
  int64_t ldy;
  int64_t L;
  // tiling: a tile = (adapter, chunk of oc outputs, chunk of rc rows)
  int64_t oc;
  int64_t noc;
  int64_t rc;
  const int64_t* tile_prefix;  // tiles of adapter a = noc * ceil(counts[a] / rc)
  // per-thread transposed-B scratch: r * ldbt floats (ldbt = oc rounded up to 16), 64-byte aligned
  float* scratch;
  int64_t scratch_stride;  // floats per thread
};

// Dense y = x W^T (+ bias), W [N, K] contiguous and streamed once per 128 rows of x; made
// for the few rows of decode steps.
struct LinearPlan {
  bsr_dtype dtype;
  const void* x;
  int64_t ldx;  // x row stride (elements)
  int64_t M;    // rows
  int64_t K;    // in_features
  const void* w;
  int64_t N;          // out_features
  const void* bias;   // [N] or nullptr
  void* y;
  int64_t ldy;
  // fp32 with rows in lanes (linear_lanes): x transposed, xt[k * W + m], zero past M; else nullptr
  const float* xt;
  // bsr_linear_w8: w is int8 and output n is scaled by scale[n] (x, bias, y f32); else nullptr
  const float* scale;
};

// Finds the adapter of tile t (tile_prefix is nondecreasing, L+1 entries).
static inline int64_t tile_adapter(const int64_t* prefix, int64_t L, int64_t t) {
  int64_t lo = 0, hi = L;  // answer in [0, L)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (prefix[mid] <= t) lo = mid; else hi = mid;
  }
  return lo;
}

// The work of shrink tile t: adapter a, sorted rows [p0, p1), ranks [j0, j1).
struct ShrinkTile {
  int64_t a, p0, p1, j0, j1;
};

static inline ShrinkTile shrink_tile_bounds(const ShrinkPlan& P, int64_t t) {
  const int64_t a = tile_adapter(P.tile_prefix, P.L, t);
  const int64_t loc = t - P.tile_prefix[a];
  const int64_t rbi = loc / P.njb, jbi = loc % P.njb;
  const int64_t end = static_cast<int64_t>(P.starts[a]) + P.counts[a];
  const int64_t p0 = P.starts[a] + rbi * P.rb;
  const int64_t j0 = jbi * P.jb;
  return {a, p0, p0 + P.rb < end ? p0 + P.rb : end, j0, j0 + P.jb < P.r ? j0 + P.jb : P.r};
}

}  // namespace bsr

#endif  // BSHAREDRAG_LORA_COMMON_H
