/* What rinna-cli's C kernels share (rinna_cli/native.py builds them into one library). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* max |x| over n floats, compared as integers (a float's magnitude bits order as it does), which vectorizes
 * without -ffast-math */
static inline float absmax(const float *x, int n) {
    uint32_t top = 0;
    for (int k = 0; k < n; k++) {
        uint32_t bits;
        memcpy(&bits, x + k, 4);
        bits &= 0x7fffffffu;
        top = bits > top ? bits : top;
    }
    float amax;
    memcpy(&amax, &top, 4);
    return amax;
}

static inline float from_bf16(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* element i of a float32 or (bf16) bfloat16 array, as a float */
static inline float widen(const void *base, size_t i, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* torch's float to bfloat16: rounded to nearest, ties to even; a NaN stays a NaN */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (bits & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)rounded;
}

/* row i of K values as floats: the row itself, or its bfloat16 values widened into `scratch` */
static inline const float *row_floats(const void *rows, int bf16, size_t i, int K, float *scratch) {
    if (!bf16) return (const float *)rows + i * (size_t)K;
    const uint16_t *row = (const uint16_t *)rows + i * (size_t)K;
    for (int k = 0; k < K; k++) scratch[k] = from_bf16(row[k]);
    return scratch;
}

/* Whether the kernel's float sums are its outputs as they are: float32 out, no bias (else finish() makes them). */
static inline int direct(int out_bf16, const void *bias) { return !out_bf16 && !bias; }

/* outputs n0..n1-1 of row i (of N) from their float values v[0..n1-n0-1], where they are not direct(): in the
 * output's dtype, plus the bias in that dtype, each step rounded as torch rounds y.to(dtype) + bias, so that the
 * kernels give the bits of torch's kernels finished by rinna_cli.int8.QuantLinear */
static inline void finish(const float *v, void *out, int bf16, const void *bias, size_t i, int N, int n0, int n1) {
    const int n = n1 - n0;
    if (bf16) {
        uint16_t *o = (uint16_t *)out + i * (size_t)N + n0;
        const uint16_t *b = bias ? (const uint16_t *)bias + n0 : NULL;
        if (b)
            for (int k = 0; k < n; k++) o[k] = to_bf16(from_bf16(to_bf16(v[k])) + from_bf16(b[k]));
        else
            for (int k = 0; k < n; k++) o[k] = to_bf16(v[k]);
    } else {
        float *o = (float *)out + i * (size_t)N + n0;
        const float *b = (const float *)bias + n0;
        for (int k = 0; k < n; k++) o[k] = v[k] + b[k];
    }
}
