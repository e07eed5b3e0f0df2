// Internal: compiles one kernels header once per ISA, each copy in its own namespace with
// that ISA's vector type V (lora_simd_*.h) in scope: the portable one always; AVX2+FMA+F16C
// and AVX-512 (F/BW/VL/DQ) under `#pragma GCC target` (clang: `attribute push`) on x86 with
// GCC / Clang. The includer defines, then this header undefines:
//   BSR_PER_ISA_KERNELS  the header to compile ("lora_kernels.h", "attention_kernels.h")
//   BSR_PER_ISA_NS(isa)  the namespace of each copy, isa = generic, avx2 or avx512
// No include guard on purpose (lora.cpp, attention.cpp and rowops.cpp each include it once).

namespace BSR_PER_ISA_NS(generic) {
#include "lora_simd_generic.h"
#include BSR_PER_ISA_KERNELS
}  // namespace

#if BSR_X86_DISPATCH
// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized on _mm512_undefined_*().
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace BSR_PER_ISA_NS(avx2) {
#include "lora_simd_avx2.h"
#include BSR_PER_ISA_KERNELS
}  // namespace
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
namespace BSR_PER_ISA_NS(avx512) {
#include "lora_simd_avx512.h"
#include BSR_PER_ISA_KERNELS
}  // namespace
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // BSR_X86_DISPATCH

#undef BSR_PER_ISA_KERNELS
#undef BSR_PER_ISA_NS
