/*
 * bsharedrag C ABI: CPU kernels for multi-LoRA linear layers.
 *
 * Plain C, no exceptions cross this boundary: every call returns a bsr_status,
 * and bsr_last_error() gives a human-readable detail for the last failing call
 * on the calling thread. Tensors are raw pointers + sizes + row strides (in
 * elements); the innermost dimension is always contiguous.
 *
 * Multi-LoRA layout (same as bsharedrag_fast.ops.lora_linear):
 *   x       [T, in]        rows of the batch
 *   lora_a  [L, r, in]     contiguous; adapters of lower rank are zero-padded to r
 *   lora_b  [L, out, r]    contiguous
 *   scaling [L]            float32 (alpha / r, or alpha / sqrt(r) for rsLoRA)
 *   token_adapter [T]      int32 adapter slot per row, -1 = base only
 *   y[t] += scaling[a] * (x[t] A_a^T) B_a^T   for rows t with a = token_adapter[t] >= 0
 *
 * Metadata (bsr_lora_sort_tokens) is built once per step and reused by every
 * layer: rows with an adapter, stably sorted by adapter id, plus per-adapter
 * counts and start offsets into that order.
 *
 * Conventions of the implementation (csrc/lora.cpp):
 *   - dtype selects the storage type of x, lora_a, lora_b and y (v and scaling are always
 *     float32). f16 / bf16 / f32 accumulate in fp32, f64 in f64; stores round to nearest even.
 *   - A pointer may be NULL only when there is nothing to touch: num_tokens == 0 (sort,
 *     add; num_adapters == 0 for counts / starts), or all counts zero (shrink, expand).
 *     Otherwise a NULL pointer is BSR_ERR_NULL_POINTER.
 *   - Rows whose adapter is -1, and columns past out_features, are never written.
 *   - Results are deterministic: they do not depend on the number of threads.
 *   - Calls are thread-safe (per-thread scratch and error message). The kernels pick the
 *     best SIMD level of the CPU at first use (AVX-512, AVX2+FMA+F16C, or portable code);
 *     the environment variable BSHAREDRAG_ISA=avx2|generic lowers it, for testing.
 */
#ifndef BSHAREDRAG_H
#define BSHAREDRAG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define BSR_API __declspec(dllexport)
#else
#define BSR_API __attribute__((visibility("default")))
#endif

#define BSR_VERSION_MAJOR 0
#define BSR_VERSION_MINOR 1
#define BSR_VERSION_PATCH 0

typedef enum bsr_dtype {
  BSR_DTYPE_F32 = 0,
  BSR_DTYPE_F16 = 1,
  BSR_DTYPE_BF16 = 2,
  BSR_DTYPE_F64 = 3
} bsr_dtype;

typedef enum bsr_status {
  BSR_OK = 0,
  BSR_ERR_NULL_POINTER = 1,
  BSR_ERR_INVALID_ARGUMENT = 2,
  BSR_ERR_UNSUPPORTED_DTYPE = 3,
  BSR_ERR_OUT_OF_MEMORY = 4,
  BSR_ERR_INTERNAL = 5
} bsr_status;

/* Version of the library actually loaded (compare with BSR_VERSION_* of the header). */
BSR_API void bsr_version(int* major, int* minor, int* patch);
BSR_API const char* bsr_version_string(void);
BSR_API const char* bsr_status_string(bsr_status status);
/* Detail of the last failing call on this thread ("" if none). */
BSR_API const char* bsr_last_error(void);

/* Worker (OpenMP) threads the kernels use; n <= 0 restores the default, omp_get_max_threads()
 * at call time. Small calls run on the calling thread regardless. */
BSR_API void bsr_set_num_threads(int n);
BSR_API int bsr_get_num_threads(void);

/*
 * Stable counting sort of the rows that use an adapter.
 *   sorted_idx [num_tokens]   out: first *num_lora entries are row indices, grouped by adapter
 *   counts     [num_adapters] out: rows per adapter
 *   starts     [num_adapters] out: offset of each adapter's group in sorted_idx
 * Ids outside [-1, num_adapters) are BSR_ERR_INVALID_ARGUMENT.
 */
BSR_API bsr_status bsr_lora_sort_tokens(const int32_t* token_adapter, int64_t num_tokens,
                                        int32_t num_adapters, int32_t* sorted_idx,
                                        int32_t* counts, int32_t* starts, int64_t* num_lora);

/*
 * Shrink: v[p, j] = sum_k x[sorted_idx[p], k] * lora_a[a(p), j, k], accumulated in fp32,
 * for p in the group of every adapter a (p in [starts[a], starts[a] + counts[a])).
 *   v [num_lora, rank] float32, contiguous, fully overwritten for those p.
 * counts / starts may describe any groups (they need not come from bsr_lora_sort_tokens),
 * but the rows named by sorted_idx must be distinct for bsr_lora_expand.
 */
BSR_API bsr_status bsr_lora_shrink(bsr_dtype dtype, const void* x, int64_t x_row_stride,
                                   int64_t in_features, const void* lora_a,
                                   int64_t num_adapters, int64_t rank,
                                   const int32_t* sorted_idx, const int32_t* counts,
                                   const int32_t* starts, float* v);

/*
 * Expand: y[sorted_idx[p], o] += scaling[a(p)] * sum_j v[p, j] * lora_b[a(p), o, j],
 * accumulated in fp32 and rounded once into y's dtype. Rows not in sorted_idx are untouched.
 */
BSR_API bsr_status bsr_lora_expand(bsr_dtype dtype, const float* v, int64_t rank,
                                   const void* lora_b, int64_t num_adapters,
                                   int64_t out_features, const float* scaling,
                                   const int32_t* sorted_idx, const int32_t* counts,
                                   const int32_t* starts, void* y, int64_t y_row_stride);

/*
 * Expand of a merged projection (q/k/v, gate/up): one shrink over the adapters' A's stacked
 * along the rank gave v [num_lora, v_cols] (fp32, contiguous); slice s reads its columns
 * [rank_offsets[s], + ranks[s]) and adds into y's columns [out_offsets[s], + out_features[s]):
 *   y[sorted_idx[p], out_offsets[s] + o] +=
 *       scaling[s][a(p)] * sum_j v[p, rank_offsets[s] + j] * lora_b[s][a(p), o, j]
 * lora_b[s] [num_adapters, out_features[s], ranks[s]] contiguous, scaling[s] [num_adapters];
 * accumulated in fp32 and rounded once into y's dtype. y [rows, y_cols] (row stride
 * y_row_stride). Every slice is checked before any is written.
 */
BSR_API bsr_status bsr_lora_expand_slices(bsr_dtype dtype, const float* v, int64_t v_cols, int64_t num_slices,
                                          const int64_t* rank_offsets, const int64_t* ranks,
                                          const void* const* lora_b, const int64_t* out_offsets,
                                          const int64_t* out_features, const float* const* scaling,
                                          int64_t num_adapters, const int32_t* sorted_idx, const int32_t* counts,
                                          const int32_t* starts, void* y, int64_t y_cols, int64_t y_row_stride);

/*
 * Whole LoRA update in one call (sort + shrink + expand, scratch allocated inside):
 * y[t] += scaling[a] * (x[t] A_a^T) B_a^T for rows with token_adapter[t] >= 0.
 * y holds the caller's base output x W^T + b (computed with any BLAS).
 */
BSR_API bsr_status bsr_lora_add(bsr_dtype dtype, const void* x, int64_t x_row_stride,
                                int64_t in_features, const void* lora_a, const void* lora_b,
                                const float* scaling, int64_t num_adapters, int64_t rank,
                                int64_t out_features, const int32_t* token_adapter,
                                int64_t num_tokens, void* y, int64_t y_row_stride);

/*
 * Dense linear for few rows (decode steps): y[m, n] = sum_k x[m, k] * weight[n, k] + bias[n],
 * accumulated in fp32 (f64 in f64) and rounded once into y's dtype.
 *   weight [out_features, in_features] contiguous; bias [out_features] or NULL.
 * Each weight row is read from memory once per call whatever `rows` is; it pays over a BLAS
 * gemm (which packs the weight) up to a few dozen rows. y must not overlap x or weight.
 * A row's summation order may depend on `rows` (with AVX-512, f32 calls of 9-16 rows sum each
 * output in k order), never on the threads.
 */
BSR_API bsr_status bsr_linear(bsr_dtype dtype, const void* x, int64_t x_row_stride, int64_t rows,
                              int64_t in_features, const void* weight, int64_t out_features,
                              const void* bias, void* y, int64_t y_row_stride);

/*
 * Weight-only int8 linear (fp32 rows, int8 weights with one scale per output channel):
 *   y[m, n] = scale[n] * (sum_k x[m, k] * weight[n, k]) + bias[n]
 * each int8 weight widened to fp32 exactly and the products summed in fp32, in the order
 * bsr_linear's f32 dot-product tile uses (never the rows-in-lanes order); every row count
 * takes that tile. weight [out_features, in_features] int8, contiguous; scale [out_features];
 * bias [out_features] or NULL. Reads a quarter of the bytes an f32 weight takes: made for
 * decode steps, which stream the weights. y must not overlap x, weight or scale.
 */
BSR_API bsr_status bsr_linear_w8(const float* x, int64_t x_row_stride, int64_t rows, int64_t in_features,
                                 const int8_t* weight, const float* scale, int64_t out_features, const float* bias,
                                 float* y, int64_t y_row_stride);

/* ---- attention ------------------------------------------------------------------------- */

/*
 * Causal attention over a paged KV cache for every sequence of a step in one call: prefill
 * chunks, decode rows and cache-less sequences alike. Sequence b has n_b = cu_seqlens_q[b + 1]
 * - cu_seqlens_q[b] new query rows (0 skips it), packed in q from row cu_seqlens_q[b], and
 * context_lens[b] >= n_b keys and values in the cache (its new ones included, written there
 * before the call); its new row i sits at position p = context_lens[b] - n_b + i and attends
 * to the positions k <= p (and p - k < window when window > 0: Mistral's sliding window):
 *   out = softmax(scale * q . k) v, per head, in fp32, rounded once into dtype (f32, f16, bf16).
 *   k_cache / v_cache: num_blocks blocks of block_size tokens, a token's num_kv_heads x
 *     head_dim values contiguous, tokens k_token_stride / v_token_stride elements apart
 *     (num_kv_heads * head_dim for a contiguous [num_blocks, block_size, KV, D] cache);
 *     position p of sequence b lives in block block_tables[b * table_stride + p / block_size],
 *     row p % block_size (a cache-less batch is block_size 1 over its packed k / v);
 *   query head h reads KV head h / (num_heads / num_kv_heads) (grouped-query attention).
 * q and out: row t, head h at t * row_stride + h * head_stride elements. No per-sequence
 * gather, padding or mask tensor.
 */
BSR_API bsr_status bsr_paged_attention(bsr_dtype dtype, const void* q, int64_t q_row_stride, int64_t q_head_stride,
                                       const void* k_cache, const void* v_cache, int64_t k_token_stride,
                                       int64_t v_token_stride, int64_t num_blocks, int64_t block_size,
                                       int64_t num_kv_heads, int64_t num_heads, int64_t head_dim,
                                       const int32_t* block_tables, int64_t table_stride,
                                       const int32_t* cu_seqlens_q, const int32_t* context_lens, int64_t num_seqs,
                                       int64_t window, float scale, void* out, int64_t out_row_stride,
                                       int64_t out_head_stride);

/* ---- pooled embedding ------------------------------------------------------------------ */

typedef enum bsr_pool_mode {
  BSR_POOL_LAST = 0, /* the sequence's last row (RepLLaMA: EOS appended) */
  BSR_POOL_MEAN = 1, /* the average of its rows */
  BSR_POOL_CLS = 2   /* its first row */
} bsr_pool_mode;

/*
 * One vector per packed sequence: hidden [T, dim] (row stride hidden_row_stride) holds
 * num_seqs sequences, cu_seqlens int32 [num_seqs + 1] with 0 = cu[0] < cu[1] < ... = T.
 *   norm_weight [dim] or NULL: the backbone's final RMSNorm, h * rsqrt(mean(h^2) + eps) * w,
 *     fused in: for last/cls on the pooled row only, for mean on every row before averaging.
 *   normalize != 0: L2-normalise the result; a zero vector stays zero.
 * All math in fp32; out [num_seqs, dim] (row stride out_row_stride) in dtype.
 * dtype: F32, F16 or BF16 (F64 is BSR_ERR_UNSUPPORTED_DTYPE). Bad cu_seqlens (not starting
 * at 0, not strictly increasing, or any entry past T) are BSR_ERR_INVALID_ARGUMENT; pass T
 * through num_rows so the bound can be checked.
 */
BSR_API bsr_status bsr_pool(bsr_dtype dtype, const void* hidden, int64_t hidden_row_stride,
                            int64_t num_rows, int64_t dim, const int32_t* cu_seqlens,
                            int64_t num_seqs, bsr_pool_mode mode, const void* norm_weight,
                            float eps, int normalize, void* out, int64_t out_row_stride);

/* ---- row-wise ops of a decoder layer ----------------------------------------------------- */

/*
 * RMSNorm of num_rows rows of dim elements (as transformers' LlamaRMSNorm):
 *   s = x, or with add != NULL s = x + add rounded to dtype and written to sum_out (the
 *     residual stream after a sublayer: one pass instead of an add and a norm);
 *   out = weight * (s * rsqrt(mean(s^2) + eps)), the product in brackets rounded to dtype.
 * weight [dim] in dtype; rows row_stride elements apart; sum_out may be x (in place) but
 * out must not overlap x, add or sum_out. fp32 math. dtype: F32, F16 or BF16.
 */
BSR_API bsr_status bsr_rms_norm(bsr_dtype dtype, const void* x, int64_t x_row_stride, const void* add,
                                int64_t add_row_stride, int64_t num_rows, int64_t dim, const void* weight, float eps,
                                void* sum_out, int64_t sum_row_stride, void* out, int64_t out_row_stride);

/*
 * SiLU-and-mul of a merged gate/up projection: x [num_rows, 2 dim] (gate columns, then up)
 * -> out [num_rows, dim] = silu(gate) * up, silu rounded to dtype first (as torch's
 * F.silu(gate) * up). fp32 math. dtype: F32, F16 or BF16.
 */
BSR_API bsr_status bsr_silu_mul(bsr_dtype dtype, const void* x, int64_t x_row_stride, int64_t num_rows, int64_t dim,
                                void* out, int64_t out_row_stride);

/*
 * Rotary position embedding, rotate-half form (GPT-NeoX / Llama), of num_rows rows of
 * num_heads heads of head_dim (even) elements: with x1, x2 a head's halves and cos / sin
 * the row's [head_dim / 2] values (rows cs_row_stride apart),
 *   out1 = x1 cos - x2 sin,  out2 = x2 cos + x1 sin,
 * each product and sum rounded to dtype (as torch's x * cos + rotate_half(x) * sin).
 * out must not overlap x. fp32 math. dtype: F32, F16 or BF16.
 */
BSR_API bsr_status bsr_rope(bsr_dtype dtype, const void* x, int64_t x_row_stride, int64_t x_head_stride,
                            int64_t num_rows, int64_t num_heads, int64_t head_dim, const void* cos, const void* sin,
                            int64_t cs_row_stride, void* out, int64_t out_row_stride, int64_t out_head_stride);

/* ---- a whole decoder stack ----------------------------------------------------------- */

/* A Llama / Qwen2 / Mistral decoder's shape (what bsr_decoder_layers needs of config.json). */
typedef struct bsr_decoder_config {
  int64_t hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size;
  float eps;     /* RMSNorm epsilon */
  int64_t window; /* sliding window, 0 for none */
  float scale;   /* attention scale; <= 0: 1 / sqrt(head_dim) */
} bsr_decoder_config;

/* One layer's weights (dtype, row-major, contiguous) and its KV cache. q/k/v and gate/up are
 * merged: qkv_weight [(num_heads + 2 num_kv_heads) head_dim, hidden] (q rows, then k, then v),
 * gate_up_weight [2 intermediate, hidden] (gate rows, then up); o_weight [hidden, num_heads
 * head_dim]; down_weight [hidden, intermediate]; norms [hidden]; biases NULL or [out].
 * k_cache / v_cache [num_blocks, block_size, num_kv_heads, head_dim], contiguous. */
typedef struct bsr_layer_weights {
  const void *input_norm, *qkv_weight, *qkv_bias, *o_weight, *o_bias, *post_norm, *gate_up_weight, *gate_up_bias,
      *down_weight, *down_bias;
  void *k_cache, *v_cache;
} bsr_layer_weights;

/*
 * Every layer of a pre-norm decoder over one step's num_rows rows, in place on hidden
 * [num_rows, hidden_size] (contiguous; the embeddings in, the last layer's output out, before
 * the final norm). Per layer: x = RMSNorm(h); qkv = x qkv_weight^T + b; q, k rotated (cos /
 * sin [num_rows, head_dim / 2], as bsr_rope); row r's k and v written to cache slot slots[r]
 * (block slots[r] / block_size, offset slots[r] % block_size); causal attention of the q
 * rows over the cache (as bsr_paged_attention: block_tables, cu_seqlens_q, context_lens of
 * num_seqs sequences, every row's sequence in the cache); h += attn o_weight^T + b;
 * x = RMSNorm(h); h += (silu(gate) * up) down_weight^T + b. The same kernels as the entry
 * points named, in this order: results equal calling them one by one. Workspace is
 * allocated per call (about num_rows x (hidden + 4 intermediate + 3 q + 3 kv) elements).
 */
BSR_API bsr_status bsr_decoder_layers(bsr_dtype dtype, const bsr_decoder_config* config,
                                      const bsr_layer_weights* layers, int64_t num_layers, void* hidden,
                                      int64_t num_rows, const void* cos, const void* sin, int64_t cs_row_stride,
                                      const int64_t* slots, int64_t num_blocks, int64_t block_size,
                                      const int32_t* block_tables, int64_t table_stride,
                                      const int32_t* cu_seqlens_q, const int32_t* context_lens, int64_t num_seqs);

/* Per-output-channel scales of one layer's int8 weights (bsr_linear_w8): qkv [(num_heads +
 * 2 num_kv_heads) head_dim], o [hidden], gate_up [2 intermediate], down [hidden]; NULL: that
 * weight is f32. */
typedef struct bsr_layer_scales {
  const float *qkv, *o, *gate_up, *down;
} bsr_layer_scales;

/*
 * bsr_decoder_layers over f32 rows where a layer's projection weights may be int8: a weight
 * whose scale in scales[l] is non-NULL is int8 [out, in] and runs through bsr_linear_w8, the
 * others (and the norms, biases and KV caches) are f32. Otherwise as bsr_decoder_layers.
 */
BSR_API bsr_status bsr_decoder_layers_w8(const bsr_decoder_config* config, const bsr_layer_weights* layers,
                                         const bsr_layer_scales* scales, int64_t num_layers, float* hidden,
                                         int64_t num_rows, const float* cos, const float* sin,
                                         int64_t cs_row_stride, const int64_t* slots, int64_t num_blocks,
                                         int64_t block_size, const int32_t* block_tables, int64_t table_stride,
                                         const int32_t* cu_seqlens_q, const int32_t* context_lens,
                                         int64_t num_seqs);

#ifdef __cplusplus
}
#endif

#endif /* BSHAREDRAG_H */
