// bsr_pool: pooled embeddings of packed sequences with the final RMSNorm and the L2
// normalisation fused in (see bsharedrag.h). One read of the rows that matter, fp32 math.
//
// last / cls read one row per sequence. mean reads each row once: its sum of squares
// (for the fused RMSNorm) and its scaled accumulation run while the row is in L1. Work is
// split over sequences; when there are fewer sequences than threads, over token chunks
// of each sequence with per-thread partial sums.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bsharedrag.h"
#include "lora_common.h"
#include "runtime.h"

namespace bsr {
namespace {

constexpr float kL2Eps = 1e-12f;  // F.normalize's: a zero vector stays zero
constexpr int64_t kMeanChunkRows = 64;

inline float sum_squares(const float* v, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += v[i] * v[i];
  return acc;
}

// acc += scale * row
inline void axpy(float* acc, const float* row, float scale, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += scale * row[i];
}

// v *= w (the RMSNorm weight, applied once after averaging: sum_t s_t h_t w = w sum_t s_t h_t)
// then the L2 normalisation, then the store in T.
template <class T>
void finish(float* v, int64_t d, const float* w, bool normalize, float post_scale, T* out) {
  if (w != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) v[i] *= w[i];
  }
  float scale = post_scale;
  if (normalize) scale /= std::max(std::sqrt(sum_squares(v, d) * post_scale * post_scale), kL2Eps);
  for (int64_t i = 0; i < d; ++i) Scalar<T>::store(out + i, v[i] * scale);
}

template <class T>
struct PoolArgs {
  const T* h;
  int64_t ldh, d;
  const int32_t* cu;
  int64_t B;
  bsr_pool_mode mode;
  const float* w;  // fp32 copy of norm_weight or nullptr
  float eps;
  bool normalize;
  T* out;
  int64_t ldo;
};

// RMS scale of one row (1 without a norm weight).
inline float rms_scale(const float* row, int64_t d, const float* w, float eps) {
  return w == nullptr ? 1.f : 1.f / std::sqrt(sum_squares(row, d) / static_cast<float>(d) + eps);
}

// Sum over rows [r0, r1) of rms_scale(row) * row into acc (row buffer: scratch of d floats).
template <class T>
void accumulate_rows(const PoolArgs<T>& p, int64_t r0, int64_t r1, float* acc, float* row) {
  for (int64_t r = r0; r < r1; ++r) {
    load_row(p.h + r * p.ldh, p.d, row);
    axpy(acc, row, rms_scale(row, p.d, p.w, p.eps), p.d);
  }
}

template <class T>
void pool_one(const PoolArgs<T>& p, int64_t b, float* acc, float* row) {
  const int64_t s = p.cu[b], e = p.cu[b + 1];
  T* dst = p.out + b * p.ldo;
  if (p.mode == BSR_POOL_MEAN) {
    std::fill(acc, acc + p.d, 0.f);
    accumulate_rows(p, s, e, acc, row);
    finish(acc, p.d, p.w, p.normalize, 1.f / static_cast<float>(e - s), dst);
  } else {
    load_row(p.h + (p.mode == BSR_POOL_LAST ? e - 1 : s) * p.ldh, p.d, row);
    const float scale = rms_scale(row, p.d, p.w, p.eps);
    finish(row, p.d, p.w, p.normalize, scale, dst);
  }
}

template <class T>
void run_pool(const PoolArgs<T>& p) {
  const int nt = num_threads();
  const int64_t d = p.d;
  const bool few_long = p.mode == BSR_POOL_MEAN && p.B < nt &&
                        (p.cu[p.B] - p.cu[0]) >= 2 * kMeanChunkRows;
  if (!few_long) {
    // one sequence per task; small work stays on the calling thread
    const int64_t rows = p.mode == BSR_POOL_MEAN ? p.cu[p.B] : p.B;
    const bool par = nt > 1 && rows * d >= (1 << 15);
#pragma omp parallel num_threads(nt) if (par)
    {
      std::vector<float> acc(p.mode == BSR_POOL_MEAN ? d : 0), row(d);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < p.B; ++b) pool_one(p, b, acc.data(), row.data());
    }
    return;
  }
  // few long sequences (mean): split each sequence's rows over the threads
  std::vector<float> partial(static_cast<size_t>(nt) * d);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t s = p.cu[b], e = p.cu[b + 1];
    std::fill(partial.begin(), partial.end(), 0.f);
#pragma omp parallel num_threads(nt)
    {
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      std::vector<float> row(d);
      float* acc = partial.data() + static_cast<size_t>(tid) * d;
#pragma omp for schedule(static)
      for (int64_t c = s; c < e; c += kMeanChunkRows)
        accumulate_rows(p, c, std::min(e, c + kMeanChunkRows), acc, row.data());
    }
    for (int t = 1; t < nt; ++t) axpy(partial.data(), partial.data() + static_cast<size_t>(t) * d, 1.f, d);
    finish(partial.data(), d, p.w, p.normalize, 1.f / static_cast<float>(e - s), p.out + b * p.ldo);
  }
}

template <class T>
bsr_status pool_typed(const void* hidden, int64_t ldh, int64_t d, const int32_t* cu, int64_t B,
                      bsr_pool_mode mode, const void* norm_weight, float eps, int normalize, void* out,
                      int64_t ldo) {
  std::vector<float> w;
  if (norm_weight != nullptr) {
    w.resize(d);
    load_row(static_cast<const T*>(norm_weight), d, w.data());
  }
  const PoolArgs<T> p{static_cast<const T*>(hidden), ldh, d, cu, B, mode,
                      w.empty() ? nullptr : w.data(), eps, normalize != 0, static_cast<T*>(out), ldo};
  run_pool(p);
  return BSR_OK;
}

}  // namespace
}  // namespace bsr

using namespace bsr;

extern "C" BSR_API bsr_status bsr_pool(bsr_dtype dtype, const void* hidden, int64_t hidden_row_stride,
                                       int64_t num_rows, int64_t dim, const int32_t* cu_seqlens,
                                       int64_t num_seqs, bsr_pool_mode mode, const void* norm_weight,
                                       float eps, int normalize, void* out, int64_t out_row_stride) {
  static const char* fn = "bsr_pool";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_f32_f16_bf16(fn, dtype));
  if (mode != BSR_POOL_LAST && mode != BSR_POOL_MEAN && mode != BSR_POOL_CLS)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: mode must be BSR_POOL_LAST, _MEAN or _CLS, got %d", fn,
                static_cast<int>(mode));
  BSR_TRY(check_at_least(fn, "num_seqs", num_seqs, 1));
  BSR_TRY(check_rows(fn, "dim", dim, "hidden_row_stride", hidden_row_stride));
  BSR_TRY(check_rows(fn, "dim", dim, "out_row_stride", out_row_stride));
  if (!(eps > 0.f)) return fail(BSR_ERR_INVALID_ARGUMENT, "%s: eps must be > 0, got %g", fn, (double)eps);
  BSR_CHECK_PTR(hidden, fn);
  BSR_CHECK_PTR(cu_seqlens, fn);
  BSR_CHECK_PTR(out, fn);
  if (cu_seqlens[0] != 0)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: cu_seqlens[0] must be 0, got %d", fn, cu_seqlens[0]);
  for (int64_t b = 0; b < num_seqs; ++b) {
    if (cu_seqlens[b + 1] <= cu_seqlens[b])
      return fail(BSR_ERR_INVALID_ARGUMENT,
                  "%s: cu_seqlens must be strictly increasing; sequence %lld spans [%d, %d)", fn,
                  (long long)b, cu_seqlens[b], cu_seqlens[b + 1]);
  }
  if (cu_seqlens[num_seqs] > num_rows)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: cu_seqlens[%lld] = %d is past num_rows = %lld", fn,
                (long long)num_seqs, cu_seqlens[num_seqs], (long long)num_rows);
  switch (dtype) {
    case BSR_DTYPE_F32:
      return pool_typed<float>(hidden, hidden_row_stride, dim, cu_seqlens, num_seqs, mode, norm_weight, eps,
                               normalize, out, out_row_stride);
    case BSR_DTYPE_F16:
      return pool_typed<f16_t>(hidden, hidden_row_stride, dim, cu_seqlens, num_seqs, mode, norm_weight, eps,
                               normalize, out, out_row_stride);
    default:
      return pool_typed<bf16_t>(hidden, hidden_row_stride, dim, cu_seqlens, num_seqs, mode, norm_weight, eps,
                                normalize, out, out_row_stride);
  }
  BSR_GUARD_END(fn)
}
