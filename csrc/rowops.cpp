// bsr_rms_norm, bsr_silu_mul and bsr_rope: the row-wise ops between a decoder layer's matmuls,
// one pass over each row (see bsharedrag.h). In torch each is 3-8 ops, each a full pass over the rows
// and, on a decode step, a few microseconds of dispatch for a handful of rows.
// The kernels (rowops_kernels.h) are compiled per ISA by per_isa.h, as the LoRA kernels are,
// and the ISA the LoRA kernels picked is used. Rows are split over threads past kParallelMin
// elements (below it a parallel region costs more than it saves).
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bsharedrag.h"
#include "lora_common.h"
#include "runtime.h"

namespace bsr {

struct RmsNormArgs {
  const void* x;
  int64_t x_row_stride;
  const void* add;
  int64_t add_row_stride;
  int64_t dim;
  const void* weight;
  float eps;
  void* sum_out;
  int64_t sum_row_stride;
  void* out;
  int64_t out_row_stride;
};

struct SiluMulArgs {
  const void* x;
  int64_t x_row_stride, dim;
  void* out;
  int64_t out_row_stride;
};

struct RopeArgs {
  const void* x;
  int64_t x_row_stride, x_head_stride, num_heads, head_dim;
  const void* cos;
  const void* sin;
  int64_t cs_row_stride;
  void* out;
  int64_t out_row_stride, out_head_stride;
};

enum class RowOp { kRmsNorm, kSiluMul, kRope };

#define BSR_PER_ISA_KERNELS "rowops_kernels.h"
#define BSR_PER_ISA_NS(isa) rowops_##isa
#include "per_isa.h"

namespace {

constexpr int64_t kParallelMin = 1 << 16;  // elements

void rows_op(RowOp op, bsr_dtype dtype, const void* args, int64_t rows, int64_t dim) {
  const int nt = rows > 1 && rows * dim >= kParallelMin ? num_threads() : 1;
#if BSR_X86_DISPATCH
  static const char* isa = active_isa_name();
  if (std::strcmp(isa, "avx512") == 0) return rowops_avx512::rows_op(op, dtype, args, rows, nt);
  if (std::strcmp(isa, "avx2") == 0) return rowops_avx2::rows_op(op, dtype, args, rows, nt);
#endif
  rowops_generic::rows_op(op, dtype, args, rows, nt);
}

}  // namespace
}  // namespace bsr

using namespace bsr;

BSR_API bsr_status bsr_rms_norm(bsr_dtype dtype, const void* x, int64_t x_row_stride, const void* add,
                                int64_t add_row_stride, int64_t num_rows, int64_t dim, const void* weight, float eps,
                                void* sum_out, int64_t sum_row_stride, void* out, int64_t out_row_stride) {
  static const char* fn = "bsr_rms_norm";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_f32_f16_bf16(fn, dtype));
  BSR_TRY(check_at_least(fn, "num_rows", num_rows, 0));
  BSR_TRY(check_rows(fn, "dim", dim, "x_row_stride", x_row_stride));
  BSR_TRY(check_rows(fn, "dim", dim, "out_row_stride", out_row_stride));
  if (!(eps > 0.f)) return fail(BSR_ERR_INVALID_ARGUMENT, "%s: eps must be > 0, got %g", fn, (double)eps);
  if (num_rows == 0) return BSR_OK;
  BSR_CHECK_PTR(x, fn);
  BSR_CHECK_PTR(weight, fn);
  BSR_CHECK_PTR(out, fn);
  if (add != nullptr) {
    BSR_CHECK_PTR(sum_out, fn);
    BSR_TRY(check_rows(fn, "dim", dim, "add_row_stride", add_row_stride));
    BSR_TRY(check_rows(fn, "dim", dim, "sum_row_stride", sum_row_stride));
  }
  const RmsNormArgs a{x, x_row_stride, add, add_row_stride, dim, weight, eps, sum_out, sum_row_stride,
                      out, out_row_stride};
  rows_op(RowOp::kRmsNorm, dtype, &a, num_rows, dim);
  return BSR_OK;
  BSR_GUARD_END(fn)
}

BSR_API bsr_status bsr_silu_mul(bsr_dtype dtype, const void* x, int64_t x_row_stride, int64_t num_rows, int64_t dim,
                                void* out, int64_t out_row_stride) {
  static const char* fn = "bsr_silu_mul";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_f32_f16_bf16(fn, dtype));
  BSR_TRY(check_at_least(fn, "num_rows", num_rows, 0));
  BSR_TRY(check_at_least(fn, "dim", dim, 1));
  if (x_row_stride < 2 * dim)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: x_row_stride must be >= 2 x dim (%lld), got %lld", fn,
                static_cast<long long>(2 * dim), static_cast<long long>(x_row_stride));
  BSR_TRY(check_rows(fn, "dim", dim, "out_row_stride", out_row_stride));
  if (num_rows == 0) return BSR_OK;
  BSR_CHECK_PTR(x, fn);
  BSR_CHECK_PTR(out, fn);
  const SiluMulArgs a{x, x_row_stride, dim, out, out_row_stride};
  rows_op(RowOp::kSiluMul, dtype, &a, num_rows, dim);
  return BSR_OK;
  BSR_GUARD_END(fn)
}

BSR_API bsr_status bsr_rope(bsr_dtype dtype, const void* x, int64_t x_row_stride, int64_t x_head_stride,
                            int64_t num_rows, int64_t num_heads, int64_t head_dim, const void* cos, const void* sin,
                            int64_t cs_row_stride, void* out, int64_t out_row_stride, int64_t out_head_stride) {
  static const char* fn = "bsr_rope";
  clear_error();
  BSR_GUARD_BEGIN
  BSR_TRY(check_f32_f16_bf16(fn, dtype));
  BSR_TRY(check_at_least(fn, "num_rows", num_rows, 0));
  BSR_TRY(check_at_least(fn, "num_heads", num_heads, 1));
  BSR_TRY(check_at_least(fn, "head_dim", head_dim, 2));
  if (head_dim % 2)
    return fail(BSR_ERR_INVALID_ARGUMENT, "%s: head_dim must be even, got %lld", fn, static_cast<long long>(head_dim));
  BSR_TRY(check_rows(fn, "head_dim", head_dim, "x_head_stride", x_head_stride));
  BSR_TRY(check_rows(fn, "head_dim", head_dim, "out_head_stride", out_head_stride));
  BSR_TRY(check_rows(fn, "num_heads x x_head_stride", num_heads * x_head_stride, "x_row_stride", x_row_stride));
  BSR_TRY(check_rows(fn, "num_heads x out_head_stride", num_heads * out_head_stride, "out_row_stride",
                     out_row_stride));
  BSR_TRY(check_rows(fn, "head_dim / 2", head_dim / 2, "cs_row_stride", cs_row_stride));
  if (num_rows == 0) return BSR_OK;
  BSR_CHECK_PTR(x, fn);
  BSR_CHECK_PTR(cos, fn);
  BSR_CHECK_PTR(sin, fn);
  BSR_CHECK_PTR(out, fn);
  const RopeArgs a{x, x_row_stride, x_head_stride, num_heads, head_dim, cos, sin, cs_row_stride,
                   out, out_row_stride, out_head_stride};
  rows_op(RowOp::kRope, dtype, &a, num_rows, num_heads * head_dim);
  return BSR_OK;
  BSR_GUARD_END(fn)
}
