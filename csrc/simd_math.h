// Internal header: scalar math written so that loops over it vectorize, included inside each
// per-ISA namespace by a kernels header (attention_kernels.h, rowops_kernels.h); no include
// guard and no system headers on purpose (the includer has <cstring> and <cstdint>).

// exp(x) for x <= 0 (scores minus their running max), 0 for x below ~-87 (-inf included).
// Cephes' single-precision polynomial (about 1 ulp), branch-free (rounding by the 1.5 * 2^23
// trick, selects as compares) so that loops over it vectorize; std::exp stays a scalar call.
static inline float exp_nonpos(float x) {
  const float xc = x > -87.f ? x : -87.f;
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return x > -87.f ? y * two_n : 0.f;
}
