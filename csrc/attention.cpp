// bsr_paged_attention: causal attention of packed new query rows (prefill chunks, decode
// rows, cache-less sequences) over their keys and values in a paged KV cache, every
// sequence of a step in one call (see bsharedrag.h).
//
// Work is split over (sequence, KV head, tile of query positions). A tile holds up to
// kTileRows query vectors: the G = H / KV heads of its group times consecutive positions,
// so each key and value row is read once per tile. Keys are visited in chunks of kChunk
// with an online softmax (flash attention's running max and sum), fp32 whatever the
// storage type, rounded once into out. Scores: with many query vectors in a tile the
// queries are kept transposed ([d][M]) and each key element is broadcast against a block
// of them (no horizontal sums); with few, one dot product per (query, key). A tile of one
// position (every decode row) goes to attend_one instead: keys and values read in place,
// all scores kept, an exact two-pass softmax (4x faster than the tile at 16 decode rows). A
// decode step of few (sequence, KV head) items splits each one's keys into parts for the
// threads to share, merged after as flash-decoding does.
// The kernels (attention_kernels.h) are compiled per ISA by per_isa.h, as the LoRA kernels
// are, and the ISA the LoRA kernels picked is used.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

constexpr int64_t kTileRows = 64;  // query vectors (positions x group heads) per work item
constexpr int64_t kChunk = 64;     // keys per online-softmax step
constexpr int64_t kDecodeUnits = 8;  // work items a decode step's keys are split into, at least

struct AttentionArgs {
  const void* q;
  int64_t q_row_stride, q_head_stride;
  const void* k_cache;
  const void* v_cache;
  int64_t k_token_stride, v_token_stride;
  int64_t block_size, num_kv_heads, num_heads, head_dim;
  const int32_t* block_tables;
  int64_t table_stride;
  const int32_t* cu_seqlens_q;
  const int32_t* context_lens;
  int64_t window;
  float scale;
  void* out;
  int64_t out_row_stride, out_head_stride;
};

struct AttentionTile {
  int64_t b, i0, i1;  // sequence b, its new rows [i0, i1)
};

#define BSR_PER_ISA_KERNELS "attention_kernels.h"
#define BSR_PER_ISA_NS(isa) attn_##isa
#include "per_isa.h"

namespace {

// The ISA the LoRA kernels picked (BSHAREDRAG_ISA lowers it for tests).
void attend(const AttentionArgs& A, bsr_dtype dtype, const std::vector<AttentionTile>& tiles, int nt,
            int64_t parts) {
#if BSR_X86_DISPATCH
  static const char* isa = active_isa_name();
  if (std::strcmp(isa, "avx512") == 0) return attn_avx512::attend(A, dtype, tiles, nt, parts);
  if (std::strcmp(isa, "avx2") == 0) return attn_avx2::attend(A, dtype, tiles, nt, parts);
#endif
  attn_generic::attend(A, dtype, tiles, nt, parts);
}

void attend_all(const AttentionArgs& A, bsr_dtype dtype, int64_t B) {
  const int64_t G = A.num_heads / A.num_kv_heads, per_tile = std::max<int64_t>(1, kTileRows / G);
  std::vector<AttentionTile> tiles;
  double work = 0;  // query-key pairs x head_dim, to decide whether threads pay
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = A.cu_seqlens_q[b + 1] - A.cu_seqlens_q[b];
    for (int64_t i0 = 0; i0 < n; i0 += per_tile) tiles.push_back({b, i0, std::min(n, i0 + per_tile)});
    work += static_cast<double>(n) * A.context_lens[b] * A.num_heads * A.head_dim;
  }
  const int64_t items = static_cast<int64_t>(tiles.size()) * A.num_kv_heads;
  const bool decode = std::all_of(tiles.begin(), tiles.end(), [](const AttentionTile& t) { return t.i1 == t.i0 + 1; });
  // A decode step of fewer (sequence, KV head) items than kDecodeUnits splits each one's keys
  // into parts, so that the threads share them: smollm2's 3 KV heads on 2 threads left one
  // thread attending 2 of the 3; in 3 parts each, 30 layers of one decode row at 300-1200 keys
  // took 7-14% less (2-vCPU EPYC; the same on 1 thread). The parts depend on the items, never
  // on the thread count (the results must not, bsharedrag.h).
  int64_t parts = decode && items > 0 && items < kDecodeUnits ? (kDecodeUnits + items - 1) / items : 1;
  // Below a few thousand key rows a parallel region costs more than it saves; a decode row's
  // cache rows are cold (the step's weights streamed through the caches since): at smollm2's
  // heads (from ~30 keys here) two threads cost nothing at 32 keys and paid from ~100, 12-20%
  // less at 150-215.
  const double min_work = decode ? (1 << 14) : (1 << 17);
  const int nt = work >= min_work ? static_cast<int>(std::min<int64_t>(num_threads(), items * parts)) : 1;
  attend(A, dtype, tiles, nt, parts);
}

}  // namespace
}  // namespace bsr

using namespace bsr;

BSR_API bsr_status bsr_paged_attention(bsr_dtype dtype, const void* q, int64_t q_row_stride, int64_t q_head_stride,
                                       const void* k_cache, const void* v_cache, int64_t k_token_stride,
                                       int64_t v_token_stride, int64_t num_blocks, int64_t block_size,
                                       int64_t num_kv_heads, int64_t num_heads, int64_t head_dim,
                                       const int32_t* block_tables, int64_t table_stride,
                                       const int32_t* cu_seqlens_q, const int32_t* context_lens, int64_t num_seqs,
                                       int64_t window, float scale, void* out, int64_t out_row_stride,
                                       int64_t out_head_stride) {
  static const char* fn = "bsr_paged_attention";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_f32_f16_bf16(fn, dtype));
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
  if (q_head_stride < head_dim || q_row_stride < num_heads * q_head_stride || out_head_stride < head_dim ||
      out_row_stride < num_heads * out_head_stride)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: q / out strides must hold num_heads x head_dim per row", fn);
  if (k_token_stride < num_kv_heads * head_dim || v_token_stride < num_kv_heads * head_dim)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: k_token_stride / v_token_stride must be >= num_kv_heads x head_dim",
                fn);
  BSR_CHECK_PTR(q, fn);
  BSR_CHECK_PTR(k_cache, fn);
  BSR_CHECK_PTR(v_cache, fn);
  BSR_CHECK_PTR(block_tables, fn);
  BSR_CHECK_PTR(cu_seqlens_q, fn);
  BSR_CHECK_PTR(context_lens, fn);
  BSR_CHECK_PTR(out, fn);
  if (cu_seqlens_q[0] != 0)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: cu_seqlens_q[0] must be 0, got %d", fn, cu_seqlens_q[0]);
  for (int64_t b = 0; b < num_seqs; ++b) {  // every row's keys must exist, every block a row reads too
    const int64_t n = static_cast<int64_t>(cu_seqlens_q[b + 1]) - cu_seqlens_q[b], len = context_lens[b];
    if (n < 0)
      return fail(BSR_ERR_INVALID_ARGUMENT, "%s: cu_seqlens_q must be nondecreasing (cu_seqlens_q[%lld] > [%lld])",
                  fn, static_cast<long long>(b), static_cast<long long>(b + 1));
    if (n == 0) continue;
    if (len < n || (len + block_size - 1) / block_size > table_stride)
      return fail(BSR_ERR_INVALID_ARGUMENT,
                  "%s: context_lens[%lld] = %lld must be in [%lld new rows, table_stride * block_size]", fn,
                  static_cast<long long>(b), static_cast<long long>(len), static_cast<long long>(n));
    const int32_t* table = block_tables + b * table_stride;
    for (int64_t i = 0; i < (len + block_size - 1) / block_size; ++i)
      if (table[i] < 0 || table[i] >= num_blocks)
        return fail(BSR_ERR_INVALID_ARGUMENT, "%s: block_tables[%lld][%lld] = %d is not a block (0..%lld)", fn,
                    static_cast<long long>(b), static_cast<long long>(i), table[i],
                    static_cast<long long>(num_blocks - 1));
  }
  const AttentionArgs A{q, q_row_stride, q_head_stride, k_cache, v_cache, k_token_stride, v_token_stride, block_size,
               num_kv_heads, num_heads, head_dim, block_tables, table_stride, cu_seqlens_q, context_lens, window,
               scale, out, out_row_stride, out_head_stride};
  attend_all(A, dtype, num_seqs);
  return BSR_OK;
  BSR_GUARD_END(fn)
}
