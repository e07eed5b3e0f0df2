// bsr_paged_decode_attention: one new query per sequence against its keys and values in the
// paged KV cache (see bsharedrag.h), every sequence of a decode step in one call.
//
// For each (sequence, KV head) the H / KV query heads of its group are done together, so
// each cached key and value row is read once per group: scores q.k over the sequence's
// blocks, a softmax in fp32 (max subtracted), then the weighted sum of the value rows. Work
// is split over (sequence, KV head) pairs; fp32 accumulation whatever the storage type.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

inline float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

struct DecodeArgs {
  const void* q;
  int64_t q_seq_stride, q_head_stride;
  const void* k_cache;
  const void* v_cache;
  int64_t block_size, num_kv_heads, num_heads, head_dim;
  const int32_t* block_tables;
  int64_t table_stride;
  const int32_t* context_lens;
  int64_t window;
  float scale;
  void* out;
  int64_t out_seq_stride, out_head_stride;
};

// One (sequence b, KV head g): its G = H / KV query heads; scratch: G * (len + 2 d) floats.
template <class T>
void decode_group(const DecodeArgs& A, int64_t b, int64_t g, std::vector<float>& scratch) {
  const int64_t d = A.head_dim, G = A.num_heads / A.num_kv_heads, len = A.context_lens[b];
  const int64_t first = A.window > 0 ? std::max<int64_t>(0, len - A.window) : 0;  // keys inside the window
  const int64_t n = len - first;
  scratch.resize(static_cast<size_t>(G * (n + 2 * d) + d));
  float* qs = scratch.data();           // [G, d] queries, pre-scaled
  float* acc = qs + G * d;              // [G, d] weighted values
  float* scores = acc + G * d;          // [G, n]
  float* row = scores + G * n;          // [d] one key / value row in fp32
  const T* q = static_cast<const T*>(A.q) + b * A.q_seq_stride;
  for (int64_t h = 0; h < G; ++h) {
    load_row(q + (g * G + h) * A.q_head_stride, d, qs + h * d);
    for (int64_t i = 0; i < d; ++i) qs[h * d + i] *= A.scale;
  }
  const int32_t* table = A.block_tables + b * A.table_stride;
  const int64_t token_stride = A.num_kv_heads * d, block_stride = A.block_size * token_stride;
  auto kv_row = [&](const void* cache, int64_t pos) {
    const int64_t blk = table[pos / A.block_size];
    return static_cast<const T*>(cache) + blk * block_stride + (pos % A.block_size) * token_stride + g * d;
  };
  for (int64_t j = 0; j < n; ++j) {
    load_row(kv_row(A.k_cache, first + j), d, row);
    for (int64_t h = 0; h < G; ++h) scores[h * n + j] = dot(qs + h * d, row, d);
  }
  for (int64_t h = 0; h < G; ++h) {  // softmax in place
    float* s = scores + h * n;
    float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - m);
      sum += s[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  }
  std::fill(acc, acc + G * d, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    load_row(kv_row(A.v_cache, first + j), d, row);
    for (int64_t h = 0; h < G; ++h) {
      const float p = scores[h * n + j];
      float* a = acc + h * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) a[i] += p * row[i];
    }
  }
  T* out = static_cast<T*>(A.out) + b * A.out_seq_stride;
  for (int64_t h = 0; h < G; ++h)
    for (int64_t i = 0; i < d; ++i) Scalar<T>::store(out + (g * G + h) * A.out_head_stride + i, acc[h * d + i]);
}

template <class T>
void decode_all(const DecodeArgs& A, int64_t B) {
  const int64_t pairs = B * A.num_kv_heads;
  int64_t keys = 0;
  for (int64_t b = 0; b < B; ++b) keys += A.context_lens[b];
  // below ~a few thousand key rows a parallel region costs more than it saves
  const int nt = keys * A.num_kv_heads * A.head_dim >= (1 << 16) ? std::min<int64_t>(num_threads(), pairs) : 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
    std::vector<float> scratch;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t p = 0; p < pairs; ++p) decode_group<T>(A, p / A.num_kv_heads, p % A.num_kv_heads, scratch);
  }
}

}  // namespace
}  // namespace bsr

using namespace bsr;

BSR_API bsr_status bsr_paged_decode_attention(bsr_dtype dtype, const void* q, int64_t q_seq_stride,
                                              int64_t q_head_stride, const void* k_cache, const void* v_cache,
                                              int64_t num_blocks, int64_t block_size, int64_t num_kv_heads,
                                              int64_t num_heads, int64_t head_dim, const int32_t* block_tables,
                                              int64_t table_stride, const int32_t* context_lens, int64_t num_seqs,
                                              int64_t window, float scale, void* out, int64_t out_seq_stride,
                                              int64_t out_head_stride) {
  static const char* fn = "bsr_paged_decode_attention";
  clear_error();
  BSR_GUARD_BEGIN
  if (dtype != BSR_DTYPE_F32 && dtype != BSR_DTYPE_F16 && dtype != BSR_DTYPE_BF16)
    return fail(BSR_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d is not f32, f16 or bf16", fn, static_cast<int>(dtype));
  BSR_TRY(check_at_least(fn, "num_seqs", num_seqs, 0));
  if (num_seqs == 0) return BSR_OK;
  BSR_TRY(check_at_least(fn, "num_blocks", num_blocks, 1));
  BSR_TRY(check_at_least(fn, "block_size", block_size, 1));
  BSR_TRY(check_at_least(fn, "num_kv_heads", num_kv_heads, 1));
  BSR_TRY(check_at_least(fn, "head_dim", head_dim, 1));
  BSR_TRY(check_at_least(fn, "window", window, 0));
  if (num_heads < num_kv_heads || num_heads % num_kv_heads != 0)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: num_heads (%lld) must be a multiple of num_kv_heads (%lld)", fn,
                static_cast<long long>(num_heads), static_cast<long long>(num_kv_heads));
  if (q_head_stride < head_dim || q_seq_stride < num_heads * q_head_stride || out_head_stride < head_dim ||
      out_seq_stride < num_heads * out_head_stride)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: q / out strides must hold num_heads x head_dim per sequence", fn);
  BSR_CHECK_PTR(q, fn);
  BSR_CHECK_PTR(k_cache, fn);
  BSR_CHECK_PTR(v_cache, fn);
  BSR_CHECK_PTR(block_tables, fn);
  BSR_CHECK_PTR(context_lens, fn);
  BSR_CHECK_PTR(out, fn);
  for (int64_t b = 0; b < num_seqs; ++b) {  // every block a sequence reads must exist
    const int64_t len = context_lens[b];
    if (len < 1 || (len + block_size - 1) / block_size > table_stride)
      return fail(BSR_ERR_INVALID_ARGUMENT, "%s: context_lens[%lld] = %lld must be in [1, table_stride * block_size]",
                  fn, static_cast<long long>(b), static_cast<long long>(len));
    const int32_t* table = block_tables + b * table_stride;
    for (int64_t i = 0; i < (len + block_size - 1) / block_size; ++i)
      if (table[i] < 0 || table[i] >= num_blocks)
        return fail(BSR_ERR_INVALID_ARGUMENT, "%s: block_tables[%lld][%lld] = %d is not a block (0..%lld)", fn,
                    static_cast<long long>(b), static_cast<long long>(i), table[i],
                    static_cast<long long>(num_blocks - 1));
  }
  const DecodeArgs A{q, q_seq_stride, q_head_stride, k_cache, v_cache, block_size, num_kv_heads, num_heads,
                     head_dim, block_tables, table_stride, context_lens, window, scale, out, out_seq_stride,
                     out_head_stride};
  if (dtype == BSR_DTYPE_F32) decode_all<float>(A, num_seqs);
  else if (dtype == BSR_DTYPE_F16) decode_all<f16_t>(A, num_seqs);
  else decode_all<bf16_t>(A, num_seqs);
  return BSR_OK;
  BSR_GUARD_END(fn)
}
