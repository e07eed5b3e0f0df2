// pybind11 module bsharedrag_fast._C: a thin mirror of the C ABI in include/bsharedrag.h.
// Pointers are Python ints (e.g. tensor.data_ptr()), sizes are int64. The GIL is released
// around every kernel call. Errors raise ValueError (invalid argument / unsupported dtype),
// MemoryError (out of memory) or RuntimeError, with bsr_last_error() as the message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bsharedrag.h"

namespace py = pybind11;

namespace bsr {
const char* active_isa_name();  // lora.cpp (internal)
}

namespace {

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(bsr_status st) {
  if (st == BSR_OK) return;
  std::string msg = bsr_last_error();
  if (msg.empty()) msg = bsr_status_string(st);
  switch (st) {
    case BSR_ERR_INVALID_ARGUMENT:
    case BSR_ERR_UNSUPPORTED_DTYPE:
      throw py::value_error(msg);
    case BSR_ERR_OUT_OF_MEMORY:
      PyErr_SetString(PyExc_MemoryError, msg.c_str());
      throw py::error_already_set();
    default:
      throw std::runtime_error(msg);
  }
}

bsr_dtype to_dtype(int d) { return static_cast<bsr_dtype>(d); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bsharedrag CPU multi-LoRA kernels (C ABI mirror; pointers are ints)";

  m.attr("DTYPE_F32") = static_cast<int>(BSR_DTYPE_F32);
  m.attr("DTYPE_F16") = static_cast<int>(BSR_DTYPE_F16);
  m.attr("DTYPE_BF16") = static_cast<int>(BSR_DTYPE_BF16);
  m.attr("DTYPE_F64") = static_cast<int>(BSR_DTYPE_F64);

  m.def("version", []() { return std::string(bsr_version_string()); });
  m.def("set_num_threads", [](int n) { bsr_set_num_threads(n); }, py::arg("n"),
        "Worker threads for the kernels; n <= 0 restores the default (omp_get_max_threads()).");
  m.def("get_num_threads", []() { return bsr_get_num_threads(); });
  m.def("_isa", []() { return std::string(bsr::active_isa_name()); },
        "SIMD level the kernels dispatched to: avx512, avx2 or generic.");

  m.def(
      "lora_sort_tokens",
      [](std::uintptr_t token_adapter, int64_t num_tokens, int64_t num_adapters, std::uintptr_t sorted_idx,
         std::uintptr_t counts, std::uintptr_t starts) -> int64_t {
        if (num_adapters < 0 || num_adapters > INT32_MAX)
          throw py::value_error("lora_sort_tokens: num_adapters must be in [0, 2^31-1], got " +
                                std::to_string(num_adapters));
        int64_t num_lora = 0;
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_lora_sort_tokens(ptr<const int32_t>(token_adapter), num_tokens,
                                    static_cast<int32_t>(num_adapters), ptr<int32_t>(sorted_idx),
                                    ptr<int32_t>(counts), ptr<int32_t>(starts), &num_lora);
        }
        check(st);
        return num_lora;
      },
      py::arg("token_adapter_ptr"), py::arg("num_tokens"), py::arg("num_adapters"), py::arg("sorted_idx_ptr"),
      py::arg("counts_ptr"), py::arg("starts_ptr"));

  m.def(
      "lora_shrink",
      [](int dtype, std::uintptr_t x, int64_t x_row_stride, int64_t in_features, std::uintptr_t a,
         int64_t num_adapters, int64_t rank, std::uintptr_t sorted_idx, std::uintptr_t counts,
         std::uintptr_t starts, std::uintptr_t v) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_lora_shrink(to_dtype(dtype), ptr<const void>(x), x_row_stride, in_features,
                               ptr<const void>(a), num_adapters, rank, ptr<const int32_t>(sorted_idx),
                               ptr<const int32_t>(counts), ptr<const int32_t>(starts), ptr<float>(v));
        }
        check(st);
      },
      py::arg("dtype"), py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("in_features"), py::arg("a_ptr"),
      py::arg("num_adapters"), py::arg("rank"), py::arg("sorted_idx_ptr"), py::arg("counts_ptr"),
      py::arg("starts_ptr"), py::arg("v_ptr"));

  m.def(
      "lora_expand",
      [](int dtype, std::uintptr_t v, int64_t rank, std::uintptr_t b, int64_t num_adapters, int64_t out_features,
         std::uintptr_t scaling, std::uintptr_t sorted_idx, std::uintptr_t counts, std::uintptr_t starts,
         std::uintptr_t y, int64_t y_row_stride) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_lora_expand(to_dtype(dtype), ptr<const float>(v), rank, ptr<const void>(b), num_adapters,
                               out_features, ptr<const float>(scaling), ptr<const int32_t>(sorted_idx),
                               ptr<const int32_t>(counts), ptr<const int32_t>(starts), ptr<void>(y),
                               y_row_stride);
        }
        check(st);
      },
      py::arg("dtype"), py::arg("v_ptr"), py::arg("rank"), py::arg("b_ptr"), py::arg("num_adapters"),
      py::arg("out_features"), py::arg("scaling_ptr"), py::arg("sorted_idx_ptr"), py::arg("counts_ptr"),
      py::arg("starts_ptr"), py::arg("y_ptr"), py::arg("y_row_stride"));

  m.def(
      "lora_expand_slices",
      [](int dtype, std::uintptr_t v, int64_t v_cols, const std::vector<int64_t>& rank_offsets,
         const std::vector<int64_t>& ranks, const std::vector<std::uintptr_t>& b, const std::vector<int64_t>& out_offsets,
         const std::vector<int64_t>& out_features, const std::vector<std::uintptr_t>& scaling, int64_t num_adapters,
         std::uintptr_t sorted_idx, std::uintptr_t counts, std::uintptr_t starts, std::uintptr_t y, int64_t y_cols,
         int64_t y_row_stride) {
        const size_t n = ranks.size();
        if (rank_offsets.size() != n || b.size() != n || out_offsets.size() != n || out_features.size() != n ||
            scaling.size() != n)
          throw std::invalid_argument("lora_expand_slices: the per-slice lists must have one entry per slice");
        std::vector<const void*> bp(n);
        std::vector<const float*> sp(n);
        for (size_t i = 0; i < n; ++i) {
          bp[i] = ptr<const void>(b[i]);
          sp[i] = ptr<const float>(scaling[i]);
        }
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_lora_expand_slices(to_dtype(dtype), ptr<const float>(v), v_cols, static_cast<int64_t>(n),
                                      rank_offsets.data(), ranks.data(), bp.data(), out_offsets.data(),
                                      out_features.data(), sp.data(), num_adapters, ptr<const int32_t>(sorted_idx),
                                      ptr<const int32_t>(counts), ptr<const int32_t>(starts), ptr<void>(y), y_cols,
                                      y_row_stride);
        }
        check(st);
      },
      py::arg("dtype"), py::arg("v_ptr"), py::arg("v_cols"), py::arg("rank_offsets"), py::arg("ranks"),
      py::arg("b_ptrs"), py::arg("out_offsets"), py::arg("out_features"), py::arg("scaling_ptrs"),
      py::arg("num_adapters"), py::arg("sorted_idx_ptr"), py::arg("counts_ptr"), py::arg("starts_ptr"),
      py::arg("y_ptr"), py::arg("y_cols"), py::arg("y_row_stride"));

  m.def(
      "paged_attention",
      [](int dtype, std::uintptr_t q, int64_t q_row_stride, int64_t q_head_stride, std::uintptr_t k_cache,
         std::uintptr_t v_cache, int64_t k_token_stride, int64_t v_token_stride, int64_t num_blocks,
         int64_t block_size, int64_t num_kv_heads, int64_t num_heads, int64_t head_dim, std::uintptr_t block_tables,
         int64_t table_stride, std::uintptr_t cu_seqlens_q, std::uintptr_t context_lens, int64_t num_seqs,
         int64_t window, float scale, std::uintptr_t out, int64_t out_row_stride, int64_t out_head_stride) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_paged_attention(to_dtype(dtype), ptr<const void>(q), q_row_stride, q_head_stride,
                                   ptr<const void>(k_cache), ptr<const void>(v_cache), k_token_stride, v_token_stride,
                                   num_blocks, block_size, num_kv_heads, num_heads, head_dim,
                                   ptr<const int32_t>(block_tables), table_stride, ptr<const int32_t>(cu_seqlens_q),
                                   ptr<const int32_t>(context_lens), num_seqs, window, scale, ptr<void>(out),
                                   out_row_stride, out_head_stride);
        }
        check(st);
      },
      py::arg("dtype"), py::arg("q_ptr"), py::arg("q_row_stride"), py::arg("q_head_stride"), py::arg("k_ptr"),
      py::arg("v_ptr"), py::arg("k_token_stride"), py::arg("v_token_stride"), py::arg("num_blocks"),
      py::arg("block_size"), py::arg("num_kv_heads"), py::arg("num_heads"), py::arg("head_dim"),
      py::arg("tables_ptr"), py::arg("table_stride"), py::arg("cu_ptr"), py::arg("lens_ptr"), py::arg("num_seqs"),
      py::arg("window"), py::arg("scale"), py::arg("out_ptr"), py::arg("out_row_stride"),
      py::arg("out_head_stride"));

  m.def(
      "rms_norm",
      [](int dtype, std::uintptr_t x, int64_t x_row_stride, std::uintptr_t add, int64_t add_row_stride,
         int64_t num_rows, int64_t dim, std::uintptr_t weight, float eps, std::uintptr_t sum_out,
         int64_t sum_row_stride, std::uintptr_t out, int64_t out_row_stride) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_rms_norm(to_dtype(dtype), ptr<const void>(x), x_row_stride, ptr<const void>(add), add_row_stride,
                            num_rows, dim, ptr<const void>(weight), eps, ptr<void>(sum_out), sum_row_stride,
                            ptr<void>(out), out_row_stride);
        }
        check(st);
      },
      py::arg("dtype"), py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("add_ptr"), py::arg("add_row_stride"),
      py::arg("num_rows"), py::arg("dim"), py::arg("weight_ptr"), py::arg("eps"), py::arg("sum_ptr"),
      py::arg("sum_row_stride"), py::arg("out_ptr"), py::arg("out_row_stride"));

  m.def(
      "silu_mul",
      [](int dtype, std::uintptr_t x, int64_t x_row_stride, int64_t num_rows, int64_t dim, std::uintptr_t out,
         int64_t out_row_stride) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_silu_mul(to_dtype(dtype), ptr<const void>(x), x_row_stride, num_rows, dim, ptr<void>(out),
                            out_row_stride);
        }
        check(st);
      },
      py::arg("dtype"), py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("num_rows"), py::arg("dim"),
      py::arg("out_ptr"), py::arg("out_row_stride"));

  m.def(
      "rope",
      [](int dtype, std::uintptr_t x, int64_t x_row_stride, int64_t x_head_stride, int64_t num_rows,
         int64_t num_heads, int64_t head_dim, std::uintptr_t cos, std::uintptr_t sin, int64_t cs_row_stride,
         std::uintptr_t out, int64_t out_row_stride, int64_t out_head_stride) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_rope(to_dtype(dtype), ptr<const void>(x), x_row_stride, x_head_stride, num_rows, num_heads,
                        head_dim, ptr<const void>(cos), ptr<const void>(sin), cs_row_stride, ptr<void>(out),
                        out_row_stride, out_head_stride);
        }
        check(st);
      },
      py::arg("dtype"), py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("x_head_stride"), py::arg("num_rows"),
      py::arg("num_heads"), py::arg("head_dim"), py::arg("cos_ptr"), py::arg("sin_ptr"), py::arg("cs_row_stride"),
      py::arg("out_ptr"), py::arg("out_row_stride"), py::arg("out_head_stride"));

  m.def(
      "decoder_layers",
      [](int dtype, int64_t hidden_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t intermediate_size, float eps, int64_t window, float scale, std::uintptr_t layers, int64_t num_layers,
         std::uintptr_t hidden, int64_t num_rows, std::uintptr_t cos, std::uintptr_t sin, int64_t cs_row_stride,
         std::uintptr_t slots, int64_t num_blocks, int64_t block_size, std::uintptr_t block_tables,
         int64_t table_stride, std::uintptr_t cu_seqlens_q, std::uintptr_t context_lens, int64_t num_seqs,
         std::uintptr_t scales) {
        const bsr_decoder_config cfg{hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size,
                                     eps,         window,    scale};
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          if (scales != 0) {  // int8 weights: bsr_decoder_layers_w8 (f32 rows)
            st = bsr_decoder_layers_w8(&cfg, ptr<const bsr_layer_weights>(layers),
                                       ptr<const bsr_layer_scales>(scales), num_layers, ptr<float>(hidden), num_rows,
                                       ptr<const float>(cos), ptr<const float>(sin), cs_row_stride,
                                       ptr<const int64_t>(slots), num_blocks, block_size,
                                       ptr<const int32_t>(block_tables), table_stride,
                                       ptr<const int32_t>(cu_seqlens_q), ptr<const int32_t>(context_lens), num_seqs);
          } else {
            st = bsr_decoder_layers(to_dtype(dtype), &cfg, ptr<const bsr_layer_weights>(layers), num_layers,
                                    ptr<void>(hidden), num_rows, ptr<const void>(cos), ptr<const void>(sin),
                                    cs_row_stride, ptr<const int64_t>(slots), num_blocks, block_size,
                                    ptr<const int32_t>(block_tables), table_stride, ptr<const int32_t>(cu_seqlens_q),
                                    ptr<const int32_t>(context_lens), num_seqs);
          }
        }
        check(st);
      });

  m.def(
      "lora_add",
      [](int dtype, std::uintptr_t x, int64_t x_row_stride, int64_t in_features, std::uintptr_t a,
         std::uintptr_t b, std::uintptr_t scaling, int64_t num_adapters, int64_t rank, int64_t out_features,
         std::uintptr_t token_adapter, int64_t num_tokens, std::uintptr_t y, int64_t y_row_stride) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_lora_add(to_dtype(dtype), ptr<const void>(x), x_row_stride, in_features, ptr<const void>(a),
                            ptr<const void>(b), ptr<const float>(scaling), num_adapters, rank, out_features,
                            ptr<const int32_t>(token_adapter), num_tokens, ptr<void>(y), y_row_stride);
        }
        check(st);
      },
      py::arg("dtype"), py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("in_features"), py::arg("a_ptr"),
      py::arg("b_ptr"), py::arg("scaling_ptr"), py::arg("num_adapters"), py::arg("rank"),
      py::arg("out_features"), py::arg("token_adapter_ptr"), py::arg("num_tokens"), py::arg("y_ptr"),
      py::arg("y_row_stride"));

  m.def(
      "linear",
      [](int dtype, std::uintptr_t x, int64_t x_row_stride, int64_t rows, int64_t in_features, std::uintptr_t w,
         int64_t out_features, std::uintptr_t bias, std::uintptr_t y, int64_t y_row_stride) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_linear(to_dtype(dtype), ptr<const void>(x), x_row_stride, rows, in_features, ptr<const void>(w),
                          out_features, ptr<const void>(bias), ptr<void>(y), y_row_stride);
        }
        check(st);
      },
      py::arg("dtype"), py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("rows"), py::arg("in_features"),
      py::arg("weight_ptr"), py::arg("out_features"), py::arg("bias_ptr"), py::arg("y_ptr"),
      py::arg("y_row_stride"), "Dense y = x W^T + b for few rows (bias_ptr 0 = no bias).");

  m.def(
      "linear_w8",
      [](std::uintptr_t x, int64_t x_row_stride, int64_t rows, int64_t in_features, std::uintptr_t w,
         std::uintptr_t scale, int64_t out_features, std::uintptr_t bias, std::uintptr_t y, int64_t y_row_stride) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_linear_w8(ptr<const float>(x), x_row_stride, rows, in_features, ptr<const int8_t>(w),
                             ptr<const float>(scale), out_features, ptr<const float>(bias), ptr<float>(y),
                             y_row_stride);
        }
        check(st);
      },
      py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("rows"), py::arg("in_features"), py::arg("weight_ptr"),
      py::arg("scale_ptr"), py::arg("out_features"), py::arg("bias_ptr"), py::arg("y_ptr"), py::arg("y_row_stride"),
      "Weight-only int8 y = scale * (x Wq^T) + b, f32 rows (bias_ptr 0 = no bias).");

  m.attr("POOL_LAST") = static_cast<int>(BSR_POOL_LAST);
  m.attr("POOL_MEAN") = static_cast<int>(BSR_POOL_MEAN);
  m.attr("POOL_CLS") = static_cast<int>(BSR_POOL_CLS);
  m.def(
      "pool",
      [](int dtype, std::uintptr_t hidden, int64_t hidden_row_stride, int64_t num_rows, int64_t dim,
         std::uintptr_t cu_seqlens, int64_t num_seqs, int mode, std::uintptr_t norm_weight, float eps,
         bool normalize, std::uintptr_t out, int64_t out_row_stride) {
        bsr_status st;
        {
          py::gil_scoped_release nogil;
          st = bsr_pool(to_dtype(dtype), ptr<const void>(hidden), hidden_row_stride, num_rows, dim,
                        ptr<const int32_t>(cu_seqlens), num_seqs, static_cast<bsr_pool_mode>(mode),
                        ptr<const void>(norm_weight), eps, normalize ? 1 : 0, ptr<void>(out), out_row_stride);
        }
        check(st);
      },
      py::arg("dtype"), py::arg("hidden_ptr"), py::arg("hidden_row_stride"), py::arg("num_rows"), py::arg("dim"),
      py::arg("cu_seqlens_ptr"), py::arg("num_seqs"), py::arg("mode"), py::arg("norm_weight_ptr"), py::arg("eps"),
      py::arg("normalize"), py::arg("out_ptr"), py::arg("out_row_stride"),
      "Pooled embeddings of packed sequences (norm_weight_ptr 0 = no fused RMSNorm).");
}
