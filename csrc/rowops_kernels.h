// Internal header of csrc/rowops.cpp, included once per ISA inside a namespace (per_isa.h).
// No include guard on purpose. Plain loops with `omp simd`: these ops read and write each
// element once, so memory, not the arithmetic, bounds them; the per-ISA copies let the
// compiler use that ISA's vectors and conversions.

#include "simd_math.h"  // exp_nonpos

// v rounded to T's precision (the identity for float): torch rounds each op's result to the
// tensor dtype, and the references these kernels must match do so between ops.
template <class T>
static inline float round_to(float v) {
  T t;
  Scalar<T>::store(&t, v);
  return Scalar<T>::load(&t);
}

// Rows [r0, r1): s = x (+ add, rounded to T, written to sum_out), then
// out = w * round(s * rsqrt(mean(s^2) + eps)), as transformers' LlamaRMSNorm.
template <class T>
static void rms_norm_rows(const RmsNormArgs& a, int64_t r0, int64_t r1) {
  const int64_t d = a.dim;
  const T* w = static_cast<const T*>(a.weight);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.x_row_stride;
    const T* src = x;  // the row the norm reads: x, or x + add once written
    float ss = 0.f;
    if (a.add != nullptr) {
      const T* add = static_cast<const T*>(a.add) + r * a.add_row_stride;
      T* sum = static_cast<T*>(a.sum_out) + r * a.sum_row_stride;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        const float v = round_to<T>(Scalar<T>::load(x + i) + Scalar<T>::load(add + i));
        Scalar<T>::store(sum + i, v);
        ss += v * v;
      }
      src = sum;
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        const float v = Scalar<T>::load(x + i);
        ss += v * v;
      }
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + a.eps);
    T* out = static_cast<T*>(a.out) + r * a.out_row_stride;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i)
      Scalar<T>::store(out + i, Scalar<T>::load(w + i) * round_to<T>(Scalar<T>::load(src + i) * inv));
  }
}

// Rows [r0, r1): out[:, i] = round(silu(x[:, i])) * x[:, dim + i] (the gate, then the up half).
// sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) below, e = exp(-|g|) <= 1: no overflow.
template <class T>
static void silu_mul_rows(const SiluMulArgs& a, int64_t r0, int64_t r1) {
  const int64_t d = a.dim;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.x_row_stride;
    T* out = static_cast<T*>(a.out) + r * a.out_row_stride;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const float g = Scalar<T>::load(x + i);
      const float e = exp_nonpos(g >= 0.f ? -g : g);
      const float sig = (g >= 0.f ? 1.f : e) / (1.f + e);
      Scalar<T>::store(out + i, round_to<T>(g * sig) * Scalar<T>::load(x + d + i));
    }
  }
}

// Rows [r0, r1), every head: the rotate-half rotary embedding (GPT-NeoX / Llama), halves
// x1 = x[:d/2], x2 = x[d/2:]: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin, cos / sin of
// the row's position [d/2]. Each product and the sum rounded to T, as torch computes
// x * cos + rotate_half(x) * sin; no product is fused into the add (fp-contract off), so fp32
// results equal torch's bit for bit.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
template <class T>
static void rope_rows(const RopeArgs& a, int64_t r0, int64_t r1) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int64_t h = a.head_dim / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const T* c = static_cast<const T*>(a.cos) + r * a.cs_row_stride;
    const T* s = static_cast<const T*>(a.sin) + r * a.cs_row_stride;
    for (int64_t head = 0; head < a.num_heads; ++head) {
      const T* x = static_cast<const T*>(a.x) + r * a.x_row_stride + head * a.x_head_stride;
      T* out = static_cast<T*>(a.out) + r * a.out_row_stride + head * a.out_head_stride;
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) {
        const float x1 = Scalar<T>::load(x + i), x2 = Scalar<T>::load(x + h + i);
        const float ci = Scalar<T>::load(c + i), si = Scalar<T>::load(s + i);
        const float a1 = round_to<T>(x1 * ci), b1 = round_to<T>(x2 * si);
        const float a2 = round_to<T>(x2 * ci), b2 = round_to<T>(x1 * si);
        Scalar<T>::store(out + i, a1 - b1);
        Scalar<T>::store(out + h + i, a2 + b2);
      }
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

template <class T>
static void row_op(RowOp op, const void* args, int64_t r) {
  if (op == RowOp::kRmsNorm) rms_norm_rows<T>(*static_cast<const RmsNormArgs*>(args), r, r + 1);
  else if (op == RowOp::kSiluMul) silu_mul_rows<T>(*static_cast<const SiluMulArgs*>(args), r, r + 1);
  else rope_rows<T>(*static_cast<const RopeArgs*>(args), r, r + 1);
}

template <class T>
static void run_rows(RowOp op, const void* args, int64_t rows, int nt) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
  for (int64_t r = 0; r < rows; ++r) row_op<T>(op, args, r);
}

static void rows_op(RowOp op, bsr_dtype dtype, const void* args, int64_t rows, int nt) {
  if (dtype == BSR_DTYPE_F32) run_rows<float>(op, args, rows, nt);
  else if (dtype == BSR_DTYPE_F16) run_rows<f16_t>(op, args, rows, nt);
  else run_rows<bf16_t>(op, args, rows, nt);
}
