/*
 * C99 test of the bsharedrag C ABI (include/bsharedrag.h) against a naive double-precision
 * reference computed here. Registered with ctest as `c_abi` (and c_abi_avx2 / c_abi_generic,
 * the same program on the lower SIMD levels via BSHAREDRAG_ISA).
 * Exits non-zero, with a message per failure, if anything is wrong.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bsharedrag.h"

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    ++g_checks;                                            \
    if (!(cond)) {                                         \
      ++g_failures;                                        \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                        \
      fprintf(stderr, "\n");                               \
    }                                                      \
  } while (0)

/* ---- 16-bit float helpers (independent of the library's own) ------------------------ */
static uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static float bf16_to_float(uint16_t h) { return float_of((uint32_t)h << 16); }
static uint16_t float_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if (f != f) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float f16_to_float(uint16_t h) {
  int sign = (h >> 15) & 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0) v = ldexp((double)m, -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = ldexp((double)(m | 0x400), e - 25);
  return (float)(sign ? -v : v);
}
/* round to nearest even via a search over the (monotonic) finite halves: slow but obviously right */
static uint16_t float_to_f16(float f) {
  uint16_t sign = (bits_of(f) >> 16) & 0x8000u;
  double a = fabs((double)f);
  uint16_t lo = 0, hi = 0x7bff, best;
  if (f != f) return 0x7e00;
  if (a >= 65520.0) return (uint16_t)(sign | 0x7c00u);
  while (lo < hi) { /* largest half magnitude <= a */
    uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
    if ((double)f16_to_float(mid) <= a) lo = mid; else hi = (uint16_t)(mid - 1);
  }
  best = lo;
  if (lo < 0x7bff) {
    double d0 = a - (double)f16_to_float(lo), d1 = (double)f16_to_float((uint16_t)(lo + 1)) - a;
    if (d1 < d0 || (d1 == d0 && (lo & 1))) best = (uint16_t)(lo + 1);
  } else if (a - 65504.0 >= 16.0) {
    best = 0x7c00;
  }
  return (uint16_t)(sign | best);
}

/* ---- deterministic data ---------------------------------------------------------------- */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static double urand(void) { /* uniform in [-1, 1) */
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (double)(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

static size_t dtype_size(bsr_dtype dt) {
  switch (dt) {
    case BSR_DTYPE_F32: return 4;
    case BSR_DTYPE_F64: return 8;
    default: return 2;
  }
}
static const char* dtype_name(bsr_dtype dt) {
  switch (dt) {
    case BSR_DTYPE_F32: return "f32";
    case BSR_DTYPE_F16: return "f16";
    case BSR_DTYPE_BF16: return "bf16";
    case BSR_DTYPE_F64: return "f64";
  }
  return "?";
}
/* store value (rounded to dtype) into buf[i]; returns the value actually stored */
static double put(bsr_dtype dt, void* buf, size_t i, double v) {
  switch (dt) {
    case BSR_DTYPE_F32: ((float*)buf)[i] = (float)v; return ((float*)buf)[i];
    case BSR_DTYPE_F64: ((double*)buf)[i] = v; return v;
    case BSR_DTYPE_F16: ((uint16_t*)buf)[i] = float_to_f16((float)v); return f16_to_float(((uint16_t*)buf)[i]);
    case BSR_DTYPE_BF16: ((uint16_t*)buf)[i] = float_to_bf16((float)v); return bf16_to_float(((uint16_t*)buf)[i]);
  }
  return 0.0;
}
static double get(bsr_dtype dt, const void* buf, size_t i) {
  switch (dt) {
    case BSR_DTYPE_F32: return ((const float*)buf)[i];
    case BSR_DTYPE_F64: return ((const double*)buf)[i];
    case BSR_DTYPE_F16: return f16_to_float(((const uint16_t*)buf)[i]);
    case BSR_DTYPE_BF16: return bf16_to_float(((const uint16_t*)buf)[i]);
  }
  return 0.0;
}
static double tolerance(bsr_dtype dt) {
  switch (dt) {
    case BSR_DTYPE_F32: return 2e-5;
    case BSR_DTYPE_F64: return 1e-6; /* v is float32 by contract */
    case BSR_DTYPE_F16: return 2e-3;
    case BSR_DTYPE_BF16: return 1.6e-2;
  }
  return 0.0;
}

/* ---- tests ------------------------------------------------------------------------------ */
static void test_version(void) {
  int ma = -1, mi = -1, pa = -1;
  char expect[64];
  bsr_version(&ma, &mi, &pa);
  CHECK(ma == BSR_VERSION_MAJOR && mi == BSR_VERSION_MINOR && pa == BSR_VERSION_PATCH,
        "bsr_version %d.%d.%d != header %d.%d.%d", ma, mi, pa, BSR_VERSION_MAJOR, BSR_VERSION_MINOR,
        BSR_VERSION_PATCH);
  sprintf(expect, "%d.%d.%d", BSR_VERSION_MAJOR, BSR_VERSION_MINOR, BSR_VERSION_PATCH);
  CHECK(bsr_version_string() != NULL && strcmp(bsr_version_string(), expect) == 0, "bsr_version_string '%s' != '%s'",
        bsr_version_string() ? bsr_version_string() : "(null)", expect);
  CHECK(strcmp(bsr_status_string(BSR_OK), "ok") == 0, "status string of BSR_OK");
  CHECK(strlen(bsr_status_string(BSR_ERR_NULL_POINTER)) > 0, "status string of BSR_ERR_NULL_POINTER");
  CHECK(strlen(bsr_status_string((bsr_status)99)) > 0, "status string of an unknown status");
}

static void test_threads(void) {
  int def;
  bsr_set_num_threads(0);
  def = bsr_get_num_threads();
  CHECK(def >= 1, "default thread count %d", def);
  bsr_set_num_threads(1);
  CHECK(bsr_get_num_threads() == 1, "set_num_threads(1) -> %d", bsr_get_num_threads());
  bsr_set_num_threads(3);
  CHECK(bsr_get_num_threads() == 3, "set_num_threads(3) -> %d", bsr_get_num_threads());
  bsr_set_num_threads(-5);
  CHECK(bsr_get_num_threads() == def, "set_num_threads(-5) should restore the default %d, got %d", def,
        bsr_get_num_threads());
}

static void test_sort(void) {
  const int32_t ta[9] = {2, -1, 0, 2, 1, -1, 0, 2, 0};
  const int32_t want_idx[7] = {2, 6, 8, 4, 0, 3, 7};
  const int32_t want_counts[3] = {3, 1, 3}, want_starts[3] = {0, 3, 4};
  int32_t idx[9], counts[3], starts[3];
  int64_t n = -1;
  bsr_status st = bsr_lora_sort_tokens(ta, 9, 3, idx, counts, starts, &n);
  CHECK(st == BSR_OK, "sort_tokens status %d (%s)", st, bsr_last_error());
  CHECK(n == 7, "num_lora %lld != 7", (long long)n);
  CHECK(memcmp(idx, want_idx, sizeof want_idx) == 0, "sorted_idx not stable/grouped");
  CHECK(memcmp(counts, want_counts, sizeof want_counts) == 0, "counts wrong");
  CHECK(memcmp(starts, want_starts, sizeof want_starts) == 0, "starts wrong");
  CHECK(bsr_last_error()[0] == '\0', "last error should be empty after success, got '%s'", bsr_last_error());

  { /* all -1 */
    const int32_t none[4] = {-1, -1, -1, -1};
    int a;
    n = -1;
    st = bsr_lora_sort_tokens(none, 4, 3, idx, counts, starts, &n);
    CHECK(st == BSR_OK && n == 0, "all -1: status %d num_lora %lld", st, (long long)n);
    for (a = 0; a < 3; ++a) CHECK(counts[a] == 0 && starts[a] == 0, "all -1: counts/starts[%d] = %d/%d", a, counts[a], starts[a]);
  }
  { /* out of range ids */
    const int32_t bad_hi[3] = {0, 3, 1}, bad_lo[3] = {0, -2, 1};
    st = bsr_lora_sort_tokens(bad_hi, 3, 3, idx, counts, starts, &n);
    CHECK(st == BSR_ERR_INVALID_ARGUMENT, "id 3 with 3 adapters: status %d", st);
    CHECK(strlen(bsr_last_error()) > 0, "id out of range: empty last error");
    CHECK(strstr(bsr_last_error(), "token_adapter") != NULL, "message should name token_adapter: '%s'", bsr_last_error());
    st = bsr_lora_sort_tokens(bad_lo, 3, 3, idx, counts, starts, &n);
    CHECK(st == BSR_ERR_INVALID_ARGUMENT, "id -2: status %d", st);
    CHECK(strlen(bsr_last_error()) > 0, "id -2: empty last error");
  }
  /* empty batch, null output, negative sizes */
  st = bsr_lora_sort_tokens(NULL, 0, 3, NULL, counts, starts, &n);
  CHECK(st == BSR_OK && n == 0, "empty batch: status %d num_lora %lld", st, (long long)n);
  st = bsr_lora_sort_tokens(ta, 9, 3, idx, counts, starts, NULL);
  CHECK(st == BSR_ERR_NULL_POINTER, "num_lora NULL: status %d", st);
  CHECK(strstr(bsr_last_error(), "num_lora") != NULL, "message should name num_lora: '%s'", bsr_last_error());
  st = bsr_lora_sort_tokens(NULL, 9, 3, idx, counts, starts, &n);
  CHECK(st == BSR_ERR_NULL_POINTER, "token_adapter NULL: status %d", st);
  st = bsr_lora_sort_tokens(ta, -1, 3, idx, counts, starts, &n);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "num_tokens -1: status %d", st);
  st = bsr_lora_sort_tokens(ta, 9, -1, idx, counts, starts, &n);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "num_adapters -1: status %d", st);
}

typedef struct {
  bsr_dtype dt;
  int T, IN, OUT, R, L;
  int64_t ldx, ldy;
  void *x, *a, *b, *y, *y0;
  float* s;
  int32_t* ta;
  double* ref;  /* [T, OUT] expected y */
  double* vref; /* [T, R] expected x A^T per row (row order, not sorted) */
} Case;

static void case_init(Case* c, bsr_dtype dt, int T, int IN, int OUT, int R, int L, int xpad, int ypad) {
  size_t es = dtype_size(dt);
  int t, k, j, o, a;
  memset(c, 0, sizeof *c);
  c->dt = dt;
  c->T = T;
  c->IN = IN;
  c->OUT = OUT;
  c->R = R;
  c->L = L;
  c->ldx = IN + xpad;
  c->ldy = OUT + ypad;
  c->x = calloc((size_t)T * c->ldx + 1, es);
  c->a = calloc((size_t)L * R * IN, es);
  c->b = calloc((size_t)L * OUT * R, es);
  c->y = calloc((size_t)T * c->ldy + 1, es);
  c->y0 = calloc((size_t)T * c->ldy + 1, es);
  c->s = (float*)calloc((size_t)L, sizeof(float));
  c->ta = (int32_t*)calloc((size_t)T + 1, sizeof(int32_t));
  c->ref = (double*)calloc((size_t)T * OUT + 1, sizeof(double));
  c->vref = (double*)calloc((size_t)T * R + 1, sizeof(double));
  for (t = 0; t < T; ++t)
    for (k = 0; k < c->ldx; ++k) put(dt, c->x, (size_t)t * c->ldx + k, k < IN ? urand() : 1e30);
  for (k = 0; k < L * R * IN; ++k) put(dt, c->a, (size_t)k, urand() / sqrt((double)IN));
  for (k = 0; k < L * OUT * R; ++k) put(dt, c->b, (size_t)k, urand());
  for (t = 0; t < T; ++t)
    for (o = 0; o < c->ldy; ++o) put(dt, c->y, (size_t)t * c->ldy + o, o < OUT ? urand() : 12345.0);
  memcpy(c->y0, c->y, ((size_t)T * c->ldy + 1) * es);
  for (a = 0; a < L; ++a) c->s[a] = (float)(0.75 + 0.25 * a);
  for (t = 0; t < T; ++t) c->ta[t] = (int32_t)((t * 7 + 3) % (L + 1)) - 1; /* includes -1 rows */
  if (T == 1) c->ta[0] = L - 1;
  /* reference from the values actually stored */
  for (t = 0; t < T; ++t) {
    a = c->ta[t];
    for (o = 0; o < OUT; ++o) c->ref[(size_t)t * OUT + o] = get(dt, c->y0, (size_t)t * c->ldy + o);
    if (a < 0) continue;
    for (j = 0; j < R; ++j) {
      double acc = 0.0;
      for (k = 0; k < IN; ++k)
        acc += get(dt, c->x, (size_t)t * c->ldx + k) * get(dt, c->a, ((size_t)a * R + j) * IN + k);
      c->vref[(size_t)t * R + j] = acc;
    }
    for (o = 0; o < OUT; ++o) {
      double acc = 0.0;
      for (j = 0; j < R; ++j) acc += c->vref[(size_t)t * R + j] * get(dt, c->b, ((size_t)a * OUT + o) * R + j);
      c->ref[(size_t)t * OUT + o] += (double)c->s[a] * acc;
    }
  }
}

static void case_free(Case* c) {
  free(c->x);
  free(c->a);
  free(c->b);
  free(c->y);
  free(c->y0);
  free(c->s);
  free(c->ta);
  free(c->ref);
  free(c->vref);
}

static void case_check_y(const Case* c, const char* what) {
  size_t es = dtype_size(c->dt);
  double maxref = 1.0, maxerr = 0.0;
  int t, o, bad_rows = 0, bad_pad = 0;
  for (t = 0; t < c->T; ++t) {
    const unsigned char* yr = (const unsigned char*)c->y + (size_t)t * c->ldy * es;
    const unsigned char* y0r = (const unsigned char*)c->y0 + (size_t)t * c->ldy * es;
    if (c->ta[t] < 0 && memcmp(yr, y0r, (size_t)c->OUT * es) != 0) ++bad_rows;
    if (memcmp(yr + (size_t)c->OUT * es, y0r + (size_t)c->OUT * es, (size_t)(c->ldy - c->OUT) * es) != 0) ++bad_pad;
    for (o = 0; o < c->OUT; ++o) {
      double r = c->ref[(size_t)t * c->OUT + o], v = get(c->dt, c->y, (size_t)t * c->ldy + o);
      double e = fabs(v - r);
      if (fabs(r) > maxref) maxref = fabs(r);
      if (!(e <= maxerr)) maxerr = e; /* NaN-propagating max */
    }
  }
  CHECK(bad_rows == 0, "%s %s T=%d IN=%d OUT=%d r=%d L=%d: %d rows with adapter -1 changed", what, dtype_name(c->dt),
        c->T, c->IN, c->OUT, c->R, c->L, bad_rows);
  CHECK(bad_pad == 0, "%s %s T=%d: %d rows had their padding (beyond out_features) written", what, dtype_name(c->dt),
        c->T, bad_pad);
  CHECK(maxerr / maxref <= tolerance(c->dt), "%s %s T=%d IN=%d OUT=%d r=%d L=%d: max rel err %.3g > %.3g", what,
        dtype_name(c->dt), c->T, c->IN, c->OUT, c->R, c->L, maxerr / maxref, tolerance(c->dt));
}

/* lora_add in one call */
static void run_add(bsr_dtype dt, int T, int IN, int OUT, int R, int L, int xpad, int ypad) {
  Case c;
  bsr_status st;
  case_init(&c, dt, T, IN, OUT, R, L, xpad, ypad);
  st = bsr_lora_add(dt, c.x, c.ldx, IN, c.a, c.b, c.s, L, R, OUT, c.ta, T, c.y, c.ldy);
  CHECK(st == BSR_OK, "lora_add %s status %d: %s", dtype_name(dt), st, bsr_last_error());
  case_check_y(&c, "lora_add");
  case_free(&c);
}

/* sort + shrink + expand */
static void run_split(bsr_dtype dt, int T, int IN, int OUT, int R, int L, int xpad, int ypad) {
  Case c;
  bsr_status st;
  int32_t *idx, *counts, *starts;
  float* v;
  int64_t n = -1, p;
  int j;
  double maxerr = 0.0, maxref = 1.0;
  case_init(&c, dt, T, IN, OUT, R, L, xpad, ypad);
  idx = (int32_t*)calloc((size_t)T + 1, sizeof(int32_t));
  counts = (int32_t*)calloc((size_t)L, sizeof(int32_t));
  starts = (int32_t*)calloc((size_t)L, sizeof(int32_t));
  v = (float*)calloc((size_t)T * R + 1, sizeof(float));
  st = bsr_lora_sort_tokens(c.ta, T, L, idx, counts, starts, &n);
  CHECK(st == BSR_OK, "sort status %d", st);
  for (p = 0; p < (int64_t)T * R; ++p) v[p] = NAN; /* must be fully overwritten */
  st = bsr_lora_shrink(dt, c.x, c.ldx, IN, c.a, L, R, idx, counts, starts, v);
  CHECK(st == BSR_OK, "lora_shrink %s status %d: %s", dtype_name(dt), st, bsr_last_error());
  for (p = 0; p < n; ++p)
    for (j = 0; j < R; ++j) {
      double r = c.vref[(size_t)idx[p] * R + j], e = fabs((double)v[p * R + j] - r);
      if (fabs(r) > maxref) maxref = fabs(r);
      if (!(e <= maxerr)) maxerr = e;
    }
  CHECK(maxerr / maxref <= 4e-5, /* v is float32 for every dtype */
        "lora_shrink %s T=%d IN=%d r=%d: max rel err %.3g", dtype_name(dt), T, IN, R, maxerr / maxref);
  st = bsr_lora_expand(dt, v, R, c.b, L, OUT, c.s, idx, counts, starts, c.y, c.ldy);
  CHECK(st == BSR_OK, "lora_expand %s status %d: %s", dtype_name(dt), st, bsr_last_error());
  case_check_y(&c, "shrink+expand");
  free(idx);
  free(counts);
  free(starts);
  free(v);
  case_free(&c);
}

static void test_kernels(void) {
  static const bsr_dtype dts[4] = {BSR_DTYPE_F32, BSR_DTYPE_F16, BSR_DTYPE_BF16, BSR_DTYPE_F64};
  /* T, IN, OUT, R, L */
  static const int shapes[][5] = {
      {1, 67, 33, 1, 3}, {1, 67, 33, 5, 3}, {9, 67, 33, 1, 3}, {9, 67, 33, 5, 3},
      {20, 70, 40, 33, 2},   /* rank > 16: partial transpose blocks */
      {37, 300, 129, 16, 4}, /* full SIMD blocks, enough work to go multi-threaded */
      {3, 1, 1, 1, 1},
  };
  int d, s, pad;
  for (d = 0; d < 4; ++d)
    for (s = 0; s < (int)(sizeof shapes / sizeof shapes[0]); ++s)
      for (pad = 0; pad < 2; ++pad) {
        const int* sh = shapes[s];
        run_add(dts[d], sh[0], sh[1], sh[2], sh[3], sh[4], pad ? 5 : 0, pad ? 3 : 0);
        run_split(dts[d], sh[0], sh[1], sh[2], sh[3], sh[4], pad ? 5 : 0, pad ? 3 : 0);
      }
}

/* The result must not depend on the number of threads (sizes large enough for both shrink
 * and expand to go multi-threaded). */
static void test_thread_determinism(void) {
  Case c1, c2;
  bsr_status st;
  g_rng = 12345;
  case_init(&c1, BSR_DTYPE_F32, 64, 256, 1100, 16, 4, 3, 1);
  g_rng = 12345;
  case_init(&c2, BSR_DTYPE_F32, 64, 256, 1100, 16, 4, 3, 1);
  bsr_set_num_threads(1);
  st = bsr_lora_add(BSR_DTYPE_F32, c1.x, c1.ldx, 256, c1.a, c1.b, c1.s, 4, 16, 1100, c1.ta, 64, c1.y, c1.ldy);
  CHECK(st == BSR_OK, "determinism run 1");
  bsr_set_num_threads(2);
  st = bsr_lora_add(BSR_DTYPE_F32, c2.x, c2.ldx, 256, c2.a, c2.b, c2.s, 4, 16, 1100, c2.ta, 64, c2.y, c2.ldy);
  CHECK(st == BSR_OK, "determinism run 2");
  bsr_set_num_threads(0);
  CHECK(memcmp(c1.y, c2.y, (size_t)64 * c1.ldy * 4) == 0, "1 thread and 2 threads give different results");
  case_check_y(&c1, "determinism");
  case_free(&c1);
  case_free(&c2);
}

static void test_errors(void) {
  float x[2 * 4] = {0}, a[1 * 2 * 4] = {0}, b[1 * 3 * 2] = {0}, y[2 * 3] = {0}, s[1] = {1.f}, v[4] = {0};
  int32_t ta[2] = {0, -1}, bad_ta[2] = {0, 1};
  int32_t idx[2] = {0, 0}, counts[1] = {1}, starts[1] = {0};
  bsr_status st;

  st = bsr_lora_add(BSR_DTYPE_F32, NULL, 4, 4, a, b, s, 1, 2, 3, ta, 2, y, 3);
  CHECK(st == BSR_ERR_NULL_POINTER, "add x NULL: status %d", st);
  CHECK(strstr(bsr_last_error(), "x") != NULL, "add x NULL: message '%s'", bsr_last_error());
  st = bsr_lora_add(BSR_DTYPE_F32, x, 4, 4, a, b, s, 1, 2, 3, ta, 2, NULL, 3);
  CHECK(st == BSR_ERR_NULL_POINTER, "add y NULL: status %d", st);
  st = bsr_lora_add(BSR_DTYPE_F32, x, 4, 4, a, b, NULL, 1, 2, 3, ta, 2, y, 3);
  CHECK(st == BSR_ERR_NULL_POINTER, "add scaling NULL: status %d", st);
  st = bsr_lora_shrink(BSR_DTYPE_F32, x, 4, 4, a, 1, 2, idx, counts, starts, NULL);
  CHECK(st == BSR_ERR_NULL_POINTER, "shrink v NULL: status %d", st);
  st = bsr_lora_expand(BSR_DTYPE_F32, v, 2, NULL, 1, 3, s, idx, counts, starts, y, 3);
  CHECK(st == BSR_ERR_NULL_POINTER, "expand b NULL: status %d", st);
  CHECK(strlen(bsr_last_error()) > 0, "expand b NULL: empty message");

  st = bsr_lora_add((bsr_dtype)7, x, 4, 4, a, b, s, 1, 2, 3, ta, 2, y, 3);
  CHECK(st == BSR_ERR_UNSUPPORTED_DTYPE, "add dtype 7: status %d", st);
  CHECK(strlen(bsr_last_error()) > 0, "bad dtype: empty message");
  st = bsr_lora_shrink((bsr_dtype)-1, x, 4, 4, a, 1, 2, idx, counts, starts, v);
  CHECK(st == BSR_ERR_UNSUPPORTED_DTYPE, "shrink dtype -1: status %d", st);
  st = bsr_lora_expand((bsr_dtype)4, v, 2, b, 1, 3, s, idx, counts, starts, y, 3);
  CHECK(st == BSR_ERR_UNSUPPORTED_DTYPE, "expand dtype 4: status %d", st);

  st = bsr_lora_add(BSR_DTYPE_F32, x, 4, 4, a, b, s, 1, 0, 3, ta, 2, y, 3);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "add rank 0: status %d", st);
  CHECK(strstr(bsr_last_error(), "rank") != NULL, "rank 0: message should name rank: '%s'", bsr_last_error());
  st = bsr_lora_shrink(BSR_DTYPE_F32, x, 3, 4, a, 1, 2, idx, counts, starts, v);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "shrink x_row_stride < in_features: status %d", st);
  CHECK(strstr(bsr_last_error(), "x_row_stride") != NULL, "stride message: '%s'", bsr_last_error());
  st = bsr_lora_expand(BSR_DTYPE_F32, v, 2, b, 1, 3, s, idx, counts, starts, y, 2);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "expand y_row_stride < out_features: status %d", st);
  st = bsr_lora_add(BSR_DTYPE_F32, x, 4, 0, a, b, s, 1, 2, 3, ta, 2, y, 3);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "add in_features 0: status %d", st);
  st = bsr_lora_add(BSR_DTYPE_F32, x, 4, 4, a, b, s, 1, 2, 0, ta, 2, y, 3);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "add out_features 0: status %d", st);
  st = bsr_lora_add(BSR_DTYPE_F32, x, 4, 4, a, b, s, 1, 2, 3, ta, -2, y, 3);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "add num_tokens -2: status %d", st);
  st = bsr_lora_add(BSR_DTYPE_F32, x, 4, 4, a, b, s, 1, 2, 3, bad_ta, 2, y, 3);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "add adapter id out of range: status %d", st);
  CHECK(strstr(bsr_last_error(), "token_adapter") != NULL, "out of range message: '%s'", bsr_last_error());
  counts[0] = -1;
  st = bsr_lora_shrink(BSR_DTYPE_F32, x, 4, 4, a, 1, 2, idx, counts, starts, v);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT, "shrink negative count: status %d", st);
  counts[0] = 1;

  /* a successful call clears the message; nothing touched when every row is -1 */
  {
    int32_t none[2] = {-1, -1};
    float y_before[6];
    memcpy(y_before, y, sizeof y);
    st = bsr_lora_add(BSR_DTYPE_F32, x, 4, 4, a, b, s, 1, 2, 3, none, 2, y, 3);
    CHECK(st == BSR_OK, "add all -1: status %d", st);
    CHECK(bsr_last_error()[0] == '\0', "message not cleared after success: '%s'", bsr_last_error());
    CHECK(memcmp(y, y_before, sizeof y) == 0, "all -1 rows changed y");
    st = bsr_lora_add(BSR_DTYPE_F32, NULL, 4, 4, NULL, NULL, NULL, 1, 2, 3, NULL, 0, NULL, 3);
    CHECK(st == BSR_OK, "add with num_tokens 0 and NULL pointers: status %d", st);
  }
}

/* bsr_lora_expand_slices == one bsr_lora_expand per slice on copies of its v columns and
 * its own output block (bit for bit: the same sums in the same order); then its checks. */
static void test_expand_slices(void) {
  enum { T = 11, L = 3, NS = 3, RT = 4 + 1 + 7, YC = 19 + 5 + 8 + 2 };
  static const int64_t roff[NS] = {0, 4, 5}, rk[NS] = {4, 1, 7}, ooff[NS] = {0, 19, 24}, of[NS] = {19, 5, 8};
  static const bsr_dtype dts[2] = {BSR_DTYPE_F32, BSR_DTYPE_BF16};
  int32_t ta[T], idx[T], counts[L], starts[L];
  int64_t n = 0;
  int d, i, sl;
  for (i = 0; i < T; ++i) ta[i] = (i * 7) % (L + 1) - 1;
  CHECK(bsr_lora_sort_tokens(ta, T, L, idx, counts, starts, &n) == BSR_OK, "expand_slices: sort");
  for (d = 0; d < 2; ++d) {
    const bsr_dtype dt = dts[d];
    const size_t es = dtype_size(dt);
    float v[T * RT], vs[T * 8], scale[NS][L];
    void *b[NS], *y = calloc((size_t)T * (YC + 3), es), *yref = calloc((size_t)T * (YC + 3), es);
    const void* bp[NS];
    const float* sp[NS];
    bsr_status st;
    for (i = 0; i < T * RT; ++i) v[i] = (float)urand();
    for (i = 0; i < T * (YC + 3); ++i) put(dt, y, (size_t)i, put(dt, yref, (size_t)i, urand()));
    for (sl = 0; sl < NS; ++sl) {
      int64_t p, j, k;
      b[sl] = malloc((size_t)L * of[sl] * rk[sl] * es);
      for (k = 0; k < L * of[sl] * rk[sl]; ++k) put(dt, b[sl], (size_t)k, urand());
      for (k = 0; k < L; ++k) scale[sl][k] = (float)(0.5 + fabs(urand()));
      bp[sl] = b[sl];
      sp[sl] = scale[sl];
      for (p = 0; p < n; ++p)
        for (j = 0; j < rk[sl]; ++j) vs[p * rk[sl] + j] = v[p * RT + roff[sl] + j];
      st = bsr_lora_expand(dt, vs, rk[sl], b[sl], L, of[sl], scale[sl], idx, counts, starts,
                           (char*)yref + ooff[sl] * es, YC + 3);
      CHECK(st == BSR_OK, "expand_slices %s: reference expand of slice %d: %s", dtype_name(dt), sl, bsr_last_error());
    }
    st = bsr_lora_expand_slices(dt, v, RT, NS, roff, rk, bp, ooff, of, sp, L, idx, counts, starts, y, YC, YC + 3);
    CHECK(st == BSR_OK, "expand_slices %s status %d: %s", dtype_name(dt), st, bsr_last_error());
    CHECK(memcmp(y, yref, (size_t)T * (YC + 3) * es) == 0,
          "expand_slices %s differs from one expand per slice (or wrote the padding)", dtype_name(dt));
    if (d == 0) { /* checks: nothing is written when any slice is bad */
      int64_t bad_off[NS] = {0, 4, 6}, bad_out[NS] = {0, 19, 27};
      const void* nb[NS] = {bp[0], NULL, bp[2]};
      memcpy(yref, y, (size_t)T * (YC + 3) * es);
      st = bsr_lora_expand_slices(dt, v, RT, NS, bad_off, rk, bp, ooff, of, sp, L, idx, counts, starts, y, YC, YC + 3);
      CHECK(st == BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "slice 2") != NULL,
            "expand_slices: v columns past v_cols: status %d '%s'", st, bsr_last_error());
      st = bsr_lora_expand_slices(dt, v, RT, NS, roff, rk, bp, bad_out, of, sp, L, idx, counts, starts, y, YC, YC + 3);
      CHECK(st == BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "y columns") != NULL,
            "expand_slices: y columns past y_cols: status %d '%s'", st, bsr_last_error());
      st = bsr_lora_expand_slices(dt, v, RT, NS, roff, rk, nb, ooff, of, sp, L, idx, counts, starts, y, YC, YC + 3);
      CHECK(st == BSR_ERR_NULL_POINTER, "expand_slices: lora_b[1] NULL: status %d", st);
      CHECK(memcmp(y, yref, (size_t)T * (YC + 3) * es) == 0, "expand_slices wrote y before failing a check");
      st = bsr_lora_expand_slices(dt, NULL, RT, 0, NULL, NULL, NULL, NULL, NULL, NULL, L, idx, counts, starts, y, YC,
                                  YC + 3);
      CHECK(st == BSR_OK, "expand_slices with no slices: status %d", st);
    }
    for (sl = 0; sl < NS; ++sl) free(b[sl]);
    free(y);
    free(yref);
  }
}

/* bsr_paged_attention against a double softmax by hand: 3 sequences over scattered blocks
 * (a single row, a chunk of 4 rows after 5 cached keys, 30 rows after 40: two query tiles
 * and two key chunks), GQA (6 query heads on 2 KV heads), head_dim 20 (not a multiple of
 * any vector width), tokens 44 elements apart in the cache (4 of padding), with and without
 * a window; then its checks. */
static void test_paged_attention(void) {
  enum { B = 3, H = 6, KV = 2, D = 20, BS = 4, NB = 32, W = 5, TW = 18, TS = KV * D + 4, T = 35 };
  static const int32_t cu[B + 1] = {0, 1, 5, 35};
  static const int32_t lens[B] = {1, 9, 70};
  static const bsr_dtype dts[2] = {BSR_DTYPE_F32, BSR_DTYPE_BF16};
  int32_t tables[B][TW];
  int d, b, i;
  for (b = 0; b < B; ++b)  /* scattered blocks, distinct within a sequence (read-only: sequences may share) */
    for (i = 0; i < TW; ++i) tables[b][i] = (int32_t)((b * 7 + i * 5) % NB);
  for (d = 0; d < 2; ++d) {
    const bsr_dtype dt = dts[d];
    const size_t es = dtype_size(dt);
    void *q = malloc((size_t)T * H * D * es), *k = malloc((size_t)NB * BS * TS * es);
    void *v = malloc((size_t)NB * BS * TS * es), *out = malloc((size_t)T * H * D * es);
    int win;
    for (i = 0; i < T * H * D; ++i) put(dt, q, (size_t)i, urand());
    for (i = 0; i < NB * BS * TS; ++i) {
      put(dt, k, (size_t)i, urand());
      put(dt, v, (size_t)i, urand());
    }
    for (win = 0; win <= W; win += W) {
      double maxerr = 0.0;
      int h, j, t, r;
      bsr_status st = bsr_paged_attention(dt, q, H * D, D, k, v, TS, TS, NB, BS, KV, H, D, &tables[0][0], TW, cu, lens,
                                          B, win, 1.0f / sqrtf((float)D), out, H * D, D);
      CHECK(st == BSR_OK, "paged_attention %s window %d: status %d (%s)", dtype_name(dt), win, st, bsr_last_error());
      for (b = 0; b < B; ++b)
        for (r = cu[b]; r < cu[b + 1]; ++r)
          for (h = 0; h < H; ++h) {
            const int g = h / (H / KV), pos = lens[b] - (cu[b + 1] - cu[b]) + (r - cu[b]);
            const int first = win && pos + 1 > win ? pos + 1 - win : 0;
            double s[80], m = -1e300, sum = 0.0;
            for (t = first; t <= pos; ++t) {
              const size_t row = ((size_t)tables[b][t / BS] * BS + t % BS) * TS + (size_t)g * D;
              double acc = 0.0;
              for (j = 0; j < D; ++j) acc += get(dt, q, (size_t)(r * H + h) * D + j) * get(dt, k, row + j);
              s[t] = acc / sqrt((double)D);
              if (s[t] > m) m = s[t];
            }
            for (t = first; t <= pos; ++t) sum += (s[t] = exp(s[t] - m));
            for (j = 0; j < D; ++j) {
              double ref = 0.0;
              for (t = first; t <= pos; ++t)
                ref += s[t] / sum * get(dt, v, ((size_t)tables[b][t / BS] * BS + t % BS) * TS + (size_t)g * D + j);
              const double e = fabs(get(dt, out, (size_t)(r * H + h) * D + j) - ref);
              if (!(e <= maxerr)) maxerr = e;
            }
          }
      CHECK(maxerr <= (dt == BSR_DTYPE_F32 ? 1e-5 : 2e-2), "paged_attention %s window %d: max err %.3g",
            dtype_name(dt), win, maxerr);
    }
    free(q);
    free(k);
    free(v);
    free(out);
  }
  {
    static float qf[4 * H * D], kv[NB * BS * KV * D], o[4 * H * D];
    const int32_t one[2] = {0, 1}, four[2] = {0, 4}, bad_len[1] = {17}, ok_len[1] = {3}, bad_table[4] = {32, 0, 0, 0};
    bsr_status st = bsr_paged_attention(BSR_DTYPE_F32, qf, H * D, D, kv, kv, KV * D, KV * D, NB, BS, KV, H, D,
                                        &tables[1][0], 4, one, bad_len, 1, 0, 1.f, o, H * D, D);
    CHECK(st == BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "context_lens") != NULL,
          "paged_attention: a length past the block table: status %d '%s'", st, bsr_last_error());
    st = bsr_paged_attention(BSR_DTYPE_F32, qf, H * D, D, kv, kv, KV * D, KV * D, NB, BS, KV, H, D, &tables[1][0], 4,
                             four, ok_len, 1, 0, 1.f, o, H * D, D);
    CHECK(st == BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "context_lens") != NULL,
          "paged_attention: 4 new rows on 3 keys: status %d '%s'", st, bsr_last_error());
    st = bsr_paged_attention(BSR_DTYPE_F32, qf, H * D, D, kv, kv, KV * D, KV * D, NB, BS, KV, H, D, bad_table, 4, one,
                             ok_len, 1, 0, 1.f, o, H * D, D);
    CHECK(st == BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "block_tables") != NULL,
          "paged_attention: block 32 of 32: status %d '%s'", st, bsr_last_error());
    st = bsr_paged_attention(BSR_DTYPE_F32, qf, H * D, D, kv, kv, KV * D, KV * D, NB, BS, 4, H, D, &tables[1][0], 4,
                             one, ok_len, 1, 0, 1.f, o, H * D, D);
    CHECK(st == BSR_ERR_INVALID_ARGUMENT, "paged_attention: 6 heads on 4 KV heads: status %d", st);
    st = bsr_paged_attention(BSR_DTYPE_F32, qf, H * D, D, kv, kv, KV * D - 1, KV * D, NB, BS, KV, H, D, &tables[1][0],
                             4, one, ok_len, 1, 0, 1.f, o, H * D, D);
    CHECK(st == BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "token_stride") != NULL,
          "paged_attention: token stride below KV x D: status %d '%s'", st, bsr_last_error());
    st = bsr_paged_attention(BSR_DTYPE_F64, qf, H * D, D, kv, kv, KV * D, KV * D, NB, BS, KV, H, D, &tables[1][0], 4,
                             one, ok_len, 1, 0, 1.f, o, H * D, D);
    CHECK(st == BSR_ERR_UNSUPPORTED_DTYPE, "paged_attention: f64: status %d", st);
    st = bsr_paged_attention(BSR_DTYPE_F32, NULL, H * D, D, kv, kv, KV * D, KV * D, NB, BS, KV, H, D, &tables[1][0], 4,
                             one, ok_len, 1, 0, 1.f, o, H * D, D);
    CHECK(st == BSR_ERR_NULL_POINTER, "paged_attention: q NULL: status %d", st);
  }
}

/* ---- bsr_pool ---------------------------------------------------------------------------- */

/* Naive double reference: RMSNorm each row (if w), pool, L2 (if normalize). */
static void pool_ref(const double* h, int d, const int32_t* cu, int B, int mode, const double* w, int normalize,
                     double* out) {
  int b, t, i;
  for (b = 0; b < B; ++b) {
    double* o = out + (size_t)b * d;
    int s = cu[b], e = cu[b + 1], n = 0;
    for (i = 0; i < d; ++i) o[i] = 0;
    for (t = s; t < e; ++t) {
      double ss = 0, sc = 1;
      if (mode == BSR_POOL_LAST && t != e - 1) continue;
      if (mode == BSR_POOL_CLS && t != s) continue;
      if (w) {
        for (i = 0; i < d; ++i) ss += h[(size_t)t * d + i] * h[(size_t)t * d + i];
        sc = 1.0 / sqrt(ss / d + 1e-6);
      }
      for (i = 0; i < d; ++i) o[i] += h[(size_t)t * d + i] * sc * (w ? w[i] : 1.0);
      ++n;
    }
    for (i = 0; i < d; ++i) o[i] /= n;
    if (normalize) {
      double nn = 0;
      for (i = 0; i < d; ++i) nn += o[i] * o[i];
      nn = sqrt(nn) > 1e-12 ? sqrt(nn) : 1e-12;
      for (i = 0; i < d; ++i) o[i] /= nn;
    }
  }
}

static void test_pool(void) {
  static const bsr_dtype dts[3] = {BSR_DTYPE_F32, BSR_DTYPE_F16, BSR_DTYPE_BF16};
  const int32_t cu[5] = {0, 1, 4, 5, 140}; /* lengths 1, 3, 1, 135 (mean splits the long one) */
  const int B = 4, T = 140, d = 37, ld = 41;
  double h[140 * 37], w[37], ref[4 * 37];
  unsigned char hbuf[140 * 41 * 4], wbuf[37 * 4], obuf[4 * 37 * 4];
  int di, mode, with_w, normalize, i, t;
  for (i = 0; i < T * d; ++i) h[i] = 2 * urand();
  for (i = 0; i < d; ++i) w[i] = 1.0 + 0.5 * urand();
  for (di = 0; di < 3; ++di) {
    bsr_dtype dt = dts[di];
    double hr[140 * 37], wr[37];
    for (t = 0; t < T; ++t)
      for (i = 0; i < d; ++i) hr[t * d + i] = put(dt, hbuf, (size_t)t * ld + i, h[t * d + i]);
    for (i = 0; i < d; ++i) wr[i] = put(dt, wbuf, (size_t)i, w[i]);
    for (mode = 0; mode < 3; ++mode)
      for (with_w = 0; with_w < 2; ++with_w)
        for (normalize = 0; normalize < 2; ++normalize) {
          double err = 0;
          bsr_status st = bsr_pool(dt, hbuf, ld, T, d, cu, B, (bsr_pool_mode)mode, with_w ? wbuf : NULL, 1e-6f,
                                   normalize, obuf, d);
          CHECK(st == BSR_OK, "pool %s mode %d: status %d (%s)", dtype_name(dt), mode, st, bsr_last_error());
          pool_ref(hr, d, cu, B, mode, with_w ? wr : NULL, normalize, ref);
          for (i = 0; i < B * d; ++i) {
            double e = fabs(get(dt, obuf, (size_t)i) - ref[i]) / (1.0 + fabs(ref[i]));
            if (e > err) err = e;
          }
          CHECK(err <= tolerance(dt), "pool %s mode %d w %d normalize %d: rel err %g", dtype_name(dt), mode, with_w,
                normalize, err);
        }
  }
  { /* bad input */
    const int32_t bad_cu[3] = {0, 3, 3}, past_cu[3] = {0, 3, 200};
    CHECK(bsr_pool(BSR_DTYPE_F32, hbuf, ld, T, d, bad_cu, 2, BSR_POOL_LAST, NULL, 1e-6f, 1, obuf, d) ==
              BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "cu_seqlens") != NULL,
          "zero-length sequence: '%s'", bsr_last_error());
    CHECK(bsr_pool(BSR_DTYPE_F32, hbuf, ld, T, d, past_cu, 2, BSR_POOL_LAST, NULL, 1e-6f, 1, obuf, d) ==
              BSR_ERR_INVALID_ARGUMENT, "cu_seqlens past num_rows");
    CHECK(bsr_pool(BSR_DTYPE_F64, hbuf, ld, T, d, cu, B, BSR_POOL_LAST, NULL, 1e-6f, 1, obuf, d) ==
              BSR_ERR_UNSUPPORTED_DTYPE, "pool F64 must be unsupported");
    CHECK(bsr_pool(BSR_DTYPE_F32, NULL, ld, T, d, cu, B, BSR_POOL_LAST, NULL, 1e-6f, 1, obuf, d) ==
              BSR_ERR_NULL_POINTER, "pool NULL hidden");
    CHECK(bsr_pool(BSR_DTYPE_F32, hbuf, ld, T, d, cu, B, (bsr_pool_mode)7, NULL, 1e-6f, 1, obuf, d) ==
              BSR_ERR_INVALID_ARGUMENT, "pool bad mode");
  }
}

/* ---- row-wise ops: bsr_rms_norm (with its residual add), bsr_silu_mul, bsr_rope ----------- */

static void test_rowops(void) {
  static const bsr_dtype dts[3] = {BSR_DTYPE_F32, BSR_DTYPE_F16, BSR_DTYPE_BF16};
  enum { T = 70, d = 37, ld = 41 }; /* strided rows; the threaded path: tests/test_rowops.py */
  double x[T * 2 * d], a[T * d], w[d];
  unsigned char xbuf[T * 2 * ld * 4], abuf[T * ld * 4], wbuf[d * 4], sbuf[T * ld * 4], obuf[T * ld * 4];
  int di, t, i, with_add;
  for (i = 0; i < T * 2 * d; ++i) x[i] = 3 * urand();
  for (i = 0; i < T * d; ++i) a[i] = urand();
  for (i = 0; i < d; ++i) w[i] = 1.0 + 0.5 * urand();
  for (di = 0; di < 3; ++di) {
    bsr_dtype dt = dts[di];
    double xr[T * 2 * d], ar[T * d], wr[d], err = 0;
    for (t = 0; t < T; ++t)
      for (i = 0; i < 2 * d; ++i) xr[t * 2 * d + i] = put(dt, xbuf, (size_t)t * 2 * ld + i, x[t * 2 * d + i]);
    for (t = 0; t < T; ++t)
      for (i = 0; i < d; ++i) ar[t * d + i] = put(dt, abuf, (size_t)t * ld + i, a[t * d + i]);
    for (i = 0; i < d; ++i) wr[i] = put(dt, wbuf, (size_t)i, w[i]);
    for (with_add = 0; with_add < 2; ++with_add) {
      bsr_status st = bsr_rms_norm(dt, xbuf, 2 * ld, with_add ? abuf : NULL, ld, T, d, wbuf, 1e-6f, sbuf, ld, obuf, ld);
      CHECK(st == BSR_OK, "rms_norm %s: status %d (%s)", dtype_name(dt), st, bsr_last_error());
      for (t = 0; t < T; ++t) { /* reference on the first d columns of x's rows, + add */
        double s[d], ss = 0, sc;
        for (i = 0; i < d; ++i) {
          s[i] = xr[t * 2 * d + i] + (with_add ? ar[t * d + i] : 0.0);
          ss += s[i] * s[i];
        }
        sc = 1.0 / sqrt(ss / d + 1e-6);
        for (i = 0; i < d; ++i) {
          double e = fabs(get(dt, obuf, (size_t)t * ld + i) - s[i] * sc * wr[i]) / (1.0 + fabs(s[i] * sc * wr[i]));
          if (with_add) {
            double es = fabs(get(dt, sbuf, (size_t)t * ld + i) - s[i]) / (1.0 + fabs(s[i]));
            if (es > e) e = es;
          }
          if (e > err) err = e;
        }
      }
    }
    for (i = 0; i < T * ld; ++i) ((unsigned char*)obuf)[i] = 0;
    CHECK(bsr_silu_mul(dt, xbuf, 2 * ld, T, d, obuf, ld) == BSR_OK, "silu_mul %s: %s", dtype_name(dt),
          bsr_last_error());
    for (t = 0; t < T; ++t)
      for (i = 0; i < d; ++i) {
        double g = xr[t * 2 * d + i], want = g / (1.0 + exp(-g)) * xr[t * 2 * d + d + i];
        double e = fabs(get(dt, obuf, (size_t)t * ld + i) - want) / (1.0 + fabs(want));
        if (e > err) err = e;
      }
    CHECK(err <= tolerance(dt), "rms_norm / silu_mul %s: rel err %g", dtype_name(dt), err);
  }
  CHECK(bsr_rms_norm(BSR_DTYPE_F32, xbuf, d, NULL, 0, 2, d, wbuf, 0.f, NULL, 0, obuf, d) == BSR_ERR_INVALID_ARGUMENT &&
            strstr(bsr_last_error(), "eps") != NULL, "rms_norm eps 0: '%s'", bsr_last_error());
  CHECK(bsr_rms_norm(BSR_DTYPE_F32, xbuf, d, abuf, d, 2, d, wbuf, 1e-6f, NULL, 0, obuf, d) == BSR_ERR_NULL_POINTER,
        "rms_norm add without sum_out");
  CHECK(bsr_silu_mul(BSR_DTYPE_F32, xbuf, d, 2, d, obuf, d) == BSR_ERR_INVALID_ARGUMENT &&
            strstr(bsr_last_error(), "x_row_stride") != NULL, "silu_mul stride: '%s'", bsr_last_error());
  CHECK(bsr_silu_mul(BSR_DTYPE_F64, xbuf, 2 * d, 2, d, obuf, d) == BSR_ERR_UNSUPPORTED_DTYPE, "silu_mul f64");
}

/* bsr_rope on strided rows and heads (x's heads 10 apart in rows of 3 heads + 5), against the
 * rotate-half formula in double on the stored inputs. */
static void test_rope(void) {
  static const bsr_dtype dts[3] = {BSR_DTYPE_F32, BSR_DTYPE_F16, BSR_DTYPE_BF16};
  enum { T = 5, H = 3, D = 8, hs = 10, ld = H * hs + 5, half = D / 2 };
  unsigned char xbuf[T * ld * 4], cbuf[T * half * 4], sbuf[T * half * 4], obuf[T * H * D * 4];
  double xr[T * ld], cr[T * half], sr[T * half];
  int di, t, h, i;
  for (di = 0; di < 3; ++di) {
    bsr_dtype dt = dts[di];
    double err = 0;
    for (i = 0; i < T * ld; ++i) xr[i] = put(dt, xbuf, (size_t)i, 2 * urand());
    for (t = 0; t < T; ++t)
      for (i = 0; i < half; ++i) {
        cr[t * half + i] = put(dt, cbuf, (size_t)t * half + i, cos(0.3 * t * (i + 1)));
        sr[t * half + i] = put(dt, sbuf, (size_t)t * half + i, sin(0.3 * t * (i + 1)));
      }
    CHECK(bsr_rope(dt, xbuf, ld, hs, T, H, D, cbuf, sbuf, half, obuf, H * D, D) == BSR_OK, "rope %s: %s",
          dtype_name(dt), bsr_last_error());
    for (t = 0; t < T; ++t)
      for (h = 0; h < H; ++h)
        for (i = 0; i < half; ++i) {
          const double* x = xr + t * ld + h * hs;
          double c = cr[t * half + i], s = sr[t * half + i];
          double w1 = x[i] * c - x[i + half] * s, w2 = x[i + half] * c + x[i] * s;
          double e1 = fabs(get(dt, obuf, (size_t)(t * H + h) * D + i) - w1) / (1.0 + fabs(w1));
          double e2 = fabs(get(dt, obuf, (size_t)(t * H + h) * D + half + i) - w2) / (1.0 + fabs(w2));
          if (e1 > err) err = e1;
          if (e2 > err) err = e2;
        }
    CHECK(err <= 2 * tolerance(dt), "rope %s: rel err %g", dtype_name(dt), err);
  }
  CHECK(bsr_rope(BSR_DTYPE_F32, xbuf, ld, hs, T, H, 7, cbuf, sbuf, half, obuf, H * D, D) == BSR_ERR_INVALID_ARGUMENT &&
            strstr(bsr_last_error(), "even") != NULL, "rope odd head_dim: '%s'", bsr_last_error());
  CHECK(bsr_rope(BSR_DTYPE_F32, xbuf, 20, hs, T, H, D, cbuf, sbuf, half, obuf, H * D, D) == BSR_ERR_INVALID_ARGUMENT &&
            strstr(bsr_last_error(), "x_row_stride") != NULL, "rope row stride: '%s'", bsr_last_error());
  CHECK(bsr_rope(BSR_DTYPE_F32, xbuf, ld, hs, T, H, D, NULL, sbuf, half, obuf, H * D, D) == BSR_ERR_NULL_POINTER,
        "rope NULL cos");
}

/* ---- bsr_decoder_layers ------------------------------------------------------------------ */
/* Two layers (GQA 2 / 1 heads, qkv and down biases, the others NULL) over a step of two
 * sequences (a decode row over 3 cached keys, a 2-row prefill), against the same entry
 * points called one by one: equal bit for bit (memcmp), hidden and caches. */
enum { DL_L = 2, DL_d = 8, DL_H = 2, DL_KV = 1, DL_D = 4, DL_I = 6, DL_T = 3, DL_NB = 6, DL_BS = 2 };
enum { DL_Q = DL_H * DL_D, DL_KVC = DL_KV * DL_D, DL_QKV = DL_Q + 2 * DL_KVC };

static void decoder_by_entry_points(const bsr_decoder_config* c, float w[DL_L][10][DL_QKV * DL_d], float* h,
                                    float kc[DL_L][DL_NB * DL_BS * DL_KVC], float vc[DL_L][DL_NB * DL_BS * DL_KVC],
                                    const float* cs, const float* sn, const int64_t* slots, const int32_t* tables,
                                    const int32_t* cu, const int32_t* lens) {
  float x[DL_T * DL_d], qkv[DL_T * DL_QKV], qk[DL_T * (DL_Q + DL_KVC)], at[DL_T * DL_Q], gu[DL_T * 2 * DL_I],
      act[DL_T * DL_I], sub[DL_T * DL_d];
  int l, r, i;
  for (l = 0; l < DL_L; ++l) {
    CHECK(bsr_rms_norm(BSR_DTYPE_F32, h, DL_d, NULL, 0, DL_T, DL_d, w[l][0], c->eps, NULL, 0, x, DL_d) == BSR_OK,
          "ref rms_norm");
    bsr_linear(BSR_DTYPE_F32, x, DL_d, DL_T, DL_d, w[l][1], DL_QKV, w[l][2], qkv, DL_QKV);
    bsr_rope(BSR_DTYPE_F32, qkv, DL_QKV, DL_D, DL_T, DL_H + DL_KV, DL_D, cs, sn, DL_D / 2, qk, DL_Q + DL_KVC, DL_D);
    for (r = 0; r < DL_T; ++r)
      for (i = 0; i < DL_KVC; ++i) {
        kc[l][slots[r] * DL_KVC + i] = qk[r * (DL_Q + DL_KVC) + DL_Q + i];
        vc[l][slots[r] * DL_KVC + i] = qkv[r * DL_QKV + DL_Q + DL_KVC + i];
      }
    bsr_paged_attention(BSR_DTYPE_F32, qk, DL_Q + DL_KVC, DL_D, kc[l], vc[l], DL_KVC, DL_KVC, DL_NB, DL_BS, DL_KV,
                        DL_H, DL_D, tables, 2, cu, lens, 2, 0, c->scale, at, DL_Q, DL_D);
    bsr_linear(BSR_DTYPE_F32, at, DL_Q, DL_T, DL_Q, w[l][3], DL_d, NULL, sub, DL_d);
    bsr_rms_norm(BSR_DTYPE_F32, h, DL_d, sub, DL_d, DL_T, DL_d, w[l][5], c->eps, h, DL_d, x, DL_d);
    bsr_linear(BSR_DTYPE_F32, x, DL_d, DL_T, DL_d, w[l][6], 2 * DL_I, NULL, gu, 2 * DL_I);
    bsr_silu_mul(BSR_DTYPE_F32, gu, 2 * DL_I, DL_T, DL_I, act, DL_I);
    bsr_linear(BSR_DTYPE_F32, act, DL_I, DL_T, DL_I, w[l][8], DL_d, w[l][9], sub, DL_d);
    for (i = 0; i < DL_T * DL_d; ++i) h[i] += sub[i];
  }
}

static void test_decoder_layers(void) {
  static float w[DL_L][10][DL_QKV * DL_d], kc[3][DL_L][DL_NB * DL_BS * DL_KVC], vc[3][DL_L][DL_NB * DL_BS * DL_KVC];
  float h[3][DL_T * DL_d], cs[DL_T * DL_D / 2], sn[DL_T * DL_D / 2];
  const bsr_decoder_config c = {DL_d, DL_H, DL_KV, DL_D, DL_I, 1e-6f, 0, 0.5f};
  /* sequence 0: 3 cached keys (blocks 4, 1) + its decode row at position 3; sequence 1: rows 0-1 in block 2 */
  const int32_t tables[4] = {4, 1, 2, 0}, cu[3] = {0, 1, 3}, lens[2] = {4, 2};
  const int64_t slots[DL_T] = {1 * DL_BS + 1, 2 * DL_BS, 2 * DL_BS + 1};
  const int64_t pos[DL_T] = {3, 0, 1};
  bsr_layer_weights lw[DL_L], lw8[DL_L];
  const bsr_layer_scales no_scales[DL_L] = {{NULL, NULL, NULL, NULL}, {NULL, NULL, NULL, NULL}};
  int l, k, i;
  for (l = 0; l < DL_L; ++l) {
    for (k = 0; k < 10; ++k)
      for (i = 0; i < DL_QKV * DL_d; ++i) w[l][k][i] = (float)((k == 0 || k == 5 ? 1.0 : 0.0) + 0.4 * urand());
    for (i = 0; i < DL_NB * DL_BS * DL_KVC; ++i) kc[0][l][i] = kc[1][l][i] = kc[2][l][i] = (float)urand();
    for (i = 0; i < DL_NB * DL_BS * DL_KVC; ++i) vc[0][l][i] = vc[1][l][i] = vc[2][l][i] = (float)urand();
    lw[l].input_norm = w[l][0], lw[l].qkv_weight = w[l][1], lw[l].qkv_bias = w[l][2], lw[l].o_weight = w[l][3];
    lw[l].o_bias = NULL, lw[l].post_norm = w[l][5], lw[l].gate_up_weight = w[l][6], lw[l].gate_up_bias = NULL;
    lw[l].down_weight = w[l][8], lw[l].down_bias = w[l][9], lw[l].k_cache = kc[0][l], lw[l].v_cache = vc[0][l];
    lw8[l] = lw[l], lw8[l].k_cache = kc[2][l], lw8[l].v_cache = vc[2][l];
  }
  for (i = 0; i < DL_T * DL_d; ++i) h[0][i] = h[1][i] = h[2][i] = (float)urand();
  for (k = 0; k < DL_T; ++k)
    for (i = 0; i < DL_D / 2; ++i) {
      cs[k * DL_D / 2 + i] = (float)cos(pos[k] * (i + 1) * 0.5);
      sn[k * DL_D / 2 + i] = (float)sin(pos[k] * (i + 1) * 0.5);
    }
  CHECK(bsr_decoder_layers(BSR_DTYPE_F32, &c, lw, DL_L, h[0], DL_T, cs, sn, DL_D / 2, slots, DL_NB, DL_BS, tables, 2,
                           cu, lens, 2) == BSR_OK, "decoder_layers: %s", bsr_last_error());
  decoder_by_entry_points(&c, w, h[1], kc[1], vc[1], cs, sn, slots, tables, cu, lens);
  CHECK(memcmp(h[0], h[1], sizeof(h[0])) == 0, "decoder_layers: hidden differs from the entry points one by one");
  CHECK(memcmp(kc[0], kc[1], sizeof(kc[0])) == 0 && memcmp(vc[0], vc[1], sizeof(vc[0])) == 0,
        "decoder_layers: caches differ from the entry points one by one");
  /* the int8 entry point with every scale NULL (f32 weights) is the same stack; scales NULL is an error */
  CHECK(bsr_decoder_layers_w8(&c, lw8, no_scales, DL_L, h[2], DL_T, cs, sn, DL_D / 2, slots, DL_NB, DL_BS, tables, 2,
                              cu, lens, 2) == BSR_OK, "decoder_layers_w8: %s", bsr_last_error());
  CHECK(memcmp(h[0], h[2], sizeof(h[0])) == 0 && memcmp(kc[0], kc[2], sizeof(kc[0])) == 0,
        "decoder_layers_w8 without int8 weights differs from decoder_layers");
  CHECK(bsr_decoder_layers_w8(&c, lw8, NULL, DL_L, h[2], DL_T, cs, sn, DL_D / 2, slots, DL_NB, DL_BS, tables, 2, cu,
                              lens, 2) == BSR_ERR_NULL_POINTER && strstr(bsr_last_error(), "scales") != NULL,
        "decoder_layers_w8 NULL scales: '%s'", bsr_last_error());
  {
    const int64_t bad_slots[DL_T] = {0, 1, DL_NB * DL_BS};
    CHECK(bsr_decoder_layers(BSR_DTYPE_F32, &c, lw, DL_L, h[0], DL_T, cs, sn, DL_D / 2, bad_slots, DL_NB, DL_BS,
                             tables, 2, cu, lens, 2) == BSR_ERR_INVALID_ARGUMENT &&
              strstr(bsr_last_error(), "slots[2]") != NULL, "decoder_layers bad slot: '%s'", bsr_last_error());
    lw[1].down_weight = NULL;
    CHECK(bsr_decoder_layers(BSR_DTYPE_F32, &c, lw, DL_L, h[0], DL_T, cs, sn, DL_D / 2, slots, DL_NB, DL_BS, tables,
                             2, cu, lens, 2) == BSR_ERR_NULL_POINTER && strstr(bsr_last_error(), "layers[1]") != NULL,
          "decoder_layers NULL weight: '%s'", bsr_last_error());
    CHECK(bsr_decoder_layers(BSR_DTYPE_F64, &c, lw, DL_L, h[0], DL_T, cs, sn, DL_D / 2, slots, DL_NB, DL_BS, tables,
                             2, cu, lens, 2) == BSR_ERR_UNSUPPORTED_DTYPE, "decoder_layers f64");
  }
}

/* ---- dense linear ------------------------------------------------------------------------ */
/* y = x W^T (+ b) against a double reference on the stored (rounded) inputs; the padding
 * beyond out_features must stay untouched. */
static void run_linear(bsr_dtype dt, int M, int K, int N, int bias, int xpad, int ypad) {
  const size_t es = dtype_size(dt);
  const int ldx = K + xpad, ldy = N + ypad;
  void* x = calloc((size_t)M * ldx + 1, es);
  void* w = calloc((size_t)N * K + 1, es);
  void* b = calloc((size_t)N + 1, es);
  void* y = calloc((size_t)M * ldy + 1, es);
  double* xd = (double*)calloc((size_t)M * K + 1, sizeof(double));
  double* wd = (double*)calloc((size_t)N * K + 1, sizeof(double));
  double* bd = (double*)calloc((size_t)N + 1, sizeof(double));
  double maxref = 1.0, maxerr = 0.0;
  int m, n, k, bad_pad = 0;
  bsr_status st;
  for (m = 0; m < M; ++m)
    for (k = 0; k < K; ++k) xd[(size_t)m * K + k] = put(dt, x, (size_t)m * ldx + k, urand());
  for (n = 0; n < N * K; ++n) wd[n] = put(dt, w, (size_t)n, urand());
  for (n = 0; n < N; ++n) bd[n] = bias ? put(dt, b, (size_t)n, urand()) : 0.0;
  for (m = 0; m < M; ++m)
    for (n = N; n < ldy; ++n) put(dt, y, (size_t)m * ldy + n, 7.0);
  st = bsr_linear(dt, x, ldx, M, K, w, N, bias ? b : NULL, y, ldy);
  CHECK(st == BSR_OK, "linear %s status %d: %s", dtype_name(dt), st, bsr_last_error());
  for (m = 0; m < M; ++m) {
    for (n = 0; n < N; ++n) {
      double r = bd[n], e;
      for (k = 0; k < K; ++k) r += xd[(size_t)m * K + k] * wd[(size_t)n * K + k];
      e = fabs(get(dt, y, (size_t)m * ldy + n) - r);
      if (fabs(r) > maxref) maxref = fabs(r);
      if (!(e <= maxerr)) maxerr = e;
    }
    for (n = N; n < ldy; ++n) bad_pad += get(dt, y, (size_t)m * ldy + n) != 7.0;
  }
  CHECK(maxerr / maxref <= tolerance(dt), "linear %s M=%d K=%d N=%d bias=%d: max rel err %.3g > %.3g",
        dtype_name(dt), M, K, N, bias, maxerr / maxref, tolerance(dt));
  CHECK(bad_pad == 0, "linear %s M=%d: %d padding entries written", dtype_name(dt), M, bad_pad);
  free(x);
  free(w);
  free(b);
  free(y);
  free(xd);
  free(wd);
  free(bd);
}

static void test_linear(void) {
  static const bsr_dtype dts[4] = {BSR_DTYPE_F32, BSR_DTYPE_F16, BSR_DTYPE_BF16, BSR_DTYPE_F64};
  /* M, K, N: odd tails of every micro-tile, one row, rows in lanes (9-16, fp32 on AVX-512),
     and a call over 128 rows (two passes) */
  static const int shapes[][3] = {{1, 1, 1},      {1, 67, 33},  {3, 16, 4},  {5, 17, 7},
                                  {9, 300, 129}, {16, 67, 49}, {130, 40, 21}};
  float x[4] = {0}, w[4] = {0}, y[4] = {0};
  int d, s, v;
  bsr_status st;
  for (d = 0; d < 4; ++d)
    for (s = 0; s < (int)(sizeof shapes / sizeof shapes[0]); ++s)
      for (v = 0; v < 2; ++v) run_linear(dts[d], shapes[s][0], shapes[s][1], shapes[s][2], v, v ? 3 : 0, v ? 2 : 0);
  st = bsr_linear(BSR_DTYPE_F32, x, 2, 1, 2, NULL, 2, NULL, y, 2);
  CHECK(st == BSR_ERR_NULL_POINTER && strstr(bsr_last_error(), "weight") != NULL, "linear NULL weight: %d %s", st,
        bsr_last_error());
  st = bsr_linear(BSR_DTYPE_F32, x, 1, 1, 2, w, 2, NULL, y, 2);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "x_row_stride") != NULL,
        "linear x_row_stride < in_features: %d %s", st, bsr_last_error());
  st = bsr_linear(BSR_DTYPE_F32, x, 2, -1, 2, w, 2, NULL, y, 2);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "rows") != NULL, "linear rows < 0: %d %s", st,
        bsr_last_error());
  st = bsr_linear((bsr_dtype)9, x, 2, 1, 2, w, 2, NULL, y, 2);
  CHECK(st == BSR_ERR_UNSUPPORTED_DTYPE, "linear bad dtype: %d", st);
  st = bsr_linear(BSR_DTYPE_F32, NULL, 2, 0, 2, NULL, 2, NULL, NULL, 2);
  CHECK(st == BSR_OK, "linear with 0 rows is a no-op: %d %s", st, bsr_last_error());
}

/* Weight-only int8: y = scale[n] * (x . q[n]) + b[n], f32 rows, against a double reference;
 * odd tails, one row, the few-row and the many-row tiles; the padding beyond N untouched. */
static void run_linear_w8(int M, int K, int N, int bias, int xpad, int ypad) {
  const int ldx = K + xpad, ldy = N + ypad;
  float* x = (float*)calloc((size_t)M * ldx + 1, sizeof(float));
  int8_t* q = (int8_t*)calloc((size_t)N * K + 1, 1);
  float* sc = (float*)calloc((size_t)N + 1, sizeof(float));
  float* b = (float*)calloc((size_t)N + 1, sizeof(float));
  float* y = (float*)calloc((size_t)M * ldy + 1, sizeof(float));
  double maxref = 1.0, maxerr = 0.0;
  int m, n, k, bad_pad = 0;
  bsr_status st;
  for (m = 0; m < M; ++m)
    for (k = 0; k < K; ++k) x[(size_t)m * ldx + k] = (float)urand();
  for (n = 0; n < N * K; ++n) q[n] = (int8_t)((int)(urand() * 127.0));
  for (n = 0; n < N; ++n) {
    sc[n] = (float)(0.001 + 0.01 * fabs(urand()));
    b[n] = bias ? (float)urand() : 0.f;
  }
  for (m = 0; m < M; ++m)
    for (n = N; n < ldy; ++n) y[(size_t)m * ldy + n] = 7.f;
  st = bsr_linear_w8(x, ldx, M, K, q, sc, N, bias ? b : NULL, y, ldy);
  CHECK(st == BSR_OK, "linear_w8 status %d: %s", st, bsr_last_error());
  for (m = 0; m < M; ++m) {
    for (n = 0; n < N; ++n) {
      double r = 0.0, e;
      for (k = 0; k < K; ++k) r += (double)x[(size_t)m * ldx + k] * q[(size_t)n * K + k];
      r = r * sc[n] + b[n];
      e = fabs(y[(size_t)m * ldy + n] - r);
      if (fabs(r) > maxref) maxref = fabs(r);
      if (!(e <= maxerr)) maxerr = e;
    }
    for (n = N; n < ldy; ++n) bad_pad += y[(size_t)m * ldy + n] != 7.f;
  }
  CHECK(maxerr / maxref <= tolerance(BSR_DTYPE_F32), "linear_w8 M=%d K=%d N=%d bias=%d: max rel err %.3g", M, K, N,
        bias, maxerr / maxref);
  CHECK(bad_pad == 0, "linear_w8 M=%d: %d padding entries written", M, bad_pad);
  free(x);
  free(q);
  free(sc);
  free(b);
  free(y);
}

static void test_linear_w8(void) {
  static const int shapes[][3] = {{1, 1, 1}, {1, 67, 33}, {5, 17, 7}, {16, 67, 49}, {40, 300, 21}, {130, 40, 21}};
  float x[4] = {0}, s[2] = {1.f, 1.f}, y[4] = {0};
  int8_t w[4] = {0};
  int i, v;
  bsr_status st;
  for (i = 0; i < (int)(sizeof shapes / sizeof shapes[0]); ++i)
    for (v = 0; v < 2; ++v) run_linear_w8(shapes[i][0], shapes[i][1], shapes[i][2], v, v ? 3 : 0, v ? 2 : 0);
  st = bsr_linear_w8(x, 2, 1, 2, w, NULL, 2, NULL, y, 2);
  CHECK(st == BSR_ERR_NULL_POINTER && strstr(bsr_last_error(), "scale") != NULL, "linear_w8 NULL scale: %d %s", st,
        bsr_last_error());
  st = bsr_linear_w8(x, 1, 1, 2, w, s, 2, NULL, y, 2);
  CHECK(st == BSR_ERR_INVALID_ARGUMENT && strstr(bsr_last_error(), "x_row_stride") != NULL,
        "linear_w8 x_row_stride < in_features: %d %s", st, bsr_last_error());
}

int main(void) {
  test_version();
  test_threads();
  test_sort();
  test_kernels();
  test_thread_determinism();
  test_errors();
  test_expand_slices();
  test_paged_attention();
  test_pool();
  test_rowops();
  test_rope();
  test_decoder_layers();
  test_linear();
  test_linear_w8();
  if (g_failures) {
    fprintf(stderr, "test_c_abi: %d of %d checks FAILED\n", g_failures, g_checks);
    return 1;
  }
  printf("test_c_abi: all %d checks passed (bsharedrag %s)\n", g_checks, bsr_version_string());
  return 0;
}
