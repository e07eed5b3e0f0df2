// Shared by the C ABI's translation units (lora.cpp, pool.cpp, attention.cpp): the ISA, the
// thread-local last error, the worker-thread count, and the guards that keep C++
// exceptions inside the ABI.
#ifndef BSHAREDRAG_RUNTIME_H
#define BSHAREDRAG_RUNTIME_H

#include <exception>
#include <new>

#include "bsharedrag.h"

// Per-ISA kernel copies (lora.cpp, attention.cpp) on x86 with GCC / Clang.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define BSR_X86_DISPATCH 1
#include <immintrin.h>
#else
#define BSR_X86_DISPATCH 0
#endif

namespace bsr {

// The ISA the kernels run at ("avx512", "avx2" or "generic"), chosen once (lora.cpp).
const char* active_isa_name();
void clear_error();
// Records the message for bsr_last_error() and returns st.
#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
bsr_status fail(bsr_status st, const char* fmt, ...);
// Threads for a parallel region: bsr_set_num_threads' value, else OpenMP's default.
int num_threads();

// Return a failing status from the calling entry point.
#define BSR_TRY(expr)                      \
  do {                                     \
    const bsr_status bsr_st_ = (expr);     \
    if (bsr_st_ != BSR_OK) return bsr_st_; \
  } while (0)

// Argument checks shared by the entry points; each message names the argument.
inline bsr_status check_at_least(const char* fn, const char* name, int64_t value, int64_t lo) {
  if (value >= lo) return BSR_OK;
  return fail(BSR_ERR_INVALID_ARGUMENT, "%s: %s must be >= %lld, got %lld", fn, name, static_cast<long long>(lo),
              static_cast<long long>(value));
}

// The storage types of the entry points that take no f64 (attention, pool, the row ops, the decoder).
inline bsr_status check_f32_f16_bf16(const char* fn, bsr_dtype dtype) {
  if (dtype == BSR_DTYPE_F32 || dtype == BSR_DTYPE_F16 || dtype == BSR_DTYPE_BF16) return BSR_OK;
  return fail(BSR_ERR_UNSUPPORTED_DTYPE, "%s: dtype must be F32, F16 or BF16, got %d", fn, static_cast<int>(dtype));
}

// A row-major operand: `features` >= 1 columns, rows `stride` elements apart.
inline bsr_status check_rows(const char* fn, const char* features_name, int64_t features, const char* stride_name,
                             int64_t stride) {
  BSR_TRY(check_at_least(fn, features_name, features, 1));
  if (stride >= features) return BSR_OK;
  return fail(BSR_ERR_INVALID_ARGUMENT, "%s: %s must be >= %s (%lld), got %lld", fn, stride_name, features_name,
              static_cast<long long>(features), static_cast<long long>(stride));
}

}  // namespace bsr

#define BSR_CHECK_PTR(p, fn)                                                    \
  do {                                                                          \
    if ((p) == nullptr) return fail(BSR_ERR_NULL_POINTER, "%s: %s is NULL", fn, #p); \
  } while (0)

#define BSR_GUARD_BEGIN try {
#define BSR_GUARD_END(fn)                                                                  \
  }                                                                                        \
  catch (const std::bad_alloc&) {                                                          \
    return fail(BSR_ERR_OUT_OF_MEMORY, "%s: out of memory", fn);                           \
  }                                                                                        \
  catch (const std::exception& e) {                                                        \
    return fail(BSR_ERR_INTERNAL, "%s: internal error: %s", fn, e.what());                 \
  }                                                                                        \
  catch (...) {                                                                            \
    return fail(BSR_ERR_INTERNAL, "%s: internal error", fn);                               \
  }


#endif  // BSHAREDRAG_RUNTIME_H
