/* Downstream consumer of an installed libbsharedrag: one version query, one lora_add. */
#include <math.h>
#include <stdio.h>

#include <bsharedrag.h>

int main(void) {
  int major = -1, minor = -1, patch = -1;
  /* T=2 rows, in=3, out=2, rank 1, 1 adapter; row 1 uses no adapter */
  const float x[2 * 3] = {1.f, 2.f, 3.f, 4.f, 5.f, 6.f};
  const float a[1 * 1 * 3] = {0.5f, -1.f, 2.f};    /* x0 . a = 0.5 - 2 + 6 = 4.5 */
  const float b[1 * 2 * 1] = {2.f, -1.f};
  const float scaling[1] = {0.5f};
  const int32_t token_adapter[2] = {0, -1};
  float y[2 * 2] = {1.f, 1.f, 7.f, 7.f};
  const float want[4] = {1.f + 0.5f * 4.5f * 2.f, 1.f - 0.5f * 4.5f, 7.f, 7.f};
  bsr_status st;
  int i;

  bsr_version(&major, &minor, &patch);
  if (major != BSR_VERSION_MAJOR || minor != BSR_VERSION_MINOR || patch != BSR_VERSION_PATCH) {
    fprintf(stderr, "version mismatch: library %d.%d.%d, header %d.%d.%d\n", major, minor, patch,
            BSR_VERSION_MAJOR, BSR_VERSION_MINOR, BSR_VERSION_PATCH);
    return 1;
  }
  st = bsr_lora_add(BSR_DTYPE_F32, x, 3, 3, a, b, scaling, 1, 1, 2, token_adapter, 2, y, 2);
  if (st != BSR_OK) {
    fprintf(stderr, "bsr_lora_add failed: %s (%s)\n", bsr_status_string(st), bsr_last_error());
    return 1;
  }
  for (i = 0; i < 4; ++i) {
    if (fabsf(y[i] - want[i]) > 1e-5f) {
      fprintf(stderr, "y[%d] = %g, expected %g\n", i, y[i], want[i]);
      return 1;
    }
  }
  printf("consumer OK: bsharedrag %s\n", bsr_version_string());
  return 0;
}
