/* The attention half of a GPT-NeoX layer's decode step for one sequence, in one call from Python:
 *   qkv = x W_qkv + b (int8dot or int4dot), the rotary on each head's query and key, the key and value written
 *   into the KV cache at token T, attend over T + 1 tokens, then out = context W_dense + b + residual.
 * rinna_cli.attention.DecodeLayer ran these as a dozen torch operations and three kernel calls, about 80 us a layer
 * of Python and dispatch around 0.4 ms of kernels. Every step is the operation torch runs there, on the same values
 * in the same order, each result rounded to the activation dtype as torch stores it, so the bits are the same.
 */
#include <stdint.h>
#include <stdlib.h>

#include "native.h"

int rinna_int8dot(const void *rows, int rows_bf16, const int8_t *w, const float *scale, const void *bias, void *out,
                  int out_bf16, int M, int N, int K, int threads);
int rinna_int4dot(const void *rows, int rows_bf16, const uint8_t *w, const uint16_t *sz, const void *bias, void *out,
                  int out_bf16, int M, int N, int K, int qg, int threads);
int rinna_attend(const void *q, const void *k, const void *v, void *out, int H, int T, int D, long qs, long khs,
                 long kts, long vhs, long vts, float scale, int bf16, int threads);

/* One row through a quantized linear layer, finished with its bias: int8 weights and float32 scales (group 0) or
 * int4 codes and bfloat16 scales in groups of `group` inputs (rinna_cli/int4.py). */
static int linear(const void *x, int bf16, const void *w, const void *s, int group, const void *bias, void *out, int N,
                  int K, int threads) {
    if (group) return rinna_int4dot(x, bf16, (const uint8_t *)w, (const uint16_t *)s, bias, out, bf16, 1, N, K, group,
                                    threads);
    return rinna_int8dot(x, bf16, (const int8_t *)w, (const float *)s, bias, out, bf16, 1, N, K, threads);
}

/* v as torch stores it in the activation dtype (bfloat16 rounds to nearest even; float32 is as it is) */
static inline float stored(float v, int bf16) { return bf16 ? from_bf16(to_bf16(v)) : v; }

static inline void put(void *base, size_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)base)[i] = to_bf16(v);
    else
        ((float *)base)[i] = v;
}

/* transformers' rotary, as rinna_cli.attention.rotate computes it: x * cos + turned * sin with turned the halves of x
 * swapped, the first negated; each product and the sum an operation of its own (no fused multiply-add) */
#if defined(__clang__)
#define SEPARATE_PRODUCTS __attribute__((noinline))
#else
#define SEPARATE_PRODUCTS __attribute__((optimize("fp-contract=off"), noinline)) /* inlined, the caller's flags rule */
#endif
SEPARATE_PRODUCTS static void rotate(const void *x, const void *cos, const void *sin, void *out, size_t at_out, int S,
                                     int bf16) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    const int half = S / 2; /* the halves apart and each dtype on its own: loops the compiler vectorizes */
    if (bf16) {
        const uint16_t *v = x, *c = cos, *s = sin;
        uint16_t *o = (uint16_t *)out + at_out;
        for (int d = 0; d < half; d++)
            o[d] = to_bf16(stored(from_bf16(v[d]) * from_bf16(c[d]), 1) +
                           stored(-from_bf16(v[d + half]) * from_bf16(s[d]), 1));
        for (int d = half; d < S; d++)
            o[d] = to_bf16(stored(from_bf16(v[d]) * from_bf16(c[d]), 1) +
                           stored(from_bf16(v[d - half]) * from_bf16(s[d]), 1));
    } else {
        const float *v = x, *c = cos, *s = sin;
        float *o = (float *)out + at_out;
        for (int d = 0; d < half; d++) o[d] = v[d] * c[d] + -v[d + half] * s[d];
        for (int d = half; d < S; d++) o[d] = v[d] * c[d] + v[d - half] * s[d];
    }
}

/* x: the layer-normed row (H * S values); cos, sin: S values for the token's position; keys, values: the cache, head h
 * token t at h * khs + t * kts (values likewise), with room for token T; residual and out: H * S values. Everything
 * in float32 or (bf16) bfloat16. 0 on success, 1 if memory ran out, 2 if a kernel refused its shapes. */
int rinna_decode_attention(const void *x, int bf16, const void *qkv_w, const void *qkv_s, int qkv_group,
                           const void *qkv_bias, const void *cos, const void *sin, void *keys, void *values, long khs,
                           long kts, long vhs, long vts, int T, const void *dense_w, const void *dense_s,
                           int dense_group, const void *dense_bias, const void *residual, void *out, int H, int S,
                           float scale, int threads) {
    const size_t width = (size_t)H * S, bytes = bf16 ? 2 : 4;
    char *scratch = malloc(bytes * width * 5);
    if (!scratch) return 1;
    void *qkv = scratch, *query = scratch + bytes * width * 3, *context = scratch + bytes * width * 4;
    int failed = linear(x, bf16, qkv_w, qkv_s, qkv_group, qkv_bias, qkv, (int)(3 * width), (int)width, threads);
    for (int h = 0; !failed && h < H; h++) { /* head h's query, key and value lie side by side in qkv */
        const char *head = (const char *)qkv + bytes * (size_t)h * 3 * S;
        rotate(head, cos, sin, query, (size_t)h * S, S, bf16);
        rotate(head + bytes * S, cos, sin, keys, (size_t)h * khs + (size_t)T * kts, S, bf16);
        memcpy((char *)values + bytes * ((size_t)h * vhs + (size_t)T * vts), head + bytes * 2 * S, bytes * S);
    }
    if (!failed) failed = rinna_attend(query, keys, values, context, H, T + 1, S, S, khs, kts, vhs, vts, scale, bf16,
                                       threads);
    if (!failed) failed = linear(context, bf16, dense_w, dense_s, dense_group, dense_bias, qkv, (int)width, (int)width,
                                 threads);
    for (size_t k = 0; !failed && k < width; k++) /* torch's `dense(context) + hidden` */
        put(out, k, widen(qkv, k, bf16) + widen(residual, k, bf16), bf16);
    free(scratch);
    return failed;
}
