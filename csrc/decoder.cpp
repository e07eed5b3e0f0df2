// bsr_decoder_layers: every layer of a Llama-style decoder over one step's rows, in one call
// (see bsharedrag.h). It runs the library's own kernels in the order the Python model calls
// them (RMSNorm, merged qkv linear, rotary, cache write, paged attention, o linear, residual
// add + RMSNorm, merged gate/up linear, SiLU-and-mul, down linear, residual add), so its
// results equal that path's bit for bit; what it removes is the Python between them: about
// 12 op calls a layer, 5-30 us each on a decode step: smollm2-135m's step went 36.6 -> 24.2 ms
// at one row, ~20 ms of it weight streaming (2-core EPYC; docs/benchmarks.md). No LoRA: steps with adapter rows take
// the op-by-op path, which adds each adapter into its projection's output slice.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "bsharedrag.h"
#include "lora_common.h"
#include "runtime.h"

namespace bsr {
namespace {

int64_t dtype_bytes(bsr_dtype dtype) { return dtype == BSR_DTYPE_F32 ? 4 : 2; }

// h += y over n elements, each sum rounded once to T (as torch's h + y)
template <class T>
void add_into(void* h, const void* y, int64_t n) {
  T* a = static_cast<T*>(h);
  const T* b = static_cast<const T*>(y);
  for (int64_t i = 0; i < n; ++i) Scalar<T>::store(a + i, Scalar<T>::load(a + i) + Scalar<T>::load(b + i));
}

void add_into(bsr_dtype dtype, void* h, const void* y, int64_t n) {
  if (dtype == BSR_DTYPE_F32) add_into<float>(h, y, n);
  else if (dtype == BSR_DTYPE_F16) add_into<f16_t>(h, y, n);
  else add_into<bf16_t>(h, y, n);
}

// Row r's k / v ([KV * D] each, inside the rotated qk and the qkv rows) into the cache at slots[r].
void write_cache(const bsr_decoder_config& c, int64_t T, int64_t es, const char* qk, int64_t qk_row,
                 const char* qkv, int64_t qkv_row, const int64_t* slots, void* k_cache, void* v_cache) {
  const int64_t kv = c.num_kv_heads * c.head_dim, qcols = c.num_heads * c.head_dim;
  for (int64_t r = 0; r < T; ++r) {
    char* kd = static_cast<char*>(k_cache) + slots[r] * kv * es;
    char* vd = static_cast<char*>(v_cache) + slots[r] * kv * es;
    std::memcpy(kd, qk + (r * qk_row + qcols) * es, kv * es);
    std::memcpy(vd, qkv + (r * qkv_row + qcols + kv) * es, kv * es);
  }
}

// One projection: bsr_linear, or bsr_linear_w8 where the weight has int8 scales.
bsr_status project(bsr_dtype dtype, const void* x, int64_t rows, int64_t in, const void* w, const float* scale,
                   int64_t out, const void* bias, void* y) {
  if (scale != nullptr)
    return bsr_linear_w8(static_cast<const float*>(x), in, rows, in, static_cast<const int8_t*>(w), scale, out,
                         static_cast<const float*>(bias), static_cast<float*>(y), out);
  return bsr_linear(dtype, x, in, rows, in, w, out, bias, y, out);
}

// bsr_decoder_layers, and bsr_decoder_layers_w8 with its scales (one bsr_layer_scales per layer).
bsr_status decoder_layers(const char* fn, bsr_dtype dtype, const bsr_decoder_config* config,
                          const bsr_layer_weights* layers, const bsr_layer_scales* scales, int64_t num_layers,
                          void* hidden, int64_t num_rows, const void* cos, const void* sin, int64_t cs_row_stride,
                          const int64_t* slots, int64_t num_blocks, int64_t block_size, const int32_t* block_tables,
                          int64_t table_stride, const int32_t* cu_seqlens_q, const int32_t* context_lens,
                          int64_t num_seqs) {
  BSR_TRY(check_f32_f16_bf16(fn, dtype));
  if (scales != nullptr && dtype != BSR_DTYPE_F32)
    return fail(BSR_ERR_UNSUPPORTED_DTYPE, "%s: int8 weights take f32 rows (dtype BSR_DTYPE_F32)", fn);
  BSR_CHECK_PTR(config, fn);
  const bsr_decoder_config& c = *config;
  BSR_TRY(check_at_least(fn, "config->hidden_size", c.hidden_size, 1));
  BSR_TRY(check_at_least(fn, "config->num_kv_heads", c.num_kv_heads, 1));
  BSR_TRY(check_at_least(fn, "config->intermediate_size", c.intermediate_size, 1));
  BSR_TRY(check_at_least(fn, "config->window", c.window, 0));
  BSR_TRY(check_at_least(fn, "num_layers", num_layers, 0));
  BSR_TRY(check_at_least(fn, "num_rows", num_rows, 0));
  if (c.num_heads < c.num_kv_heads || c.num_heads % c.num_kv_heads != 0)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: config->num_heads (%lld) must be a multiple of num_kv_heads (%lld)",
                fn, static_cast<long long>(c.num_heads), static_cast<long long>(c.num_kv_heads));
  if (c.head_dim < 2 || c.head_dim % 2)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: config->head_dim must be even and >= 2, got %lld", fn,
                static_cast<long long>(c.head_dim));
  if (!(c.eps > 0.f)) return fail(BSR_ERR_INVALID_ARGUMENT, "%s: config->eps must be > 0, got %g", fn, (double)c.eps);
  if (num_layers == 0 || num_rows == 0) return BSR_OK;
  BSR_CHECK_PTR(layers, fn);
  BSR_CHECK_PTR(hidden, fn);
  BSR_CHECK_PTR(slots, fn);
  for (int64_t l = 0; l < num_layers; ++l) {
    const bsr_layer_weights& w = layers[l];
    if (!w.input_norm || !w.qkv_weight || !w.o_weight || !w.post_norm || !w.gate_up_weight || !w.down_weight ||
        !w.k_cache || !w.v_cache)
      return fail(BSR_ERR_NULL_POINTER, "%s: layers[%lld] has a NULL weight or cache (only biases may be NULL)", fn,
                  static_cast<long long>(l));
  }
  const int64_t T = num_rows, d = c.hidden_size, D = c.head_dim, H = c.num_heads, KV = c.num_kv_heads;
  const int64_t qcols = H * D, kvcols = KV * D, qkv_cols = qcols + 2 * kvcols, I = c.intermediate_size;
  for (int64_t r = 0; r < T; ++r)
    if (slots[r] < 0 || slots[r] >= num_blocks * block_size)
      return fail(BSR_ERR_INVALID_ARGUMENT, "%s: slots[%lld] = %lld is outside the cache's %lld slots", fn,
                  static_cast<long long>(r), static_cast<long long>(slots[r]),
                  static_cast<long long>(num_blocks * block_size));
  const int64_t es = dtype_bytes(dtype);
  // workspace: x [T, d], qkv [T, qkv_cols], qk (rotated q and k) [T, H + KV, D], attention
  // [T, qcols], gate/up [T, 2 I], act [T, I], a sublayer's output [T, d]
  const int64_t sizes[7] = {T * d, T * qkv_cols, T * (qcols + kvcols), T * qcols, T * 2 * I, T * I, T * d};
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  std::unique_ptr<char[]> ws(new char[total * es]);
  char* p[7];
  p[0] = ws.get();
  for (int i = 1; i < 7; ++i) p[i] = p[i - 1] + sizes[i - 1] * es;
  char *x = p[0], *qkv = p[1], *qk = p[2], *attn = p[3], *gu = p[4], *act = p[5], *sub = p[6];
  const float scale = c.scale > 0.f ? c.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  for (int64_t l = 0; l < num_layers; ++l) {
    const bsr_layer_weights& w = layers[l];
    const bsr_layer_scales none = {nullptr, nullptr, nullptr, nullptr};
    const bsr_layer_scales& s = scales != nullptr ? scales[l] : none;
    BSR_TRY(bsr_rms_norm(dtype, hidden, d, nullptr, 0, T, d, w.input_norm, c.eps, nullptr, 0, x, d));
    BSR_TRY(project(dtype, x, T, d, w.qkv_weight, s.qkv, qkv_cols, w.qkv_bias, qkv));
    BSR_TRY(bsr_rope(dtype, qkv, qkv_cols, D, T, H + KV, D, cos, sin, cs_row_stride, qk, qcols + kvcols, D));
    write_cache(c, T, es, qk, qcols + kvcols, qkv, qkv_cols, slots, w.k_cache, w.v_cache);
    BSR_TRY(bsr_paged_attention(dtype, qk, qcols + kvcols, D, w.k_cache, w.v_cache, kvcols, kvcols, num_blocks,
                                block_size, KV, H, D, block_tables, table_stride, cu_seqlens_q, context_lens,
                                num_seqs, c.window, scale, attn, qcols, D));
    BSR_TRY(project(dtype, attn, T, qcols, w.o_weight, s.o, d, w.o_bias, sub));
    BSR_TRY(bsr_rms_norm(dtype, hidden, d, sub, d, T, d, w.post_norm, c.eps, hidden, d, x, d));
    BSR_TRY(project(dtype, x, T, d, w.gate_up_weight, s.gate_up, 2 * I, w.gate_up_bias, gu));
    BSR_TRY(bsr_silu_mul(dtype, gu, 2 * I, T, I, act, I));
    BSR_TRY(project(dtype, act, T, I, w.down_weight, s.down, d, w.down_bias, sub));
    add_into(dtype, hidden, sub, T * d);
  }
  return BSR_OK;
}

}  // namespace
}  // namespace bsr

using namespace bsr;

BSR_API bsr_status bsr_decoder_layers(bsr_dtype dtype, const bsr_decoder_config* config,
                                      const bsr_layer_weights* layers, int64_t num_layers, void* hidden,
                                      int64_t num_rows, const void* cos, const void* sin, int64_t cs_row_stride,
                                      const int64_t* slots, int64_t num_blocks, int64_t block_size,
                                      const int32_t* block_tables, int64_t table_stride,
                                      const int32_t* cu_seqlens_q, const int32_t* context_lens, int64_t num_seqs) {
  static const char* fn = "bsr_decoder_layers";
  clear_error();
  BSR_GUARD_BEGIN
  return decoder_layers(fn, dtype, config, layers, nullptr, num_layers, hidden, num_rows, cos, sin, cs_row_stride,
                        slots, num_blocks, block_size, block_tables, table_stride, cu_seqlens_q, context_lens,
                        num_seqs);
  BSR_GUARD_END(fn)
}

BSR_API bsr_status bsr_decoder_layers_w8(const bsr_decoder_config* config, const bsr_layer_weights* layers,
                                         const bsr_layer_scales* scales, int64_t num_layers, float* hidden,
                                         int64_t num_rows, const float* cos, const float* sin,
                                         int64_t cs_row_stride, const int64_t* slots, int64_t num_blocks,
                                         int64_t block_size, const int32_t* block_tables, int64_t table_stride,
                                         const int32_t* cu_seqlens_q, const int32_t* context_lens,
                                         int64_t num_seqs) {
  static const char* fn = "bsr_decoder_layers_w8";
  clear_error();
  BSR_GUARD_BEGIN
  if (num_layers > 0 && num_rows > 0) BSR_CHECK_PTR(scales, fn);
  return decoder_layers(fn, BSR_DTYPE_F32, config, layers, scales, num_layers, hidden, num_rows, cos, sin,
                        cs_row_stride, slots, num_blocks, block_size, block_tables, table_stride, cu_seqlens_q,
                        context_lens, num_seqs);
  BSR_GUARD_END(fn)
}
