// bsharedrag C ABI: CPU multi-LoRA kernels (see include/bsharedrag.h).
//
// Layout of this file:
//   - the kernels (lora_kernels.h) are compiled three times, for a portable baseline, for
//     AVX2+FMA+F16C and for AVX-512 (F/BW/VL/DQ), each in its own namespace under
//     `#pragma GCC target` (per_isa.h, shared with attention.cpp); the best one the CPU
//     supports is picked once at first use (override with BSHAREDRAG_ISA=generic|avx2|avx512,
//     for testing);
//   - planning (tiling + cost-balanced split over OpenMP threads), argument validation,
//     thread-local error messages and the extern "C" entry points.
// No exception ever crosses the C ABI; no allocation happens inside a parallel region.

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bsharedrag.h"
#include "lora_common.h"
#include "runtime.h"

#if defined(__GNUC__)
#define BSR_ALWAYS_INLINE static inline __attribute__((always_inline))
#define BSR_NOINLINE static __attribute__((noinline))
#else
#define BSR_ALWAYS_INLINE static inline
#define BSR_NOINLINE static
#endif

// Fully unrolls the loop that follows, so an array of accumulators indexed by its counter
// stays in registers (GCC's own heuristics stop short of the 24 x 4 body of linear_lanes).
#if defined(__clang__)
#define BSR_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define BSR_UNROLL _Pragma("GCC unroll 64")
#else
#define BSR_UNROLL
#endif

// `#pragma omp simd reduction(+:acc)` when OpenMP is on (lets fp reductions vectorize
// without -ffast-math); nothing otherwise.
#if defined(_OPENMP) && _OPENMP >= 201307  // OpenMP 4.0 (simd); MSVC's 2.0 has none
#define BSR_OMP_SIMD_SUM_ACC _Pragma("omp simd reduction(+ : acc)")
#else
#define BSR_OMP_SIMD_SUM_ACC
#endif

namespace bsr {

// ---------------------------------------------------------------------------------------
// kernels, once per ISA
// ---------------------------------------------------------------------------------------
#define BSR_PER_ISA_KERNELS "lora_kernels.h"
#define BSR_PER_ISA_NS(isa) isa_##isa
#include "per_isa.h"

struct Isa {
  const char* name;
  int W;
  int sh_rb, sh_rj, ex_rb;
  void (*shrink)(const ShrinkPlan&, int64_t, int64_t);
  void (*expand)(const ExpandPlan&, int64_t, int64_t, float*);
  void (*linear)(const LinearPlan&, int64_t, int64_t);
  int64_t lanes_min_rows;  // fp32 linear from this many rows up to W: rows in lanes (0: never)
};

#define BSR_ISA_ENTRY(ns, nm)                                                                  \
  Isa {                                                                                      \
    nm, ns::V::W, ns::V::SH_RB, ns::V::SH_RJ, ns::V::EX_RB, &ns::shrink_range, &ns::expand_range, \
        &ns::linear_range, ns::V::LN_LANES_NJ > 0 ? ns::V::LN_RB + 1 : 0                       \
  }

static const Isa kGeneric = BSR_ISA_ENTRY(isa_generic, "generic");
#if BSR_X86_DISPATCH
static const Isa kAvx2 = BSR_ISA_ENTRY(isa_avx2, "avx2");
static const Isa kAvx512 = BSR_ISA_ENTRY(isa_avx512, "avx512");
#endif

static const Isa* detect_isa() {
  const Isa* best = &kGeneric;
#if BSR_X86_DISPATCH
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  if (has_avx512) best = &kAvx512;
  else if (has_avx2) best = &kAvx2;
  // Testing override: only ever lowers the level.
  const char* env = std::getenv("BSHAREDRAG_ISA");
  if (env != nullptr) {
    if (std::strcmp(env, "generic") == 0) best = &kGeneric;
    else if (std::strcmp(env, "avx2") == 0 && has_avx2) best = &kAvx2;
  }
#endif
  return best;
}

static const Isa& isa() {
  static const Isa* chosen = detect_isa();
  return *chosen;
}

const char* active_isa_name() { return isa().name; }

// ---------------------------------------------------------------------------------------
// errors, threads, scratch
// ---------------------------------------------------------------------------------------
static thread_local char tl_error[512] = "";

void clear_error() { tl_error[0] = '\0'; }

bsr_status fail(bsr_status st, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(tl_error, sizeof(tl_error), fmt, ap);
  va_end(ap);
  return st;
}

static std::atomic<int> g_num_threads{0};

int num_threads() {
  const int n = g_num_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Growth-only per-calling-thread scratch, so steady-state calls do not allocate.
struct Scratch {
  std::vector<int64_t> tile_prefix;
  std::vector<int64_t> cost_prefix;
  std::vector<float> bt;
  std::vector<float> v;
  std::vector<float> xt;
  std::vector<int32_t> sorted_idx, counts, starts;
};
static thread_local Scratch tl_scratch;

template <class Vec>
static void grow(Vec& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// Below this much work (multiply-adds) a call runs on the calling thread: fork/join, and
// for expand the second thread's share of transposing B, cost more than they save there.
static constexpr int64_t kShrinkParallelMinWork = 1 << 17;
static constexpr int64_t kExpandParallelMinWork = 1 << 20;

// Runs body(tid, t0, t1) over tiles [0, ntiles) split into contiguous, cost-balanced ranges.
template <class Body>
static void run_tiles(int64_t ntiles, const int64_t* cost_prefix, int nt, Body&& body) {
  if (ntiles <= 0) return;
#ifdef _OPENMP
  if (nt > 1 && ntiles > 1) {
    if (nt > ntiles) nt = static_cast<int>(ntiles);
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      const int n = omp_get_num_threads();
      const int64_t total = cost_prefix[ntiles];
      auto bound = [&](int k) -> int64_t {
        if (k <= 0) return 0;
        if (k >= n) return ntiles;
        const int64_t target = (total * k) / n;
        return std::lower_bound(cost_prefix, cost_prefix + ntiles + 1, target) - cost_prefix;
      };
      const int64_t t0 = bound(tid), t1 = bound(tid + 1);
      if (t0 < t1) body(tid, t0, t1);
    }
    return;
  }
#else
  (void)cost_prefix;
  (void)nt;
#endif
  body(0, 0, ntiles);
}

// ---------------------------------------------------------------------------------------
// validation helpers
// ---------------------------------------------------------------------------------------
static bool dtype_ok(int d) {
  return d == BSR_DTYPE_F32 || d == BSR_DTYPE_F16 || d == BSR_DTYPE_BF16 || d == BSR_DTYPE_F64;
}

// counts / starts: counts[a] >= 0, starts[a] >= 0. Returns the number of rows of v
// (max over adapters of starts + counts) in *vrows and the sum of counts in *total.
static bsr_status check_groups(const char* fn, const int32_t* counts, const int32_t* starts, int64_t L,
                               int64_t* total, int64_t* vrows) {
  int64_t t = 0, m = 0;
  for (int64_t a = 0; a < L; ++a) {
    if (counts[a] < 0)
      return fail(BSR_ERR_INVALID_ARGUMENT, "%s: counts[%lld] must be >= 0, got %d", fn,
                  static_cast<long long>(a), counts[a]);
    if (starts[a] < 0)
      return fail(BSR_ERR_INVALID_ARGUMENT, "%s: starts[%lld] must be >= 0, got %d", fn,
                  static_cast<long long>(a), starts[a]);
    t += counts[a];
    if (counts[a] > 0) m = std::max<int64_t>(m, static_cast<int64_t>(starts[a]) + counts[a]);
  }
  *total = t;
  *vrows = m;
  return BSR_OK;
}

// ---------------------------------------------------------------------------------------
// planning + execution (arguments already validated)
// ---------------------------------------------------------------------------------------
static void do_shrink(Scratch& S, bsr_dtype dtype, const void* x, int64_t ldx, int64_t K, const void* a,
                      int64_t L, int64_t r, const int32_t* sorted_idx, const int32_t* counts,
                      const int32_t* starts, float* v, int64_t total) {
  const Isa& I = isa();
  const int64_t work = total * r * K;
  const int nt = work >= kShrinkParallelMinWork ? num_threads() : 1;
  const int64_t rb = I.sh_rb;
  int64_t total_rb = 0;
  for (int64_t i = 0; i < L; ++i) total_rb += (counts[i] + rb - 1) / rb;
  // split the ranks too when there are too few row blocks to feed every thread
  int64_t njb = 1;
  if (nt > 1 && total_rb < 2 * nt) {
    const int64_t max_jb = (r + I.sh_rj - 1) / I.sh_rj;
    njb = std::min<int64_t>(max_jb, (2 * nt + total_rb - 1) / total_rb);
  }
  int64_t jb = (r + njb - 1) / njb;
  jb = (jb + I.sh_rj - 1) / I.sh_rj * I.sh_rj;
  njb = (r + jb - 1) / jb;

  grow(S.tile_prefix, static_cast<size_t>(L + 1));
  int64_t* prefix = S.tile_prefix.data();
  prefix[0] = 0;
  for (int64_t i = 0; i < L; ++i) prefix[i + 1] = prefix[i] + (counts[i] + rb - 1) / rb * njb;
  const int64_t ntiles = prefix[L];

  ShrinkPlan P;
  P.dtype = dtype;
  P.x = x;
  P.ldx = ldx;
  P.K = K;
  P.a = a;
  P.r = r;
  P.sorted_idx = sorted_idx;
  P.counts = counts;
  P.starts = starts;
  P.v = v;
  P.L = L;
  P.rb = rb;
  P.jb = jb;
  P.njb = njb;
  P.tile_prefix = prefix;

  if (nt <= 1) {
    I.shrink(P, 0, ntiles);
    return;
  }
  grow(S.cost_prefix, static_cast<size_t>(ntiles + 1));
  int64_t* cost = S.cost_prefix.data();
  cost[0] = 0;
  int64_t t = 0;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t nrb = (counts[i] + rb - 1) / rb;
    for (int64_t b = 0; b < nrb; ++b) {
      const int64_t rows = std::min<int64_t>(rb, counts[i] - b * rb);
      for (int64_t j = 0; j < njb; ++j) {
        const int64_t nj = std::min<int64_t>(jb, r - j * jb);
        cost[t + 1] = cost[t] + rows * nj + 1;
        ++t;
      }
    }
  }
  run_tiles(ntiles, cost, nt, [&](int, int64_t t0, int64_t t1) { I.shrink(P, t0, t1); });
}

static bsr_status do_expand(Scratch& S, bsr_dtype dtype, const float* v, int64_t r, int64_t ldv, const void* b,
                            int64_t L, int64_t N, const float* scaling, const int32_t* sorted_idx,
                            const int32_t* counts, const int32_t* starts, void* y, int64_t ldy,
                            int64_t total) {
  const Isa& I = isa();
  const int64_t rc = 16;  // rows per tile (a multiple of every ISA's EX_RB)
  int64_t active = 0, total_rc = 0;
  for (int64_t i = 0; i < L; ++i) {
    if (counts[i] > 0) ++active;
    total_rc += (counts[i] + rc - 1) / rc;
  }
  if (active == 0) return BSR_OK;
  // multiply-adds plus the transpose of each active B (about as costly as 4 rows)
  const int64_t work = (total + 4 * active) * r * N;
  const int nt = work >= kExpandParallelMinWork ? num_threads() : 1;
  // output chunk: keep the transposed chunk of B (r x oc fp32) within ~16 KiB of L1
  int64_t oc = 512;
  while (oc > 64 && r * oc * 4 > 16384) oc /= 2;
  // enough tiles to balance the threads
  while (nt > 1 && oc > 64 && total_rc * ((N + oc - 1) / oc) < 4 * nt) oc /= 2;
  if (oc > N) oc = (N + I.W - 1) / I.W * I.W;
  const int64_t noc = (N + oc - 1) / oc;
  const int64_t ldbt = (oc + 15) / 16 * 16;
  const int64_t per_thread = (r * ldbt + 15) / 16 * 16;  // floats, keeps 64-byte alignment

  grow(S.tile_prefix, static_cast<size_t>(L + 1));
  int64_t* prefix = S.tile_prefix.data();
  prefix[0] = 0;
  for (int64_t i = 0; i < L; ++i) prefix[i + 1] = prefix[i] + noc * ((counts[i] + rc - 1) / rc);
  const int64_t ntiles = prefix[L];

  const int nthreads = std::max(1, static_cast<int>(std::min<int64_t>(nt, ntiles)));
  grow(S.bt, static_cast<size_t>(per_thread * nthreads + 16));
  float* bt = S.bt.data();
  bt += (16 - (reinterpret_cast<uintptr_t>(bt) / sizeof(float)) % 16) % 16;

  ExpandPlan P;
  P.dtype = dtype;
  P.v = v;
  P.r = r;
  P.ldv = ldv;
  P.b = b;
  P.N = N;
  P.scaling = scaling;
  P.sorted_idx = sorted_idx;
  P.counts = counts;
  P.starts = starts;
  P.y = y;
  P.ldy = ldy;
  P.L = L;
  P.oc = oc;
  P.noc = noc;
  P.rc = rc;
  P.tile_prefix = prefix;
  P.scratch = bt;
  P.scratch_stride = per_thread;

  if (nthreads <= 1) {
    I.expand(P, 0, ntiles, bt);
    return BSR_OK;
  }
  grow(S.cost_prefix, static_cast<size_t>(ntiles + 1));
  int64_t* cost = S.cost_prefix.data();
  cost[0] = 0;
  int64_t t = 0;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t nrc = (counts[i] + rc - 1) / rc;
    for (int64_t c = 0; c < noc; ++c) {
      const int64_t on = std::min<int64_t>(oc, N - c * oc);
      for (int64_t q = 0; q < nrc; ++q) {
        const int64_t rows = std::min<int64_t>(rc, counts[i] - q * rc);
        // a transpose of the chunk costs about as much as a few rows of multiply-adds
        cost[t + 1] = cost[t] + (rows + (q == 0 ? 4 : 0)) * on;
        ++t;
      }
    }
  }
  run_tiles(ntiles, cost, nthreads,
            [&](int tid, int64_t t0, int64_t t1) { I.expand(P, t0, t1, bt + tid * per_thread); });
  return BSR_OK;
}

// Threads split the outputs into contiguous ranges (multiples of the micro-tiles), so each
// streams its own part of W. An fp32 call with more rows than the dot-product tile takes in
// one pass, and at most a vector's lanes of them, first writes x transposed for linear_lanes.
static void do_linear(LinearPlan P) {
  const Isa& I = isa();
  if (P.dtype == BSR_DTYPE_F32 && P.scale == nullptr && I.lanes_min_rows > 0 && P.M >= I.lanes_min_rows &&
      P.M <= I.W) {
    std::vector<float>& xt = tl_scratch.xt;
    grow(xt, static_cast<size_t>(P.K * I.W));
    const float* x = static_cast<const float*>(P.x);
    for (int64_t k = 0; k < P.K; ++k) {
      float* d = xt.data() + k * I.W;
      for (int64_t m = 0; m < I.W; ++m) d[m] = m < P.M ? x[m * P.ldx + k] : 0.f;
    }
    P.xt = xt.data();
  }
  const int64_t work = P.M * P.N * P.K;
  const int64_t step = 12;  // a multiple of every ISA's weight-rows tile (2, 3, 4)
  const int64_t nblocks = (P.N + step - 1) / step;
  int nt = work >= kShrinkParallelMinWork ? num_threads() : 1;
  if (nt > nblocks) nt = static_cast<int>(nblocks);
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
      const int64_t n0 = std::min(P.N, nblocks * tid / n * step);
      const int64_t n1 = std::min(P.N, nblocks * (tid + 1) / n * step);
      if (n0 < n1) I.linear(P, n0, n1);
    }
    return;
  }
#endif
  I.linear(P, 0, P.N);
}

// bsr_linear (scale nullptr) and bsr_linear_w8 (int8 weight, its scales checked by the caller)
// after their dtype checks: the shape and pointer checks, then the call.
static bsr_status linear_call(const char* fn, bsr_dtype dtype, const void* x, int64_t x_row_stride, int64_t rows,
                              int64_t in_features, const void* weight, const float* scale, int64_t out_features,
                              const void* bias, void* y, int64_t y_row_stride) {
  BSR_TRY(check_at_least(fn, "rows", rows, 0));
  BSR_TRY(check_rows(fn, "in_features", in_features, "x_row_stride", x_row_stride));
  BSR_TRY(check_rows(fn, "out_features", out_features, "y_row_stride", y_row_stride));
  if (rows == 0) return BSR_OK;
  BSR_CHECK_PTR(x, fn);
  BSR_CHECK_PTR(weight, fn);
  BSR_CHECK_PTR(y, fn);
  LinearPlan P;
  P.dtype = dtype;
  P.x = x;
  P.ldx = x_row_stride;
  P.M = rows;
  P.K = in_features;
  P.w = weight;
  P.N = out_features;
  P.bias = bias;
  P.y = y;
  P.ldy = y_row_stride;
  P.xt = nullptr;
  P.scale = scale;
  do_linear(P);
  return BSR_OK;
}

static bsr_status do_sort(const char* fn, const int32_t* ta, int64_t T, int32_t L, int32_t* sorted_idx,
                          int32_t* counts, int32_t* starts, int64_t* num_lora) {
  for (int32_t a = 0; a < L; ++a) counts[a] = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int32_t id = ta[t];
    if (id < -1 || id >= L)
      return fail(BSR_ERR_INVALID_ARGUMENT,
                  "%s: token_adapter[%lld] = %d is out of range [-1, %d) (num_adapters = %d)", fn,
                  static_cast<long long>(t), id, L, L);
    if (id >= 0) ++counts[id];
  }
  int64_t acc = 0;
  for (int32_t a = 0; a < L; ++a) {
    starts[a] = static_cast<int32_t>(acc);
    acc += counts[a];
  }
  // stable scatter; counts is reused as a cursor and restored afterwards
  for (int32_t a = 0; a < L; ++a) counts[a] = starts[a];
  for (int64_t t = 0; t < T; ++t) {
    const int32_t id = ta[t];
    if (id >= 0) sorted_idx[counts[id]++] = static_cast<int32_t>(t);
  }
  for (int32_t a = 0; a < L; ++a) counts[a] -= starts[a];
  *num_lora = acc;
  return BSR_OK;
}

}  // namespace bsr

using namespace bsr;

static bsr_status check_dtype(const char* fn, bsr_dtype dtype) {
  if (dtype_ok(dtype)) return BSR_OK;
  return fail(BSR_ERR_UNSUPPORTED_DTYPE, "%s: unsupported dtype %d", fn, static_cast<int>(dtype));
}

// Rows the adapters' segments cover (the sum of counts), after checking counts / starts;
// 0 when there are no adapters.
static bsr_status segment_rows(const char* fn, const int32_t* counts, const int32_t* starts, int64_t L,
                               int64_t* total) {
  *total = 0;
  if (L == 0) return BSR_OK;
  BSR_CHECK_PTR(counts, fn);
  BSR_CHECK_PTR(starts, fn);
  int64_t vrows = 0;
  return check_groups(fn, counts, starts, L, total, &vrows);
}

extern "C" {

BSR_API void bsr_version(int* major, int* minor, int* patch) {
  if (major) *major = BSR_VERSION_MAJOR;
  if (minor) *minor = BSR_VERSION_MINOR;
  if (patch) *patch = BSR_VERSION_PATCH;
}

#define BSR_STR2(x) #x
#define BSR_STR(x) BSR_STR2(x)
BSR_API const char* bsr_version_string(void) {
  return BSR_STR(BSR_VERSION_MAJOR) "." BSR_STR(BSR_VERSION_MINOR) "." BSR_STR(BSR_VERSION_PATCH);
}

BSR_API const char* bsr_status_string(bsr_status status) {
  switch (status) {
    case BSR_OK: return "ok";
    case BSR_ERR_NULL_POINTER: return "null pointer";
    case BSR_ERR_INVALID_ARGUMENT: return "invalid argument";
    case BSR_ERR_UNSUPPORTED_DTYPE: return "unsupported dtype";
    case BSR_ERR_OUT_OF_MEMORY: return "out of memory";
    case BSR_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

BSR_API const char* bsr_last_error(void) { return tl_error; }

BSR_API void bsr_set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

BSR_API int bsr_get_num_threads(void) { return num_threads(); }

BSR_API bsr_status bsr_lora_sort_tokens(const int32_t* token_adapter, int64_t num_tokens,
                                        int32_t num_adapters, int32_t* sorted_idx, int32_t* counts,
                                        int32_t* starts, int64_t* num_lora) {
  static const char* fn = "bsr_lora_sort_tokens";
  clear_error();
  BSR_GUARD_BEGIN
  if (num_tokens < 0)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: num_tokens must be >= 0, got %lld", fn,
                static_cast<long long>(num_tokens));
  if (num_tokens > INT32_MAX)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: num_tokens must be <= 2^31-1, got %lld", fn,
                static_cast<long long>(num_tokens));
  if (num_adapters < 0)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: num_adapters must be >= 0, got %d", fn, num_adapters);
  BSR_CHECK_PTR(num_lora, fn);
  if (num_tokens > 0) {
    BSR_CHECK_PTR(token_adapter, fn);
    BSR_CHECK_PTR(sorted_idx, fn);
  }
  if (num_adapters > 0) {
    BSR_CHECK_PTR(counts, fn);
    BSR_CHECK_PTR(starts, fn);
  }
  return do_sort(fn, token_adapter, num_tokens, num_adapters, sorted_idx, counts, starts, num_lora);
  BSR_GUARD_END(fn)
}

BSR_API bsr_status bsr_lora_shrink(bsr_dtype dtype, const void* x, int64_t x_row_stride,
                                   int64_t in_features, const void* lora_a, int64_t num_adapters,
                                   int64_t rank, const int32_t* sorted_idx, const int32_t* counts,
                                   const int32_t* starts, float* v) {
  static const char* fn = "bsr_lora_shrink";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_dtype(fn, dtype));
  BSR_TRY(check_rows(fn, "in_features", in_features, "x_row_stride", x_row_stride));
  BSR_TRY(check_at_least(fn, "num_adapters", num_adapters, 0));
  BSR_TRY(check_at_least(fn, "rank", rank, 1));
  int64_t total = 0;
  BSR_TRY(segment_rows(fn, counts, starts, num_adapters, &total));
  if (total == 0) return BSR_OK;
  BSR_CHECK_PTR(x, fn);
  BSR_CHECK_PTR(lora_a, fn);
  BSR_CHECK_PTR(sorted_idx, fn);
  BSR_CHECK_PTR(v, fn);
  do_shrink(tl_scratch, dtype, x, x_row_stride, in_features, lora_a, num_adapters, rank, sorted_idx, counts,
            starts, v, total);
  return BSR_OK;
  BSR_GUARD_END(fn)
}

BSR_API bsr_status bsr_lora_expand(bsr_dtype dtype, const float* v, int64_t rank, const void* lora_b,
                                   int64_t num_adapters, int64_t out_features, const float* scaling,
                                   const int32_t* sorted_idx, const int32_t* counts, const int32_t* starts,
                                   void* y, int64_t y_row_stride) {
  static const char* fn = "bsr_lora_expand";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_dtype(fn, dtype));
  BSR_TRY(check_at_least(fn, "rank", rank, 1));
  BSR_TRY(check_at_least(fn, "num_adapters", num_adapters, 0));
  BSR_TRY(check_rows(fn, "out_features", out_features, "y_row_stride", y_row_stride));
  int64_t total = 0;
  BSR_TRY(segment_rows(fn, counts, starts, num_adapters, &total));
  if (total == 0) return BSR_OK;
  BSR_CHECK_PTR(v, fn);
  BSR_CHECK_PTR(lora_b, fn);
  BSR_CHECK_PTR(scaling, fn);
  BSR_CHECK_PTR(sorted_idx, fn);
  BSR_CHECK_PTR(y, fn);
  return do_expand(tl_scratch, dtype, v, rank, rank, lora_b, num_adapters, out_features, scaling, sorted_idx,
                   counts, starts, y, y_row_stride, total);
  BSR_GUARD_END(fn)
}

static int64_t dtype_bytes(bsr_dtype d) {
  return d == BSR_DTYPE_F64 ? 8 : d == BSR_DTYPE_F32 ? 4 : 2;
}

BSR_API bsr_status bsr_lora_expand_slices(bsr_dtype dtype, const float* v, int64_t v_cols, int64_t num_slices,
                                          const int64_t* rank_offsets, const int64_t* ranks,
                                          const void* const* lora_b, const int64_t* out_offsets,
                                          const int64_t* out_features, const float* const* scaling,
                                          int64_t num_adapters, const int32_t* sorted_idx, const int32_t* counts,
                                          const int32_t* starts, void* y, int64_t y_cols, int64_t y_row_stride) {
  static const char* fn = "bsr_lora_expand_slices";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_dtype(fn, dtype));
  BSR_TRY(check_at_least(fn, "v_cols", v_cols, 1));
  BSR_TRY(check_at_least(fn, "num_slices", num_slices, 0));
  BSR_TRY(check_at_least(fn, "num_adapters", num_adapters, 0));
  BSR_TRY(check_rows(fn, "y_cols", y_cols, "y_row_stride", y_row_stride));
  int64_t total = 0;
  BSR_TRY(segment_rows(fn, counts, starts, num_adapters, &total));
  if (total == 0 || num_slices == 0) return BSR_OK;
  BSR_CHECK_PTR(v, fn);
  BSR_CHECK_PTR(rank_offsets, fn);
  BSR_CHECK_PTR(ranks, fn);
  BSR_CHECK_PTR(lora_b, fn);
  BSR_CHECK_PTR(out_offsets, fn);
  BSR_CHECK_PTR(out_features, fn);
  BSR_CHECK_PTR(scaling, fn);
  BSR_CHECK_PTR(sorted_idx, fn);
  BSR_CHECK_PTR(y, fn);
  for (int64_t s = 0; s < num_slices; ++s) {  // every slice checked before any is written
    if (ranks[s] < 1 || rank_offsets[s] < 0 || rank_offsets[s] + ranks[s] > v_cols)
      return fail(BSR_ERR_INVALID_ARGUMENT, "%s: slice %lld: v columns [%lld, %lld) are not within [0, %lld)", fn,
                  static_cast<long long>(s), static_cast<long long>(rank_offsets[s]),
                  static_cast<long long>(rank_offsets[s] + ranks[s]), static_cast<long long>(v_cols));
    if (out_features[s] < 1 || out_offsets[s] < 0 || out_offsets[s] + out_features[s] > y_cols)
      return fail(BSR_ERR_INVALID_ARGUMENT, "%s: slice %lld: y columns [%lld, %lld) are not within [0, %lld)", fn,
                  static_cast<long long>(s), static_cast<long long>(out_offsets[s]),
                  static_cast<long long>(out_offsets[s] + out_features[s]), static_cast<long long>(y_cols));
    BSR_CHECK_PTR(lora_b[s], fn);
    BSR_CHECK_PTR(scaling[s], fn);
  }
  char* y0 = static_cast<char*>(y);
  for (int64_t s = 0; s < num_slices; ++s) {
    bsr_status st = do_expand(tl_scratch, dtype, v + rank_offsets[s], ranks[s], v_cols, lora_b[s], num_adapters,
                              out_features[s], scaling[s], sorted_idx, counts, starts,
                              y0 + out_offsets[s] * dtype_bytes(dtype), y_row_stride, total);
    if (st != BSR_OK) return st;
  }
  return BSR_OK;
  BSR_GUARD_END(fn)
}

BSR_API bsr_status bsr_lora_add(bsr_dtype dtype, const void* x, int64_t x_row_stride, int64_t in_features,
                                const void* lora_a, const void* lora_b, const float* scaling,
                                int64_t num_adapters, int64_t rank, int64_t out_features,
                                const int32_t* token_adapter, int64_t num_tokens, void* y,
                                int64_t y_row_stride) {
  static const char* fn = "bsr_lora_add";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_dtype(fn, dtype));
  BSR_TRY(check_rows(fn, "in_features", in_features, "x_row_stride", x_row_stride));
  if (num_adapters < 0 || num_adapters > INT32_MAX)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: num_adapters must be in [0, 2^31-1], got %lld", fn,
                static_cast<long long>(num_adapters));
  BSR_TRY(check_at_least(fn, "rank", rank, 1));
  BSR_TRY(check_rows(fn, "out_features", out_features, "y_row_stride", y_row_stride));
  if (num_tokens < 0 || num_tokens > INT32_MAX)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: num_tokens must be in [0, 2^31-1], got %lld", fn,
                static_cast<long long>(num_tokens));
  if (num_tokens == 0) return BSR_OK;
  BSR_CHECK_PTR(x, fn);
  BSR_CHECK_PTR(lora_a, fn);
  BSR_CHECK_PTR(lora_b, fn);
  BSR_CHECK_PTR(scaling, fn);
  BSR_CHECK_PTR(token_adapter, fn);
  BSR_CHECK_PTR(y, fn);
  Scratch& S = tl_scratch;
  const int32_t L = static_cast<int32_t>(num_adapters);
  grow(S.sorted_idx, static_cast<size_t>(num_tokens));
  grow(S.counts, static_cast<size_t>(L) + 1);
  grow(S.starts, static_cast<size_t>(L) + 1);
  int64_t num_lora = 0;
  bsr_status st = do_sort(fn, token_adapter, num_tokens, L, S.sorted_idx.data(), S.counts.data(),
                          S.starts.data(), &num_lora);
  if (st != BSR_OK) return st;
  if (num_lora == 0) return BSR_OK;
  grow(S.v, static_cast<size_t>(num_lora * rank));
  do_shrink(S, dtype, x, x_row_stride, in_features, lora_a, num_adapters, rank, S.sorted_idx.data(),
            S.counts.data(), S.starts.data(), S.v.data(), num_lora);
  return do_expand(S, dtype, S.v.data(), rank, rank, lora_b, num_adapters, out_features, scaling, S.sorted_idx.data(),
                   S.counts.data(), S.starts.data(), y, y_row_stride, num_lora);
  BSR_GUARD_END(fn)
}

BSR_API bsr_status bsr_linear(bsr_dtype dtype, const void* x, int64_t x_row_stride, int64_t rows,
                              int64_t in_features, const void* weight, int64_t out_features, const void* bias,
                              void* y, int64_t y_row_stride) {
  static const char* fn = "bsr_linear";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_dtype(fn, dtype));
  return linear_call(fn, dtype, x, x_row_stride, rows, in_features, weight, nullptr, out_features, bias, y,
                     y_row_stride);
  BSR_GUARD_END(fn)
}

BSR_API bsr_status bsr_linear_w8(const float* x, int64_t x_row_stride, int64_t rows, int64_t in_features,
                                 const int8_t* weight, const float* scale, int64_t out_features, const float* bias,
                                 float* y, int64_t y_row_stride) {
  static const char* fn = "bsr_linear_w8";
  clear_error();
  BSR_GUARD_BEGIN
  if (rows > 0) BSR_CHECK_PTR(scale, fn);
  return linear_call(fn, BSR_DTYPE_F32, x, x_row_stride, rows, in_features, weight, scale, out_features, bias, y,
                     y_row_stride);
  BSR_GUARD_END(fn)
}

}  // extern "C"
