/* Fused fp32 CPU kernels for a decoder block's small operations (fedsea_shared/cpu_kernels.py).
 *
 * At the one to sixteen rows of a decode step each of these is a few microseconds of
 * arithmetic, while the torch ops they replace cost ~3-8 us each in dispatch alone
 * (RMSNorm alone is seven of them).  Single-threaded on purpose: the calling thread
 * already owns the cores' intra-op pool, and the work per call is too small to split.
 * Strides are in floats; the innermost dimension is always contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x to ~1 ulp (Cephes' expf: x = n ln2 + r, a polynomial in r, times 2^n),
 * written so that the compiler vectorizes it: glibc's expf is a call per element unless
 * built with -ffast-math, which would also reorder our sums. */
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    /* n = round(x / ln2) by the 1.5 * 2^23 trick (floorf would not vectorize) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

static float inv_rms(const float *x, int64_t n, float eps) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; j++) s += x[j] * x[j];
    return 1.0f / sqrtf(s / (float)n + eps);
}

/* out[r] = x[r] / rms(x[r]) * w */
void fs_rms_norm(const float *x, int64_t x_stride, const float *w, float *out, int64_t rows, int64_t n,
                 float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * n;
        float k = inv_rms(xr, n, eps);
#pragma omp simd
        for (int64_t j = 0; j < n; j++) o[j] = (xr[j] * k) * w[j];
    }
}

/* sum[r] = x[r] + delta[r]; out[r] = sum[r] / rms(sum[r]) * w  (the residual add before a norm) */
void fs_add_rms_norm(const float *x, int64_t x_stride, const float *delta, int64_t d_stride, const float *w,
                     float *sum, float *out, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride, *dr = delta + r * d_stride;
        float *s = sum + r * n, *o = out + r * n;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) s[j] = xr[j] + dr[j];
        float k = inv_rms(s, n, eps);
#pragma omp simd
        for (int64_t j = 0; j < n; j++) o[j] = (s[j] * k) * w[j];
    }
}

/* RoPE in place on x [rows, heads, d] (row stride x_stride, heads contiguous): x * cos +
 * roll(x, d/2) * sin, with sin's first half already negated (ModelShard.rotary_tables);
 * cos and sin are [rows, d]. */
void fs_rope(float *x, int64_t x_stride, int64_t heads, int64_t d, const float *cos_t, const float *sin_t,
             int64_t rows) {
    int64_t half = d / 2;
    float tmp[512];
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_t + r * d, *s = sin_t + r * d;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + r * x_stride + h * d;
            memcpy(tmp, v, (size_t)d * sizeof(float));
#pragma omp simd
            for (int64_t i = 0; i < half; i++) v[i] = tmp[i] * c[i] + tmp[i + half] * s[i];
#pragma omp simd
            for (int64_t i = half; i < d; i++) v[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
        }
    }
}

/* out[r] = silu(gate_up[r, :n]) * gate_up[r, n:2n]  (LLaMA's MLP on a fused gate/up product) */
void fs_silu_mul(const float *gate_up, int64_t gu_stride, float *out, int64_t rows, int64_t n) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * gu_stride, *u = g + n;
        float *o = out + r * n;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) o[j] = g[j] / (1.0f + exp_f32(-g[j])) * u[j];
    }
}

/* One new token per row attending over its paged context: q [rows, heads, d] contiguous;
 * the cache is [slots, kv_heads, d] with slot = table[t / block_size] * block_size +
 * t % block_size for context position t; row r reads positions [0, lens[r]) only, so
 * slots it does not own (which may hold anything) are never touched.  out [rows, heads, d].
 * Each kv head's K/V rows are read once for all query heads of its group (at most
 * MAX_GROUP); d is a multiple of 16 (the dot products keep 16 partial sums per head, so
 * they are independent chains of vector FMAs instead of one long serial one). */
#define MAX_GROUP 8
#define LANES 16

static inline float kv_float(float x) { return x; }
static inline float kv_bfloat16(uint16_t x) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)x << 16};
    return c.f;
}

/* scores [group, len] -> softmax over each head's row, in place; that head's output row zeroed */
static void softmax_rows(float *scores, int64_t group, int64_t len, float *og, int64_t d) {
    for (int64_t h = 0; h < group; h++) {
        float *sc = scores + h * len, mx = -INFINITY, total = 0.f;
#pragma omp simd reduction(max : mx)
        for (int64_t t = 0; t < len; t++) mx = sc[t] > mx ? sc[t] : mx;
#pragma omp simd
        for (int64_t t = 0; t < len; t++) sc[t] = exp_f32(sc[t] - mx);
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < len; t++) total += sc[t];
        float inv = 1.0f / total;
#pragma omp simd
        for (int64_t t = 0; t < len; t++) sc[t] *= inv;
        memset(og + h * d, 0, (size_t)d * sizeof(float));
    }
}

/* The kernel over a cache of KV_T, each element widened to float by LOAD as it is read:
 * float32, or bfloat16 (a pool of half the bytes; the arithmetic stays float32). */
#define PAGED_DECODE_ATTENTION(NAME, KV_T, LOAD)                                                           \
    static void NAME##_scores(const float *qg, const KV_T *kt, int64_t group, int64_t d, float scale,      \
                              float *scores, int64_t stride) {                                             \
        float acc[MAX_GROUP][LANES] = {{0}};                                                               \
        for (int64_t i = 0; i < d; i += LANES)                                                             \
            for (int64_t h = 0; h < group; h++)                                                            \
                _Pragma("omp simd") for (int64_t l = 0; l < LANES; l++) acc[h][l] +=                       \
                    qg[h * d + i + l] * LOAD(kt[i + l]);                                                   \
        for (int64_t h = 0; h < group; h++) {                                                              \
            float dot = 0.f;                                                                               \
            for (int64_t l = 0; l < LANES; l++) dot += acc[h][l];                                          \
            scores[h * stride] = dot * scale;                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    int NAME(const float *q, const KV_T *k_cache, const KV_T *v_cache, const int64_t *tables,              \
             int64_t table_width, const int64_t *lens, int64_t rows, int64_t heads, int64_t kv_heads,      \
             int64_t d, int64_t block_size, float scale, float *out) {                                     \
        int64_t group = heads / kv_heads, longest = 0;                                                     \
        if (group > MAX_GROUP || d % LANES) return -2;                                                     \
        for (int64_t r = 0; r < rows; r++) longest = lens[r] > longest ? lens[r] : longest;                \
        float *scores = malloc((size_t)(longest * group) * sizeof(float));                                 \
        if (!scores) return -1;                                                                            \
        int64_t slot_stride = kv_heads * d;                                                                \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            const int64_t *table = tables + r * table_width;                                               \
            int64_t len = lens[r];                                                                         \
            for (int64_t g = 0; g < kv_heads; g++) {                                                       \
                const float *qg = q + (r * heads + g * group) * d;                                         \
                float *og = out + (r * heads + g * group) * d;                                             \
                for (int64_t b = 0; b * block_size < len; b++) {                                           \
                    int64_t first = b * block_size, n = len - first < block_size ? len - first : block_size; \
                    const KV_T *kb = k_cache + table[b] * block_size * slot_stride + g * d;                \
                    for (int64_t t = 0; t < n; t++)                                                        \
                        NAME##_scores(qg, kb + t * slot_stride, group, d, scale, scores + first + t, len); \
                }                                                                                          \
                softmax_rows(scores, group, len, og, d);                                                   \
                for (int64_t b = 0; b * block_size < len; b++) {                                           \
                    int64_t first = b * block_size, n = len - first < block_size ? len - first : block_size; \
                    const KV_T *vb = v_cache + table[b] * block_size * slot_stride + g * d;                \
                    for (int64_t t = 0; t < n; t++)                                                        \
                        for (int64_t h = 0; h < group; h++) {                                              \
                            float p = scores[h * len + first + t], *oh = og + h * d;                       \
                            const KV_T *vt = vb + t * slot_stride;                                         \
                            _Pragma("omp simd") for (int64_t i = 0; i < d; i++) oh[i] += p * LOAD(vt[i]);  \
                        }                                                                                  \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        free(scores);                                                                                      \
        return 0;                                                                                          \
    }

PAGED_DECODE_ATTENTION(fs_paged_decode_attention, float, kv_float)
PAGED_DECODE_ATTENTION(fs_paged_decode_attention_bf16, uint16_t, kv_bfloat16)
