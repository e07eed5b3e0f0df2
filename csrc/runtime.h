// Shared by the C ABI's translation units (lora.cpp, pool.cpp): the thread-local last
// error, the worker-thread count, and the guards that keep C++ exceptions inside the ABI.
#ifndef BSHAREDRAG_RUNTIME_H
#define BSHAREDRAG_RUNTIME_H

#include <exception>
#include <new>

#include "bsharedrag.h"

namespace bsr {

void clear_error();
// Records the message for bsr_last_error() and returns st.
#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
bsr_status fail(bsr_status st, const char* fmt, ...);
// Threads for a parallel region: bsr_set_num_threads' value, else OpenMP's default.
int num_threads();

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
